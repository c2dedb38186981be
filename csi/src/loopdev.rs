//! Loop devices through the kernel's ioctls: attach an image file (`LOOP_CTL_GET_FREE` +
//! `LOOP_CONFIGURE`, retried when another attacher wins the same free device), find the
//! devices backed by a file (`/sys/block/loopN/loop/backing_file` of the devices that
//! `/proc/partitions` lists: only those with a size, so one read skips the unbound devices
//! other users leave behind), refresh the capacity after the image grew, detach.
//!
//! Devices are attached without `LO_FLAGS_AUTOCLEAR`: with it, a device used in block mode
//! (only bind-mounted, never opened) would vanish as soon as this process closed its fd, and
//! a restart could not find a staged volume's device. Detaching is explicit (unstage,
//! delete, startup reconcile). `LOOP_CLR_FD` on a device still mounted elsewhere only marks
//! it autoclear, so the kernel finishes the detach at the last unmount.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::sys;

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";
/// Where the kernel lists the block devices that have a size (bound loop devices, not
/// unbound ones).
pub const PROC_PARTITIONS: &str = "/proc/partitions";
/// The loop control device.
pub const LOOP_CONTROL: &str = "/dev/loop-control";

/// How long a detach waits for the kernel to finish it.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// How often an attach retries when other attachers keep taking the free device.
const ATTACH_ATTEMPTS: u32 = 100;

/// A loop device, by number (`/dev/loopN`; its number in state records).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct LoopDevice(pub u32);

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.0))
    }

    /// `loopN`, the name under `/sys/block`.
    pub fn name(&self) -> String {
        format!("loop{}", self.0)
    }

    /// Parses `loopN` (a `/sys/block` entry or a `/dev` basename).
    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.strip_prefix("loop")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok().map(Self)
    }
}

impl std::fmt::Display for LoopDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/dev/loop{}", self.0)
    }
}

/// A loop-device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopDeviceError {
    /// A device or control node could not be opened.
    #[error("opening {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {device}")]
    Ioctl {
        /// The ioctl's name.
        op: &'static str,
        /// The device (or the control node).
        device: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// Other attachers took every free device we were offered.
    #[error(
        "attaching {backing}: no free loop device after {ATTACH_ATTEMPTS} attempts (contention)"
    )]
    Contention {
        /// The image.
        backing: PathBuf,
    },
    /// sysfs or /proc/partitions could not be read.
    #[error("reading {path}")]
    Sysfs {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What the node needs from loop devices; a narrow trait so the staging logic can be tested
/// without a kernel.
pub trait LoopDevices: Send + Sync {
    /// Attaches `backing` (an absolute, canonical path) to a free device, read-write.
    fn attach(&self, backing: &Path) -> Result<LoopDevice, LoopDeviceError>;
    /// Every attached device with its backing file (as the kernel reports it, a
    /// ` (deleted)` suffix stripped; see [`Attached::deleted`]).
    fn list(&self) -> Result<Vec<Attached>, LoopDeviceError>;
    /// Detaches `device`; OK when it is not attached.
    fn detach(&self, device: LoopDevice) -> Result<(), LoopDeviceError>;
    /// Makes `device` pick up its backing file's new size.
    fn refresh_capacity(&self, device: LoopDevice) -> Result<(), LoopDeviceError>;
    /// The device's size in bytes.
    fn size(&self, device: LoopDevice) -> Result<u64, LoopDeviceError>;
    /// What backs `device`, if it is attached. One device's answer: callers that remember
    /// their device check it with this rather than listing every device.
    fn backing(&self, device: LoopDevice) -> Result<Option<Attached>, LoopDeviceError> {
        Ok(self.list()?.into_iter().find(|a| a.device == device))
    }
    /// The devices backed by `backing`, in number order.
    fn find(&self, backing: &Path) -> Result<Vec<LoopDevice>, LoopDeviceError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|a| a.backing == backing && !a.deleted)
            .map(|a| a.device)
            .collect())
    }
}

/// An attached device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The device.
    pub device: LoopDevice,
    /// Its backing file.
    pub backing: PathBuf,
    /// Whether the backing file was deleted while attached.
    pub deleted: bool,
}

