//! Suite `device-plugin`: plays the kubelet (nodekit's kubelet-side library:
//! `nodekit_device_plugin::kubelet`, the client side of the contract) against a device
//! plugin started on a throwaway device lab (`nodekit_device_plugin::lab`: char device
//! nodes made with mknod in a temp dir, a fake NVIDIA tree, a temp device plugin directory;
//! never the real `/var/lib/kubelet`).
//!
//! Targets: `device-plugin[nodekit]` runs `nodekit-device-plugin` (found beside this
//! executable) on the lab config; `device-plugin[custom]` runs any command given by
//! `--device-plugin-cmd`, with `{config}`, `{dir}`, `{devices}` and `{gpu-root}` replaced
//! by the lab's config file, plugin directory, device node directory and fake NVIDIA root.
//! A custom plugin must advertise `nodekit.io/lab` over the lab's nodes; checks of what only
//! the lab config defines (replica count, env names, the GPU resource) are skipped for it.

pub mod checks;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

use nodekit_device_plugin::kubelet::registration::KubeletServer;
use nodekit_device_plugin::kubelet::{DeviceManager, ManagerError};
use nodekit_device_plugin::lab::{Lab, LabError, PluginProcess};

use crate::report::Reporter;
use crate::suite;

/// The suite's name.
pub const SUITE: &str = "device-plugin";

/// The plugin's executable name.
pub const BINARY: &str = "nodekit-device-plugin";

/// How long a vanished plugin's devices count in the suite's kubelet.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);

/// Lines of the plugin log shown when a check failed.
const LOG_TAIL: usize = 20;

/// Which plugin the suite runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePluginTarget {
    /// `nodekit-device-plugin` beside the running executable, on the lab config.
    Nodekit,
    /// Any plugin: program and arguments, with the lab placeholders replaced.
    Command(Vec<String>),
}

/// Why the suite could not run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum DevicePluginSuiteError {
    /// The plugin executable is missing.
    #[error("device plugin executable {} not found: {hint}", path.display())]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// `--device-plugin-cmd` was empty.
    #[error("--device-plugin-cmd is empty")]
    EmptyCommand,
    /// The runner's own location is unknown.
    #[error("cannot locate the nodekit-conformance executable to find {BINARY} beside it: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The lab could not be built or the plugin not started.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The suite's kubelet could not start.
    #[error("kubelet side: {0}")]
    Kubelet(#[from] ManagerError),
    /// The async runtime could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl DevicePluginTarget {
    /// The label in test names.
    fn label(&self) -> &'static str {
        match self {
            Self::Nodekit => "nodekit",
            Self::Command(_) => "custom",
        }
    }

    /// The program and arguments for `lab`.
    fn command(&self, lab: &Lab) -> Result<(PathBuf, Vec<String>), DevicePluginSuiteError> {
        match self {
            Self::Nodekit => Ok((nodekit_binary()?, lab.plugin_args())),
            Self::Command(argv) => {
                let (program, args) = argv
                    .split_first()
                    .ok_or(DevicePluginSuiteError::EmptyCommand)?;
                let fill = |s: &String| {
                    s.replace("{config}", &lab.config_path().display().to_string())
                        .replace("{dir}", &lab.plugin_dir().display().to_string())
                        .replace("{devices}", &lab.dev_dir().display().to_string())
                        .replace("{gpu-root}", &lab.gpu_root().display().to_string())
                };
                Ok((
                    PathBuf::from(fill(program)),
                    args.iter().map(fill).collect(),
                ))
            }
        }
    }
}

fn nodekit_binary() -> Result<PathBuf, DevicePluginSuiteError> {
    let exe = std::env::current_exe().map_err(DevicePluginSuiteError::CurrentExe)?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = dir.join(BINARY);
    if !path.is_file() {
        return Err(DevicePluginSuiteError::MissingBinary {
            path,
            hint: format!(
                "build it with `cargo build --release` (or `cargo build`) so it sits beside nodekit-conformance in {}, or give --device-plugin-cmd",
                dir.display()
            ),
        });
    }
    Ok(path)
}

