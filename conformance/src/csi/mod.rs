//! Suite `csi`: drives a CSI driver only through its gRPC services on a unix socket, the way
//! the kubelet and the external sidecars do, with real staging and target directories, and
//! checks it against the CSI spec: identity, capabilities, create/delete idempotency, the
//! node lifecycle with data written and read back, block mode, snapshot and restore,
//! expansion, error codes, and that nothing is left mounted or attached.
//!
//! Targets: `csi[nodekit]` (the default) starts `nodekit-csi`, found beside this
//! executable, on a throwaway lab (temp state, pool and "kubelet root" directories);
//! `csi[custom]` talks to any driver already serving at `--csi-endpoint`, making its staging
//! and target directories under `--csi-kubelet-root` (default `/var/lib/kubelet`).

pub mod checks;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nodekit_proto::csi::v1::controller_client::ControllerClient;
use nodekit_proto::csi::v1::identity_client::IdentityClient;
use nodekit_proto::csi::v1::node_client::NodeClient;
use tonic::transport::Channel;

use crate::report::Reporter;
use crate::suite;

/// The suite's name.
pub const SUITE: &str = "csi";
/// The driver's executable name.
pub const BINARY: &str = "nodekit-csi";
/// How long one RPC may take before the check fails.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines shown when a check failed.
const LOG_TAIL: usize = 30;

/// Which driver the suite runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsiTarget {
    /// `nodekit-csi` beside the running executable, on a temp lab.
    Nodekit,
    /// A driver already serving at `socket`; staging and target paths go under
    /// `kubelet_root`.
    Endpoint {
        /// The driver's socket path.
        socket: PathBuf,
        /// Where the suite makes its directories (the driver must accept paths there).
        kubelet_root: PathBuf,
    },
}

impl CsiTarget {
    /// The label in test names.
    fn label(&self) -> &'static str {
        match self {
            Self::Nodekit => "nodekit",
            Self::Endpoint { .. } => "custom",
        }
    }
}

/// Why the suite could not run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum CsiSuiteError {
    /// The driver executable is missing.
    #[error("CSI driver executable {} not found: {hint}", path.display())]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// The runner's own location is unknown.
    #[error("cannot locate the nodekit-conformance executable to find {BINARY} beside it: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// A lab directory or file could not be made.
    #[error("preparing {path}: {source}")]
    Lab {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The driver could not be started or did not listen.
    #[error("starting {BINARY}: {0}")]
    Start(String),
    /// The async runtime could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The driver's socket did not accept a gRPC connection.
    #[error("connecting to {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The failure.
        #[source]
        source: nodekit_proto::uds::UdsError,
    },
}

fn lab_err(path: &Path) -> impl FnOnce(std::io::Error) -> CsiSuiteError + '_ {
    move |source| CsiSuiteError::Lab {
        path: path.to_path_buf(),
        source,
    }
}

fn nodekit_binary() -> Result<PathBuf, CsiSuiteError> {
    let exe = std::env::current_exe().map_err(CsiSuiteError::CurrentExe)?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = dir.join(BINARY);
    if !path.is_file() {
        return Err(CsiSuiteError::MissingBinary {
            path,
            hint: format!(
                "build it with `cargo build --release` (or `cargo build`) so it sits beside nodekit-conformance in {}, or give --csi-endpoint",
                dir.display()
            ),
        });
    }
    Ok(path)
}

