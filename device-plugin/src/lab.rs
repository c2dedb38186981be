//! A throwaway device lab for exercising a device plugin without real hardware or a real
//! kubelet directory: a temp dir holding char device nodes made with mknod (copies of
//! `/dev/null`, 1:3), a fake NVIDIA tree (four GPUs on two NUMA nodes, control devices), a
//! device plugin directory, a CDI directory and the matching config. The crate's tests, its
//! benchmark and the conformance runner's `device-plugin` suite all use it. Needs root
//! (mknod).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::Pid;

use crate::kubelet::{DeviceManager, ManagerConfig, ManagerError};

/// The lab's path-discovered resource: `lab0`..`lab3`, two replicas each.
pub const RESOURCE: &str = "nodekit.io/lab";
/// The lab's NVIDIA-discovered resource.
pub const GPU_RESOURCE: &str = "nodekit.io/lab-gpu";
/// Device nodes of [`RESOURCE`].
pub const NODES: &[&str] = &["lab0", "lab1", "lab2", "lab3"];
/// Replicas per node of [`RESOURCE`].
pub const REPLICAS: usize = 2;
/// The fake GPUs: (minor, PCI bus ID, NUMA node).
pub const GPUS: &[(u32, &str, u32)] = &[
    (0, "0000:3b:00.0", 0),
    (1, "0000:3c:00.0", 0),
    (2, "0000:b1:00.0", 1),
    (3, "0000:b2:00.0", 1),
];
/// Host file the lab config mounts into containers.
pub const MOUNT_HOST_PATH: &str = "/etc/hostname";
/// Where that mount appears.
pub const MOUNT_CONTAINER_PATH: &str = "/etc/nodekit-lab";

/// The lab could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file operation failed.
    #[error("lab: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// mknod failed (not root?).
    #[error("lab: mknod {}: {source} (the device lab needs root to make device nodes)", path.display())]
    Mknod {
        /// The node.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The plugin process could not be started.
    #[error("lab: cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The in-process kubelet could not start.
    #[error("lab: kubelet side: {0}")]
    Kubelet(#[from] ManagerError),
}

/// A lab in a temp dir, removed on drop.
#[derive(Debug)]
pub struct Lab {
    dir: tempfile::TempDir,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.to_path_buf();
    move |source| LabError::Io { what, path, source }
}

/// Makes a char device node with /dev/null's numbers (1:3), mode 0666.
pub fn make_node(path: &Path) -> Result<(), LabError> {
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .map_err(|source| LabError::Mknod {
        path: path.to_path_buf(),
        source,
    })
}

impl Lab {
    /// Makes the device nodes, the fake NVIDIA tree and the config file.
    pub fn create() -> Result<Self, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("nk-dp-lab-")
            .tempdir()
            .map_err(io("creating", Path::new("/tmp")))?;
        let lab = Self { dir };
        for d in [lab.dev_dir(), lab.gpu_root().join("dev"), lab.plugin_dir()] {
            std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
        }
        for name in NODES {
            make_node(&lab.node(name))?;
        }
        lab.make_gpu_tree()?;
        lab.write_config(&lab.config_yaml())?;
        Ok(lab)
    }

    fn make_gpu_tree(&self) -> Result<(), LabError> {
        let root = self.gpu_root();
        for (minor, bus, numa) in GPUS {
            make_node(&root.join(format!("dev/nvidia{minor}")))?;
            let proc_dir = root.join("proc/driver/nvidia/gpus").join(bus);
            std::fs::create_dir_all(&proc_dir).map_err(io("creating", &proc_dir))?;
            let info = format!(
                "Model: \t\t nodekit lab GPU\nGPU UUID: \t {}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n",
                gpu_uuid(*minor)
            );
            let file = proc_dir.join("information");
            std::fs::write(&file, info).map_err(io("writing", &file))?;
            let sys = root.join("sys/bus/pci/devices").join(bus);
            std::fs::create_dir_all(&sys).map_err(io("creating", &sys))?;
            let file = sys.join("numa_node");
            std::fs::write(&file, format!("{numa}\n")).map_err(io("writing", &file))?;
        }
        for name in ["nvidiactl", "nvidia-uvm"] {
            make_node(&root.join("dev").join(name))?;
        }
        Ok(())
    }

    /// The lab's root directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where [`RESOURCE`]'s nodes are.
    pub fn dev_dir(&self) -> PathBuf {
        self.path().join("dev")
    }

    /// The device node called `name` (`lab0`).
    pub fn node(&self, name: &str) -> PathBuf {
        self.dev_dir().join(name)
    }

    /// The fake NVIDIA root.
    pub fn gpu_root(&self) -> PathBuf {
        self.path().join("gpu")
    }

    /// The device plugin directory (kubelet.sock and plugin sockets).
    pub fn plugin_dir(&self) -> PathBuf {
        self.path().join("device-plugins")
    }

    /// The CDI spec directory.
    pub fn cdi_dir(&self) -> PathBuf {
        self.path().join("cdi")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.yaml")
    }

    /// Where a plugin started by the lab logs.
    pub fn log_path(&self) -> PathBuf {
        self.path().join("plugin.log")
    }

    /// The kubelet checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.path().join("kubelet_internal_checkpoint")
    }

    /// The lab config: [`RESOURCE`] with replicas, env, mount, annotation, CDI and
    /// PreStartContainer; [`GPU_RESOURCE`] from the fake NVIDIA tree.
    pub fn config_yaml(&self) -> String {
        format!(
            r#"cdiDir: {cdi}
resources:
  - name: {RESOURCE}
    devices: ["{dev}/lab*"]
    replicas: {REPLICAS}
    permissions: rw
    env: {{NODEKIT_LAB_DEVICES: "{{ids}}"}}
    annotations: {{nodekit.io/lab-paths: "{{paths}}"}}
    mounts: [{{hostPath: {MOUNT_HOST_PATH}, containerPath: {MOUNT_CONTAINER_PATH}, readOnly: true}}]
    cdi: true
    preStartRequired: true
  - name: {GPU_RESOURCE}
    nvidia: {{root: {gpu}}}
    env: {{NVIDIA_VISIBLE_DEVICES: "{{ids}}"}}
"#,
            cdi = self.cdi_dir().display(),
            dev = self.dev_dir().display(),
            gpu = self.gpu_root().display(),
        )
    }

    /// Replaces the config file.
    pub fn write_config(&self, yaml: &str) -> Result<(), LabError> {
        let path = self.config_path();
        std::fs::write(&path, yaml).map_err(io("writing", &path))
    }

    /// The kubelet side with its checkpoint in the lab and a `grace` period.
    pub fn manager(&self, grace: Duration) -> Result<DeviceManager, LabError> {
        let mut config = ManagerConfig::new(self.plugin_dir());
        config.checkpoint = self.checkpoint_path();
        config.grace_period = grace;
        Ok(DeviceManager::new(config)?)
    }

    /// The arguments that run our plugin on this lab.
    pub fn plugin_args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.config_path().display().to_string(),
            "--device-plugin-path".into(),
            self.plugin_dir().display().to_string(),
        ]
    }
}

