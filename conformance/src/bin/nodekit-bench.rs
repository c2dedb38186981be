//! `nodekit-bench`: pod ADD and DEL latency of nodekit's CNI plugin (bridge and routed
//! mode), the reference plugins and the bare netlink floor, in one run. Needs root.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nodekit_conformance::bench::{self, report, BenchOptions, Target};

/// Whole-binary CNI benchmark: pod ADD and DEL latency as a container runtime sees it.
///
/// For each target it builds a fresh lab (node network namespace), does one warm-up ADD and
/// DEL, then adds N pods one at a time and deletes them one at a time, then again with
/// --concurrency calls in flight. Plugins run as processes inside the node namespace, with
/// the CNI environment and stdin a runtime gives them; the floor does the same kernel work
/// in-process through netlink. Prints median, p95 and throughput per phase and the ratios
/// against nodekit's goals; asserts nothing.
#[derive(Debug, Parser)]
#[command(name = "nodekit-bench", version)]
struct Cli {
    /// Pods per phase.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=bench::MAX_PODS as u64))]
    pods: u64,

    /// Calls in flight at once in the concurrent phases (1: sequential phases only).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,

    /// Targets to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Target::ALL)]
    targets: Vec<Target>,

    /// Directory holding `nodekit` and `nodekit-ipam` [default: the directory of this
    /// executable].
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,

    /// Directory holding the reference `bridge` and `host-local` plugins.
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/cni")]
    reference_bin_dir: PathBuf,

    /// Seconds one plugin call may run before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,

    /// Milliseconds the pods stay up between the ADD and the DEL phase. With 0 they are
    /// deleted while their IPv6 link-local addresses are still tentative, which the kernel
    /// deletes faster than the settled interfaces of long-lived pods.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    settle_ms: u64,

    /// Also write every figure (and each sample) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cni_bin_dir = match cli.cni_bin_dir {
        Some(dir) => dir,
        None => match std::env::current_exe() {
            Ok(exe) => exe
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".")),
            Err(e) => {
                eprintln!("nodekit-bench: cannot locate this executable (use --cni-bin-dir): {e}");
                return ExitCode::from(2);
            }
        },
    };
    let opts = BenchOptions {
        pods: usize::try_from(cli.pods).unwrap_or(bench::MAX_PODS),
        concurrency: usize::try_from(cli.concurrency).unwrap_or(1),
        targets: cli.targets,
        reference_bin_dir: cli.reference_bin_dir,
        timeout: Duration::from_secs(cli.timeout.max(1)),
        settle: Duration::from_millis(cli.settle_ms),
        ..BenchOptions::new(cni_bin_dir)
    };
    let figures = match bench::run(&opts) {
        Ok(figures) => figures,
        Err(e) => {
            eprintln!("nodekit-bench: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report::render(&figures));
    if let Some(path) = cli.json {
        if let Err(e) = report::write_json(&path, &figures) {
            eprintln!("nodekit-bench: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