/// The kernel's loop devices.
#[derive(Debug)]
pub struct KernelLoopDevices {
    sys_block: PathBuf,
    partitions: PathBuf,
    /// Serialises this process's GET_FREE + CONFIGURE pairs (other processes are handled by
    /// the EBUSY retry).
    attach_lock: Mutex<()>,
}

impl Default for KernelLoopDevices {
    fn default() -> Self {
        Self::new(SYS_BLOCK, PROC_PARTITIONS)
    }
}

impl KernelLoopDevices {
    /// Loop devices as `partitions` (normally [`PROC_PARTITIONS`]) lists them, with their
    /// attributes under `sys_block` (normally [`SYS_BLOCK`]).
    pub fn new(sys_block: impl Into<PathBuf>, partitions: impl Into<PathBuf>) -> Self {
        Self {
            sys_block: sys_block.into(),
            partitions: partitions.into(),
            attach_lock: Mutex::new(()),
        }
    }

    fn open_device(device: LoopDevice) -> Result<File, LoopDeviceError> {
        open_rw(&device.path())
    }

    /// The backing file sysfs reports for `device`, raw (with any ` (deleted)` suffix).
    fn backing_of(&self, device: LoopDevice) -> Result<Option<String>, LoopDeviceError> {
        let path = self
            .sys_block
            .join(device.name())
            .join("loop")
            .join("backing_file");
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // The kernel removed the attribute between our open and read: the device is
            // being detached (ours, or another process's).
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(LoopDeviceError::Sysfs { path, source }),
        }
    }

    fn try_attach(&self, backing: &File) -> Result<Option<LoopDevice>, LoopDeviceError> {
        let control = open_rw(Path::new(LOOP_CONTROL))?;
        let number =
            sys::loop_ctl_get_free(control.as_fd()).map_err(|source| LoopDeviceError::Ioctl {
                op: "LOOP_CTL_GET_FREE",
                device: LOOP_CONTROL.into(),
                source,
            })?;
        let device = LoopDevice(number);
        let dev = match Self::open_device(device) {
            Ok(f) => f,
            // Removed (LOOP_CTL_REMOVE) between GET_FREE and open: ask again.
            Err(LoopDeviceError::Open { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match sys::loop_configure(dev.as_fd(), backing.as_fd()) {
            Ok(()) => Ok(Some(device)),
            // Another attacher configured it first.
            Err(Errno::EBUSY) => Ok(None),
            Err(source) => Err(LoopDeviceError::Ioctl {
                op: "LOOP_CONFIGURE",
                device: device.to_string(),
                source,
            }),
        }
    }
}

impl LoopDevices for KernelLoopDevices {
    fn attach(&self, backing: &Path) -> Result<LoopDevice, LoopDeviceError> {
        let file = open_rw(backing)?;
        let _serial = self
            .attach_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for attempt in 0..ATTACH_ATTEMPTS {
            if let Some(device) = self.try_attach(&file)? {
                return Ok(device);
            }
            std::thread::sleep(Duration::from_millis(u64::from(attempt.min(20))));
        }
        Err(LoopDeviceError::Contention {
            backing: backing.to_path_buf(),
        })
    }

    fn list(&self) -> Result<Vec<Attached>, LoopDeviceError> {
        let table =
            std::fs::read_to_string(&self.partitions).map_err(|source| LoopDeviceError::Sysfs {
                path: self.partitions.clone(),
                source,
            })?;
        let mut out = Vec::new();
        // `major minor #blocks name`: an unbound loop device has no size and no line.
        for device in table
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .filter_map(LoopDevice::from_name)
        {
            out.extend(self.backing(device)?);
        }
        out.sort_by_key(|a| a.device);
        Ok(out)
    }

    fn backing(&self, device: LoopDevice) -> Result<Option<Attached>, LoopDeviceError> {
        Ok(self.backing_of(device)?.map(|raw| {
            let (path, deleted) = match raw.strip_suffix(" (deleted)") {
                Some(p) => (p, true),
                None => (raw.as_str(), false),
            };
            Attached {
                device,
                backing: PathBuf::from(path),
                deleted,
            }
        }))
    }

    fn detach(&self, device: LoopDevice) -> Result<(), LoopDeviceError> {
        let dev = match Self::open_device(device) {
            Ok(f) => f,
            Err(LoopDeviceError::Open { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        match sys::loop_clr_fd(dev.as_fd()) {
            Ok(()) | Err(Errno::ENXIO) => {}
            Err(source) => {
                return Err(LoopDeviceError::Ioctl {
                    op: "LOOP_CLR_FD",
                    device: device.to_string(),
                    source,
                })
            }
        }
        drop(dev);
        // The kernel detaches at the last close (ours, or a short-lived prober's) and may
        // finish in a workqueue; wait so callers see the device gone. A device still
        // mounted somewhere stays attached (autoclear) until unmounted: stop waiting.
        let deadline = Instant::now() + DETACH_WAIT;
        let mut pause = Duration::from_micros(200);
        while self.backing_of(device)?.is_some() && Instant::now() < deadline {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        Ok(())
    }

    fn refresh_capacity(&self, device: LoopDevice) -> Result<(), LoopDeviceError> {
        let dev = Self::open_device(device)?;
        sys::loop_set_capacity(dev.as_fd()).map_err(|source| LoopDeviceError::Ioctl {
            op: "LOOP_SET_CAPACITY",
            device: device.to_string(),
            source,
        })
    }

    fn size(&self, device: LoopDevice) -> Result<u64, LoopDeviceError> {
        let path = self.sys_block.join(device.name()).join("size");
        let raw = std::fs::read_to_string(&path).map_err(|source| LoopDeviceError::Sysfs {
            path: path.clone(),
            source,
        })?;
        raw.trim()
            .parse::<u64>()
            .map(|sectors| sectors * 512)
            .map_err(|e| LoopDeviceError::Sysfs {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }
}

/// Opens `path` read-write, close-on-exec.
fn open_rw(path: &Path) -> Result<File, LoopDeviceError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LoopDeviceError::Open {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_only_loop_numbers() {
        assert_eq!(LoopDevice::from_name("loop12"), Some(LoopDevice(12)));
        assert_eq!(LoopDevice::from_name("loop"), None);
        assert_eq!(LoopDevice::from_name("loop-control"), None);
        assert_eq!(LoopDevice::from_name("nvme0n1"), None);
        assert_eq!(LoopDevice(3).path(), Path::new("/dev/loop3"));
    }

    #[test]
    fn list_reads_the_backing_files_of_listed_devices_and_marks_deleted_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mk = |name: &str, backing: Option<&str>| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(d.join("loop")).expect("mkdir");
            if let Some(b) = backing {
                std::fs::write(d.join("loop/backing_file"), format!("{b}\n")).expect("write");
            }
        };
        mk("loop0", Some("/pool/a.img"));
        mk("loop7", Some("/pool/b.img (deleted)"));
        mk("loop3", None);
        mk("loop9", Some("/pool/unlisted.img"));
        mk("sda", Some("/not/a/loop"));
        let partitions = dir.path().join("partitions");
        std::fs::write(
            &partitions,
            "major minor  #blocks  name\n\n   7        7    1048576 loop7\n   8        0   10485760 sda\n   7        0      65536 loop0\n   7        3      65536 loop3\n",
        )
        .expect("write");
        let loops = KernelLoopDevices::new(dir.path(), &partitions);
        let listed = loops.list().expect("list");
        assert_eq!(
            listed,
            vec![
                Attached {
                    device: LoopDevice(0),
                    backing: "/pool/a.img".into(),
                    deleted: false
                },
                Attached {
                    device: LoopDevice(7),
                    backing: "/pool/b.img".into(),
                    deleted: true
                },
            ]
        );
        assert_eq!(
            loops.find(Path::new("/pool/a.img")).expect("find"),
            vec![LoopDevice(0)]
        );
        assert!(loops
            .find(Path::new("/pool/b.img"))
            .expect("find")
            .is_empty());
    }
}