/// The UUID the fake tree gives GPU `minor`.
pub fn gpu_uuid(minor: u32) -> String {
    format!("GPU-{minor:08x}-0000-4000-8000-00000000dead")
}

/// A plugin process: SIGTERMed (then SIGKILLed after 5 s) and reaped on drop.
#[derive(Debug)]
pub struct PluginProcess {
    child: Option<Child>,
}

impl PluginProcess {
    /// Starts `program args` with its stdout and stderr appended to `log`.
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Self, LabError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("opening", log))?;
        let err = out.try_clone().map_err(io("opening", log))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        Ok(Self { child: Some(child) })
    }

    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) -> Result<(), nix::Error> {
        match self.pid().and_then(|p| i32::try_from(p).ok()) {
            Some(pid) => kill(Pid::from_raw(pid), signal),
            None => Ok(()),
        }
    }

    /// Its exit status if it has exited, waiting up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return None,
            }
        }
    }

    /// SIGTERM, then the exit status (SIGKILL after 5 s).
    pub fn terminate(mut self) -> Option<ExitStatus> {
        self.stop()
    }

    fn stop(&mut self) -> Option<ExitStatus> {
        let _ = self.signal(Signal::SIGTERM);
        let status = self.wait_timeout(Duration::from_secs(5));
        let mut child = self.child.take()?;
        match status {
            Some(s) => Some(s),
            None => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn the_lab_has_char_device_nodes_and_a_valid_config() {
        let lab = Lab::create().unwrap();
        let meta = std::fs::metadata(lab.node("lab0")).unwrap();
        assert!(meta.file_type().is_char_device());
        let c = config::load(&lab.config_path()).unwrap();
        assert_eq!(c.resources.len(), 2);
        let gpus = crate::discovery::nvidia::scan(&lab.gpu_root()).unwrap();
        let numa: Vec<_> = gpus.iter().map(|g| g.numa).collect();
        assert_eq!(numa, [Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(gpus[2].id, gpu_uuid(2));
        let root = lab.path().to_path_buf();
        drop(lab);
        assert!(!root.exists());
    }
}
