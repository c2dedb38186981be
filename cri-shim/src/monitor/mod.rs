//! The per-container monitor (`nodekit-cri-monitor`), our conmon: it outlives the shim so
//! containers keep running and logging across shim restarts.
//!
//! It detaches (`setsid`), becomes the child subreaper, serves the container's attach socket
//! ([`crate::attach_socket`]), runs `RUNTIME create` with the container's stdout/stderr (and
//! stdin, if it has one) on pipes it owns, or for a TTY container with a console socket on
//! which the runtime hands over the terminal's master (SCM_RIGHTS), reports `{"pid":N}` or
//! `{"error":..}` as one JSON line on its stdout, then relays ([`relay`]) output to CRI log
//! records (reopening the file on SIGUSR1) and to attach sessions, reaps the container's init
//! when it exits and writes the exit record atomically.

pub mod relay;

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use nodekit_nsutil::mountns::{hide_mounts_in_child, HiddenMount};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};

use crate::attach_socket;
use crate::logs::LogWriter;
use crate::store;
use relay::{ContainerIo, Relay};

/// The console socket's name in the bundle; the runtime runs in the bundle and connects to
/// it by this relative name, so long bundle paths fit `sun_path`.
const CONSOLE_SOCKET: &str = "console.sock";

/// How often the wait for the runtime's console connection checks that the runtime lives.
const CONSOLE_POLL: Duration = Duration::from_millis(100);

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
    /// The runtime's global flags (`--root DIR`, `--systemd-cgroup`), one per occurrence.
    #[arg(long, allow_hyphen_values = true)]
    pub runtime_arg: Vec<String>,
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
    /// A mount the runtime must not see (crun on hybrid cgroup hosts: the cgroup2 mount)
    /// and the mount it sits on, as the shim found them.
    #[arg(long, num_args = 2, value_names = ["MOUNT_POINT", "PARENT"])]
    pub hide_mount: Vec<PathBuf>,
    /// The attach socket to serve (none: no attach).
    #[arg(long)]
    pub attach_socket: Option<PathBuf>,
    /// The container's stdin and terminal.
    #[command(flatten)]
    pub stdio: StdioArgs,
}

