//! `nodekit-bench cluster`: nodekit's cluster networking measured on the multi-node lab
//! ([`MultiNodeLab`]: etcd on an underlay, N node namespaces each running `nodekit-netd`),
//! in one run, driving the binaries only:
//!
//! 1. ADD then DEL of `pods` pods one at a time on node 1 against etcd, and the baseline: the
//!    same on a one-node lab with the file store (the latency bench's lab and runtime, same
//!    mode). The two alternate call by call, so both see the same machine at the same
//!    moment (the figures of a shared 2-core VM drift by tens of percent within seconds);
//! 3. a burst: `pods` pods on every node at once, `concurrency` ADDs in flight per node,
//!    timed from the common start to the last exit (addresses per second), and every pod's
//!    address checked distinct;
//! 4. block claims: a pool of one block per claim (`claimK`, `10.90.K.0/26`, created
//!    beforehand), then one ADD from it on a node in turn; the time from the ADD's start to
//!    the block's route arriving on every other node, seen by route notifications
//!    ([`watch`]) subscribed in each node namespace before the first ADD. The claim commits
//!    inside the ADD, so this is an upper bound; the ADD's own time is reported beside it;
//! 5. each netd's memory (VmRSS and its peak VmHWM) after all of it, and the CPU time it
//!    used.
//!
//! Nothing is asserted about the figures: [`report`] prints them against the goals. The lab
//! is a drop guard: any error, panic or stop signal ([`super::interrupt`]) tears it down.

pub mod report;
pub mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nix::unistd::{sysconf, SysconfVar};
use nodekit_nsutil::NetNs;
use serde::Serialize;
use serde_json::{json, Value};

use super::stats::{self, Summary};
use super::{call_err, drive, interrupt, BenchError, BenchOptions, Op, Target, IFNAME};
use crate::cni::conf::ConfList;
use crate::cni::exec::{Attachment, CniRuntime, NetnsExec};
use crate::cni::nodekit_conflist;
use crate::inspect;
use crate::lab::multinode::{
    etcd_datastore, node_ip, node_name, MultiNodeLab, MultiNodeOptions, MAX_NODES,
    NETD_ROUTE_PROTOCOL,
};
use crate::lab::{Lab, PodNs};
use watch::RouteWatch;

/// The executables a cluster run needs in the CNI bin dir.
pub const EXECUTABLES: [&str; 4] = ["nodekit", "nodekit-ipam", "nodekit-netd", "nodekitctl"];
/// The most block claims a run may measure (one `10.90.K.0/26` pool each).
pub const MAX_CLAIMS: usize = 200;
/// How long every node may take to route a newly claimed block before the run fails.
const CLAIM_DEADLINE: Duration = Duration::from_secs(5);
/// Pause before each claim, so the netds' passes for the previous one are over.
const QUIET: Duration = Duration::from_millis(200);
/// How long the routes may take to converge after the burst.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);

/// What a cluster run does.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes in the lab (2..=[`MAX_NODES`]).
    pub nodes: usize,
    /// Pods per node in the burst, and pods of the sequential phases.
    pub pods: usize,
    /// ADDs in flight per node in the burst.
    pub concurrency: usize,
    /// Block claims measured (1..=[`MAX_CLAIMS`]).
    pub claims: usize,
    /// nodekit's wiring mode ([`Target::Routed`] or [`Target::Bridge`]).
    pub mode: Target,
    /// Where nodekit's binaries are (also `CNI_PATH`).
    pub cni_bin_dir: PathBuf,
    /// How long one plugin call may run before it is killed.
    pub timeout: Duration,
    /// Each netd's full resync period (changes reach it through its etcd watch anyway).
    pub netd_resync: Duration,
}

