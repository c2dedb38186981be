//! `nodekit-bench cri`: pod start and teardown latency and memory of CRI runtimes, measured
//! the way the kubelet sees them, nodekit-cri against containerd in one run.
//!
//! Each runtime gets a fresh [`Lab`] (node namespace, local registry, bridge + host-local
//! CNI, runc: the same for both), the image pulled and one warm-up pod (containerd pulls its
//! pause image then). Pod start is RunPodSandbox + CreateContainer + StartContainer until
//! ContainerStatus says RUNNING, N pods one at a time; teardown is StopPodSandbox +
//! RemovePodSandbox of each, one at a time. Memory is the resident (VmRSS) and proportional
//! (Pss) size of the daemon and its per-container helpers (nodekit-cri's monitors,
//! containerd's shims) idle after the warm-up and with M pods running. Nothing is asserted:
//! the figures are printed with the goal (nodekit's median start <= 0.5x containerd's).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::image_service_client::ImageServiceClient;
use nodekit_proto::cri::v1::runtime_service_client::RuntimeServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::interrupt;
use super::stats::Summary;
use crate::cri::checks::LONG_RUNNING;
use crate::cri::lab::procs::{self, Memory};
use crate::cri::lab::{CriRuntime, Lab, LabError, LabOptions, PAUSE_IMAGE};
use crate::cri::pod::PodTemplate;

/// The goal: nodekit's median pod start at most this fraction of containerd's.
pub const START_RATIO_GOAL: f64 = 0.5;
/// How long one RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long memory settles before it is read.
const SETTLE: Duration = Duration::from_secs(1);

/// A runtime to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchRuntime {
    /// nodekit-cri.
    Nodekit,
    /// nodekit-cri with `--pause-image` (the lab's pause image, as containerd runs it).
    #[value(name = "nodekit-pause-image")]
    #[serde(rename = "nodekit-pause-image")]
    NodekitPauseImage,
    /// Debian's containerd with its CRI plugin.
    Containerd,
}

impl BenchRuntime {
    /// Both, ours first.
    pub const ALL: [BenchRuntime; 2] = [BenchRuntime::Nodekit, BenchRuntime::Containerd];
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CriBenchOptions {
    /// Pods started and torn down one at a time.
    pub pods: usize,
    /// Pods running while the loaded memory is read.
    pub loaded_pods: usize,
    /// The runtimes, in order.
    pub runtimes: Vec<BenchRuntime>,
    /// The nodekit-cri executable (helpers beside it).
    pub nodekit_binary: PathBuf,
}

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum CriBenchError {
    /// The lab or a runtime could not be set up.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The async runtime could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The runtime's socket did not take a gRPC connection.
    #[error("connecting to {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The failure.
        #[source]
        source: nodekit_proto::uds::UdsError,
    },
    /// An RPC failed or hung.
    #[error("{runtime}: {step}: {message}")]
    Rpc {
        /// The runtime.
        runtime: &'static str,
        /// What was being done.
        step: String,
        /// The status or timeout.
        message: String,
    },
    /// The daemon vanished.
    #[error("{runtime}: the daemon is gone")]
    DaemonGone {
        /// The runtime.
        runtime: &'static str,
    },
    /// A stop signal arrived.
    #[error("interrupted")]
    Interrupted,
}

/// Memory of the daemon and its helpers at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// The daemon.
    pub daemon: Memory,
    /// How many helpers (monitors, shims) ran.
    pub helpers: usize,
    /// Their sum.
    pub helpers_memory: Memory,
}

impl Usage {
    /// Daemon plus helpers.
    pub fn total(&self) -> Memory {
        self.daemon + self.helpers_memory
    }
}

/// One runtime's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeFigures {
    /// Which.
    pub runtime: BenchRuntime,
    /// Its Version answer.
    pub version: String,
    /// Pod start latency.
    pub start: Summary,
    /// Its parts: RunPodSandbox, CreateContainer, StartContainer until RUNNING.
    pub steps: [Summary; 3],
    /// Pod teardown latency.
    pub teardown: Summary,
    /// Memory after the warm-up pod was removed.
    pub idle: Usage,
    /// Memory with the loaded pods running.
    pub loaded: Usage,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct CriFigures {
    /// Pods per latency phase.
    pub pods: usize,
    /// Pods running for the loaded memory.
    pub loaded_pods: usize,
    /// Per runtime.
    pub runtimes: Vec<RuntimeFigures>,
}

