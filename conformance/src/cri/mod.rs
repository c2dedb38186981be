//! Suite `cri`: drives a CRI runtime only through its gRPC services on a unix socket, the
//! way the kubelet does, and checks the contract: version and readiness, image pull, status,
//! list and removal, pod sandboxes with networking (a pod reaches another pod), the
//! container lifecycle with exit codes and reasons, CRI-format logs, ExecSync, Exec's
//! streaming URL, stats, idempotent stop/remove, and the error codes of bad requests.
//!
//! Targets: `cri[nodekit]` (the default) starts `nodekit-cri`, found beside this executable,
//! on a throwaway [`lab`] (node namespace, local registry with busybox images, bridge +
//! host-local CNI, runc; `cri[nodekit-crun]` with `--cri-runtime crun`); `cri[containerd]` (with `--cri-containerd`, besides nodekit) runs
//! Debian's containerd on an identical lab, and the suite ends with the checks on which the
//! two differ; `cri[custom]` talks to any runtime already serving at `--cri-endpoint`,
//! with the containers' image from `--cri-image` (busybox), skipping the lab-only checks.

pub mod checks;
pub mod lab;
pub mod pod;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::image_service_client::ImageServiceClient;
use nodekit_proto::cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::report::{Reporter, Status};
use crate::suite;
use lab::{CriRuntime, Lab, LabError, LabOptions, OciRuntime};
use pod::PodTemplate;

/// The suite's name.
pub const SUITE: &str = "cri";
/// The runtime's executable name.
pub const BINARY: &str = "nodekit-cri";
/// The image a custom endpoint runs unless `--cri-image` says otherwise.
pub const DEFAULT_CUSTOM_IMAGE: &str = "docker.io/library/busybox:1.36";
/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(180);
/// Runtime log lines shown when a check failed.
const LOG_TAIL: usize = 30;

/// A runtime the suite runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CriTarget {
    /// `nodekit-cri` beside the running executable, on a lab, driving this OCI runtime.
    Nodekit(OciRuntime),
    /// Debian's containerd on a lab.
    Containerd,
    /// A runtime already serving at `socket`; containers run `image` (busybox applets).
    Endpoint {
        /// The runtime's socket path.
        socket: PathBuf,
        /// The image the containers run.
        image: String,
    },
}

impl CriTarget {
    /// The label in test names.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Nodekit(OciRuntime::Runc) => "nodekit",
            Self::Nodekit(OciRuntime::Crun) => "nodekit-crun",
            Self::Containerd => "containerd",
            Self::Endpoint { .. } => "custom",
        }
    }
}

/// Why the suite could not run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum CriSuiteError {
    /// The runtime executable is missing.
    #[error("CRI runtime executable {} not found: {hint}", path.display())]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// The runner's own location is unknown.
    #[error("cannot locate the running executable to find {BINARY} beside it: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The lab could not be built or the runtime not started.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A scratch directory could not be made.
    #[error("creating a scratch directory: {0}")]
    Scratch(#[source] std::io::Error),
    /// The async runtime could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The runtime's socket did not accept a gRPC connection.
    #[error("connecting to {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The failure.
        #[source]
        source: nodekit_proto::uds::UdsError,
    },
}

/// `nodekit-cri` beside the running executable.
pub fn nodekit_binary() -> Result<PathBuf, CriSuiteError> {
    let exe = std::env::current_exe().map_err(CriSuiteError::CurrentExe)?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = dir.join(BINARY);
    if !path.is_file() {
        return Err(CriSuiteError::MissingBinary {
            path,
            hint: format!(
                "build it with `cargo build --release` (or `cargo build`) so it sits beside this executable in {}, or give --cri-endpoint",
                dir.display()
            ),
        });
    }
    Ok(path)
}

/// Everything a check needs. Field order is drop order: clients, the async runtime, then
/// the scratch directory and the lab (which stops the CRI runtime and removes everything).
#[derive(Debug)]
pub struct Env {
    /// The runtime service.
    pub runtime: RuntimeServiceClient<Channel>,
    /// The image service.
    pub images: ImageServiceClient<Channel>,
    /// The async runtime the clients run on.
    pub rt: tokio::runtime::Runtime,
    /// Pod and container configs.
    pub template: PodTemplate,
    /// Pods made by the running check, stopped and removed after it.
    pods: Mutex<Vec<String>>,
    /// The image's reference once pulled this run.
    pulled: tokio::sync::OnceCell<String>,
    seq: AtomicU32,
    /// A custom target's log directory root, kept for the run.
    _scratch: Option<tempfile::TempDir>,
    /// The lab (`None` for a custom endpoint).
    pub lab: Option<Lab>,
}

