//! `/proc/self/mountinfo`, parsed: what is mounted where, from which device.

use std::path::{Path, PathBuf};

/// Where the kernel lists this process's mounts.
pub const PROC_MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount ID.
    pub id: u32,
    /// The device's major number (`7` for loop devices' filesystems).
    pub major: u32,
    /// The device's minor number.
    pub minor: u32,
    /// The path inside the filesystem that is mounted (`/` for a whole filesystem, the file
    /// for a bind-mounted device node: `/loop3` from devtmpfs).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`).
    pub options: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source (`/dev/loop3`).
    pub source: String,
}

/// mountinfo could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    /// Reading failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line does not have mountinfo's shape.
    #[error("malformed mountinfo line {line:?}")]
    Malformed {
        /// The line.
        line: String,
    },
}

/// Reads and parses `path` (normally [`PROC_MOUNTINFO`]).
pub fn read(path: &Path) -> Result<Vec<MountEntry>, MountInfoError> {
    let text = std::fs::read_to_string(path).map_err(|source| MountInfoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text)
}

/// The topmost mount at `path` in `mounts` (a table as [`read`] returns it), if any.
pub fn topmost_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountInfoError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, MountInfoError> {
    let malformed = || MountInfoError::Malformed {
        line: line.to_string(),
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .ok_or_else(malformed)?;
    if sep < 6 || fields.len() < sep + 3 {
        return Err(malformed());
    }
    let (major, minor) = fields[2].split_once(':').ok_or_else(malformed)?;
    Ok(MountEntry {
        id: fields[0].parse().map_err(|_| malformed())?,
        major: major.parse().map_err(|_| malformed())?,
        minor: minor.parse().map_err(|_| malformed())?,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: fields[5].to_string(),
        fs_type: fields[sep + 1].to_string(),
        source: unescape(fields[sep + 2]),
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(d) = octal {
            let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
98 22 7:3 / /var/lib/kubelet/plugins/staging/pv\\0401 rw,relatime shared:50 - xfs /dev/loop3 rw,attr2
99 22 7:3 / /var/lib/kubelet/pods/p/volumes/v/mount ro,relatime shared:50 - xfs /dev/loop3 rw,attr2
100 22 0:5 /loop4 /var/lib/kubelet/pods/p/volumeDevices/v rw,nosuid master:2 - devtmpfs udev rw,size=4k
";

    #[test]
    fn parses_devices_paths_and_escapes() {
        let mounts = parse(SAMPLE).expect("parse");
        assert_eq!(mounts.len(), 4);
        let staged = &mounts[1];
        assert_eq!((staged.major, staged.minor), (7, 3));
        assert_eq!(
            staged.mount_point,
            Path::new("/var/lib/kubelet/plugins/staging/pv 1")
        );
        assert_eq!(staged.fs_type, "xfs");
        assert_eq!(staged.source, "/dev/loop3");
        assert_eq!(staged.options, "rw,relatime");
        assert_eq!(mounts[2].options, "ro,relatime");
        assert_eq!(mounts[3].root, Path::new("/loop4"));
        assert_eq!(mounts[3].fs_type, "devtmpfs");
    }

    #[test]
    fn optional_fields_may_be_absent_or_many() {
        let none = parse("5 1 0:4 / /x rw - tmpfs tmpfs rw").expect("parse");
        assert_eq!(none[0].fs_type, "tmpfs");
        let many = parse("5 1 0:4 / /x rw shared:1 master:2 - tmpfs t rw").expect("parse");
        assert_eq!(many[0].source, "t");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse("garbage").is_err());
        assert!(parse("1 2 x / /m rw - t s o").is_err());
    }

    #[test]
    fn a_trailing_backslash_is_kept() {
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("a\\13"), "a\\13");
        assert_eq!(unescape("a\\134b"), "a\\b");
    }
}
