//! Volume image files in the pool: created sparse, grown in place, cloned by reflink
//! (FICLONE) where the pool's filesystem shares extents, else by a sparse-aware copy
//! (SEEK_DATA/SEEK_HOLE + copy_file_range) that keeps holes as holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::Whence;

use crate::sys;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done (`creating`, `growing`...).
        op: &'static str,
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Whether the pool ran out of space.
    pub fn is_no_space(&self) -> bool {
        let Self::Io { source, .. } = self;
        source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT)
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { op, path, source }
}

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// FICLONE: extents shared, copy-on-write.
    Reflink,
    /// A sparse-aware byte copy.
    Copy,
}

/// Creates a sparse image of `size` bytes at `path`, replacing a partial one (not synced:
/// the caller syncs once it has written what it needs, see [`sync`]).
pub fn create_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.set_len(size).map_err(io_err("sizing", path))
}

/// Makes the image's data and size durable.
pub fn sync(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", path))
}

/// Grows the image at `path` to `size` bytes; never shrinks it. Returns the size after.
pub fn grow(path: &Path, size: u64) -> Result<u64, ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    let current = file.metadata().map_err(io_err("inspecting", path))?.len();
    if current >= size {
        return Ok(current);
    }
    file.set_len(size).map_err(io_err("growing", path))?;
    file.sync_all().map_err(io_err("syncing", path))?;
    Ok(size)
}

/// Removes the image; OK when it is already gone.
pub fn remove(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// Copies `src` to a new file `dest` (replacing a partial one), sharing extents when the
/// filesystem can, else copying only the data regions. `dest` is synced before returning.
pub fn clone_image(src: &Path, dest: &Path) -> Result<CloneMethod, ImageError> {
    let input = File::open(src).map_err(io_err("opening", src))?;
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dest)
        .map_err(io_err("creating", dest))?;
    let method = match sys::ficlone(&output, &input) {
        Ok(()) => CloneMethod::Reflink,
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY | Errno::ENOSYS) => {
            sparse_copy(&input, src, &output, dest)?;
            CloneMethod::Copy
        }
        Err(e) => return Err(io_err("cloning into", dest)(io::Error::from(e))),
    };
    output.sync_all().map_err(io_err("syncing", dest))?;
    Ok(method)
}

/// Copies the data regions of `input` into `output` at the same offsets and sets the
/// length, so holes stay holes.
fn sparse_copy(input: &File, src: &Path, output: &File, dest: &Path) -> Result<(), ImageError> {
    let len = input.metadata().map_err(io_err("inspecting", src))?.len();
    let len = i64::try_from(len).map_err(|_| io_err("inspecting", src)(Errno::EFBIG.into()))?;
    output.set_len(0).map_err(io_err("truncating", dest))?;
    let mut offset: i64 = 0;
    while offset < len {
        let data = match nix::unistd::lseek(input, offset, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(io_err("seeking data in", src)(e.into())),
        };
        let hole = nix::unistd::lseek(input, data, Whence::SeekHole)
            .map_err(|e| io_err("seeking a hole in", src)(e.into()))?;
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let chunk = usize::try_from(hole - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = nix::fcntl::copy_file_range(
                input,
                Some(&mut off_in),
                output,
                Some(&mut off_out),
                chunk,
            )
            .map_err(|e| io_err("copying into", dest)(e.into()))?;
            if n == 0 {
                break; // the source shrank under us
            }
        }
        offset = hole;
    }
    output
        .set_len(len.unsigned_abs())
        .map_err(io_err("sizing", dest))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn sparse_images_use_no_blocks_and_only_grow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("a.img");
        create_sparse(&img, 64 << 20).expect("create");
        let meta = std::fs::metadata(&img).expect("meta");
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "allocated {}", meta.blocks());
        assert_eq!(grow(&img, 128 << 20).expect("grow"), 128 << 20);
        assert_eq!(grow(&img, 32 << 20).expect("no shrink"), 128 << 20);
        assert_eq!(std::fs::metadata(&img).expect("meta").len(), 128 << 20);
        remove(&img).expect("remove");
        remove(&img).expect("remove again");
    }

    #[test]
    fn clones_keep_data_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        create_sparse(&src, 32 << 20).expect("create");
        let mut f = OpenOptions::new().write(true).open(&src).expect("open");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(b"hello clone").expect("write");
        f.seek(SeekFrom::Start((32 << 20) - 4)).expect("seek");
        f.write_all(b"tail").expect("write");
        drop(f);
        let dest = dir.path().join("dest.img");
        clone_image(&src, &dest).expect("clone");
        let meta = std::fs::metadata(&dest).expect("meta");
        assert_eq!(meta.len(), 32 << 20);
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "holes kept: {}",
            meta.blocks()
        );
        let mut data = Vec::new();
        File::open(&dest)
            .expect("open")
            .read_to_end(&mut data)
            .expect("read");
        assert_eq!(&data[8 << 20..(8 << 20) + 11], b"hello clone");
        assert_eq!(&data[(32 << 20) - 4..], b"tail");
        assert!(data[..8 << 20].iter().all(|b| *b == 0));
    }

    #[test]
    fn the_copy_fallback_copies_every_data_region() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        create_sparse(&src, 16 << 20).expect("create");
        let mut f = OpenOptions::new().write(true).open(&src).expect("open");
        for (i, at) in [0u64, 5 << 20, 12 << 20].iter().enumerate() {
            f.seek(SeekFrom::Start(*at)).expect("seek");
            f.write_all(&[b'a' + i as u8; 70_000]).expect("write");
        }
        drop(f);
        let dest = dir.path().join("dest.img");
        let input = File::open(&src).expect("open");
        let output = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dest)
            .expect("create");
        sparse_copy(&input, &src, &output, &dest).expect("copy");
        assert_eq!(
            std::fs::read(&src).expect("src"),
            std::fs::read(&dest).expect("dest")
        );
    }
}