impl ClusterOptions {
    /// The figures: 10 nodes x 30 pods, 10 concurrent ADDs per node, 10 claims,
    /// routed mode, netd's default 2 s resync, binaries in `cni_bin_dir`.
    pub fn new(cni_bin_dir: PathBuf) -> Self {
        Self {
            nodes: 10,
            pods: 30,
            concurrency: 10,
            claims: 10,
            mode: Target::Routed,
            cni_bin_dir,
            timeout: crate::cni::exec::DEFAULT_TIMEOUT,
            netd_resync: Duration::from_secs(2),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let invalid = |option, reason: String| Err(BenchError::InvalidOption { option, reason });
        if !(2..=MAX_NODES).contains(&self.nodes) {
            return invalid(
                "--nodes",
                format!("must be 2..={MAX_NODES}, got {}", self.nodes),
            );
        }
        if !(1..=super::MAX_PODS).contains(&self.pods) {
            return invalid("--pods", format!("must be at least 1, got {}", self.pods));
        }
        if self.concurrency == 0 {
            return invalid("--concurrency", "must be at least 1".into());
        }
        if !(1..=MAX_CLAIMS).contains(&self.claims) {
            return invalid(
                "--claims",
                format!("must be 1..={MAX_CLAIMS}, got {}", self.claims),
            );
        }
        if !matches!(self.mode, Target::Routed | Target::Bridge) {
            return invalid(
                "--mode",
                format!("must be routed or bridge, got {}", self.mode),
            );
        }
        Ok(())
    }
}

/// One phase's latencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// The summary (`ops_per_s` over the phase's wall time).
    #[serde(flatten)]
    pub summary: Summary,
    /// Every sample in milliseconds.
    pub samples_ms: Vec<f64>,
}

impl Figure {
    fn of(phase: &'static str, samples: &[Duration], total: Duration) -> Result<Self, BenchError> {
        Ok(Self {
            summary: Summary::of(samples, total).ok_or(BenchError::EmptyPhase(phase))?,
            samples_ms: samples.iter().map(|d| stats::millis(*d)).collect(),
        })
    }
}

/// One netd's memory after the run, and the CPU time it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NetdUsage {
    /// The node.
    pub node: usize,
    /// Resident set size (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub peak_kib: u64,
    /// User + system CPU time since it started, milliseconds.
    pub cpu_ms: u64,
}

/// Everything a cluster run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterReport {
    /// Nodes in the lab.
    pub nodes: usize,
    /// Pods per node in the burst (and per sequential phase).
    pub pods: usize,
    /// ADDs in flight per node in the burst.
    pub concurrency: usize,
    /// The wiring mode.
    pub mode: Target,
    /// Each netd's resync period, milliseconds.
    pub netd_resync_ms: u64,
    /// One-node file-store ADD, sequential (the baseline; alternates with `etcd_add`).
    pub file_add: Figure,
    /// One-node file-store DEL, sequential (alternates with `etcd_del`).
    pub file_del: Figure,
    /// etcd ADD on node 1, sequential.
    pub etcd_add: Figure,
    /// etcd DEL on node 1, sequential.
    pub etcd_del: Figure,
    /// The burst's ADDs on every node at once (`ops_per_s`: addresses per second).
    pub burst_add: Figure,
    /// Distinct addresses the burst handed out (equal to its pod count when none repeats).
    pub distinct_addresses: usize,
    /// Per claim, from the claiming ADD's start until the block's route was on every other
    /// node (the slowest node).
    pub claim_to_route: Figure,
    /// The claiming ADDs' own latency.
    pub claim_add: Figure,
    /// Each netd's memory and CPU time, by node.
    pub netd: Vec<NetdUsage>,
    /// etcd's CPU time over the run, milliseconds (it serves every node).
    pub etcd_cpu_ms: u64,
    /// The machine's 1-minute load average when the run started and when it ended: the
    /// figures of a busy machine are not those of an idle one.
    pub load_average: [f64; 2],
}

