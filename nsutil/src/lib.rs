//! Shared OS helpers for nodekit's crates, lab and tests: network namespaces (this module),
//! children in a mount namespace with mounts hidden ([`mountns`]) and crash-safe file
//! replacement ([`durable`]).
//!
//! Every namespace switch happens on a dedicated OS thread that is thrown away afterwards
//! (the pattern of containernetworking/plugins' `ns.Do`), so no caller thread — and never a
//! tokio worker — is left in a foreign namespace. Named namespaces follow iproute2's layout
//! (`/run/netns/NAME`, a bind mount of the nsfs file) so `ip netns` tools can see them.
#![allow(unsafe_code)] // Audited uses: `pre_exec` (setns, mount namespaces) and one ioctl.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

pub mod durable;
pub mod mountns;

/// Where iproute2 and container runtimes keep named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// What went wrong while handling a namespace; every variant names the namespace involved.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// The namespace path could not be opened (it does not exist, or is not a namespace).
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `setns(2)` refused the handle (not a network namespace, or missing privilege).
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace entered.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Creating a named namespace failed at `step`.
    #[error("cannot create network namespace {name} ({step}): {source}")]
    Create {
        /// The name requested.
        name: String,
        /// Which step failed (unshare, mount...).
        step: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The helper thread panicked; the namespace state of the caller is unaffected.
    #[error("namespace worker thread panicked")]
    ThreadPanicked,
}

/// An open handle on a network namespace; holding it keeps the namespace alive.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path` (a `/run/netns/NAME` bind mount or `/proc/PID/ns/net`)
    /// and checks that it really is a network namespace.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NsError::Open {
            path: path.clone(),
            source,
        })?;
        if !is_net_namespace(&file) {
            return Err(NsError::Open {
                path,
                source: io::Error::other("not a network namespace"),
            });
        }
        Ok(Self { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path the namespace was opened from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace, and returns its
    /// result. The calling thread never changes namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, NsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NsError::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    Ok(f())
                })
                .join()
                .map_err(|_| NsError::ThreadPanicked)?
        })
    }

    /// Makes `cmd` run its child inside this namespace (setns between fork and exec), the way
    /// a container runtime executes a CNI plugin inside the node's namespace.
    pub fn apply_to_command(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe; `fd` stays open in the parent for the whole spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The inode identifying the namespace, to compare two handles.
    pub fn inode(&self) -> Result<u64, NsError> {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| m.ino())
            .map_err(|source| NsError::Open {
                path: self.path.clone(),
                source,
            })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn is_net_namespace(file: &File) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    match nix::sys::statfs::fstatfs(file) {
        Ok(stat) => stat.filesystem_type().0 == NSFS_MAGIC,
        Err(_) => false,
    }
}

/// A named namespace this process created; removed (unmounted and unlinked) on drop, so a
/// failing test or lab run leaves nothing behind.
#[derive(Debug)]
pub struct NamedNetNs {
    name: String,
    ns: NetNs,
}

impl NamedNetNs {
    /// Creates `/run/netns/NAME` holding a new, empty network namespace (loopback up).
    pub fn create(name: &str) -> Result<Self, NsError> {
        let err = |step, source| NsError::Create {
            name: name.to_string(),
            step,
            source,
        };
        fs::create_dir_all(NETNS_RUN_DIR).map_err(|e| err("mkdir /run/netns", e))?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err("create mount point", e))?;
        let mounted = std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<()> {
                    unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    mount(
                        Some("/proc/thread-self/ns/net"),
                        &path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(io::Error::from)?;
                    set_loopback_up()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
        });
        if let Err(e) = mounted {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&path);
            return Err(err("unshare and bind mount", e));
        }
        let ns = NetNs::open(&path)?;
        Ok(Self {
            name: name.to_string(),
            ns,
        })
    }

    /// The namespace's name under `/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for NamedNetNs {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl Drop for NamedNetNs {
    fn drop(&mut self) {
        let path = self.ns.path.clone();
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
    }
}

/// Brings `lo` up in the calling thread's namespace with the SIOCSIFFLAGS ioctl, which needs
/// no netlink socket and works before any runtime exists.
fn set_loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A name no other test or lab run on this machine uses right now: `nk-TAG-PID-N`.
/// Names start with `nk-` so leftovers are recognisable as ours.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "nk-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a sysctl (`net/ipv4/ip_forward` style key) inside `ns`; `/proc/sys/net` reflects
/// the namespace of the thread that opens it.
pub fn write_sysctl(ns: &NetNs, key: &str, value: &str) -> Result<io::Result<()>, NsError> {
    let path = Path::new("/proc/sys").join(key);
    ns.run(move || fs::write(path, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_start_with_nk() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert!(a.starts_with("nk-t-"));
    }

    #[test]
    fn open_rejects_a_file_that_is_not_a_namespace() {
        let err = NetNs::open("/proc/self/status").unwrap_err();
        assert!(err.to_string().contains("not a network namespace"), "{err}");
    }

    #[test]
    fn named_namespace_is_created_entered_and_removed() {
        let name = unique_name("nsutil");
        let path = Path::new(NETNS_RUN_DIR).join(&name);
        {
            let ns = NamedNetNs::create(&name).expect("create netns (needs root)");
            let here = NetNs::current().unwrap().inode().unwrap();
            let inner = ns
                .run(|| NetNs::current().unwrap().inode().unwrap())
                .unwrap();
            assert_ne!(
                here, inner,
                "the worker thread must be in the new namespace"
            );
            assert_eq!(ns.inode().unwrap(), inner);
            assert_eq!(NetNs::current().unwrap().inode().unwrap(), here);
            write_sysctl(&ns, "net/ipv4/ip_forward", "1")
                .unwrap()
                .unwrap();
            let fwd = ns
                .run(|| fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
                .unwrap()
                .unwrap();
            assert_eq!(fwd.trim(), "1");
        }
        assert!(!path.exists(), "drop must remove {}", path.display());
    }
}
