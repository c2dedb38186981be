//! The per-container monitor (`nodekit-cri-monitor`), our conmon: it outlives the shim so
//! containers keep running and logging across shim restarts.
//!
//! It detaches (`setsid`), becomes the child subreaper, runs `RUNTIME create` with the
//! container's stdout/stderr on pipes it owns, reports `{"pid":N}` or `{"error":..}` as one
//! JSON line on its stdout, then turns the pipes into CRI log records (reopening the file on
//! SIGUSR1), reaps the container's init when it exits and writes the exit record atomically.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nodekit_nsutil::mountns::{hide_mounts_in_child, HiddenMount};
use serde::{Deserialize, Serialize};

use crate::logs::{LogWriter, Stream};
use crate::store;

/// How long output may keep flowing after the init process exited (a daemonised child
/// holding the pipes open must not keep the container "running").
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What the monitor writes when the container's init process is gone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    /// The exit code, or 128 + signal number when killed by a signal.
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// When the exit was observed, in nanoseconds since the epoch.
    pub finished_at: i64,
    /// Whether the memory cgroup recorded an OOM kill.
    pub oom_killed: bool,
}

/// The one line the monitor prints once `create` finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CreateReport {
    /// The container exists; its init process (host PID) waits for `start`.
    Pid(i32),
    /// `create` failed with this message; nothing is left running.
    Error(String),
}

/// The monitor's parameters (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct MonitorArgs {
    /// OCI runtime binary (runc or crun).
    #[arg(long)]
    pub runtime: PathBuf,
    /// The runtime's state root (`--root`).
    #[arg(long)]
    pub runtime_root: PathBuf,
    /// Container ID.
    #[arg(long)]
    pub id: String,
    /// OCI bundle directory (holds config.json).
    #[arg(long)]
    pub bundle: PathBuf,
    /// CRI log file; output is discarded without one.
    #[arg(long)]
    pub log_path: Option<PathBuf>,
    /// Where to write the exit record.
    #[arg(long)]
    pub exit_file: PathBuf,
    /// The container's memory cgroup directory, read for the OOM-kill counter.
    #[arg(long)]
    pub memory_cgroup: Option<PathBuf>,
    /// A mount the runtime must not see (crun on hybrid cgroup hosts: the cgroup2 mount).
    #[arg(long)]
    pub hide_mount: Vec<PathBuf>,
}

/// The monitor failed before the container existed (reported to the shim) or while watching
/// it (logged; the exit record is still written when possible).
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Spawning the runtime or reading its files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `RUNTIME create` failed.
    #[error("{0}")]
    Create(String),
    /// Writing the exit record failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> MonitorError {
    move |source| MonitorError::Sys { what, source }
}