/// Runs the cluster benchmark (progress to `tracing` at info level).
pub fn run(opts: &ClusterOptions) -> Result<ClusterReport, BenchError> {
    opts.validate()?;
    if let Some(name) = EXECUTABLES
        .iter()
        .find(|name| !opts.cni_bin_dir.join(name).is_file())
    {
        return Err(BenchError::MissingPlugin {
            name: name.to_string(),
            dir: opts.cni_bin_dir.clone(),
        });
    }
    let load_at_start = load_average();
    tracing::info!(nodes = opts.nodes, "building the multi-node lab");
    let lab = MultiNodeLab::create_with(
        opts.nodes,
        &opts.cni_bin_dir,
        &MultiNodeOptions {
            netd_resync: opts.netd_resync,
        },
    )?;
    let nodes: Vec<usize> = (1..=opts.nodes).collect();
    let watch = RouteWatch::start(nodes.iter().map(|i| (*i, &**lab.node(*i))))?;
    wait_registered(&lab)?;
    let runtimes = nodes
        .iter()
        .map(|i| node_runtime(&lab, opts, *i, ""))
        .collect::<Result<Vec<_>, _>>()?;

    tracing::info!("sequential ADD and DEL: etcd on node 1, file store on one node");
    let [file_add, etcd_add, file_del, etcd_del] = sequential(&lab, &runtimes[0], opts)?;
    tracing::info!(
        pods = opts.nodes * opts.pods,
        concurrency = opts.concurrency,
        "etcd: burst on every node"
    );
    let (burst_add, distinct_addresses) = burst(&lab, &runtimes, opts)?;
    wait_converged(&lab)?;
    tracing::info!(
        claims = opts.claims,
        "block claim -> route on every other node"
    );
    let (claim_to_route, claim_add) = claims(&lab, &watch, opts)?;
    let netd = nodes
        .iter()
        .map(|i| netd_usage(&lab, *i))
        .collect::<Result<Vec<_>, _>>()?;
    let etcd_cpu_ms = lab
        .etcd_pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| cpu_ticks(&stat))
        .map_or(0, |ticks| ticks * 1000 / ticks_per_second());
    Ok(ClusterReport {
        nodes: opts.nodes,
        pods: opts.pods,
        concurrency: opts.concurrency,
        mode: opts.mode,
        netd_resync_ms: u64::try_from(opts.netd_resync.as_millis()).unwrap_or(u64::MAX),
        file_add,
        file_del,
        etcd_add,
        etcd_del,
        burst_add,
        distinct_addresses,
        claim_to_route,
        claim_add,
        netd,
        etcd_cpu_ms,
        load_average: [load_at_start, load_average()],
    })
}

/// The 1-minute load average (`/proc/loadavg`), 0 when unreadable.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The runtime that runs nodekit inside node `i`'s namespace against the lab's etcd, with
/// `cni_args` (`IP_POOLS=...`) on every call.
fn node_runtime(
    lab: &MultiNodeLab,
    opts: &ClusterOptions,
    i: usize,
    cni_args: &str,
) -> Result<CniRuntime, BenchError> {
    let mut list = nodekit_conflist(opts.mode.key(), lab.scratch());
    list["plugins"][0]["nodeName"] = json!(node_name(i));
    list["plugins"][0]["ipam"]["datastore"] = etcd_datastore();
    let conf = ConfList::from_value(list, "generated cluster conflist")?;
    let node = NetNs::open(lab.node(i).path())?;
    let mut rt = CniRuntime::new(
        Box::new(NetnsExec::new(node, opts.timeout)),
        opts.cni_bin_dir.clone(),
        conf,
    )
    .with_cni_args(cni_args);
    rt.negotiate().1.map_err(|source| BenchError::Negotiate {
        target: opts.mode,
        source,
    })?;
    Ok(rt)
}

/// `count` fresh pod namespaces from `make` and their attachments `bench-<tag>-<k>`.
fn pods(
    make: impl Fn() -> Result<PodNs, BenchError>,
    tag: &str,
    count: usize,
) -> Result<(Vec<PodNs>, Vec<Attachment>), BenchError> {
    let mut namespaces = Vec::with_capacity(count);
    let mut attachments = Vec::with_capacity(count);
    for k in 0..count {
        interrupt::check()?;
        let pod = make()?;
        attachments.push(Attachment {
            container_id: format!("bench-{tag}-{k}"),
            netns: pod.path(),
            ifname: IFNAME.into(),
        });
        namespaces.push(pod);
    }
    Ok((namespaces, attachments))
}

