//! `nodekit-bench`: pod ADD and DEL latency of nodekit's CNI plugin (bridge and routed
//! mode), the reference plugins and the bare netlink floor, in one run; `nodekit-bench
//! cluster`: the multi-node figures (etcd IPAM, netd route convergence and memory);
//! `nodekit-bench cri`: pod start and memory of nodekit-cri against containerd. Needs root.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nodekit_conformance::bench::cluster::{self, ClusterOptions};
use nodekit_conformance::bench::cri::{self as cri_bench, BenchRuntime, CriBenchOptions};
use nodekit_conformance::bench::{self, interrupt, report, BenchOptions, Target};

/// Whole-binary CNI benchmark: pod ADD and DEL latency as a container runtime sees it.
///
/// For each target it builds a fresh lab (node network namespace), does one warm-up ADD and
/// DEL, then adds N pods one at a time and deletes them one at a time, then again with
/// --concurrency calls in flight. Plugins run as processes inside the node namespace, with
/// the CNI environment and stdin a runtime gives them; the floor does the same kernel work
/// in-process through netlink. Prints median, p95 and throughput per phase and the ratios
/// against nodekit's goals; asserts nothing. Ctrl-C stops it and removes the lab.
#[derive(Debug, Parser)]
#[command(
    name = "nodekit-bench",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,

    #[command(flatten)]
    latency: LatencyArgs,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Cluster networking on the multi-node lab (etcd, one nodekit-netd per node).
    ///
    /// In one run: ADD/DEL against etcd one at a time on node 1, alternating call by call
    /// with the same on a one-node file-store lab (the baseline), a burst of --pods pods on
    /// every node with --concurrency ADDs in flight per node (addresses per second, every
    /// address checked distinct), the time from a node claiming a new block to its route
    /// on every other node (route notifications subscribed in each node namespace), and
    /// each netd's memory and CPU time. Prints
    /// the figures against the goals: etcd ADD median <= 2x the file store's, convergence
    /// < 200 ms, netd < 20 MiB RSS.
    Cluster(ClusterArgs),

    /// CRI runtimes: pod start and teardown latency and memory, nodekit-cri vs containerd.
    ///
    /// Each runtime runs on a fresh lab (node namespace, local registry with busybox images,
    /// bridge + host-local CNI, runc: the same for both). After the image pull and one
    /// warm-up pod: --pods pods started one at a time (RunPodSandbox + CreateContainer +
    /// StartContainer until RUNNING) and torn down one at a time (StopPodSandbox +
    /// RemovePodSandbox); then the memory (RSS and PSS) of the daemon and its monitors or
    /// shims, idle and with --loaded-pods pods running. Prints median and p95 and the goal:
    /// nodekit's median pod start <= 0.5x containerd's.
    Cri(CriArgs),
}

#[derive(Debug, Args)]
struct CriArgs {
    /// Pods started and torn down one at a time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pods: u64,

    /// Pods running while the loaded memory is read.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    loaded_pods: u64,

    /// Runtimes to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = BenchRuntime::ALL)]
    runtimes: Vec<BenchRuntime>,

    /// Directory holding `nodekit-cri`, `nodekit-pause` and `nodekit-cri-monitor`
    /// [default: the directory of this executable].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Where nodekit's binaries are, and where the figures go.
#[derive(Debug, Args)]
struct Common {
    /// Directory holding `nodekit`, `nodekit-ipam` (and for `cluster` `nodekit-netd`,
    /// `nodekitctl`) [default: the directory of this executable].
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,

    /// Seconds one plugin call may run before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,

    /// Also write every figure (and each sample) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LatencyArgs {
    /// Pods per phase.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=bench::MAX_PODS as u64))]
    pods: u64,

    /// Calls in flight at once in the concurrent phases (1: sequential phases only).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,

    /// Targets to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Target::ALL)]
    targets: Vec<Target>,

    /// Directory holding the reference `bridge` and `host-local` plugins.
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/cni")]
    reference_bin_dir: PathBuf,

    /// Milliseconds the pods stay up between the ADD and the DEL phase. With 0 they are
    /// deleted while their IPv6 link-local addresses are still tentative, which the kernel
    /// deletes faster than the settled interfaces of long-lived pods.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    settle_ms: u64,

    #[command(flatten)]
    common: Common,
}

/// nodekit's wiring modes.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum WiringMode {
    Routed,
    Bridge,
}

