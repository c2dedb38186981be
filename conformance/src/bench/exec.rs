//! The benchmark's plugin executor: like [`NetnsExec`](crate::cni::exec::NetnsExec) (child
//! process inside the node namespace, only the call's `CNI_*` environment, stdin fed, stdout
//! and stderr collected, process group killed past the deadline) but it *blocks* in
//! `waitpid` instead of polling `try_wait` every 5 ms, so a call's measured wall time is the
//! plugin's, as a Go runtime's `exec.Cmd.Run` would see it, not rounded up to the poll tick.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nodekit_nsutil::NetNs;

use crate::cni::exec::{ExecError, PluginCall, PluginExec, RawOutput};

/// Stdin up to this size is written before waiting: it fits in a pipe's default 64 KiB
/// buffer, so the write cannot block even if the plugin never reads it.
const INLINE_STDIN_MAX: usize = 16 * 1024;

/// Runs each plugin as a child process inside a network namespace and waits for it without
/// polling; a watchdog kills its process group after the deadline.
#[derive(Debug)]
pub struct WaitExec {
    ns: NetNs,
    timeout: Duration,
}

impl WaitExec {
    /// Plugins will run inside `ns` and be killed (with their process group) after `timeout`.
    pub fn new(ns: NetNs, timeout: Duration) -> Self {
        Self { ns, timeout }
    }
}

impl PluginExec for WaitExec {
    fn exec(&self, binary: &Path, call: &PluginCall) -> Result<RawOutput, ExecError> {
        if !binary.is_file() {
            return Err(ExecError::NotFound {
                binary: binary.to_path_buf(),
            });
        }
        let mut cmd = Command::new(binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(call.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        self.ns.apply_to_command(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let stdin = child.stdin.take();
        let timed_out = AtomicBool::new(false);
        let (done, finished) = mpsc::channel::<()>();
        let output = std::thread::scope(|scope| {
            let timed_out = &timed_out;
            let timeout = self.timeout;
            scope.spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout) {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                }
            });
            let writer = stdin.map(|mut pipe| {
                // A plugin may exit without reading stdin (VERSION, early errors): ignore
                // EPIPE. Large inputs go through a thread so they cannot block the wait.
                if call.stdin.len() <= INLINE_STDIN_MAX {
                    let _ = pipe.write_all(&call.stdin);
                    None
                } else {
                    Some(scope.spawn(move || {
                        let _ = pipe.write_all(&call.stdin);
                    }))
                }
            });
            let output = child.wait_with_output();
            let _ = done.send(());
            if let Some(Some(writer)) = writer {
                let _ = writer.join();
            }
            output
        });
        let output = output.map_err(|source| ExecError::Io {
            binary: binary.to_path_buf(),
            source,
        })?;
        if timed_out.load(Ordering::SeqCst) {
            return Err(ExecError::Timeout {
                binary: binary.to_path_buf(),
                after: self.timeout,
            });
        }
        Ok(RawOutput {
            status: output.status,
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn script(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("echoer");
        std::fs::write(
            &path,
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = SLEEP ]; then sleep 5; fi\n\
             printf '{\"cmd\":\"%s\",\"stray\":\"%s\",\"in\":' \"$CNI_COMMAND\" \"${CNI_STRAY:-}\"\n\
             cat\nprintf '}'\n",
        )
        .expect("write script");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        path
    }

    #[test]
    fn passes_env_and_stdin_collects_stdout_and_enforces_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = script(dir.path());
        let exec = WaitExec::new(
            NetNs::current().expect("current netns"),
            Duration::from_millis(300),
        );
        let call = PluginCall {
            env: vec![("CNI_COMMAND".into(), "ADD".into())],
            stdin: br#"{"x":1}"#.to_vec(),
        };
        let raw = exec.exec(&script, &call).expect("runs");
        assert!(raw.status.success());
        let v: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("json");
        assert_eq!(v, serde_json::json!({"cmd":"ADD","stray":"","in":{"x":1}}));

        let big = PluginCall {
            stdin: format!("\"{}\"", "a".repeat(200_000)).into_bytes(),
            ..call.clone()
        };
        let raw = exec.exec(&script, &big).expect("large stdin");
        assert!(raw.stdout.len() > 200_000);

        let started = Instant::now();
        let slow = call.clone().with("CNI_COMMAND", "SLEEP");
        assert!(matches!(
            exec.exec(&script, &slow),
            Err(ExecError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(3), "killed early");
        assert!(matches!(
            exec.exec(&dir.path().join("missing"), &call),
            Err(ExecError::NotFound { .. })
        ));
    }
}
