//! The OCI runtime driver: runc or crun run as commands with `--root` under our state dir.
//! `create` goes through the per-container monitor (see [`crate::monitor`]); the other
//! verbs are one runtime invocation each. "Already gone" answers count as success.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nodekit_nsutil::mountns::{hide_mounts_in_child, HiddenMount};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::monitor::{CreateReport, StdioArgs};

/// How long `create` (runtime plus monitor start-up) may take before it is abandoned.
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`kill_exec`] waits for `runc exec` after each SIGKILL to its command.
const EXEC_KILL_WAIT: Duration = Duration::from_millis(100);

/// How many SIGKILL rounds [`kill_exec`] tries before killing `runc exec` itself.
const EXEC_KILL_TRIES: u32 = 50;

/// Most bytes ExecSync keeps of each stream (the kubelet's own cap is 16 MiB).
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// What failed while driving the OCI runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime or monitor binary could not be run.
    #[error("running {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime exited non-zero.
    #[error("{verb} {id}: {message}")]
    Failed {
        /// The runtime verb (create, start, kill...).
        verb: &'static str,
        /// The container.
        id: String,
        /// The runtime's error output.
        message: String,
    },
    /// ExecSync's command ran past its timeout and was killed.
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
}

/// Which runtime CLI dialect to speak; both take the same verbs we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// runc (default: works with cgroup v1 + a hybrid unified mount).
    Runc,
    /// crun (refuses hybrid cgroup v1 setups unless the unified mount is hidden).
    Crun,
}

impl RuntimeKind {
    /// The binary's name, which is also the runtime handler it serves.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }
}

/// Output of a finished ExecSync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code.
    pub exit_code: i32,
    /// Captured stdout (capped).
    pub stdout: Vec<u8>,
    /// Captured stderr (capped).
    pub stderr: Vec<u8>,
}

/// One OCI runtime binary with its state root, and the monitor binary that creates
/// containers with it.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    binary: PathBuf,
    monitor: PathBuf,
    hidden_mounts: Vec<HiddenMount>,
    global_args: Vec<String>,
}

/// Parameters of one `create`.
#[derive(Debug, Clone)]
pub struct CreateParams<'a> {
    /// Container ID.
    pub id: &'a str,
    /// Bundle directory with `config.json`.
    pub bundle: &'a Path,
    /// CRI log file, if the pod has a log directory.
    pub log_path: Option<&'a Path>,
    /// Where the monitor records the exit.
    pub exit_file: &'a Path,
    /// The container's memory cgroup directory (OOM detection).
    pub memory_cgroup: Option<&'a Path>,
    /// The attach socket the monitor serves (none for a sandbox container).
    pub attach_socket: Option<&'a Path>,
    /// The container's stdin and terminal settings.
    pub stdio: StdioArgs,
}

impl OciRuntime {
    /// A runtime at `binary` keeping its state in `root`, with `monitor` as the monitor;
    /// every runtime process starts in a mount namespace without `hidden_mounts`. With
    /// `systemd_cgroup` the runtime creates container cgroups through systemd.
    pub fn new(
        binary: PathBuf,
        root: PathBuf,
        monitor: PathBuf,
        hidden_mounts: Vec<HiddenMount>,
        systemd_cgroup: bool,
    ) -> Self {
        let mut global_args = vec!["--root".to_string(), root.to_string_lossy().into_owned()];
        if systemd_cgroup {
            global_args.push("--systemd-cgroup".into());
        }
        Self {
            binary,
            monitor,
            hidden_mounts,
            global_args,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.global_args).kill_on_drop(true);
        hide_mounts_in_child(cmd.as_std_mut(), &self.hidden_mounts);
        cmd
    }