/// Everything a check needs. Field order is drop order: the plugin stops before the kubelet
/// and the lab go.
#[derive(Debug)]
pub struct Env {
    /// The plugin under test.
    pub plugin: PluginProcess,
    /// The suite's Registration server (replaced by the restart check).
    pub kubelet: Mutex<Option<KubeletServer>>,
    /// The kubelet side.
    pub manager: DeviceManager,
    /// The runtime the kubelet side runs on.
    pub rt: tokio::runtime::Runtime,
    /// Whether the target is a custom plugin (lab-config-specific checks are skipped).
    pub custom: bool,
    /// The device lab.
    pub lab: Lab,
    /// Set once a registration wait timed out: later checks do not wait the full time again.
    pub gave_up: AtomicBool,
}

impl Env {
    fn start(target: &DevicePluginTarget) -> Result<Self, DevicePluginSuiteError> {
        let lab = Lab::create()?;
        let (program, args) = target.command(&lab)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(DevicePluginSuiteError::Runtime)?;
        let manager = lab.manager(GRACE_PERIOD)?;
        let kubelet = {
            let _entered = rt.enter();
            manager.serve()?
        };
        let plugin = PluginProcess::spawn(&program, &args, &lab.log_path())?;
        Ok(Self {
            plugin,
            kubelet: Mutex::new(Some(kubelet)),
            manager,
            rt,
            custom: matches!(target, DevicePluginTarget::Command(_)),
            lab,
            gave_up: AtomicBool::new(false),
        })
    }
}

/// Every test name the suite would run against `target`.
pub fn test_names(target: &DevicePluginTarget) -> Vec<String> {
    suite::names(&suite::group(SUITE, target.label()), checks::CHECKS)
}

/// Runs the suite against `target`, recording every test whose full name `selected`
/// accepts. Setup problems (missing binary, no root for mknod) end it with an error.
pub fn run(
    target: &DevicePluginTarget,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), DevicePluginSuiteError> {
    let group = suite::group(SUITE, target.label());
    let tests = suite::select(&group, checks::CHECKS, selected);
    if tests.is_empty() {
        return Ok(());
    }
    // Env::start finds the binary too; this fails before any lab is built.
    if *target == DevicePluginTarget::Nodekit {
        nodekit_binary()?;
    }
    let env = Env::start(target)?;
    reporter.note(&format!(
        "== {group}: device lab {}, plugin log {}",
        env.lab.path().display(),
        env.lab.log_path().display()
    ));
    let statuses = suite::run_tests(reporter, SUITE, &group, tests, |c| (c.run)(&env));
    let kubelet = env.kubelet.lock().ok().and_then(|mut k| k.take());
    if let Some(kubelet) = kubelet {
        env.rt.block_on(kubelet.stop());
    }
    if suite::any_failed(&statuses) {
        // The lab (and the log in it) is removed on return: show the log's end now.
        let log = std::fs::read_to_string(env.lab.log_path()).unwrap_or_default();
        suite::note_log(reporter, &group, "plugin", &suite::tail(&log, LOG_TAIL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_commands_get_the_lab_paths() {
        let lab = Lab::create().expect("lab (needs root)");
        let target = DevicePluginTarget::Command(vec![
            "/bin/{devices}-x".into(),
            "--config={config}".into(),
            "{dir}".into(),
            "{gpu-root}".into(),
        ]);
        let (program, args) = target.command(&lab).expect("command");
        assert_eq!(
            program,
            PathBuf::from(format!("/bin/{}-x", lab.dev_dir().display()))
        );
        assert_eq!(
            args,
            vec![
                format!("--config={}", lab.config_path().display()),
                lab.plugin_dir().display().to_string(),
                lab.gpu_root().display().to_string(),
            ]
        );
        assert!(matches!(
            DevicePluginTarget::Command(vec![]).command(&lab),
            Err(DevicePluginSuiteError::EmptyCommand)
        ));
    }

    #[test]
    fn test_names_carry_the_target_label() {
        let names = test_names(&DevicePluginTarget::Nodekit);
        assert_eq!(names.len(), checks::CHECKS.len());
        assert!(names
            .iter()
            .all(|n| n.starts_with("device-plugin[nodekit] ")));
        let custom = test_names(&DevicePluginTarget::Command(vec!["x".into()]));
        assert!(custom[0].starts_with("device-plugin[custom] "));
    }
}
