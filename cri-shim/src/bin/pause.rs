//! `nodekit-pause`: a pod sandbox's namespace holder; see `nodekit_cri::pause`.

use clap::Parser;

/// Holds a pod's IPC, UTS and PID namespaces inside its network namespace.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: nodekit_cri::pause::PauseArgs,
}

fn main() -> std::process::ExitCode {
    match nodekit_cri::pause::run(&Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nodekit-pause: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