    async fn run(
        &self,
        verb: &'static str,
        id: &str,
        args: &[&str],
    ) -> Result<String, RuntimeError> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| RuntimeError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(RuntimeError::Failed {
            verb,
            id: id.to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Creates the container through a detached monitor; returns the init PID and the
    /// monitor's PID. On failure the runtime's state for `id` is removed.
    pub async fn create(&self, p: &CreateParams<'_>) -> Result<(i32, u32), RuntimeError> {
        let monitor_log =
            std::fs::File::create(p.bundle.join("monitor.log")).map_err(|source| {
                RuntimeError::Spawn {
                    binary: self.monitor.clone(),
                    source,
                }
            })?;
        let mut cmd = Command::new(&self.monitor);
        cmd.arg("--runtime").arg(&self.binary);
        for arg in &self.global_args {
            cmd.arg(format!("--runtime-arg={arg}"));
        }
        cmd.arg("--id")
            .arg(p.id)
            .arg("--bundle")
            .arg(p.bundle)
            .arg("--exit-file")
            .arg(p.exit_file);
        if let Some(socket) = p.attach_socket {
            cmd.arg("--attach-socket").arg(socket);
        }
        for (on, flag) in [
            (p.stdio.stdin, "--stdin"),
            (p.stdio.stdin_once, "--stdin-once"),
            (p.stdio.tty, "--tty"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        if let Some(log) = p.log_path {
            cmd.arg("--log-path").arg(log);
        }
        if let Some(mem) = p.memory_cgroup {
            cmd.arg("--memory-cgroup").arg(mem);
        }
        for hidden in &self.hidden_mounts {
            cmd.arg("--hide-mount")
                .arg(hidden.mount_point())
                .arg(hidden.parent());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(monitor_log))
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                binary: self.monitor.clone(),
                source,
            })?;
        let monitor_pid = child.id().unwrap_or(0);
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let mut reader = BufReader::new(out);
            let read = reader.read_line(&mut line);
            if tokio::time::timeout(CREATE_TIMEOUT, read).await.is_err() {
                let _ = child.start_kill();
                line.clear();
            }
        }
        // The monitor lives on; tokio reaps it in the background once it exits.
        drop(child);
        let failed = |message: String| RuntimeError::Failed {
            verb: "create",
            id: p.id.to_string(),
            message,
        };
        let result = match serde_json::from_str::<CreateReport>(line.trim()) {
            Ok(CreateReport::Pid(pid)) => Ok((pid, monitor_pid)),
            Ok(CreateReport::Error(msg)) => Err(failed(msg)),
            Err(_) => Err(failed(format!(
                "monitor exited without a report: {}",
                std::fs::read_to_string(p.bundle.join("monitor.log"))
                    .unwrap_or_default()
                    .trim()
            ))),
        };
        if result.is_err() {
            let _ = self.delete(p.id).await;
        }
        result
    }

    /// Starts the created container's process.
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.run("start", id, &["start", id]).await.map(drop)
    }