/// Warm-up ADD + DEL on both, then `pods` ADDs one at a time on node 1 (etcd) and on a
/// one-node lab (file store), alternating, then their DELs the same way. Returns
/// [file ADD, etcd ADD, file DEL, etcd DEL]; each rate is one over the mean latency.
fn sequential(
    lab: &MultiNodeLab,
    etcd: &CniRuntime,
    opts: &ClusterOptions,
) -> Result<[Figure; 4], BenchError> {
    let target = opts.mode;
    let one_node = Lab::create("bench")?;
    let file = super::plugin_runtime(
        &one_node,
        target,
        &BenchOptions {
            timeout: opts.timeout,
            ..BenchOptions::new(opts.cni_bin_dir.clone())
        },
    )?;
    let (_file_pods, file_atts) = pods(|| Ok(one_node.pod()?), "file", opts.pods + 1)?;
    let (_etcd_pods, etcd_atts) = pods(|| Ok(lab.pod()?), "etcd", opts.pods + 1)?;
    let stores = [(&file, &file_atts), (etcd, &etcd_atts)];
    // Pod 0 is the warm-up: it loads the binaries, claims the first block.
    let mut added: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let mut times: [Vec<Duration>; 4] = Default::default();
    for k in 0..=opts.pods {
        interrupt::check()?;
        // Alternate which store goes first, so neither always follows the other.
        for s in [k % 2, 1 - k % 2] {
            let (rt, atts) = stores[s];
            let began = Instant::now();
            let result = rt
                .add(&atts[k])
                .map_err(call_err(target, Op::Add, k, "sequential"))?;
            if k > 0 {
                times[s].push(began.elapsed());
            }
            added[s].push(result);
        }
    }
    for k in 0..=opts.pods {
        interrupt::check()?;
        for s in [k % 2, 1 - k % 2] {
            let (rt, atts) = stores[s];
            let began = Instant::now();
            rt.del(&atts[k], added[s].get(k)).map_err(call_err(
                target,
                Op::Del,
                k,
                "sequential",
            ))?;
            if k > 0 {
                times[2 + s].push(began.elapsed());
            }
        }
    }
    let figure = |phase, samples: &[Duration]| Figure::of(phase, samples, samples.iter().sum());
    Ok([
        figure("file store ADD", &times[0])?,
        figure("etcd ADD", &times[1])?,
        figure("file store DEL", &times[2])?,
        figure("etcd DEL", &times[3])?,
    ])
}

/// `pods` ADDs on every node at once, `concurrency` in flight per node. Returns the figure
/// (throughput over the whole burst) and how many distinct addresses were handed out; an
/// address handed out twice is an error.
fn burst(
    lab: &MultiNodeLab,
    runtimes: &[CniRuntime],
    opts: &ClusterOptions,
) -> Result<(Figure, usize), BenchError> {
    let target = opts.mode;
    let mut namespaces = Vec::new();
    let mut attachments = Vec::new();
    for i in 1..=runtimes.len() {
        let (ns, atts) = pods(|| Ok(lab.pod()?), &format!("burst-n{i}"), opts.pods)?;
        namespaces.push(ns);
        attachments.push(atts);
    }
    let start = Barrier::new(runtimes.len() + 1);
    let (phases, total) = std::thread::scope(|scope| {
        let handles: Vec<_> = runtimes
            .iter()
            .zip(&attachments)
            .map(|(rt, atts)| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    drive(
                        opts.pods,
                        opts.concurrency,
                        || Ok(()),
                        |_, k| {
                            rt.add(&atts[k])
                                .map_err(call_err(target, Op::Add, k, "etcd burst"))
                        },
                    )
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let phases: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(BenchError::WorkerPanicked)))
            .collect();
        (phases, began.elapsed())
    });
    let mut samples = Vec::new();
    let mut holders: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for (phase, atts) in phases.into_iter().zip(&attachments) {
        let phase = phase?;
        samples.extend(phase.samples);
        for (result, att) in phase.outputs.iter().zip(atts) {
            for ip in addresses(result) {
                holders
                    .entry(ip)
                    .or_default()
                    .push(att.container_id.clone());
            }
        }
    }
    if let Some((ip, pods)) = holders.iter().find(|(_, pods)| pods.len() > 1) {
        return Err(BenchError::DuplicateAddress {
            address: *ip,
            pods: pods.join(", "),
        });
    }
    Ok((Figure::of("etcd burst", &samples, total)?, holders.len()))
}

/// The addresses of an ADD result.
fn addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str()?.parse::<IpNetwork>().ok())
                .map(|net| net.ip())
                .collect()
        })
        .unwrap_or_default()
}

