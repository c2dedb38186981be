//! Unpacking one layer tarball into its own directory, an overlayfs lower layer: OCI
//! whiteouts become overlay whiteouts (`.wh.NAME` -> character device 0:0 `NAME`,
//! `.wh..wh..opq` -> `trusted.overlay.opaque=y` on the directory). The uncompressed stream is
//! hashed on the way so the layer is checked against the image config's diff ID.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{mknod, Mode, SFlag};
use sha2::{Digest, Sha256};

/// A layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Reading the archive or writing the tree failed.
    #[error("unpacking layer into {dest}: {source}")]
    Io {
        /// The layer directory.
        dest: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The layer is compressed in a way we do not read.
    #[error("unsupported layer media type {0}")]
    MediaType(String),
    /// The uncompressed content does not hash to the config's diff ID.
    #[error("layer diff ID mismatch: expected {expected}, got {actual}")]
    DiffId {
        /// From the image config.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// An entry's path leaves the layer directory.
    #[error("layer entry {0:?} escapes the layer")]
    Escape(PathBuf),
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layer blob at `blob` (of OCI/Docker `media_type`) into the empty directory
/// `dest` and checks the uncompressed content against `diff_id` (`sha256:...`).
pub fn unpack_layer(
    blob: &Path,
    media_type: &str,
    dest: &Path,
    diff_id: &str,
) -> Result<(), UnpackError> {
    let io_err = |source| UnpackError::Io {
        dest: dest.to_path_buf(),
        source,
    };
    let file = BufReader::new(File::open(blob).map_err(io_err)?);
    let decompressed: Box<dyn Read> =
        if media_type.ends_with("gzip") || media_type.ends_with("+gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
            Box::new(file)
        } else {
            return Err(UnpackError::MediaType(media_type.to_string()));
        };
    let mut reader = HashingReader {
        inner: decompressed,
        hasher: Sha256::new(),
    };
    unpack_tar(&mut reader, dest)?;
    // Hash any padding the tar reader did not consume.
    io::copy(&mut reader, &mut io::sink()).map_err(io_err)?;
    let actual = format!("sha256:{:x}", reader.hasher.finalize());
    if actual != diff_id {
        return Err(UnpackError::DiffId {
            expected: diff_id.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Unpacks a tar stream into `dest`, translating whiteouts.
pub fn unpack_tar(reader: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let io_err = |source| UnpackError::Io {
        dest: dest.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let path = entry.path().map_err(io_err)?.into_owned();
        let rel = clean(&path).ok_or_else(|| UnpackError::Escape(path.clone()))?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            fs::create_dir_all(&parent).map_err(io_err)?;
            xattr::set(&parent, "trusted.overlay.opaque", b"y").map_err(io_err)?;
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            fs::create_dir_all(&parent).map_err(io_err)?;
            let target = parent.join(hidden);
            remove_any(&target).map_err(io_err)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| io_err(e.into()))?;
        } else {
            entry.unpack_in(dest).map_err(io_err)?;
        }
    }
    Ok(())
}

/// The entry path relative to the layer root, or `None` if it climbs out.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;

    fn tarball(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts_and_files_land() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tarball(&[
            ("etc/", None),
            ("etc/motd", Some(b"hi")),
            ("etc/.wh.old", Some(b"")),
            ("var/.wh..wh..opq", Some(b"")),
        ]);
        unpack_tar(&tar[..], dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("etc/motd")).unwrap(), b"hi");
        let wh = fs::symlink_metadata(dir.path().join("etc/old")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(
            xattr::get(dir.path().join("var"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
    }

    #[test]
    fn gzip_layer_is_checked_against_its_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tarball(&[("a", Some(b"x"))]);
        let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
        let blob = dir.path().join("blob");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&blob).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap();
        let media = "application/vnd.oci.image.layer.v1.tar+gzip";
        let good = dir.path().join("good");
        fs::create_dir(&good).unwrap();
        unpack_layer(&blob, media, &good, &diff_id).unwrap();
        assert_eq!(fs::read(good.join("a")).unwrap(), b"x");
        let bad = dir.path().join("bad");
        fs::create_dir(&bad).unwrap();
        let err = unpack_layer(&blob, media, &bad, "sha256:00").unwrap_err();
        assert!(matches!(err, UnpackError::DiffId { .. }), "{err}");
        let err = unpack_layer(
            &blob,
            "application/vnd.oci.image.layer.v1.tar+zstd",
            &bad,
            &diff_id,
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::MediaType(_)));
    }

    #[test]
    fn parent_dir_entries_are_rejected() {
        assert_eq!(clean(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("/a")), Some(PathBuf::from("a")));
        assert_eq!(clean(Path::new("a/../../x")), None);
    }
}
