//! Filesystems on volumes: which one an image or device holds and how big it is (read from
//! the superblock, no tool needed), and the external tools this driver runs: mkfs.ext4 /
//! mkfs.xfs to format, xfs_growfs (online) and e2fsck + resize2fs (offline; online where
//! the kernel allows) to grow.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The filesystems volumes can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4 (also what an ext2/ext3 superblock is mounted as).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// The default when neither the parameters nor the capability name one.
    pub const DEFAULT: Self = Self::Ext4;

    /// Parses a CSI `fs_type` / `fsType` value; empty is `None`.
    pub fn parse(name: &str) -> Result<Option<Self>, FsToolError> {
        match name.to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "ext4" => Ok(Some(Self::Ext4)),
            "xfs" => Ok(Some(Self::Xfs)),
            _ => Err(FsToolError::UnsupportedFs {
                name: name.to_string(),
            }),
        }
    }

    /// The name mount(2) takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }

    /// The smallest volume this driver formats with it (mkfs.xfs refuses below 300 MiB).
    pub fn min_size(self) -> u64 {
        match self {
            Self::Ext4 => 16 << 20,
            Self::Xfs => 300 << 20,
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a superblock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsInfo {
    /// The filesystem.
    pub fs_type: FsType,
    /// Its size in bytes (blocks x block size).
    pub size: u64,
}

/// A filesystem tool or probe failed.
#[derive(Debug, thiserror::Error)]
pub enum FsToolError {
    /// A filesystem this driver does not format.
    #[error("unsupported filesystem {name:?}: nodekit-csi formats ext4 and xfs")]
    UnsupportedFs {
        /// The name asked for.
        name: String,
    },
    /// The tool is not installed.
    #[error("{tool} not found: install {package} (apt-get install {package})")]
    Missing {
        /// The executable.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The tool ran and failed.
    #[error("{tool} {target} failed ({status}): {stderr}")]
    Failed {
        /// The executable.
        tool: &'static str,
        /// What it ran on.
        target: PathBuf,
        /// Its exit status.
        status: String,
        /// Its diagnostics, trimmed.
        stderr: String,
    },
    /// Growing a mounted ext4 needs CAP_SYS_RESOURCE, which this process lacks.
    #[error("growing mounted ext4 on {target} needs CAP_SYS_RESOURCE, which nodekit-csi lacks; the filesystem grows offline at the next NodeStageVolume")]
    OnlineResizeDenied {
        /// The device.
        target: PathBuf,
    },
    /// The tool could not be started.
    #[error("running {tool}")]
    Spawn {
        /// The executable.
        tool: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The superblock could not be read.
    #[error("reading the superblock of {path}")]
    Probe {
        /// The image or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Reads the superblock at `path` (an image file or a device): `None` when it holds neither
/// ext4 nor xfs.
pub fn probe(path: &Path) -> Result<Option<FsInfo>, FsToolError> {
    let err = |source| FsToolError::Probe {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut head = [0u8; 2048];
    let mut filled = 0;
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(err)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(parse_superblock(&head[..filled]))
}

fn parse_superblock(head: &[u8]) -> Option<FsInfo> {
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(0..4) == Some(b"XFSB") {
        let block = u64::from(be32(4)?);
        let blocks = head
            .get(8..16)
            .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))?;
        return Some(FsInfo {
            fs_type: FsType::Xfs,
            size: blocks.checked_mul(block)?,
        });
    }
    const EXT: usize = 1024;
    if head.get(EXT + 0x38..EXT + 0x3A) == Some(&[0x53, 0xEF]) {
        let log = le32(EXT + 0x18)?;
        let block = 1024u64.checked_shl(log)?;
        let lo = u64::from(le32(EXT + 0x04)?);
        let incompat_64bit = le32(EXT + 0x60)? & 0x80 != 0;
        let hi = if incompat_64bit {
            u64::from(le32(EXT + 0x150).unwrap_or(0))
        } else {
            0
        };
        return Some(FsInfo {
            fs_type: FsType::Ext4,
            size: ((hi << 32) | lo).checked_mul(block)?,
        });
    }
    None
}

/// Runs a tool with a C locale, mapping "not installed" and failures to errors.
fn run(
    tool: &'static str,
    package: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<std::process::Output, FsToolError> {
    let output = Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .env("PATH", tool_path())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => FsToolError::Missing { tool, package },
            _ => FsToolError::Spawn { tool, source },
        })?;
    Ok(output)
}

/// PATH for the tools: the caller's plus the sbin directories Debian installs them in.
fn tool_path() -> String {
    let inherited = std::env::var("PATH").unwrap_or_default();
    format!("{inherited}:/usr/local/sbin:/usr/sbin:/sbin")
}

fn failed(tool: &'static str, target: &Path, output: &std::process::Output) -> FsToolError {
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    FsToolError::Failed {
        tool,
        target: target.to_path_buf(),
        status: output.status.to_string(),
        stderr,
    }
}

/// What formats and grows filesystems; a narrow trait so the staging logic can be tested
/// without the tools.
pub trait FsTools: Send + Sync {
    /// Formats `target` (an image or a device) with `fs_type`.
    fn mkfs(&self, fs_type: FsType, target: &Path) -> Result<(), FsToolError>;
    /// Grows the unmounted ext4 on `device` to the device's size (e2fsck first, as
    /// resize2fs requires).
    fn grow_ext4_offline(&self, device: &Path) -> Result<(), FsToolError>;
    /// Grows the ext4 on `device`, mounted, to the device's size.
    fn grow_ext4_online(&self, device: &Path) -> Result<(), FsToolError>;
    /// Grows the xfs mounted at `mount_point` to its device's size.
    fn grow_xfs(&self, mount_point: &Path) -> Result<(), FsToolError>;
    /// Reads the superblock on `path`.
    fn probe(&self, path: &Path) -> Result<Option<FsInfo>, FsToolError> {
        probe(path)
    }
}

/// The Debian tools (e2fsprogs, xfsprogs).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemFsTools;

impl FsTools for SystemFsTools {
    fn mkfs(&self, fs_type: FsType, target: &Path) -> Result<(), FsToolError> {
        let t = target.as_os_str();
        let (tool, package, args): (_, _, Vec<&std::ffi::OsStr>) = match fs_type {
            FsType::Ext4 => (
                "mkfs.ext4",
                "e2fsprogs",
                vec![
                    "-F".as_ref(),
                    "-q".as_ref(),
                    "-E".as_ref(),
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    t,
                ],
            ),
            FsType::Xfs => (
                "mkfs.xfs",
                "xfsprogs",
                vec!["-f".as_ref(), "-q".as_ref(), "-K".as_ref(), t],
            ),
        };
        let out = run(tool, package, &args)?;
        if !out.status.success() {
            return Err(failed(tool, target, &out));
        }
        Ok(())
    }

    fn grow_ext4_offline(&self, device: &Path) -> Result<(), FsToolError> {
        let d = device.as_os_str();
        let fsck = run("e2fsck", "e2fsprogs", &["-f".as_ref(), "-p".as_ref(), d])?;
        // 0: clean, 1: errors corrected; anything else needs a human.
        if !matches!(fsck.status.code(), Some(0 | 1)) {
            return Err(failed("e2fsck", device, &fsck));
        }
        let out = run("resize2fs", "e2fsprogs", &[d])?;
        if !out.status.success() {
            return Err(failed("resize2fs", device, &out));
        }
        Ok(())
    }

    fn grow_ext4_online(&self, device: &Path) -> Result<(), FsToolError> {
        let out = run("resize2fs", "e2fsprogs", &[device.as_os_str()])?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr);
        if text.contains("Permission denied to resize filesystem")
            || text.contains("Operation not permitted")
        {
            return Err(FsToolError::OnlineResizeDenied {
                target: device.to_path_buf(),
            });
        }
        Err(failed("resize2fs", device, &out))
    }

    fn grow_xfs(&self, mount_point: &Path) -> Result<(), FsToolError> {
        let out = run(
            "xfs_growfs",
            "xfsprogs",
            &["-d".as_ref(), mount_point.as_os_str()],
        )?;
        if !out.status.success() {
            return Err(failed("xfs_growfs", mount_point, &out));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_names_parse_case_insensitively_and_others_are_refused() {
        assert_eq!(FsType::parse("").expect("empty"), None);
        assert_eq!(FsType::parse("XFS").expect("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("ext4").expect("ext4"), Some(FsType::Ext4));
        assert!(matches!(
            FsType::parse("btrfs"),
            Err(FsToolError::UnsupportedFs { .. })
        ));
    }

    #[test]
    fn superblocks_give_type_and_size() {
        let mut xfs = vec![0u8; 2048];
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[4..8].copy_from_slice(&4096u32.to_be_bytes());
        xfs[8..16].copy_from_slice(&76800u64.to_be_bytes());
        assert_eq!(
            parse_superblock(&xfs),
            Some(FsInfo {
                fs_type: FsType::Xfs,
                size: 300 << 20
            })
        );
        let mut ext = vec![0u8; 2048];
        ext[1024 + 0x38..1024 + 0x3A].copy_from_slice(&[0x53, 0xEF]);
        ext[1024 + 0x18..1024 + 0x1C].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB
        ext[1024 + 0x04..1024 + 0x08].copy_from_slice(&16384u32.to_le_bytes());
        assert_eq!(
            parse_superblock(&ext),
            Some(FsInfo {
                fs_type: FsType::Ext4,
                size: 64 << 20
            })
        );
        assert_eq!(parse_superblock(&[0u8; 2048]), None);
        assert_eq!(parse_superblock(&[0u8; 10]), None);
    }

    #[test]
    fn probe_reads_what_mkfs_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("v.img");
        let f = File::create(&img).expect("create");
        f.set_len(64 << 20).expect("truncate");
        assert_eq!(probe(&img).expect("probe blank"), None);
        match SystemFsTools.mkfs(FsType::Ext4, &img) {
            Err(FsToolError::Missing { .. }) => {
                panic!("mkfs.ext4 missing: apt-get install e2fsprogs")
            }
            other => other.expect("mkfs.ext4"),
        }
        let info = probe(&img).expect("probe").expect("ext4 found");
        assert_eq!(info.fs_type, FsType::Ext4);
        assert_eq!(info.size, 64 << 20);
    }
}