/// One block claim per `claimK` pool, on node `K mod N + 1`, each timed until its route is
/// on every other node. Returns (claim -> route, the claiming ADDs).
fn claims(
    lab: &MultiNodeLab,
    watch: &RouteWatch,
    opts: &ClusterOptions,
) -> Result<(Figure, Figure), BenchError> {
    for k in 0..opts.claims {
        let (name, cidr) = claim_pool(k);
        ctl(
            lab,
            &[
                "ipam",
                "pool",
                "add",
                &name,
                &cidr.to_string(),
                "--block-size",
                "26",
            ],
        )?;
    }
    let mut to_route = Vec::new();
    let mut add_times = Vec::new();
    let mut keep = Vec::new();
    let began_all = Instant::now();
    for k in 0..opts.claims {
        interrupt::check()?;
        let (pool, block) = claim_pool(k);
        let node = k % lab.len() + 1;
        let rt = node_runtime(lab, opts, node, &format!("IP_POOLS={pool}"))?;
        let (ns, atts) = pods(|| Ok(lab.pod()?), &format!("claim{k}-n{node}"), 1)?;
        std::thread::sleep(QUIET);
        watch.drain();
        let began = Instant::now();
        rt.add(&atts[0])
            .map_err(call_err(opts.mode, Op::Add, k, "block claim"))?;
        add_times.push(began.elapsed());
        let others: Vec<usize> = (1..=lab.len()).filter(|i| *i != node).collect();
        let seen = watch.wait_for(block, NETD_ROUTE_PROTOCOL, &others, began + CLAIM_DEADLINE);
        let delays = watch::delays(began, &seen);
        if delays.len() < others.len() {
            let missing: Vec<String> = others
                .iter()
                .filter(|i| !delays.iter().any(|(n, _)| n == *i))
                .map(|i| node_name(*i))
                .collect();
            return Err(BenchError::NotConverged {
                what: format!("the route to {block}, claimed by {}", node_name(node)),
                within: CLAIM_DEADLINE,
                missing: missing.join(", "),
            });
        }
        let slowest = delays.iter().map(|(_, d)| *d).max().unwrap_or_default();
        tracing::debug!(%block, node, ?slowest, "claim routed everywhere");
        to_route.push(slowest);
        keep.push(ns);
    }
    let total = began_all.elapsed();
    Ok((
        Figure::of("claim -> route", &to_route, total)?,
        Figure::of("claiming ADD", &add_times, total)?,
    ))
}

/// Pool `claimK`: `10.90.K.0/26`, exactly one block.
fn claim_pool(k: usize) -> (String, IpNetwork) {
    let octet = u8::try_from(k).unwrap_or(u8::MAX);
    let cidr = IpNetwork::new(IpAddr::from([10, 90, octet, 0]), 26)
        .unwrap_or_else(|_| IpNetwork::from(IpAddr::from([10, 90, octet, 0])));
    (format!("claim{k}"), cidr)
}