impl Env {
    fn start(target: &CriTarget) -> Result<Self, CriSuiteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(CriSuiteError::Runtime)?;
        let (socket, lab, scratch, template) = match target {
            CriTarget::Nodekit(_) | CriTarget::Containerd => {
                let (runtime, oci_runtime) = match target {
                    CriTarget::Nodekit(oci) => (CriRuntime::nodekit(nodekit_binary()?), *oci),
                    _ => (CriRuntime::Containerd, OciRuntime::Runc),
                };
                let mut lab = Lab::create(&LabOptions {
                    oci_runtime,
                    ..Default::default()
                })?;
                let socket = lab.start_runtime(&runtime)?;
                let template = lab.template();
                (socket, Some(lab), None, template)
            }
            CriTarget::Endpoint { socket, image } => {
                let scratch = tempfile::Builder::new()
                    .prefix("nk-cri-conformance-")
                    .tempdir()
                    .map_err(CriSuiteError::Scratch)?;
                let template = PodTemplate {
                    namespace: "nk-conformance".into(),
                    log_root: scratch.path().join("logs"),
                    cgroup_parent: String::new(),
                    image: image.clone(),
                };
                (socket.clone(), None, Some(scratch), template)
            }
        };
        let channel = rt
            .block_on(nodekit_proto::uds::connect(&socket))
            .map_err(|source| CriSuiteError::Connect {
                socket: socket.clone(),
                source,
            })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            rt,
            template,
            pods: Mutex::new(Vec::new()),
            pulled: tokio::sync::OnceCell::new(),
            seq: AtomicU32::new(0),
            _scratch: scratch,
            lab,
        })
    }

    /// A pod or container name unique within this run.
    pub fn unique(&self, what: &str) -> String {
        format!("{what}-{}", self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether the target is a runtime the suite did not start (lab-only checks skip).
    pub fn custom(&self) -> bool {
        self.lab.is_none()
    }

    /// Records a pod for teardown after the running check.
    pub fn track(&self, pod_id: &str) {
        if let Ok(mut pods) = self.pods.lock() {
            pods.push(pod_id.to_string());
        }
    }

    /// Pulls the template's image once per run; returns its reference.
    pub async fn ensure_image(&self) -> Result<String, checks::CheckError> {
        self.pulled
            .get_or_try_init(|| async {
                let req = cri::PullImageRequest {
                    image: Some(self.template.image_spec()),
                    ..Default::default()
                };
                let r = checks::call("PullImage", self.images.clone().pull_image(req)).await?;
                Ok(r.image_ref)
            })
            .await
            .cloned()
    }

    /// Stops and removes the pods the check made (errors ignored: the check judged them).
    async fn teardown(&self) {
        let pods = self
            .pods
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let started = Instant::now();
        let count = pods.len();
        for id in pods {
            let mut rs = self.runtime.clone();
            let stop = cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            let _ = tokio::time::timeout(checks::RPC_TIMEOUT, rs.stop_pod_sandbox(stop)).await;
            let remove = cri::RemovePodSandboxRequest { pod_sandbox_id: id };
            let _ = tokio::time::timeout(checks::RPC_TIMEOUT, rs.remove_pod_sandbox(remove)).await;
        }
        tracing::debug!(pods = count, elapsed = ?started.elapsed(), "tore the check's pods down");
    }

    /// The tail of the runtime's log (lab targets only).
    pub fn log_tail(&self) -> Option<String> {
        self.lab.as_ref().map(|l| l.runtime_log_tail(LOG_TAIL))
    }
}

/// Every test name the suite would run against `target`.
pub fn test_names(target: &CriTarget) -> Vec<String> {
    suite::names(&suite::group(SUITE, target.label()), checks::CHECKS)
}

/// Runs the suite against each of `targets` in turn, recording every test whose full name
/// `selected` accepts; with several targets, ends with a note listing the checks whose
/// status differs between them. Setup problems (missing binary, no socket) end it with an
/// error.
pub fn run(
    targets: &[CriTarget],
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), CriSuiteError> {
    let mut statuses: Vec<(&'static str, Vec<(&'static str, Status)>)> = Vec::new();
    for target in targets {
        statuses.push((target.label(), run_target(target, selected, reporter)?));
    }
    if statuses.len() > 1 {
        for line in differences(&statuses) {
            reporter.note(&line);
        }
    }
    Ok(())
}

