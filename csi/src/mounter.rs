//! Mounts through mount(2)/umount2(2): a filesystem from a device, bind mounts (read-only
//! ones by a bind remount), unmounts that treat "not mounted" as done, and the mount table.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::mountinfo::{self, MountEntry, MountInfoError};
use crate::sys;

/// A mount operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// mount(2) failed.
    #[error("mounting {source_path} on {target} ({what})")]
    Mount {
        /// What was being mounted.
        source_path: PathBuf,
        /// Where.
        target: PathBuf,
        /// The kind of mount (`xfs`, `bind`, `read-only remount`).
        what: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// umount2(2) failed.
    #[error("unmounting {target}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The mount table could not be read.
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
    /// A mount flag this driver does not pass through.
    #[error("unsupported mount flag {flag:?}")]
    UnsupportedFlag {
        /// The flag.
        flag: String,
    },
}

/// Mount flags split into mount(2)'s flag bits and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Generic flags (`MS_NOATIME`...).
    pub flags: MsFlags,
    /// Filesystem-specific options, comma-separated (`discard,prjquota`).
    pub data: String,
}

impl MountOptions {
    /// Parses CSI `mount_flags` (each may itself be comma-separated). Flags that would change
    /// what gets mounted (`bind`, `remount`, `move`...) are refused.
    pub fn parse<S: AsRef<str>>(mount_flags: &[S]) -> Result<Self, MountError> {
        let mut flags = MsFlags::empty();
        let mut data: Vec<&str> = Vec::new();
        for flag in mount_flags
            .iter()
            .flat_map(|f| f.as_ref().split(','))
            .map(str::trim)
            .filter(|f| !f.is_empty())
        {
            match flag {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" | "defaults" | "async" | "auto" | "nouser" => {}
                "noatime" => flags |= MsFlags::MS_NOATIME,
                "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
                "relatime" => flags |= MsFlags::MS_RELATIME,
                "strictatime" => flags |= MsFlags::MS_STRICTATIME,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
                "dirsync" => flags |= MsFlags::MS_DIRSYNC,
                "lazytime" => flags |= MsFlags::MS_LAZYTIME,
                "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "slave"
                | "rslave" | "private" | "rprivate" | "unbindable" | "runbindable" => {
                    return Err(MountError::UnsupportedFlag {
                        flag: flag.to_string(),
                    })
                }
                other => data.push(other),
            }
        }
        Ok(Self {
            flags,
            data: data.join(","),
        })
    }

    /// The flags a bind mount of the filesystem carries over (per-mount ones only).
    pub fn per_mount_flags(&self) -> MsFlags {
        self.flags
            & (MsFlags::MS_RDONLY
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
                | MsFlags::MS_STRICTATIME
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NOEXEC)
    }
}

/// What the node needs from the mount table; a narrow trait so the staging logic can be
/// tested without mounting.
pub trait Mounter: Send + Sync {
    /// Mounts the filesystem on `device` at `target`.
    fn mount_fs(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &MountOptions,
    ) -> Result<(), MountError>;
    /// Bind-mounts `source` (a directory or a device node) on `target`, read-only when
    /// `flags` has `MS_RDONLY` (done as a second, remounting call, as the kernel requires).
    fn bind(&self, source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError>;
    /// Unmounts everything stacked at `target`; OK when nothing is mounted there.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// The mount table.
    fn mounts(&self) -> Result<Vec<MountEntry>, MountError>;
    /// The topmost mount at `target`, if any.
    fn mounted_at(&self, target: &Path) -> Result<Option<MountEntry>, MountError> {
        Ok(mountinfo::topmost_at(&self.mounts()?, target).cloned())
    }
}

/// The kernel's mount table, for this process's mount namespace.
#[derive(Debug, Clone)]
pub struct KernelMounter {
    mountinfo: PathBuf,
}

impl Default for KernelMounter {
    fn default() -> Self {
        Self {
            mountinfo: PathBuf::from(mountinfo::PROC_MOUNTINFO),
        }
    }
}

impl Mounter for KernelMounter {
    fn mount_fs(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        let data = (!options.data.is_empty()).then_some(options.data.as_str());
        nix::mount::mount(Some(device), target, Some(fs_type), options.flags, data).map_err(
            |source| MountError::Mount {
                source_path: device.to_path_buf(),
                target: target.to_path_buf(),
                what: fs_type.to_string(),
                source,
            },
        )
    }

    fn bind(&self, source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
        let err = |what: &str| {
            let what = what.to_string();
            move |errno| MountError::Mount {
                source_path: source.to_path_buf(),
                target: target.to_path_buf(),
                what,
                source: errno,
            }
        };
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("bind"))?;
        if flags.is_empty() {
            return Ok(());
        }
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>)
        {
            // Leave nothing half-done: a writable bind where read-only was asked is worse
            // than none.
            let _ = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW);
            return Err(err("bind remount")(e));
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        // Stacked mounts (a retried mount that raced) come off one per call.
        for _ in 0..16 {
            match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => continue,
                Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
                Err(source) => {
                    return Err(MountError::Unmount {
                        target: target.to_path_buf(),
                        source,
                    })
                }
            }
        }
        Err(MountError::Unmount {
            target: target.to_path_buf(),
            source: Errno::EBUSY,
        })
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(mountinfo::read(&self.mountinfo)?)
    }

    /// One statx answers "nothing is mounted here", the common case of every stage and
    /// publish; mountinfo, whose cost grows with the node's mounts, is read only for a
    /// mount root (or where the kernel cannot tell).
    fn mounted_at(&self, target: &Path) -> Result<Option<MountEntry>, MountError> {
        match sys::is_mount_root(target) {
            Ok(Some(false)) | Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
            Ok(Some(true)) | Ok(None) | Err(_) => {
                Ok(mountinfo::topmost_at(&self.mounts()?, target).cloned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_split_into_bits_and_data() {
        let o = MountOptions::parse(&["noatime,nodev", "discard", "ro", ""]).expect("parse");
        assert_eq!(
            o.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, "discard");
        assert_eq!(
            o.per_mount_flags(),
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        let sync = MountOptions::parse(&["sync"]).expect("parse");
        assert!(sync.per_mount_flags().is_empty());
    }

    #[test]
    fn flags_that_change_what_is_mounted_are_refused() {
        for bad in ["bind", "remount", "rshared", "move"] {
            let err = MountOptions::parse(&[bad]).unwrap_err();
            assert!(matches!(err, MountError::UnsupportedFlag { ref flag } if flag == bad));
        }
    }

    /// Needs root (mounts).
    #[test]
    fn mounted_at_finds_mount_roots_only() {
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = KernelMounter::default().unmount(&self.0);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(dir.path()).expect("canonical");
        let (source, target) = (base.join("source"), base.join("target"));
        std::fs::create_dir(&source).expect("mkdir");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::write(source.join("file"), b"x").expect("write");
        let mounter = KernelMounter::default();
        assert_eq!(mounter.mounted_at(&target).expect("statx"), None);
        assert_eq!(
            mounter.mounted_at(&base.join("absent")).expect("statx"),
            None
        );
        mounter
            .bind(&source, &target, MsFlags::empty())
            .expect("bind (needs root)");
        let _guard = Unmount(target.clone());
        assert_eq!(sys::is_mount_root(&target), Ok(Some(true)));
        let entry = mounter.mounted_at(&target).expect("read").expect("mounted");
        assert_eq!(entry.mount_point, target);
        assert_eq!(
            mounter.mounted_at(&target.join("file")).expect("statx"),
            None
        );
        assert_eq!(mounter.mounted_at(&source).expect("statx"), None);
    }
}