/// Runs `nodekitctl ARGS` against the lab's etcd; a failure is an error.
fn ctl(lab: &MultiNodeLab, args: &[&str]) -> Result<String, BenchError> {
    let failed = |reason: String| BenchError::Ctl {
        args: args.join(" "),
        reason,
    };
    let out = lab.nodekitctl(args).map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `ready` every 100 ms until it holds or `deadline` passes; `Err(last why)` then.
fn poll_until(
    deadline: Duration,
    mut ready: impl FnMut() -> Result<Result<(), String>, BenchError>,
) -> Result<Result<(), String>, BenchError> {
    let until = Instant::now() + deadline;
    loop {
        interrupt::check()?;
        let why = match ready()? {
            Ok(()) => return Ok(Ok(())),
            Err(why) => why,
        };
        if Instant::now() >= until {
            return Ok(Err(why));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every netd registered its node.
fn wait_registered(lab: &MultiNodeLab) -> Result<(), BenchError> {
    let wanted = lab.len();
    let outcome = poll_until(CONVERGE_DEADLINE, || {
        let listed = ctl(lab, &["-o", "json", "node", "list"])?;
        let count = serde_json::from_str::<Vec<Value>>(&listed)
            .map(|nodes| nodes.len())
            .unwrap_or(0);
        Ok(if count == wanted {
            Ok(())
        } else {
            Err(format!("{count} of {wanted} registered"))
        })
    })?;
    outcome.map_err(|missing| BenchError::NotConverged {
        what: "netd registrations".into(),
        within: CONVERGE_DEADLINE,
        missing,
    })
}

/// Waits until every node routes to a block of every other node.
fn wait_converged(lab: &MultiNodeLab) -> Result<(), BenchError> {
    let outcome = poll_until(CONVERGE_DEADLINE, || {
        for i in 1..=lab.len() {
            let routes = inspect::routes(lab.node(i)).map_err(BenchError::Inspect)?;
            let missing: Vec<usize> = (1..=lab.len())
                .filter(|j| *j != i)
                .filter(|j| {
                    !routes.iter().any(|r| {
                        r.protocol == NETD_ROUTE_PROTOCOL
                            && r.gateway == Some(IpAddr::V4(node_ip(*j)))
                    })
                })
                .collect();
            if !missing.is_empty() {
                return Ok(Err(format!(
                    "{} has no route via {missing:?}",
                    node_name(i)
                )));
            }
        }
        Ok(Ok(()))
    })?;
    outcome.map_err(|missing| BenchError::NotConverged {
        what: "routes between all nodes after the burst".into(),
        within: CONVERGE_DEADLINE,
        missing,
    })
}

/// Node `i`'s netd memory and CPU time from `/proc/PID/status` and `/proc/PID/stat`.
fn netd_usage(lab: &MultiNodeLab, i: usize) -> Result<NetdUsage, BenchError> {
    let pid = lab.netd_pid(i);
    let gone = |reason: String| BenchError::Netd { node: i, reason };
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|e| gone(format!("cannot read /proc/{pid}/{file}: {e}")))
    };
    let (status, stat) = (read("status")?, read("stat")?);
    match (
        status_kib(&status, "VmRSS"),
        status_kib(&status, "VmHWM"),
        cpu_ticks(&stat),
    ) {
        (Some(rss_kib), Some(peak_kib), Some(ticks)) => Ok(NetdUsage {
            node: i,
            rss_kib,
            peak_kib,
            cpu_ms: ticks * 1000 / ticks_per_second(),
        }),
        _ => Err(gone(format!("process {pid} has exited"))),
    }
}

/// The clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
fn ticks_per_second() -> u64 {
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime + stime (clock ticks) of a `/proc/PID/stat` line: fields 14 and 15, counted after
/// the parenthesised command name, which may hold spaces.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value in KiB of `key` (`VmRSS:   1234 kB`) in a `/proc/PID/status` text.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values_are_read_in_kib() {
        let status = "Name:\tnodekit-netd\nVmHWM:\t    7312 kB\nVmRSS:\t    6120 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(6120));
        assert_eq!(status_kib(status, "VmHWM"), Some(7312));
        assert_eq!(status_kib("Name:\tzombie\n", "VmRSS"), None);
        assert_eq!(status_kib("VmRSSX:\t1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn cpu_time_is_utime_plus_stime_whatever_the_command_name() {
        let stat = "4242 (nodekit netd) S 1 4242 4242 0 -1 4194560 900 0 0 0 37 5 0 0 20 0 2 0";
        assert_eq!(cpu_ticks(stat), Some(42));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn claim_pools_are_one_distinct_block_each() {
        assert_eq!(claim_pool(0).1.to_string(), "10.90.0.0/26");
        assert_eq!(
            claim_pool(7),
            ("claim7".into(), "10.90.7.0/26".parse().expect("cidr"))
        );
    }

    #[test]
    fn addresses_are_read_from_every_ip_of_a_result() {
        let result = json!({"ips": [{"address": "10.244.0.5/26"}, {"address": "fd00::5/122"}]});
        assert_eq!(
            addresses(&result),
            vec![
                "10.244.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
        assert!(addresses(&json!({})).is_empty());
    }

    #[test]
    fn options_out_of_range_are_rejected_before_anything_runs() {
        let mut o = ClusterOptions::new(PathBuf::from("/nonexistent"));
        o.nodes = 1;
        assert!(matches!(
            run(&o),
            Err(BenchError::InvalidOption {
                option: "--nodes",
                ..
            })
        ));
        o.nodes = 3;
        o.mode = Target::Reference;
        assert!(matches!(
            run(&o),
            Err(BenchError::InvalidOption {
                option: "--mode",
                ..
            })
        ));
        o.mode = Target::Routed;
        let err = run(&o).expect_err("no binaries there");
        assert!(
            matches!(&err, BenchError::MissingPlugin { name, .. } if name == "nodekit"),
            "{err}"
        );
    }
}