/// A container's stdin and terminal settings (CRI `ContainerConfig` `stdin`, `stdin_once`,
/// `tty`), as the monitor takes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct StdioArgs {
    /// Give the container a stdin pipe the monitor holds open, fed by attach sessions
    /// (without it, stdin is /dev/null).
    #[arg(long)]
    pub stdin: bool,
    /// Close the container's stdin when the first attach session that had stdin ends.
    #[arg(long)]
    pub stdin_once: bool,
    /// Run the container on a terminal (its spec says `terminal: true`): output, input and
    /// size go through the terminal's master, received from the runtime.
    #[arg(long)]
    pub tty: bool,
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
    /// The runtime exited without handing over the terminal on the console socket.
    #[error("{runtime} create did not send the terminal on the console socket")]
    NoConsole {
        /// The runtime binary.
        runtime: PathBuf,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MonitorError {
    let what = what.into();
    move |source| MonitorError::Io { what, source }
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

    let listener = args
        .attach_socket
        .as_deref()
        .map(attach_socket::listen)
        .transpose()
        .map_err(io_err("binding the attach socket"));
    let created = listener.and_then(|l| Ok((create(args)?, l)));
    let report = match &created {
        Ok(((pid, _), _)) => CreateReport::Pid(*pid),
        Err(e) => CreateReport::Error(e.to_string()),
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let ((pid, io), listener) = created?;
    let mut log =
        LogWriter::open(args.log_path.as_deref()).map_err(io_err("opening the container log"))?;
    let relay = Relay::new(io, listener, args.stdio.stdin_once)
        .map_err(io_err("setting up the container's stdio"))?;
    let status = relay.run(pid, &signals, &mut log);
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

/// Runs `RUNTIME create`; returns the init PID and the monitor's side of the container's
/// stdio.
fn create(args: &MonitorArgs) -> Result<(i32, ContainerIo), MonitorError> {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"));
    // The runtime's own errors; with pipes also the container's stderr.
    let (err_r, err_w) = pipe()?;
    let pid_file = args.bundle.join("init.pid");
    let runtime_log = args.bundle.join("runtime.log");
    let _ = std::fs::remove_file(&runtime_log);
    let mut cmd = Command::new(&args.runtime);
    let hidden = args
        .hide_mount
        .chunks_exact(2)
        .filter_map(|pair| HiddenMount::new(&pair[0], &pair[1]))
        .collect::<Vec<_>>();
    hide_mounts_in_child(&mut cmd, &hidden);
    cmd.current_dir(&args.bundle)
        .args(&args.runtime_arg)
        .arg("--log")
        .arg(&runtime_log)
        .arg("--log-format")
        .arg("json")
        .arg("create")
        .arg("--bundle")
        .arg(&args.bundle)
        .arg("--pid-file")
        .arg(&pid_file);
    let (child, io) = if args.stdio.tty {
        let console =
            attach_socket::listen_unix(&args.bundle.join(CONSOLE_SOCKET), SocketType::STREAM)
                .map_err(io_err("binding the console socket"))?;
        cmd.arg("--console-socket")
            .arg(CONSOLE_SOCKET)
            .arg(&args.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_w));
        let mut child = spawn(cmd, &args.runtime)?;
        let master =
            receive_console(&console, &mut child).map_err(io_err("receiving the terminal"))?;
        let _ = std::fs::remove_file(args.bundle.join(CONSOLE_SOCKET));
        (child, master.map(ContainerIo::Terminal))
    } else {
        let (out_r, out_w) = pipe()?;
        let (stdin_r, stdin_w) = match args.stdio.stdin {
            true => pipe().map(|(r, w)| (Stdio::from(r), Some(w)))?,
            false => (Stdio::null(), None),
        };
        let err_r = err_r.try_clone().map_err(io_err("duplicating a pipe"))?;
        cmd.arg(&args.id)
            .stdin(stdin_r)
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let child = spawn(cmd, &args.runtime)?;
        let io = ContainerIo::Pipes {
            stdout: out_r,
            stderr: err_r,
            stdin: stdin_w,
        };
        (child, Some(io))
    };
    let status = wait(child, &args.runtime)?;
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
    let io = io.ok_or_else(|| MonitorError::NoConsole {
        runtime: args.runtime.clone(),
    })?;
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| MonitorError::Create(format!("no pid in {}", pid_file.display())))?;
    Ok((pid, io))
}

/// Starts `cmd`, dropping it so that the parent's copies of the child's pipe ends close.
fn spawn(mut cmd: Command, runtime: &Path) -> Result<Child, MonitorError> {
    cmd.spawn()
        .map_err(io_err(format!("running {}", runtime.display())))
}

fn wait(mut child: Child, runtime: &Path) -> Result<std::process::ExitStatus, MonitorError> {
    child
        .wait()
        .map_err(io_err(format!("waiting for {}", runtime.display())))
}

/// The terminal master the runtime sends on `console` (SCM_RIGHTS, as runc and crun do for
/// `--console-socket`); `None` when the runtime exited without connecting.
fn receive_console(console: &OwnedFd, runtime: &mut Child) -> std::io::Result<Option<OwnedFd>> {
    loop {
        let mut fds = [PollFd::new(console.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(CONSOLE_POLL).unwrap_or(PollTimeout::ZERO);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::Error::EINTR) => {
                if runtime.try_wait()?.is_some() {
                    return Ok(None);
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let conn = match rustix::net::accept_with(console, SocketFlags::CLOEXEC) {
            Ok(conn) => conn,
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(e) => return Err(e.into()),
        };
        // The runtime sends the terminal's name as data and the master as a right.
        let mut name = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        rustix::net::recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut name)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let master = control.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        return Ok(master);
    }
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