    /// Sends `signal` (a name like `TERM` or a number) to the init process, or with `all`
    /// to every process of the container. A stopped or absent container is success.
    pub async fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), RuntimeError> {
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, signal]);
        match self.run("kill", id, &args).await {
            Err(RuntimeError::Failed { message, .. }) if is_gone(&message) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Deletes the container (killing it if needed); an absent one is success.
    pub async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        match self.run("delete", id, &["delete", "--force", id]).await {
            Err(RuntimeError::Failed { message, .. }) if is_gone(&message) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Applies new cgroup resources (`update --resources`, an OCI `LinuxResources` JSON file).
    pub async fn update(&self, id: &str, resources_file: &Path) -> Result<(), RuntimeError> {
        let path = resources_file.to_string_lossy();
        self.run("update", id, &["update", "--resources", &path, id])
            .await
            .map(drop)
    }

    /// Runs `cmd` inside the container like the container's own process (user, env, cwd,
    /// capabilities) and collects its output; past `timeout` the process is killed and
    /// [`RuntimeError::Timeout`] returned.
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
        pid_file: &Path,
    ) -> Result<ExecOutput, RuntimeError> {
        let _ = std::fs::remove_file(pid_file);
        let mut child = self
            .command()
            .arg("exec")
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect = async {
            let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
            let status = child.wait().await;
            (out, err, status)
        };
        let (out, err, status) = match timeout {
            Some(t) => match tokio::time::timeout(t, collect).await {
                Ok(done) => done,
                Err(_) => {
                    let _ = kill_exec(&mut child, pid_file).await;
                    let _ = std::fs::remove_file(pid_file);
                    return Err(RuntimeError::Timeout(t));
                }
            },
            None => collect.await,
        };
        let _ = std::fs::remove_file(pid_file);
        let status = status.map_err(|source| RuntimeError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        Ok(ExecOutput {
            exit_code: exit_code(status),
            stdout: out,
            stderr: err,
        })
    }

    /// Starts `cmd` inside the container for a streaming exec, with the given stdio: pipes, or
    /// with `tty` one terminal (the caller's pty slave) that runc relays to a container pty.
    /// The process's PID lands in `pid_file`; `runc exec` exits with the process's status.
    pub fn spawn_exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        pid_file: &Path,
        stdio: [Stdio; 3],
    ) -> Result<tokio::process::Child, RuntimeError> {
        let _ = std::fs::remove_file(pid_file);
        let [stdin, stdout, stderr] = stdio;
        let mut command = self.command();
        command.arg("exec").arg("--pid-file").arg(pid_file);
        if tty {
            command.arg("--tty");
        }
        command
            .arg(id)
            .args(cmd)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                binary: self.binary.clone(),
                source,
            })
    }
}

/// The runtime binary: an explicit path if it is a file, else the first `name` on PATH.
/// Resolved once at start so each of the many runtime invocations skips the PATH search.
pub fn resolve_binary(path: Option<&Path>, name: &str) -> Option<PathBuf> {
    match path {
        Some(p) => p.is_file().then(|| p.to_path_buf()),
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        }),
    }
}

/// The exit code a shell would report for `status`: the code, or 128 + the killing signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 255,
    }
}

/// Ends an exec: SIGKILL to its command (PID in `pid_file`) until `runc exec` (`child`)
/// exits, having reaped it. Killing `runc exec` first would orphan the command to a reaper
/// outside the container's PID namespace; its zombie then holds up the exit of the
/// container's init (the kernel waits until every task of the namespace is reaped), so the
/// next stop took a second longer. A runtime that never wrote the PID is killed itself
/// after [`EXEC_KILL_TRIES`] rounds.
pub async fn kill_exec(
    child: &mut tokio::process::Child,
    pid_file: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    for _ in 0..EXEC_KILL_TRIES {
        kill_pid_file(pid_file);
        if let Ok(status) = tokio::time::timeout(EXEC_KILL_WAIT, child.wait()).await {
            return status;
        }
    }
    child.kill().await?;
    child.wait().await
}

/// Sends SIGKILL to the process whose PID is in `pid_file` (an exec's), if it is there.
fn kill_pid_file(pid_file: &Path) {
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(reader: Option<R>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(mut r) = reader else {
        return out;
    };
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = r.read(&mut buf).await {
        if out.len() < MAX_EXEC_OUTPUT {
            let take = n.min(MAX_EXEC_OUTPUT - out.len());
            out.extend_from_slice(&buf[..take]);
        }
    }
    out
}

/// Runtime messages meaning the container is already stopped or gone: runc's, and crun's
/// (a missing state file; `kill` of an exited init: "kill container: No such process").
fn is_gone(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "does not exist",
        "not exist",
        "container not running",
        "process already finished",
        "no such file",
        "no such process",
    ]
    .iter()
    .any(|s| m.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_messages_of_runc_and_crun_are_recognised() {
        assert!(is_gone("container \"x\" does not exist"));
        assert!(is_gone("ERRO[0000] container not running"));
        assert!(is_gone(
            "error opening file `/run/crun/x/status`: No such file or directory"
        ));
        assert!(is_gone("kill container: No such process"));
        assert!(!is_gone("permission denied"));
    }
}
