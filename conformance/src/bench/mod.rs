//! `nodekit-bench`: whole-binary CNI latency, measured the way a container runtime sees it.
//!
//! For each target — nodekit's plugin in bridge mode, in routed mode, the reference
//! `bridge` + `host-local`, and the *floor* (the bare kernel work through netlink, see
//! [`floor`]) — a fresh lab (node namespace, scratch directory) is built, one warm-up
//! ADD + DEL creates the network-level state (the bridge...), then N pods are added one at a
//! time and deleted one at a time, and again with C in flight at once. Each operation's wall
//! time is recorded: for plugins, from spawning the plugin process inside the node namespace
//! (env and stdin as a runtime sets them) to its exit with its output collected. Nothing is
//! asserted about the figures: they are summarised ([`stats`]) and printed ([`report`]).
//!
//! Plugins go through the conformance runner's libcni ([`CniRuntime`]: conflist, version
//! negotiation, `prevResult`, cached result on DEL), executed by the runner's [`NetnsExec`],
//! which blocks until the plugin exits, so no figure is rounded up to a polling tick. Ten
//! VERSION calls per plugin target record the bare cost of starting the plugin process.
//!
//! Every namespace and directory is a drop guard, so an error, a panic or a stop signal
//! ([`interrupt`]) leaves nothing behind. [`cluster`] is the multi-node benchmark (etcd
//! IPAM, `nodekit-netd` route convergence and memory).

pub mod cluster;
pub mod cri;
pub mod floor;
pub mod interrupt;
pub mod report;
pub mod stats;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use nodekit_nsutil::{NetNs, NsError, NETNS_RUN_DIR};
use serde::Serialize;
use serde_json::Value;

use crate::cni::conf::{ConfError, ConfList};
use crate::cni::exec::{
    Attachment, CallError, CniCommand, CniRuntime, NegotiateError, NetnsExec, DEFAULT_TIMEOUT,
};
use crate::cni::{nodekit_conflist, reference_conflist};
use crate::lab::{Lab, LabError};
use floor::{FloorError, FloorPod, FloorWorker};
use stats::Summary;

/// The interface name every pod gets.
const IFNAME: &str = "eth0";
/// Prefix length of the floor's pod addresses (`10.99.0.0/16`).
const FLOOR_PREFIX: u8 = 16;
/// The most pods a phase may have (the floor's address plan, see [`floor::pod_address`]).
pub const MAX_PODS: usize = 50_000;
/// How many VERSION calls measure a plugin's bare exec cost.
const VERSION_CALLS: usize = 10;

/// What is benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The bare kernel work through netlink, in-process (the lower bound).
    Floor,
    /// nodekit's `nodekit` + `nodekit-ipam` in bridge mode.
    Bridge,
    /// nodekit's `nodekit` + `nodekit-ipam` in routed mode.
    Routed,
    /// The reference `bridge` + `host-local` plugins.
    Reference,
}

impl Target {
    /// Every target, in run and print order.
    pub const ALL: [Target; 4] = [Self::Floor, Self::Bridge, Self::Routed, Self::Reference];

    /// The label printed in the table.
    pub fn label(self) -> &'static str {
        match self {
            Self::Floor => "floor (netlink)",
            Self::Bridge => "nodekit bridge",
            Self::Routed => "nodekit routed",
            Self::Reference => "reference bridge",
        }
    }

    /// The short name used by `--targets` and in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Bridge => "bridge",
            Self::Routed => "routed",
            Self::Reference => "reference",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// A measured operation: the CNI verb the plugins are called with, `ADD`, `DEL` or `VERSION`
/// (the plugin's bare exec-and-exit cost, no kernel work); the floor does the kernel work of
/// ADD and DEL. Printed and serialised as the verb.
pub type Op = CniCommand;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Pods per phase (1..=[`MAX_PODS`]).
    pub pods: usize,
    /// Operations in flight at once in the concurrent phases (>= 1; 1 skips them).
    pub concurrency: usize,
    /// Targets to run; run in [`Target::ALL`] order whatever the order given.
    pub targets: Vec<Target>,
    /// Where `nodekit` and `nodekit-ipam` are (also their `CNI_PATH`).
    pub cni_bin_dir: PathBuf,
    /// Where the reference `bridge` and `host-local` are.
    pub reference_bin_dir: PathBuf,
    /// How long one plugin call may run before it is killed.
    pub timeout: Duration,
    /// How long the pods stay up between the ADD and the DEL phase. Zero (the default)
    /// deletes them at once, while their IPv6 link-local addresses are still tentative;
    /// a few seconds lets duplicate address detection finish, as for long-lived pods, which
    /// makes deleting an interface with IPv6 forwarding on markedly slower in the kernel.
    pub settle: Duration,
}