/// The suite against one target; returns each check's status.
fn run_target(
    target: &CriTarget,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<Vec<(&'static str, Status)>, CriSuiteError> {
    let group = suite::group(SUITE, target.label());
    let tests = suite::select(&group, checks::CHECKS, selected);
    if tests.is_empty() {
        return Ok(Vec::new());
    }
    let env = Env::start(target)?;
    let version = env
        .rt
        .block_on(env.runtime.clone().version(cri::VersionRequest::default()))
        .map(|r| {
            let v = r.into_inner();
            format!("{} {}", v.runtime_name, v.runtime_version)
        })
        .unwrap_or_else(|e| format!("Version failed: {}", e.message()));
    reporter.note(&format!(
        "== {group}: {version}, image {}",
        env.template.image
    ));
    let statuses = suite::run_tests(reporter, SUITE, &group, tests, |check| {
        let result = env.rt.block_on(async {
            let r = tokio::time::timeout(CHECK_TIMEOUT, (check.run)(&env)).await;
            env.teardown().await;
            r
        });
        match result {
            Ok(r) => r,
            Err(_) => Err(checks::CheckError::Violation(format!(
                "the check took over {CHECK_TIMEOUT:?}"
            ))),
        }
    });
    // Pods of a check that panicked mid-way.
    env.rt.block_on(env.teardown());
    if suite::any_failed(&statuses) {
        if let Some(tail) = env.log_tail() {
            suite::note_log(reporter, &group, "runtime", &tail);
        }
    }
    Ok(statuses
        .into_iter()
        .map(|(check, status)| (check.name, status))
        .collect())
}

/// Note lines naming each check whose status differs between targets.
fn differences(statuses: &[(&'static str, Vec<(&'static str, Status)>)]) -> Vec<String> {
    let labels: Vec<&str> = statuses.iter().map(|(l, _)| *l).collect();
    let mut lines = Vec::new();
    for check in checks::CHECKS {
        let row: Vec<Option<Status>> = statuses
            .iter()
            .map(|(_, s)| s.iter().find(|(n, _)| *n == check.name).map(|(_, st)| *st))
            .collect();
        let first = row.first().copied().flatten();
        if row.iter().all(|s| *s == first) {
            continue;
        }
        let cells: Vec<String> = labels
            .iter()
            .zip(&row)
            .map(|(l, s)| format!("{l}: {}", s.map_or("not run".into(), status_word)))
            .collect();
        lines.push(format!("   {} ({})", check.name, cells.join(", ")));
    }
    let header = if lines.is_empty() {
        format!(
            "== {SUITE}: {} agree on every check run",
            labels.join(" and ")
        )
    } else {
        format!("== {SUITE}: where {} differ:", labels.join(" and "))
    };
    std::iter::once(header).chain(lines).collect()
}

fn status_word(s: Status) -> String {
    match s {
        Status::Passed => "passed",
        Status::Failed => "failed",
        Status::Skipped => "skipped",
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_unique_sentences_with_the_target_prefix() {
        let names = test_names(&CriTarget::Containerd);
        assert!(names.iter().all(|n| n.starts_with("cri[containerd] ")));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn differences_name_the_checks_whose_status_differs() {
        let a = checks::CHECKS[0].name;
        let b = checks::CHECKS[1].name;
        let lines = differences(&[
            ("nodekit", vec![(a, Status::Passed), (b, Status::Passed)]),
            ("containerd", vec![(a, Status::Passed), (b, Status::Failed)]),
        ]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("where nodekit and containerd differ"));
        assert!(lines[1].contains(b) && lines[1].contains("containerd: failed"));
        let same = differences(&[
            ("x", vec![(a, Status::Passed)]),
            ("y", vec![(a, Status::Passed)]),
        ]);
        assert_eq!(same.len(), 1);
        assert!(same[0].contains("agree"));
    }

    #[test]
    fn a_missing_endpoint_is_a_setup_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = CriTarget::Endpoint {
            socket: dir.path().join("absent.sock"),
            image: DEFAULT_CUSTOM_IMAGE.into(),
        };
        let mut reporter = Reporter::new(Box::new(std::io::sink()));
        let err = run(&[target], &|_| true, &mut reporter).unwrap_err();
        assert!(matches!(err, CriSuiteError::Connect { .. }), "{err}");
        assert!(reporter.records().is_empty());
    }
}
