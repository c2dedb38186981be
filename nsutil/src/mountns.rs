//! Children that start in a private copy of the mount namespace with some mounts hidden: how
//! crun (which refuses cgroup v1 hosts that also mount cgroup2, "hybrid") is made to see a
//! plain v1 host without touching the host's mounts.
//!
//! Unmounting propagates to the peers of the *parent* mount, so the parent of each hidden
//! mount is first made a slave in the copy (it still receives the host's mount events but
//! sends none); every other mount keeps its propagation, so a container's Bidirectional
//! mounts still reach the host.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// A mount to hide: its mount point and that of its parent mount, as C strings ready for
/// the syscalls made between fork and exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenMount {
    mount_point: CString,
    parent: CString,
}

impl HiddenMount {
    /// Looks `mount_point` up in `/proc/self/mountinfo`; `None` when nothing is mounted there.
    pub fn find(mount_point: &Path) -> io::Result<Option<Self>> {
        Ok(Self::parse(
            &std::fs::read_to_string("/proc/self/mountinfo")?,
            mount_point,
        ))
    }

    /// Finds `mount_point` (its topmost mount) and its parent mount in mountinfo text.
    pub fn parse(mountinfo: &str, mount_point: &Path) -> Option<Self> {
        // (mount ID, parent ID, mount point) per line.
        let mounts: Vec<(&str, &str, &str)> = mountinfo
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                Some((fields.next()?, fields.next()?, fields.nth(2)?))
            })
            .collect();
        let target = mount_point.as_os_str().as_bytes();
        let (_, parent_id, _) = mounts.iter().rev().find(|m| m.2.as_bytes() == target)?;
        let (_, _, parent) = mounts.iter().find(|m| m.0 == *parent_id)?;
        Self::new(mount_point, Path::new(OsStr::from_bytes(parent.as_bytes())))
    }

    /// The mount at `mount_point` sitting on the mount at `parent`, as [`HiddenMount::find`]
    /// found them earlier (another process hands them on instead of looking again); `None`
    /// for a path with a NUL byte.
    pub fn new(mount_point: &Path, parent: &Path) -> Option<Self> {
        Some(Self {
            mount_point: CString::new(mount_point.as_os_str().as_bytes()).ok()?,
            parent: CString::new(parent.as_os_str().as_bytes()).ok()?,
        })
    }

    /// The hidden mount point.
    pub fn mount_point(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.mount_point.as_bytes()))
    }

    /// The mount point of the mount it sits on.
    pub fn parent(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.parent.as_bytes()))
    }
}

/// Makes `cmd`'s child start in a new mount namespace (a copy of the caller's) without the
/// `hidden` mounts; the caller's mounts are never changed. The spawn fails if the caller
/// lacks CAP_SYS_ADMIN. Only for short-lived children: a long-lived namespace copy would pin
/// every mount that existed at its creation on hosts whose mounts are private. With nothing
/// to hide, `cmd` is left as it is (no namespace, no copy of the mount table).
pub fn hide_mounts_in_child(cmd: &mut Command, hidden: &[HiddenMount]) {
    if hidden.is_empty() {
        return;
    }
    let hidden = hidden.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscalls unshare(2), mount(2) and umount2(2) on C strings allocated
    // before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            for h in &hidden {
                if libc::mount(
                    std::ptr::null(),
                    h.parent.as_ptr(),
                    std::ptr::null(),
                    libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
                    || libc::umount2(h.mount_point.as_ptr(), libc::MNT_DETACH) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 27 0:22 / /sys rw,relatime shared:2 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:3 - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:4 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw
";

    #[test]
    fn a_mount_is_found_with_its_parent_mount() {
        let h = HiddenMount::parse(MOUNTINFO, Path::new("/sys/fs/cgroup/unified")).unwrap();
        assert_eq!(h.mount_point(), Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(h.parent(), Path::new("/sys/fs/cgroup"));
        assert_eq!(HiddenMount::parse(MOUNTINFO, Path::new("/nope")), None);
    }

    #[test]
    fn the_child_misses_the_mount_and_the_parent_keeps_it() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (CAP_SYS_ADMIN) for a mount namespace: run the tests as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("m");
        std::fs::create_dir(&mp).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mp,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(mp.join("marker"), b"x").unwrap();
        let hidden = HiddenMount::find(&mp).unwrap().unwrap();
        let mut cmd = Command::new("test");
        cmd.arg("-e").arg(mp.join("marker"));
        hide_mounts_in_child(&mut cmd, &[hidden]);
        let status = cmd.status().unwrap();
        let still_here = mp.join("marker").exists();
        nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(!status.success(), "the child still saw the hidden mount");
        assert!(still_here, "hiding it in the child unmounted it here");
    }
}
