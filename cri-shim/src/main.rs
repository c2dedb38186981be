//! `nodekit-cri`: the CRI runtime and image service daemon.

use clap::Parser;
use nodekit_cri::config::Options;

fn main() -> std::process::ExitCode {
    let opts = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nodekit-cri: starting the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nodekit_cri::server::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "nodekit-cri failed");
            std::process::ExitCode::FAILURE
        }
    }
}