impl BenchOptions {
    /// Options with the defaults of the command line (50 pods, 10 concurrent, every
    /// target, the reference from `/usr/lib/cni`) and nodekit's plugins in `cni_bin_dir`.
    pub fn new(cni_bin_dir: PathBuf) -> Self {
        Self {
            pods: 50,
            concurrency: 10,
            targets: Target::ALL.to_vec(),
            cni_bin_dir,
            reference_bin_dir: PathBuf::from(crate::cni::REFERENCE_BIN_DIR),
            timeout: DEFAULT_TIMEOUT,
            settle: Duration::ZERO,
        }
    }

    /// The concurrency levels measured: 1, then `concurrency` (capped at `pods`) if larger.
    pub fn levels(&self) -> Vec<usize> {
        let conc = self.concurrency.min(self.pods).max(1);
        if conc > 1 {
            vec![1, conc]
        } else {
            vec![1]
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        if self.pods == 0 || self.pods > MAX_PODS {
            return Err(BenchError::InvalidOption {
                option: "--pods",
                reason: format!("must be between 1 and {MAX_PODS}, got {}", self.pods),
            });
        }
        if self.concurrency == 0 {
            return Err(BenchError::InvalidOption {
                option: "--concurrency",
                reason: "must be at least 1".into(),
            });
        }
        if self.targets.is_empty() {
            return Err(BenchError::InvalidOption {
                option: "--targets",
                reason: "names no target".into(),
            });
        }
        Ok(())
    }
}

/// Why the benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option is out of range.
    #[error("{option} {reason}")]
    InvalidOption {
        /// The flag.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// One of nodekit's plugin executables is missing.
    #[error("plugin executable `{name}` not found in {}: build nodekit's plugins with `cargo build --release` so they sit beside nodekit-bench, or point --cni-bin-dir at them", dir.display())]
    MissingPlugin {
        /// The executable.
        name: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// The lab (namespaces, scratch directory) could not be set up.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The node namespace could not be opened.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// A generated configuration is unusable.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// No CNI version could be agreed with a target's plugins.
    #[error("{target}: {source}")]
    Negotiate {
        /// The target.
        target: Target,
        /// Why.
        #[source]
        source: NegotiateError,
    },
    /// A plugin call failed.
    #[error("{target}: {op} of pod {pod} ({phase}) failed: {source}")]
    Call {
        /// The target.
        target: Target,
        /// The verb.
        op: Op,
        /// The pod's index in its phase.
        pod: usize,
        /// `warm-up`, `sequential`, `concurrency 10`.
        phase: String,
        /// The failure (boxed: it is large).
        #[source]
        source: Box<CallError>,
    },
    /// A floor operation failed.
    #[error("floor: {op} of pod {pod} ({phase}) failed: {source}")]
    Floor {
        /// The verb.
        op: Op,
        /// The pod's index in its phase.
        pod: usize,
        /// `warm-up`, `sequential`, `concurrency 10`.
        phase: String,
        /// The failure (boxed: it is large).
        #[source]
        source: Box<FloorError>,
    },
    /// A floor worker could not be set up.
    #[error("floor: cannot set up a worker: {0}")]
    FloorWorker(#[source] Box<FloorError>),
    /// A benchmark worker thread panicked.
    #[error("a benchmark worker thread panicked")]
    WorkerPanicked,
    /// A stop signal arrived (Ctrl-C, SIGTERM, SIGHUP).
    #[error("interrupted")]
    Interrupted,
    /// The multi-node lab could not be set up.
    #[error(transparent)]
    MultiNode(#[from] crate::lab::multinode::MultiNodeError),
    /// Route notifications could not be subscribed to.
    #[error(transparent)]
    Watch(#[from] cluster::watch::WatchError),
    /// A node's routes could not be read.
    #[error(transparent)]
    Inspect(crate::inspect::InspectError),
    /// Two pods got the same address.
    #[error("address {address} was handed out more than once: to {pods}")]
    DuplicateAddress {
        /// The address.
        address: std::net::IpAddr,
        /// The container IDs holding it.
        pods: String,
    },
    /// The cluster did not reach a state in time.
    #[error("{what} did not converge within {within:?}: {missing}")]
    NotConverged {
        /// What was awaited.
        what: String,
        /// How long it was given.
        within: Duration,
        /// What was still missing.
        missing: String,
    },
    /// A `nodekitctl` call failed.
    #[error("nodekitctl {args}: {reason}")]
    Ctl {
        /// Its arguments.
        args: String,
        /// Why it failed.
        reason: String,
    },
    /// A node's `nodekit-netd` could not be measured.
    #[error("nodekit-netd of node {node}: {reason}")]
    Netd {
        /// The node.
        node: usize,
        /// Why.
        reason: String,
    },
    /// A phase ended without a single sample.
    #[error("{0}: no sample was taken")]
    EmptyPhase(&'static str),
}

/// The figures of one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// The target.
    pub target: Target,
    /// The verb.
    pub op: Op,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// The summary.
    #[serde(flatten)]
    pub summary: Summary,
    /// Every sample in milliseconds, in pod order.
    pub samples_ms: Vec<f64>,
}

/// A target that was not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The target.
    pub target: Target,
    /// Why, with how to fix it.
    pub reason: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Pods per phase.
    pub pods: usize,
    /// The concurrency levels measured.
    pub levels: Vec<usize>,
    /// How long pods stayed up between ADD and DEL, in milliseconds.
    pub settle_ms: u64,
    /// Every phase's figures, in run order.
    pub results: Vec<Measurement>,
    /// Targets not run.
    pub skipped: Vec<Skipped>,
}

impl BenchReport {
    /// The figures of `target`'s `op` at `concurrency`, if measured.
    pub fn get(&self, target: Target, op: Op, concurrency: usize) -> Option<&Measurement> {
        self.results
            .iter()
            .find(|m| m.target == target && m.op == op && m.concurrency == concurrency)
    }
}

/// Runs the benchmark. Targets whose plugins are missing are skipped with a note when they
/// are the reference's, and an error when they are nodekit's (checked before any lab is
/// built). Progress goes to `tracing` at info level.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    opts.validate()?;
    let mut targets = opts.targets.clone();
    targets.sort();
    targets.dedup();
    let mut report = BenchReport {
        pods: opts.pods,
        levels: opts.levels(),
        settle_ms: u64::try_from(opts.settle.as_millis()).unwrap_or(u64::MAX),
        results: Vec::new(),
        skipped: Vec::new(),
    };
    let mut runnable = Vec::new();
    for target in targets {
        match missing_plugin(opts, target)? {
            None => runnable.push(target),
            Some((name, dir)) if target == Target::Reference => {
                let reason = format!(
                    "reference plugin `{name}` not found in {}: apt-get install containernetworking-plugins (or point --reference-bin-dir at them)",
                    dir.display()
                );
                tracing::warn!(%target, %reason, "skipping target");
                report.skipped.push(Skipped { target, reason });
            }
            Some((name, dir)) => return Err(BenchError::MissingPlugin { name, dir }),
        }
    }
    for target in runnable {
        interrupt::check()?;
        tracing::info!(%target, pods = opts.pods, "benchmarking");
        let lab = Lab::create("bench")?;
        let results = match target {
            Target::Floor => bench_floor(&lab, opts)?,
            _ => bench_plugin(&lab, target, opts)?,
        };
        report.results.extend(results);
    }
    Ok(report)
}

/// The bin dir and conflist of a plugin target, with plugin state under `scratch`.
fn plugin_setup(opts: &BenchOptions, target: Target, scratch: &Path) -> (PathBuf, Value) {
    match target {
        Target::Reference => (opts.reference_bin_dir.clone(), reference_conflist(scratch)),
        Target::Routed => (
            opts.cni_bin_dir.clone(),
            nodekit_conflist("routed", scratch),
        ),
        Target::Bridge | Target::Floor => (
            opts.cni_bin_dir.clone(),
            nodekit_conflist("bridge", scratch),
        ),
    }
}

/// The first executable `target` needs that is not in its bin dir.
fn missing_plugin(
    opts: &BenchOptions,
    target: Target,
) -> Result<Option<(String, PathBuf)>, BenchError> {
    if target == Target::Floor {
        return Ok(None);
    }
    let (dir, value) = plugin_setup(opts, target, Path::new("/nonexistent-scratch"));
    let conf = ConfList::from_value(value, "generated conflist")?;
    Ok(conf
        .executables()
        .into_iter()
        .find(|name| !dir.join(name).is_file())
        .map(|name| (name, dir)))
}

fn phase_name(conc: usize) -> String {
    if conc == 1 {
        "sequential".into()
    } else {
        format!("concurrency {conc}")
    }
}

/// The figures of `phase`, which ran `target`'s `op` at `concurrency` (none if it is empty).
fn measurement<T>(
    target: Target,
    op: Op,
    concurrency: usize,
    phase: &Phase<T>,
) -> Option<Measurement> {
    Summary::of(&phase.samples, phase.total).map(|summary| Measurement {
        target,
        op,
        concurrency,
        summary,
        samples_ms: phase.samples.iter().map(|d| stats::millis(*d)).collect(),
    })
}

/// The runtime that runs `target`'s plugins inside `lab`'s node namespace, with plugin state
/// in its scratch directory, its version negotiated.
fn plugin_runtime(
    lab: &Lab,
    target: Target,
    opts: &BenchOptions,
) -> Result<CniRuntime, BenchError> {
    let (bin_dir, value) = plugin_setup(opts, target, lab.scratch());
    let conf = ConfList::from_value(value, "generated conflist")?;
    let node = NetNs::open(Path::new(NETNS_RUN_DIR).join(lab.node_name()))?;
    let exec = Box::new(NetnsExec::new(node, opts.timeout));
    let mut rt = CniRuntime::new(exec, bin_dir, conf);
    rt.negotiate()
        .1
        .map_err(|source| BenchError::Negotiate { target, source })?;
    Ok(rt)
}

/// Maps a failed plugin call of `target` (`op` of pod `pod` in `phase`) to a [`BenchError`].
fn call_err(
    target: Target,
    op: Op,
    pod: usize,
    phase: &str,
) -> impl FnOnce(CallError) -> BenchError {
    let phase = phase.to_string();
    move |source| BenchError::Call {
        target,
        op,
        pod,
        phase,
        source: Box::new(source),
    }
}

fn bench_plugin(
    lab: &Lab,
    target: Target,
    opts: &BenchOptions,
) -> Result<Vec<Measurement>, BenchError> {
    let rt = plugin_runtime(lab, target, opts)?;

    // Warm-up: creates the bridge (and whatever else a first ADD sets up), loads the
    // binaries into the page cache.
    {
        let pod = lab.pod()?;
        let att = Attachment {
            container_id: format!("bench-{target}-warmup"),
            netns: pod.path(),
            ifname: IFNAME.into(),
        };
        let cached = rt
            .add(&att)
            .map_err(call_err(target, Op::Add, 0, "warm-up"))?;
        rt.del(&att, Some(&cached))
            .map_err(call_err(target, Op::Del, 0, "warm-up"))?;
    }

    let mut out = Vec::new();
    for conc in opts.levels() {
        let phase = phase_name(conc);
        let pods = (0..opts.pods)
            .map(|_| lab.pod())
            .collect::<Result<Vec<_>, _>>()?;
        let atts: Vec<Attachment> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| Attachment {
                container_id: format!("bench-{target}-c{conc}-{i}"),
                netns: pod.path(),
                ifname: IFNAME.into(),
            })
            .collect();
        tracing::info!(%target, %phase, "ADD");
        let added = drive(
            opts.pods,
            conc,
            || Ok(()),
            |_, i| {
                rt.add(&atts[i])
                    .map_err(call_err(target, Op::Add, i, &phase))
            },
        )?;
        out.extend(measurement(target, Op::Add, conc, &added));
        std::thread::sleep(opts.settle);
        tracing::info!(%target, %phase, "DEL");
        let deleted = drive(
            opts.pods,
            conc,
            || Ok(()),
            |_, i| {
                rt.del(&atts[i], added.outputs.get(i))
                    .map_err(call_err(target, Op::Del, i, &phase))
            },
        )?;
        out.extend(measurement(target, Op::Del, conc, &deleted));
    }

    let versions = drive(
        VERSION_CALLS,
        1,
        || Ok(()),
        |_, i| {
            rt.version_of(0)
                .map(|_| ())
                .map_err(call_err(target, Op::Version, i, "exec baseline"))
        },
    )?;
    out.extend(measurement(target, Op::Version, 1, &versions));
    Ok(out)
}

fn bench_floor(lab: &Lab, opts: &BenchOptions) -> Result<Vec<Measurement>, BenchError> {
    let floor_err = |op, pod, phase: &str| {
        let phase = phase.to_string();
        move |source| BenchError::Floor {
            op,
            pod,
            phase,
            source: Box::new(source),
        }
    };
    let new_worker =
        || FloorWorker::new(lab.node()).map_err(|e| BenchError::FloorWorker(Box::new(e)));
    {
        let worker = new_worker()?;
        let pod = lab.pod()?;
        let host = "nkfw0";
        worker
            .add(&FloorPod {
                host,
                ifname: IFNAME,
                ns: &pod,
                address: floor::pod_address(0),
                prefix: FLOOR_PREFIX,
                gateway: floor::GATEWAY,
            })
            .map_err(floor_err(Op::Add, 0, "warm-up"))?;
        worker.del(host).map_err(floor_err(Op::Del, 0, "warm-up"))?;
    }

    let mut out = Vec::new();
    for conc in opts.levels() {
        let phase = phase_name(conc);
        let pods = (0..opts.pods)
            .map(|_| lab.pod())
            .collect::<Result<Vec<_>, _>>()?;
        let hosts: Vec<String> = (0..opts.pods).map(|i| format!("nkf{conc}x{i}")).collect();
        let specs: Vec<FloorPod<'_>> = pods
            .iter()
            .zip(&hosts)
            .enumerate()
            .map(|(i, (pod, host))| FloorPod {
                host,
                ifname: IFNAME,
                ns: pod,
                address: floor::pod_address(i),
                prefix: FLOOR_PREFIX,
                gateway: floor::GATEWAY,
            })
            .collect();
        tracing::info!(target = %Target::Floor, %phase, "ADD");
        let added = drive(opts.pods, conc, new_worker, |w, i| {
            w.add(&specs[i]).map_err(floor_err(Op::Add, i, &phase))
        })?;
        out.extend(measurement(Target::Floor, Op::Add, conc, &added));
        std::thread::sleep(opts.settle);
        tracing::info!(target = %Target::Floor, %phase, "DEL");
        let deleted = drive(opts.pods, conc, new_worker, |w, i| {
            w.del(&hosts[i]).map_err(floor_err(Op::Del, i, &phase))
        })?;
        out.extend(measurement(Target::Floor, Op::Del, conc, &deleted));
    }
    Ok(out)
}

/// One phase's raw figures.
struct Phase<T> {
    /// Each operation's latency, by pod index.
    samples: Vec<Duration>,
    /// Wall time from the start signal to the last operation's end.
    total: Duration,
    /// Each operation's output, by pod index.
    outputs: Vec<T>,
}

/// Runs `op(worker, i)` for every `i < n` on `conc` threads (each with its own `make()`
/// state, built before the clock starts), each thread taking the next index as soon as it
/// is free, so `conc` operations are in flight at once. Stops at the first error, or when a
/// stop signal arrived ([`interrupt::check`]).
fn drive<W, T>(
    n: usize,
    conc: usize,
    make: impl Fn() -> Result<W, BenchError> + Sync,
    op: impl Fn(&mut W, usize) -> Result<T, BenchError> + Sync,
) -> Result<Phase<T>, BenchError>
where
    T: Send,
{
    let threads = conc.clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    type Done<T> = Vec<(usize, Duration, T)>;
    let (joined, total): (Vec<Result<Done<T>, BenchError>>, Duration) =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let worker = make();
                        start.wait();
                        let mut worker = worker?;
                        let mut done = Vec::new();
                        while !stop.load(Ordering::SeqCst) {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= n {
                                break;
                            }
                            if let Err(e) = interrupt::check() {
                                stop.store(true, Ordering::SeqCst);
                                return Err(e);
                            }
                            let began = Instant::now();
                            match op(&mut worker, i) {
                                Ok(v) => done.push((i, began.elapsed(), v)),
                                Err(e) => {
                                    stop.store(true, Ordering::SeqCst);
                                    return Err(e);
                                }
                            }
                        }
                        Ok(done)
                    })
                })
                .collect();
            start.wait();
            let began = Instant::now();
            let joined = handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(BenchError::WorkerPanicked)))
                .collect();
            (joined, began.elapsed())
        });
    let mut all = Vec::with_capacity(n);
    for result in joined {
        all.extend(result?);
    }
    all.sort_by_key(|(i, _, _)| *i);
    let (samples, outputs) = all.into_iter().map(|(_, d, v)| (d, v)).unzip();
    Ok(Phase {
        samples,
        total,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn drive_runs_every_index_once_in_pod_order_with_bounded_concurrency() {
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let phase = drive(
            40,
            4,
            || Ok(0usize),
            |calls, i| {
                *calls += 1;
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(i * 10)
            },
        )
        .expect("runs");
        assert_eq!(phase.outputs, (0..40).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(phase.samples.len(), 40);
        assert!(phase.samples.iter().all(|d| *d >= Duration::from_millis(2)));
        assert!(peak.load(Ordering::SeqCst) <= 4);
        assert!(
            phase.total >= Duration::from_millis(20),
            "{:?}",
            phase.total
        );
    }

    #[test]
    fn drive_stops_at_the_first_error_and_reports_it() {
        let ran = AtomicUsize::new(0);
        let err = drive(
            100,
            1,
            || Ok(()),
            |_, i| {
                ran.fetch_add(1, Ordering::SeqCst);
                if i == 3 {
                    Err(BenchError::WorkerPanicked)
                } else {
                    Ok(())
                }
            },
        )
        .err()
        .expect("fails");
        assert!(matches!(err, BenchError::WorkerPanicked));
        assert_eq!(ran.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_failing_worker_setup_does_not_hang_the_start_signal() {
        let result = drive::<(), ()>(
            5,
            3,
            || {
                Err(BenchError::InvalidOption {
                    option: "--x",
                    reason: "setup".into(),
                })
            },
            |_, _| Ok(()),
        );
        assert!(matches!(result, Err(BenchError::InvalidOption { .. })));
    }

    #[test]
    fn levels_are_one_then_the_capped_concurrency() {
        let mut o = BenchOptions::new(PathBuf::from("/bin"));
        assert_eq!(o.levels(), vec![1, 10]);
        o.pods = 4;
        assert_eq!(o.levels(), vec![1, 4]);
        o.concurrency = 1;
        assert_eq!(o.levels(), vec![1]);
    }

    #[test]
    fn options_out_of_range_are_rejected() {
        let mut o = BenchOptions::new(PathBuf::from("/bin"));
        o.pods = 0;
        assert!(run(&o).is_err());
        o.pods = 1;
        o.concurrency = 0;
        let err = run(&o).expect_err("invalid");
        assert_eq!(err.to_string(), "--concurrency must be at least 1");
    }

    #[test]
    fn missing_reference_plugins_skip_the_target_and_missing_nodekit_is_an_error() {
        let empty = tempfile::tempdir().expect("tempdir");
        let mut o = BenchOptions::new(empty.path().to_path_buf());
        o.reference_bin_dir = empty.path().to_path_buf();
        o.targets = vec![Target::Reference];
        let report = run(&o).expect("a missing reference is not an error");
        assert!(report.results.is_empty());
        assert_eq!(report.skipped.len(), 1);
        assert!(
            report.skipped[0]
                .reason
                .contains("apt-get install containernetworking-plugins"),
            "{}",
            report.skipped[0].reason
        );
        o.targets = vec![Target::Routed, Target::Reference];
        let err = run(&o).expect_err("nodekit missing");
        assert!(
            matches!(&err, BenchError::MissingPlugin { name, .. } if name == "nodekit"),
            "{err}"
        );
    }
}
