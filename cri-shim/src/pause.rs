//! The pause process: the holder of a sandbox's IPC, UTS and PID namespaces (the network
//! namespace is a bind mount of its own). `nodekit-pause` joins the pod netns, unshares the
//! others, sets the hostname, and re-executes itself as PID 1 of the new PID namespace, which
//! only reaps orphans and exits on SIGTERM/SIGINT. Its host PID is printed on stdout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nodekit_nsutil::{NetNs, NsError};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::process::ProcessRef;

/// Why the pause process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A namespace or hostname call failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Running the pause binary failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pod netns could not be opened.
    #[error(transparent)]
    Netns(#[from] NsError),
    /// The pause binary exited without reporting its PID.
    #[error("pause process failed to start: {0}")]
    NoReport(String),
}

/// What the pause process sets up (its command line).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PauseArgs {
    /// Network namespace to join (absent: stay in the node's, for hostNetwork pods).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Hostname of the new UTS namespace (absent: keep the node's UTS namespace).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Create an IPC namespace (not for hostIPC pods).
    #[arg(long)]
    pub new_ipc: bool,
    /// Create a PID namespace (not for hostPID pods).
    #[arg(long)]
    pub new_pid: bool,
    /// Internal: this is the namespace holder itself.
    #[arg(long, hide = true)]
    pub inner: bool,
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> PauseError {
    move |source| PauseError::Sys { what, source }
}

/// The body of `nodekit-pause`.
pub fn run(args: &PauseArgs) -> Result<(), PauseError> {
    if args.inner {
        return hold();
    }
    if let Some(path) = &args.netns {
        let ns = NetNs::open(path)?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(sys("joining the pod netns"))?;
    }
    let mut flags = CloneFlags::empty();
    flags.set(CloneFlags::CLONE_NEWUTS, args.hostname.is_some());
    flags.set(CloneFlags::CLONE_NEWIPC, args.new_ipc);
    flags.set(CloneFlags::CLONE_NEWPID, args.new_pid);
    nix::sched::unshare(flags).map_err(sys("unshare"))?;
    if let Some(name) = &args.hostname {
        nix::unistd::sethostname(name).map_err(sys("sethostname"))?;
    }
    let mut child = Command::new("/proc/self/exe")
        .arg("--inner")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| PauseError::Io {
            what: "starting the namespace holder".into(),
            source,
        })?;
    println!("{}", child.id());
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let _ = child.wait();
    Ok(())
}

/// PID 1 of the pod: reap orphans, exit on SIGTERM/SIGINT.
fn hold() -> Result<(), PauseError> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    mask.thread_block().map_err(sys("blocking signals"))?;
    let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(sys("signalfd"))?;
    loop {
        match fd.read_signal() {
            Ok(Some(info)) if info.ssi_signo == Signal::SIGCHLD as u32 => {
                while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if s == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(Some(_)) => return Ok(()),
            _ => {}
        }
    }
}

/// Starts `binary` (nodekit-pause) with `args` and returns the namespace holder, once it
/// exists. Its parent stays behind as a waiter; tokio reaps that one when it exits.
pub async fn spawn(binary: &Path, args: &PauseArgs) -> Result<ProcessRef, PauseError> {
    let mut cmd = tokio::process::Command::new(binary);
    if let Some(ns) = &args.netns {
        cmd.arg("--netns").arg(ns);
    }
    if let Some(h) = &args.hostname {
        cmd.arg("--hostname").arg(h);
    }
    if args.new_ipc {
        cmd.arg("--new-ipc");
    }
    if args.new_pid {
        cmd.arg("--new-pid");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PauseError::Io {
            what: format!("running {}", binary.display()),
            source,
        })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line).await;
    }
    let pid: Option<i32> = line.trim().parse().ok();
    match pid.and_then(ProcessRef::of) {
        Some(holder) => Ok(holder),
        None => {
            let out = child
                .wait_with_output()
                .await
                .map_err(|source| PauseError::Io {
                    what: "waiting for the pause process".into(),
                    source,
                })?;
            Err(PauseError::NoReport(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }
}
