//! `nodekit-csi`: the CSI driver binary. Parses flags, installs logging, serves until
//! SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nodekit_csi::driver::{Config, Driver, Mode, DEFAULT_DRIVER_NAME, DEFAULT_KUBELET_ROOT};
use nodekit_csi::server;

/// nodekit's CSI driver: local volumes on loop devices, reflink snapshots, online expansion.
#[derive(Debug, Parser)]
#[command(name = "nodekit-csi", version)]
struct Cli {
    /// The CSI endpoint to listen on: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,

    /// This node's ID (also its topology value for topology.nodekit.io/node).
    #[arg(long)]
    node_id: String,

    /// Directory for the driver's state files.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,

    /// Directory holding volume and snapshot images (use an xfs filesystem for reflink
    /// snapshots).
    #[arg(long, value_name = "DIR")]
    pool_dir: PathBuf,

    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,

    /// The CSI driver name.
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    driver_name: String,

    /// Staging and target paths must lie under this directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_KUBELET_ROOT)]
    kubelet_root: PathBuf,

    /// Accept staging and target paths outside --kubelet-root (still absolute, no `..`).
    #[arg(long)]
    allow_any_path: bool,

    /// The most bytes all volumes together may be provisioned with (default: the pool
    /// filesystem's size).
    #[arg(long, value_name = "BYTES")]
    max_capacity: Option<u64>,

    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    #[arg(long, default_value_t = 256)]
    max_volumes_per_node: i64,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
    tracing::info!("shutting down on signal");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config {
        driver_name: cli.driver_name,
        node_id: cli.node_id,
        state_dir: cli.state_dir,
        pool_dir: cli.pool_dir,
        mode: cli.mode,
        kubelet_root: cli.kubelet_root,
        allow_any_path: cli.allow_any_path,
        max_capacity: cli.max_capacity,
        max_volumes_per_node: cli.max_volumes_per_node,
    };
    let driver = match Driver::new(config) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("nodekit-csi: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodekit-csi: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(server::serve(driver, &cli.endpoint, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodekit-csi: {e}");
            ExitCode::FAILURE
        }
    }
}