#[derive(Debug, Args)]
struct ClusterArgs {
    /// Nodes in the lab.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=199))]
    nodes: u64,

    /// Pods per node in the burst (and pods of the sequential phases).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pods: u64,

    /// ADDs in flight per node in the burst.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,

    /// Block claims timed until their route is on every other node.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=cluster::MAX_CLAIMS as u64))]
    claims: u64,

    /// nodekit's wiring mode.
    #[arg(long, value_enum, default_value = "routed")]
    mode: WiringMode,

    /// Each netd's full resync period in milliseconds (changes reach it by etcd watch).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    netd_resync_ms: u64,

    #[command(flatten)]
    common: Common,
}

/// `--cni-bin-dir`, else the directory of this executable.
fn bin_dir(given: Option<PathBuf>) -> Result<PathBuf, String> {
    match given {
        Some(dir) => Ok(dir),
        None => std::env::current_exe()
            .map(|exe| {
                exe.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."))
            })
            .map_err(|e| format!("cannot locate this executable (use --cni-bin-dir): {e}")),
    }
}

fn count(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Runs the latency benchmark; prints it and writes the JSON.
fn latency(args: LatencyArgs) -> Result<(), (u8, String)> {
    let cni_bin_dir = bin_dir(args.common.cni_bin_dir).map_err(|e| (2, e))?;
    let opts = BenchOptions {
        pods: count(args.pods).min(bench::MAX_PODS),
        concurrency: count(args.concurrency),
        targets: args.targets,
        reference_bin_dir: args.reference_bin_dir,
        timeout: Duration::from_secs(args.common.timeout.max(1)),
        settle: Duration::from_millis(args.settle_ms),
        ..BenchOptions::new(cni_bin_dir)
    };
    let figures = bench::run(&opts).map_err(|e| (2, e.to_string()))?;
    print!("{}", report::render(&figures));
    match args.common.json {
        Some(path) => report::write_json(&path, &figures).map_err(|e| (1, e.to_string())),
        None => Ok(()),
    }
}

/// Runs the cluster benchmark; prints it and writes the JSON.
fn cluster(args: ClusterArgs) -> Result<(), (u8, String)> {
    let cni_bin_dir = bin_dir(args.common.cni_bin_dir).map_err(|e| (2, e))?;
    let opts = ClusterOptions {
        nodes: count(args.nodes),
        pods: count(args.pods),
        concurrency: count(args.concurrency),
        claims: count(args.claims),
        mode: match args.mode {
            WiringMode::Routed => Target::Routed,
            WiringMode::Bridge => Target::Bridge,
        },
        timeout: Duration::from_secs(args.common.timeout.max(1)),
        netd_resync: Duration::from_millis(args.netd_resync_ms.max(1)),
        ..ClusterOptions::new(cni_bin_dir)
    };
    let figures = cluster::run(&opts).map_err(|e| (2, e.to_string()))?;
    print!("{}", cluster::report::render(&figures));
    match args.common.json {
        Some(path) => cluster::report::write_json(&path, &figures).map_err(|e| (1, e.to_string())),
        None => Ok(()),
    }
}

/// Runs the CRI benchmark; prints it and writes the JSON.
fn cri(args: CriArgs) -> Result<(), (u8, String)> {
    let bin_dir = bin_dir(args.bin_dir).map_err(|e| (2, e))?;
    let opts = CriBenchOptions {
        pods: count(args.pods),
        loaded_pods: count(args.loaded_pods),
        runtimes: args.runtimes,
        nodekit_binary: bin_dir.join("nodekit-cri"),
    };
    let figures = cri_bench::run(&opts).map_err(|e| (2, e.to_string()))?;
    print!("{}", cri_bench::render(&figures));
    match args.json {
        Some(path) => cri_bench::write_json(&path, &figures).map_err(|e| (1, e.to_string())),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    // First: every thread started later inherits the blocked stop signals.
    if let Err(e) = interrupt::install() {
        eprintln!("nodekit-bench: cannot take over stop signals: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let outcome = match cli.mode {
        Some(Mode::Cluster(args)) => cluster(args),
        Some(Mode::Cri(args)) => cri(args),
        None => latency(cli.latency),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // Whatever failed after a stop signal failed because of it.
        Err(_) if interrupt::interrupted() => {
            eprintln!("nodekit-bench: interrupted; the lab was torn down");
            ExitCode::from(130)
        }
        Err((code, message)) => {
            eprintln!("nodekit-bench: {message}");
            ExitCode::from(code)
        }
    }
}
