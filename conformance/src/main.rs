//! `nodekit-conformance`: runs conformance suites against node-side plugins in an embedded
//! lab of network namespaces. Needs root.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekit_conformance::cni::CniTarget;
use nodekit_conformance::report::Reporter;
use nodekit_conformance::{run, RunOptions};
use regex::Regex;

/// Conformance runner for node-side Kubernetes plugin contracts.
///
/// Suite `cni` drives a CNI plugin only through the CNI exec protocol, the way a container
/// runtime does. By default it tests nodekit's own plugins (`nodekit`, `nodekit-ipam`, found
/// beside this executable) in bridge and routed mode. Prints a line per test and a final
/// `N passed, N failed, N skipped`; exits 1 if any test failed, 2 if the run could not start.
#[derive(Debug, Parser)]
#[command(name = "nodekit-conformance", version)]
struct Cli {
    /// Run only this suite (repeatable); without it every suite runs. Known: cni.
    #[arg(long = "suite", value_name = "NAME")]
    suites: Vec<String>,

    /// Run only tests whose full name (e.g. `cni[bridge] DEL ...`) matches this regex.
    #[arg(long, value_name = "RE")]
    focus: Option<Regex>,

    /// Do not run tests whose full name matches this regex.
    #[arg(long, value_name = "RE")]
    skip: Option<Regex>,

    /// Write a JUnit XML report to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,

    /// Write a JSON report ({"tests": [{name, suite, status, duration_ms, message}]}) to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Directory holding the CNI plugin executables to test (with --cni-config).
    #[arg(long, value_name = "DIR", requires = "cni_config")]
    cni_bin_dir: Option<PathBuf>,

    /// Network configuration list (.conflist, or a single-plugin .conf) to test (with
    /// --cni-bin-dir).
    #[arg(long, value_name = "FILE", requires = "cni_bin_dir")]
    cni_config: Option<PathBuf>,

    /// Test Debian's reference plugins (bridge + host-local from /usr/lib/cni) instead of
    /// nodekit's.
    #[arg(long, conflicts_with_all = ["cni_bin_dir", "cni_config"])]
    reference: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cni = match (cli.reference, cli.cni_bin_dir, cli.cni_config) {
        (true, _, _) => CniTarget::Reference,
        (false, Some(bin_dir), Some(config)) => CniTarget::Custom { bin_dir, config },
        _ => CniTarget::Nodekit,
    };
    let opts = RunOptions {
        suites: cli.suites,
        focus: cli.focus,
        skip: cli.skip,
        junit: cli.junit,
        json: cli.json,
        cni,
    };
    let mut reporter = Reporter::new(Box::new(std::io::stdout()));
    match run(&opts, &mut reporter) {
        Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nodekit-conformance: {e}");
            ExitCode::from(2)
        }
    }
}