/// Runs the monitor to completion: create, report, log, reap, record the exit.
pub fn run(args: &MonitorArgs) -> Result<(), MonitorError> {
    let _ = nix::unistd::setsid();
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("PR_SET_CHILD_SUBREAPER"))?;
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block().map_err(sys("blocking signals"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(sys("signalfd"))?;

    let created = create(args);
    let report = match &created {
        Ok((pid, ..)) => CreateReport::Pid(*pid),
        Err(e) => CreateReport::Error(e.to_string()),
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let (pid, out, err) = created?;
    let mut log = LogWriter::open(args.log_path.as_deref()).map_err(|source| MonitorError::Io {
        what: "opening the container log".into(),
        source,
    })?;
    let status = watch(pid, &signals, [Some(out), Some(err)], &mut log);
    let oom_killed = args.memory_cgroup.as_deref().is_some_and(oom_killed);
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        _ => (255, None),
    };
    store::write_json(
        &args.exit_file,
        &ExitRecord {
            exit_code,
            signal,
            finished_at: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
            oom_killed,
        },
    )?;
    Ok(())
}

/// Runs `RUNTIME create`; returns the init PID and the read ends of its stdout/stderr.
fn create(args: &MonitorArgs) -> Result<(i32, OwnedFd, OwnedFd), MonitorError> {
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let pid_file = args.bundle.join("init.pid");
    let runtime_log = args.bundle.join("runtime.log");
    let _ = std::fs::remove_file(&runtime_log);
    let mut cmd = Command::new(&args.runtime);
    let hidden = args
        .hide_mount
        .iter()
        .filter_map(|m| HiddenMount::find(m).ok().flatten())
        .collect::<Vec<_>>();
    hide_mounts_in_child(&mut cmd, &hidden);
    let status = cmd
        .arg("--root")
        .arg(&args.runtime_root)
        .arg("--log")
        .arg(&runtime_log)
        .arg("--log-format")
        .arg("json")
        .arg("create")
        .arg("--bundle")
        .arg(&args.bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .map_err(|source| MonitorError::Io {
            what: format!("running {}", args.runtime.display()),
            source,
        })?;
    if !status.success() {
        let mut msg = runtime_error(&runtime_log);
        if msg.is_empty() {
            msg = drain(&err_r);
        }
        return Err(MonitorError::Create(format!(
            "{} create: {status}: {msg}",
            args.runtime.display()
        )));
    }
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| MonitorError::Create(format!("no pid in {}", pid_file.display())))?;
    Ok((pid, out_r, err_r))
}

/// The error messages of a runtime's JSON log (`{"level":"error","msg":...}` lines).
pub fn runtime_error(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What is buffered in a pipe whose writers are all gone.
fn drain(fd: &OwnedFd) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = nix::unistd::read(fd, &mut buf) {
        all.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&all).trim().to_string()
}

/// Copies output to the log until the init process `pid` exited and the pipes closed (or
/// [`DRAIN_AFTER_EXIT`] passed); reaps every orphan meanwhile. Returns init's wait status.
fn watch(
    pid: i32,
    signals: &SignalFd,
    mut pipes: [Option<OwnedFd>; 2],
    log: &mut LogWriter,
) -> WaitStatus {
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut exit: Option<(WaitStatus, Instant)> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let open = pipes.iter().any(Option::is_some);
        if let Some((status, at)) = exit {
            if !open || at.elapsed() >= DRAIN_AFTER_EXIT {
                for s in streams {
                    let _ = log.finish(s);
                }
                return status;
            }
        }
        let timeout = match exit {
            Some((_, at)) => PollTimeout::try_from(DRAIN_AFTER_EXIT.saturating_sub(at.elapsed()))
                .unwrap_or(PollTimeout::ZERO),
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let order: Vec<usize> = (0..2).filter(|i| pipes[*i].is_some()).collect();
        for i in &order {
            if let Some(p) = &pipes[*i] {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
        }
        if poll(&mut fds, timeout).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for (slot, i) in order.iter().enumerate() {
            if !ready[slot + 1] {
                continue;
            }
            let n = pipes[*i]
                .as_ref()
                .map_or(Ok(0), |p| nix::unistd::read(p, &mut buf));
            match n {
                Ok(0) | Err(_) => {
                    let _ = log.finish(streams[*i]);
                    pipes[*i] = None;
                }
                Ok(n) => {
                    if let Err(e) = log.write(streams[*i], &buf[..n]) {
                        eprintln!("writing container log: {e}");
                    }
                }
            }
        }
        if ready[0] {
            while let Ok(Some(info)) = signals.read_signal() {
                if info.ssi_signo == Signal::SIGUSR1 as u32 {
                    if let Err(e) = log.reopen() {
                        eprintln!("reopening container log: {e}");
                    }
                }
                if info.ssi_signo == Signal::SIGCHLD as u32 {
                    reap(pid, &mut exit);
                }
            }
        }
    }
}

fn reap(init: i32, exit: &mut Option<(WaitStatus, Instant)>) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if status.pid() == Some(Pid::from_raw(init)) {
                    *exit = Some((status, Instant::now()));
                }
            }
        }
    }
}

/// Whether the cgroup's OOM-kill counter (v1 `memory.oom_control`, v2 `memory.events`) moved.
fn oom_killed(dir: &Path) -> bool {
    ["memory.oom_control", "memory.events"].iter().any(|f| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    > 0
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_are_read_from_its_json_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runtime.log");
        std::fs::write(
            &log,
            "{\"level\":\"warning\",\"msg\":\"meh\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
        )
        .unwrap();
        assert_eq!(
            runtime_error(&log),
            "exec: \"nope\": executable file not found in $PATH"
        );
    }

    #[test]
    fn oom_counter_is_read_from_v1_or_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!oom_killed(dir.path()));
        std::fs::write(
            dir.path().join("memory.oom_control"),
            "under_oom 0\noom_kill 0\n",
        )
        .unwrap();
        assert!(!oom_killed(dir.path()));
        std::fs::write(dir.path().join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        assert!(oom_killed(dir.path()));
    }

    #[test]
    fn reports_round_trip_as_one_json_line() {
        let line = serde_json::to_string(&CreateReport::Pid(42)).unwrap();
        assert_eq!(line, r#"{"pid":42}"#);
        let err: CreateReport = serde_json::from_str(r#"{"error":"boom"}"#).unwrap();
        assert_eq!(err, CreateReport::Error("boom".into()));
    }
}
