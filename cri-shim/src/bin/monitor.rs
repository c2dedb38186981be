//! `nodekit-cri-monitor`: started by `nodekit-cri` for each container; see
//! `nodekit_cri::monitor`.

use clap::Parser;

/// Creates one container with the OCI runtime, logs its output in the CRI format and records
/// its exit status.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: nodekit_cri::monitor::MonitorArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match nodekit_cri::monitor::run(&cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nodekit-cri-monitor {}: {err}", cli.args.id);
            std::process::ExitCode::FAILURE
        }
    }
}