/// `nodekit-csi` on a temp lab; stopped (SIGTERM) on drop.
#[derive(Debug)]
struct Lab {
    child: Child,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    fn start(binary: &Path) -> Result<Self, CsiSuiteError> {
        let dir = tempfile::Builder::new()
            .prefix("nk-csi-conformance-")
            .tempdir()
            .map_err(lab_err(Path::new("/tmp")))?;
        for sub in ["state", "pool", "kubelet"] {
            let p = dir.path().join(sub);
            std::fs::create_dir_all(&p).map_err(lab_err(&p))?;
        }
        let log = dir.path().join("driver.log");
        let log_file = File::create(&log).map_err(lab_err(&log))?;
        let socket = dir.path().join("csi.sock");
        let child = Command::new(binary)
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "conformance-node"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pool-dir")
            .arg(dir.path().join("pool"))
            .arg("--kubelet-root")
            .arg(dir.path().join("kubelet"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| CsiSuiteError::Start(e.to_string()))?;
        let mut lab = Self { child, log, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket_listens(&socket) {
            if let Ok(Some(status)) = lab.child.try_wait() {
                return Err(CsiSuiteError::Start(format!(
                    "exited with {status}: {}",
                    lab.log_tail()
                )));
            }
            if Instant::now() > deadline {
                return Err(CsiSuiteError::Start(format!(
                    "no socket after 20 s: {}",
                    lab.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(lab)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    fn log_tail(&self) -> String {
        suite::tail(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            LOG_TAIL,
        )
    }
}

fn socket_listens(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever a misbehaving driver left mounted in the lab comes off before the
        // directory goes (a leftover is reported by the last check).
        for m in checks::mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// gRPC clients of the driver's three services.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity.
    pub identity: IdentityClient<Channel>,
    /// Controller.
    pub controller: ControllerClient<Channel>,
    /// Node.
    pub node: NodeClient<Channel>,
}

/// Everything a check needs. Field order is drop order: clients, then the runtime, then
/// the driver and its lab.
#[derive(Debug)]
pub struct Env {
    /// The driver's clients.
    pub clients: Clients,
    /// The runtime the clients run on.
    pub rt: tokio::runtime::Runtime,
    /// The directory (under the driver's kubelet root) holding the suite's staging and
    /// target paths.
    pub kubelet_dir: PathBuf,
    /// The driver's pool directory when the suite started it (loop devices backed by files
    /// in it are the driver's).
    pub pool_dir: Option<PathBuf>,
    scratch: Option<tempfile::TempDir>,
    lab: Option<Lab>,
    seq: AtomicU32,
}

impl Env {
    fn start(target: &CsiTarget) -> Result<Self, CsiSuiteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(CsiSuiteError::Runtime)?;
        let (socket, lab, kubelet_dir, scratch) = match target {
            CsiTarget::Nodekit => {
                let lab = Lab::start(&nodekit_binary()?)?;
                let kubelet = lab.dir.path().join("kubelet");
                (lab.socket(), Some(lab), kubelet, None)
            }
            CsiTarget::Endpoint {
                socket,
                kubelet_root,
            } => {
                std::fs::create_dir_all(kubelet_root).map_err(lab_err(kubelet_root))?;
                let scratch = tempfile::Builder::new()
                    .prefix("nk-csi-conformance-")
                    .tempdir_in(kubelet_root)
                    .map_err(lab_err(kubelet_root))?;
                (
                    socket.clone(),
                    None,
                    scratch.path().to_path_buf(),
                    Some(scratch),
                )
            }
        };
        let channel = rt
            .block_on(nodekit_proto::uds::connect(&socket))
            .map_err(|source| CsiSuiteError::Connect {
                socket: socket.clone(),
                source,
            })?;
        let pool_dir = lab.as_ref().map(|l| l.dir.path().join("pool"));
        Ok(Self {
            clients: Clients {
                identity: IdentityClient::new(channel.clone()),
                controller: ControllerClient::new(channel.clone()),
                node: NodeClient::new(channel),
            },
            rt,
            kubelet_dir,
            pool_dir,
            scratch,
            lab,
            seq: AtomicU32::new(0),
        })
    }

    /// A name unique within this run, for volumes, snapshots and directories.
    pub fn unique(&self, what: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("nk-conf-{}-{what}-{n}", std::process::id())
    }

    /// The tail of the driver's log (the nodekit target only).
    pub fn log_tail(&self) -> Option<String> {
        self.lab.as_ref().map(Lab::log_tail)
    }

    /// The scratch directory for a custom target (kept alive for the run).
    pub fn scratch(&self) -> Option<&Path> {
        self.scratch.as_ref().map(tempfile::TempDir::path)
    }
}

/// Every test name the suite would run against `target`.
pub fn test_names(target: &CsiTarget) -> Vec<String> {
    suite::names(&suite::group(SUITE, target.label()), checks::CHECKS)
}

/// Runs the suite against `target`, recording every test whose full name `selected`
/// accepts. Setup problems (missing binary, no socket) end it with an error.
pub fn run(
    target: &CsiTarget,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), CsiSuiteError> {
    let group = suite::group(SUITE, target.label());
    let tests = suite::select(&group, checks::CHECKS, selected);
    if tests.is_empty() {
        return Ok(());
    }
    let env = Env::start(target)?;
    reporter.note(&format!(
        "== {group}: staging and targets under {}",
        env.kubelet_dir.display()
    ));
    let statuses = suite::run_tests(reporter, SUITE, &group, tests, |c| (c.run)(&env));
    if suite::any_failed(&statuses) {
        if let Some(tail) = env.log_tail() {
            suite::note_log(reporter, &group, "driver", &tail);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_unique_sentences_with_the_target_prefix() {
        let names = test_names(&CsiTarget::Nodekit);
        assert!(names.iter().all(|n| n.starts_with("csi[nodekit] ")));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert!(
            names.last().is_some_and(|n| n.contains("left")),
            "the leftover check runs last"
        );
    }

    #[test]
    fn a_missing_endpoint_is_a_setup_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = CsiTarget::Endpoint {
            socket: dir.path().join("absent.sock"),
            kubelet_root: dir.path().join("kubelet"),
        };
        let mut reporter = Reporter::new(Box::new(std::io::sink()));
        let err = run(&target, &|_| true, &mut reporter).unwrap_err();
        assert!(matches!(err, CsiSuiteError::Connect { .. }), "{err}");
        assert!(reporter.records().is_empty());
    }
}
