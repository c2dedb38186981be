//! Running another plugin (the IPAM named by `ipam.type`) through the CNI exec protocol, the
//! way the spec says a plugin delegates: same stdin, same environment, CNI_COMMAND set.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use crate::spec::{code, CmdArgs, CniResult, ErrorResult};

/// Finds `plugin_type` in the CNI_PATH directories.
pub fn find_plugin(plugin_type: &str, path: &[PathBuf]) -> Result<PathBuf, ErrorResult> {
    if plugin_type.is_empty() || plugin_type.contains('/') {
        return Err(ErrorResult::new(
            code::INVALID_NETWORK_CONFIG,
            format!("plugin type {plugin_type:?} must be a bare binary name"),
        ));
    }
    path.iter()
        .map(|dir| dir.join(plugin_type))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            ErrorResult::new(
                code::DELEGATE,
                format!(
                    "plugin {plugin_type:?} not found in CNI_PATH {}",
                    path.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            )
        })
}

/// A delegated plugin that is running; the caller does other work, then [`Pending::wait`]s.
pub struct Pending {
    child: std::process::Child,
    plugin_type: String,
    command: String,
}

/// Starts `plugin_type` with `command` ("ADD", "DEL"...) on the same config and environment.
pub fn spawn(plugin_type: &str, command: &str, args: &CmdArgs) -> Result<Pending, ErrorResult> {
    let binary = find_plugin(plugin_type, &args.path)?;
    let mut child = Process::new(&binary)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| delegate_err(format!("running {}: {e}", binary.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The config is far smaller than a pipe buffer, and plugins read it all first.
        stdin
            .write_all(&args.stdin)
            .map_err(|e| delegate_err(format!("writing config to {plugin_type}: {e}")))?;
    }
    Ok(Pending {
        child,
        plugin_type: plugin_type.to_string(),
        command: command.to_string(),
    })
}

impl Pending {
    /// Waits for the plugin; its stdout parsed as a result for ADD, `None` otherwise. A
    /// failing delegate's error is passed through with its own code.
    pub fn wait(self) -> Result<Option<CniResult>, ErrorResult> {
        let Self {
            child,
            plugin_type,
            command,
        } = self;
        let out = child
            .wait_with_output()
            .map_err(|e| delegate_err(format!("waiting for {plugin_type}: {e}")))?;
        if !out.status.success() {
            let mut err: ErrorResult = serde_json::from_slice(&out.stdout).map_err(|_| {
                delegate_err(format!(
                    "{plugin_type} {command} failed ({}) without an error document: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            })?;
            err.msg = format!("{plugin_type}: {}", err.msg);
            return Err(err);
        }
        if command != "ADD" {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| delegate_err(format!("{plugin_type} ADD printed no valid result: {e}")))?;
        CniResult::from_value(value)
            .map(Some)
            .map_err(|e| delegate_err(format!("{plugin_type} ADD result: {e}")))
    }
}

/// Runs `plugin_type` with `command` to completion (see [`spawn`] and [`Pending::wait`]).
pub fn run(
    plugin_type: &str,
    command: &str,
    args: &CmdArgs,
) -> Result<Option<CniResult>, ErrorResult> {
    spawn(plugin_type, command, args)?.wait()
}

fn delegate_err(msg: String) -> ErrorResult {
    ErrorResult::new(code::DELEGATE, msg)
}