/// A connected runtime.
struct Client {
    name: &'static str,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    template: PodTemplate,
}

impl Client {
    async fn rpc<T>(
        &self,
        step: &str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriBenchError> {
        let err = |message: String| CriBenchError::Rpc {
            runtime: self.name,
            step: step.to_string(),
            message,
        };
        match tokio::time::timeout(RPC_TIMEOUT, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(err(format!("{:?}: {}", s.code(), s.message()))),
            Err(_) => Err(err(format!("no answer within {RPC_TIMEOUT:?}"))),
        }
    }

    /// RunPodSandbox + CreateContainer + StartContainer, then ContainerStatus until RUNNING;
    /// returns the pod and the time of each of the three steps.
    async fn start_pod(&self, name: &str) -> Result<(String, [Duration; 3]), CriBenchError> {
        let sandbox = self.template.sandbox(name);
        let t0 = Instant::now();
        let pod = self
            .rpc(
                "RunPodSandbox",
                self.runtime
                    .clone()
                    .run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(sandbox.clone()),
                        runtime_handler: String::new(),
                    }),
            )
            .await?
            .pod_sandbox_id;
        let t1 = Instant::now();
        let container = self
            .rpc(
                "CreateContainer",
                self.runtime
                    .clone()
                    .create_container(cri::CreateContainerRequest {
                        pod_sandbox_id: pod.clone(),
                        config: Some(self.template.container("main", LONG_RUNNING)),
                        sandbox_config: Some(sandbox),
                    }),
            )
            .await?
            .container_id;
        let t2 = Instant::now();
        self.rpc(
            "StartContainer",
            self.runtime
                .clone()
                .start_container(cri::StartContainerRequest {
                    container_id: container.clone(),
                }),
        )
        .await?;
        let deadline = Instant::now() + RPC_TIMEOUT;
        loop {
            let state = self
                .rpc(
                    "ContainerStatus",
                    self.runtime
                        .clone()
                        .container_status(cri::ContainerStatusRequest {
                            container_id: container.clone(),
                            verbose: false,
                        }),
                )
                .await?
                .status
                .map(|s| s.state);
            if state == Some(cri::ContainerState::ContainerRunning as i32) {
                return Ok((pod, [t1 - t0, t2 - t1, t2.elapsed()]));
            }
            if Instant::now() > deadline {
                return Err(CriBenchError::Rpc {
                    runtime: self.name,
                    step: "ContainerStatus".into(),
                    message: format!("not RUNNING after {RPC_TIMEOUT:?}: {state:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// StopPodSandbox + RemovePodSandbox.
    async fn remove_pod(&self, pod: &str) -> Result<(), CriBenchError> {
        self.rpc(
            "StopPodSandbox",
            self.runtime
                .clone()
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod.into(),
                }),
        )
        .await?;
        self.rpc(
            "RemovePodSandbox",
            self.runtime
                .clone()
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.into(),
                }),
        )
        .await?;
        Ok(())
    }
}

fn check_interrupt() -> Result<(), CriBenchError> {
    if interrupt::interrupted() {
        Err(CriBenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// Memory of `lab`'s daemon and helpers now.
fn usage(lab: &Lab, runtime: &'static str) -> Result<Usage, CriBenchError> {
    let daemon = lab
        .runtime_pid()
        .and_then(procs::memory)
        .ok_or(CriBenchError::DaemonGone { runtime })?;
    let helpers: Vec<Memory> = lab
        .helper_processes()
        .iter()
        .filter_map(|p| procs::memory(p.pid))
        .collect();
    Ok(Usage {
        daemon,
        helpers: helpers.len(),
        helpers_memory: helpers.into_iter().fold(Memory::default(), |a, b| a + b),
    })
}

/// The summary of a phase's samples (zeros when there were none).
fn summary(samples: &[Duration], total: Duration) -> Summary {
    Summary::of(samples, total).unwrap_or(Summary {
        n: 0,
        median_ms: 0.0,
        p95_ms: 0.0,
        mean_ms: 0.0,
        min_ms: 0.0,
        max_ms: 0.0,
        total_ms: 0.0,
        ops_per_s: 0.0,
    })
}

/// Benchmarks one runtime on a fresh lab.
fn bench_runtime(
    which: BenchRuntime,
    opts: &CriBenchOptions,
    rt: &tokio::runtime::Runtime,
) -> Result<RuntimeFigures, CriBenchError> {
    let (runtime, name) = match which {
        BenchRuntime::Nodekit => (CriRuntime::nodekit(&opts.nodekit_binary), "nodekit"),
        BenchRuntime::NodekitPauseImage => (
            CriRuntime::Nodekit {
                binary: opts.nodekit_binary.clone(),
                args: vec!["--pause-image".into(), PAUSE_IMAGE.into()],
                log_filter: "info".into(),
            },
            "nodekit-pause-image",
        ),
        BenchRuntime::Containerd => (CriRuntime::Containerd, "containerd"),
    };
    let mut lab = Lab::create(&LabOptions::default())?;
    let socket = lab.start_runtime(&runtime)?;
    let channel = rt
        .block_on(nodekit_proto::uds::connect(&socket))
        .map_err(|source| CriBenchError::Connect {
            socket: socket.clone(),
            source,
        })?;
    let client = Client {
        name,
        runtime: RuntimeServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
        template: lab.template(),
    };
    rt.block_on(async {
        let v = client
            .rpc(
                "Version",
                client
                    .runtime
                    .clone()
                    .version(cri::VersionRequest::default()),
            )
            .await?;
        let version = format!("{} {}", v.runtime_name, v.runtime_version);
        client
            .rpc(
                "PullImage",
                client.images.clone().pull_image(cri::PullImageRequest {
                    image: Some(client.template.image_spec()),
                    ..Default::default()
                }),
            )
            .await?;
        let (warm, _) = client.start_pod("warm").await?;
        client.remove_pod(&warm).await?;
        tokio::time::sleep(SETTLE).await;
        let idle = usage(&lab, name)?;

        let (mut starts, mut steps, mut pods) = (Vec::new(), [vec![], vec![], vec![]], Vec::new());
        let phase = Instant::now();
        for i in 0..opts.pods {
            check_interrupt()?;
            let t = Instant::now();
            let (pod, parts) = client.start_pod(&format!("pod-{i}")).await?;
            starts.push(t.elapsed());
            pods.push(pod);
            for (all, part) in steps.iter_mut().zip(parts) {
                all.push(part);
            }
        }
        let total = phase.elapsed();
        let start = summary(&starts, total);
        let steps = steps.map(|s| summary(&s, total));
        let mut teardowns = Vec::new();
        let phase = Instant::now();
        for pod in &pods {
            check_interrupt()?;
            let t = Instant::now();
            client.remove_pod(pod).await?;
            teardowns.push(t.elapsed());
        }
        let teardown = summary(&teardowns, phase.elapsed());

        let mut loaded_pods = Vec::new();
        for i in 0..opts.loaded_pods {
            check_interrupt()?;
            loaded_pods.push(client.start_pod(&format!("load-{i}")).await?.0);
        }
        tokio::time::sleep(SETTLE).await;
        let loaded = usage(&lab, name)?;
        for pod in &loaded_pods {
            check_interrupt()?;
            client.remove_pod(pod).await?;
        }
        Ok(RuntimeFigures {
            runtime: which,
            version,
            start,
            steps,
            teardown,
            idle,
            loaded,
        })
    })
}

/// Runs the benchmark for each runtime in turn.
pub fn run(opts: &CriBenchOptions) -> Result<CriFigures, CriBenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CriBenchError::Runtime)?;
    let mut runtimes = Vec::new();
    for which in &opts.runtimes {
        tracing::info!(runtime = ?which, pods = opts.pods, loaded = opts.loaded_pods, "benchmarking");
        runtimes.push(bench_runtime(*which, opts, &rt)?);
    }
    Ok(CriFigures {
        pods: opts.pods,
        loaded_pods: opts.loaded_pods,
        runtimes,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn memory_cells(u: &Usage) -> String {
    format!(
        "{:>7.1} {:>7.1} {:>4} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        mib(u.daemon.rss_kib),
        mib(u.daemon.pss_kib),
        u.helpers,
        mib(u.helpers_memory.rss_kib),
        mib(u.helpers_memory.pss_kib),
        mib(u.total().rss_kib),
        mib(u.total().pss_kib),
    )
}

/// The figures as a table, with the goal.
pub fn render(f: &CriFigures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "CRI pod start (RunPodSandbox + CreateContainer + StartContainer until RUNNING) and teardown (StopPodSandbox + RemovePodSandbox), {} pods one at a time; same registry, CNI (bridge + host-local) and runc",
        f.pods
    );
    let _ = writeln!(
        out,
        "{:<11} {:>12} {:>9} {:>15} {:>12}  version",
        "runtime", "start med ms", "p95 ms", "teardown med ms", "p95 ms"
    );
    for r in &f.runtimes {
        let _ = writeln!(
            out,
            "{:<11} {:>12.1} {:>9.1} {:>15.1} {:>12.1}  {}",
            name(r.runtime),
            r.start.median_ms,
            r.start.p95_ms,
            r.teardown.median_ms,
            r.teardown.p95_ms,
            r.version
        );
    }
    for r in &f.runtimes {
        let _ = writeln!(
            out,
            "{:<11} start steps, median ms: RunPodSandbox {:.1}, CreateContainer {:.1}, StartContainer until RUNNING {:.1}",
            name(r.runtime),
            r.steps[0].median_ms,
            r.steps[1].median_ms,
            r.steps[2].median_ms
        );
    }
    let _ = writeln!(
        out,
        "\nmemory, MiB (RSS counts shared pages in every process; PSS divides them):"
    );
    let _ = writeln!(
        out,
        "{:<11} {:<9} {:>7} {:>7} {:>4} {:>8} {:>8} {:>8} {:>8}",
        "runtime", "when", "dmn RSS", "dmn PSS", "hlp", "hlp RSS", "hlp PSS", "tot RSS", "tot PSS"
    );
    for r in &f.runtimes {
        for (when, u) in [
            ("idle", &r.idle),
            (format!("{} pods", f.loaded_pods).as_str(), &r.loaded),
        ] {
            let _ = writeln!(
                out,
                "{:<11} {:<9} {}",
                name(r.runtime),
                when,
                memory_cells(u)
            );
        }
    }
    let find = |w: BenchRuntime| f.runtimes.iter().find(|r| r.runtime == w);
    if let (Some(ours), Some(theirs)) =
        (find(BenchRuntime::Nodekit), find(BenchRuntime::Containerd))
    {
        if theirs.start.median_ms > 0.0 {
            let ratio = ours.start.median_ms / theirs.start.median_ms;
            let _ = writeln!(
                out,
                "\ngoal: nodekit median pod start <= {START_RATIO_GOAL}x containerd's: {ratio:.2}x ({})",
                if ratio <= START_RATIO_GOAL { "met" } else { "NOT met" }
            );
        }
    }
    out
}

fn name(r: BenchRuntime) -> &'static str {
    match r {
        BenchRuntime::Nodekit => "nodekit",
        BenchRuntime::NodekitPauseImage => "nk+pause",
        BenchRuntime::Containerd => "containerd",
    }
}

/// Writes the figures as JSON.
pub fn write_json(path: &Path, f: &CriFigures) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(f).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(rss: u64) -> Usage {
        Usage {
            daemon: Memory {
                rss_kib: rss,
                pss_kib: rss / 2,
            },
            helpers: 2,
            helpers_memory: Memory {
                rss_kib: 2048,
                pss_kib: 1024,
            },
        }
    }

    fn figures(runtime: BenchRuntime, median: f64) -> RuntimeFigures {
        let s = Summary::of(
            &[Duration::from_secs_f64(median / 1000.0)],
            Duration::from_secs(1),
        )
        .expect("one sample");
        RuntimeFigures {
            runtime,
            version: "x 1".into(),
            start: s,
            steps: [s; 3],
            teardown: s,
            idle: usage(1024),
            loaded: usage(4096),
        }
    }

    #[test]
    fn the_report_shows_both_runtimes_memory_and_the_goal() {
        let f = CriFigures {
            pods: 20,
            loaded_pods: 50,
            runtimes: vec![
                figures(BenchRuntime::Nodekit, 40.0),
                figures(BenchRuntime::Containerd, 200.0),
            ],
        };
        let text = render(&f);
        assert!(text.contains("nodekit"), "{text}");
        assert!(text.contains("containerd"), "{text}");
        assert!(text.contains("50 pods"), "{text}");
        assert!(text.contains("0.20x (met)"), "{text}");
        assert_eq!(usage(1024).total().rss_kib, 3072);
        let json = serde_json::to_value(&f).expect("json");
        assert_eq!(json["runtimes"][1]["runtime"], "containerd");
        assert_eq!(json["runtimes"][0]["loaded"]["helpers"], 2);
    }
}
