//! `nodekit-device-plugin`: advertises node devices to the kubelet (device plugin API
//! v1beta1), one resource per config entry. Exits 0 on SIGTERM/SIGINT (sockets removed),
//! 1 when the config is unusable or the plugin cannot run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekit_device_plugin::plugin::daemon::{self, Options};
use nodekit_device_plugin::plugin::DEFAULT_PLUGIN_DIR;

/// Kubelet device plugin for node devices (paths, globs, NVIDIA GPUs).
///
/// Serves one gRPC socket per configured resource in the device plugin directory and
/// registers each with the kubelet; re-registers after kubelet restarts. SIGHUP re-reads
/// the config. Logs go to stderr (`NODEKIT_LOG=debug` for more).
#[derive(Debug, Parser)]
#[command(name = "nodekit-device-plugin", version)]
struct Cli {
    /// The YAML config listing the resources.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,

    /// The kubelet's device plugin directory (holds kubelet.sock).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PLUGIN_DIR)]
    device_plugin_path: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODEKIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodekit-device-plugin: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        config: cli.config,
        plugin_dir: cli.device_plugin_path,
    };
    match runtime.block_on(daemon::run(&options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodekit-device-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
