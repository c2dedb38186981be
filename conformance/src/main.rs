//! `nodekit-conformance`: runs conformance suites against node-side plugins in an embedded
//! lab of network namespaces. Needs root.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekit_conformance::cni::CniTarget;
use nodekit_conformance::cri::lab::OciRuntime;
use nodekit_conformance::cri::{CriTarget, DEFAULT_CUSTOM_IMAGE};
use nodekit_conformance::csi::CsiTarget;
use nodekit_conformance::device_plugin::DevicePluginTarget;
use nodekit_conformance::report::Reporter;
use nodekit_conformance::{run, RunOptions};
use nodekit_proto::uds::endpoint_path;
use regex::Regex;

/// Conformance runner for node-side Kubernetes plugin contracts.
///
/// Suite `cni` drives a CNI plugin only through the CNI exec protocol, the way a container
/// runtime does. By default it tests nodekit's own plugins (`nodekit`, `nodekit-ipam`, found
/// beside this executable) in bridge and routed mode. Suite `device-plugin` plays the kubelet
/// against a device plugin (by default `nodekit-device-plugin`, beside this executable) on a
/// temp device lab. Suite `csi` drives a CSI driver over gRPC (by default `nodekit-csi`,
/// beside this executable, on a temp lab) through real stage/publish mounts. Suite `cri`
/// drives a CRI runtime over gRPC (by default `nodekit-cri`, beside this executable, in a lab
/// namespace with a local registry, CNI bridge and runc). Prints a line per test and a final
/// `N passed, N failed, N skipped`; exits 1 if any test failed, 2 if the run could not start.
#[derive(Debug, Parser)]
#[command(name = "nodekit-conformance", version)]
struct Cli {
    /// Run only this suite (repeatable); without it every suite runs. Known: cni,
    /// device-plugin, csi, cri.
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

    /// Device plugin command for suite device-plugin instead of nodekit-device-plugin, split
    /// on spaces; `{config}`, `{dir}`, `{devices}` and `{gpu-root}` become the lab's config
    /// file, device plugin directory, device node directory and fake NVIDIA root.
    #[arg(long, value_name = "CMD")]
    device_plugin_cmd: Option<String>,

    /// A CSI driver already serving at this endpoint (unix:///path.sock) for suite csi,
    /// instead of starting nodekit-csi (found beside this executable) on a temp lab.
    #[arg(long, value_name = "ENDPOINT")]
    csi_endpoint: Option<String>,

    /// With --csi-endpoint: the directory under which suite csi makes its staging and target
    /// paths (the driver must accept paths there).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/kubelet",
        requires = "csi_endpoint"
    )]
    csi_kubelet_root: PathBuf,

    /// Suite cri: also run it against Debian's containerd (its CRI plugin, on a lab like
    /// nodekit-cri's: same registry, CNI config and runc), and list where the two differ.
    #[arg(long, conflicts_with = "cri_endpoint")]
    cri_containerd: bool,

    /// Suite cri: the OCI runtime nodekit-cri drives in its lab (runc or crun); containerd
    /// always uses runc.
    #[arg(
        long,
        value_name = "RUNTIME",
        default_value = "runc",
        conflicts_with = "cri_endpoint"
    )]
    cri_runtime: OciRuntime,

    /// A CRI runtime already serving at this endpoint (unix:///path.sock) for suite cri,
    /// instead of starting nodekit-cri (found beside this executable) on a lab.
    #[arg(long, value_name = "ENDPOINT")]
    cri_endpoint: Option<String>,

    /// With --cri-endpoint: the image the containers run (busybox applets: sh, sleep,
    /// httpd, wget).
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_CUSTOM_IMAGE, requires = "cri_endpoint")]
    cri_image: String,
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
    let device_plugin = match cli.device_plugin_cmd {
        Some(cmd) => {
            DevicePluginTarget::Command(cmd.split_whitespace().map(String::from).collect())
        }
        None => DevicePluginTarget::Nodekit,
    };
    let csi = match cli.csi_endpoint {
        Some(endpoint) => CsiTarget::Endpoint {
            socket: endpoint_path(&endpoint).to_path_buf(),
            kubelet_root: cli.csi_kubelet_root,
        },
        None => CsiTarget::Nodekit,
    };
    let cri = match (cli.cri_endpoint, cli.cri_containerd) {
        (Some(endpoint), _) => vec![CriTarget::Endpoint {
            socket: endpoint_path(&endpoint).to_path_buf(),
            image: cli.cri_image,
        }],
        (None, true) => vec![CriTarget::Nodekit(cli.cri_runtime), CriTarget::Containerd],
        (None, false) => vec![CriTarget::Nodekit(cli.cri_runtime)],
    };
    let opts = RunOptions {
        suites: cli.suites,
        focus: cli.focus,
        skip: cli.skip,
        junit: cli.junit,
        json: cli.json,
        cni,
        device_plugin,
        csi,
        cri,
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
