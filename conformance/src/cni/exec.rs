//! A small libcni: runs the plugins of a network configuration list through the CNI exec
//! protocol (environment variables, configuration on stdin, result or error JSON on stdout),
//! the way a container runtime does. ADD runs the plugins in order, each given the previous
//! one's result as `prevResult`; DEL runs them in reverse with the cached ADD result; CHECK
//! runs them in order with the cached ADD result; GC and STATUS run every plugin once.
//!
//! Spawning sits behind [`PluginExec`], so the protocol logic is unit-tested against a fake
//! and the real [`NetnsExec`] runs plugins inside the lab's node namespace.

use std::fmt;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use nodekit_nsutil::NetNs;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::conf::ConfList;
use super::version::{negotiate, CniVersion, Negotiated, NegotiationError, PluginVersions};

/// How long one plugin invocation may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The CNI verbs (`CNI_COMMAND`), serialised as [`CniCommand::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// Add a container to the network.
    Add,
    /// Remove a container from the network.
    Del,
    /// Check a container's networking is as expected.
    Check,
    /// Clean up stale resources (1.1.0).
    Gc,
    /// Report readiness (1.1.0).
    Status,
    /// Report supported versions.
    Version,
}

impl CniCommand {
    /// The value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }
}

impl fmt::Display for CniCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invocation's input: the environment (`CNI_*` variables; nothing else of the runner's
/// `CNI_*` environment leaks through) and the bytes on stdin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginCall {
    /// Environment variables set for the plugin.
    pub env: Vec<(String, String)>,
    /// The network configuration (or anything else) fed on stdin.
    pub stdin: Vec<u8>,
}

impl PluginCall {
    /// Removes variable `key` from the environment (for the missing-variable checks).
    pub fn without(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    /// Sets variable `key`, replacing an earlier value.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What a plugin process left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything printed on stdout.
    pub stdout: Vec<u8>,
    /// Everything printed on stderr.
    pub stderr: Vec<u8>,
}

impl RawOutput {
    /// `exited 0`, `exited 1`, `killed by signal 9`.
    pub fn describe_exit(&self) -> String {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exited {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "ended".to_string(),
        }
    }

    /// A one-line summary of the output for messages: exit, stdout and stderr (shortened).
    pub fn summary(&self) -> String {
        format!(
            "{} (stdout: {:?}; stderr: {:?})",
            self.describe_exit(),
            snippet(&self.stdout),
            snippet(&self.stderr)
        )
    }
}

/// Shortens plugin output for messages.
pub fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 240;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

/// Why a plugin could not be run or answered outside the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The executable is not in the bin dir.
    #[error("plugin executable {} not found", binary.display())]
    NotFound {
        /// The path looked for.
        binary: PathBuf,
    },
    /// The process could not be started.
    #[error("cannot run plugin {}: {source}", binary.display())]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the process or waiting for it failed.
    #[error("i/o with plugin {}: {source}", binary.display())]
    Io {
        /// The executable.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin ran past the deadline and was killed.
    #[error("plugin {} did not finish within {after:?} and was killed", binary.display())]
    Timeout {
        /// The executable.
        binary: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// The output breaks the protocol: a non-zero exit without error JSON, or a success whose
    /// stdout is not JSON.
    #[error("plugin {plugin} broke the exec protocol: {problem}; it {output}")]
    Protocol {
        /// The plugin type.
        plugin: String,
        /// What is wrong.
        problem: &'static str,
        /// [`RawOutput::summary`].
        output: String,
    },
}

/// Runs plugin executables. The real implementation is [`NetnsExec`].
pub trait PluginExec: Send + Sync {
    /// Runs `binary` with `call`'s environment and stdin and collects its output.
    fn exec(&self, binary: &Path, call: &PluginCall) -> Result<RawOutput, ExecError>;
}

/// Runs each plugin as a child process inside a network namespace (the node's), the way a
/// runtime on the node does: only the call's `CNI_*` environment, stdin fed, stdout and
/// stderr collected. It blocks in `waitpid` rather than polling, so a call's wall time is
/// the plugin's own (what the bench measures, as a Go runtime's `exec.Cmd.Run` sees it); a
/// watchdog thread kills the plugin's process group past the deadline.
#[derive(Debug)]
pub struct NetnsExec {
    ns: NetNs,
    timeout: Duration,
}

impl NetnsExec {
    /// Plugins will run inside `ns` and be killed (with their process group) after `timeout`.
    pub fn new(ns: NetNs, timeout: Duration) -> Self {
        Self { ns, timeout }
    }
}

impl PluginExec for NetnsExec {
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
        let pgid = Pid::from_raw(child.id() as i32);
        let stdin = child.stdin.take();
        let killed = AtomicBool::new(false);
        let (done, finished) = mpsc::channel::<()>();
        let output = std::thread::scope(|scope| {
            let killed = &killed;
            let timeout = self.timeout;
            scope.spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout) {
                    killed.store(true, Ordering::SeqCst);
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
            });
            let writer = stdin.map(|mut pipe| {
                // A plugin may exit without reading stdin (VERSION, early errors): ignore
                // EPIPE. On a thread, so a large input cannot block the wait.
                scope.spawn(move || {
                    let _ = pipe.write_all(&call.stdin);
                })
            });
            // Reads stdout and stderr to their end, then reaps the plugin. A leftover
            // grandchild holding the pipes open is killed with the group at the deadline.
            let output = child.wait_with_output();
            if let Some(writer) = writer {
                let _ = writer.join();
            }
            drop(done);
            output
        });
        let output = output.map_err(|source| ExecError::Io {
            binary: binary.to_path_buf(),
            source,
        })?;
        // Only a plugin the watchdog killed timed out: one that exited on its own but left a
        // grandchild holding its pipes until the deadline still answered.
        if killed.load(Ordering::SeqCst) && output.status.signal() == Some(Signal::SIGKILL as i32) {
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

/// The error JSON a failing plugin prints: `{cniVersion, code, msg, details}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The version of the error's format.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: Option<String>,
    /// The error code (1–99 well-known, 100+ plugin specific).
    pub code: i64,
    /// A short message.
    pub msg: String,
    /// Longer details.
    #[serde(default)]
    pub details: Option<String>,
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        match &self.details {
            Some(d) if !d.is_empty() => write!(f, " ({d})"),
            _ => Ok(()),
        }
    }
}

/// A protocol-conforming answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Exit 0, with the JSON printed (if any).
    Success(Option<Value>),
    /// Non-zero exit with error JSON.
    Failure(ErrorReply),
}

/// Reads a plugin's output per the exec protocol: exit 0 means success (stdout empty or a
/// JSON document); non-zero must come with error JSON on stdout.
pub fn interpret(plugin: &str, raw: &RawOutput) -> Result<Reply, ExecError> {
    let text = String::from_utf8_lossy(&raw.stdout);
    let text = text.trim();
    let protocol = |problem| ExecError::Protocol {
        plugin: plugin.to_string(),
        problem,
        output: raw.summary(),
    };
    if raw.status.success() {
        if text.is_empty() {
            return Ok(Reply::Success(None));
        }
        return serde_json::from_str(text)
            .map(|v| Reply::Success(Some(v)))
            .map_err(|_| protocol("stdout of a successful call is not JSON"));
    }
    serde_json::from_str::<ErrorReply>(text)
        .map(Reply::Failure)
        .map_err(|_| protocol("a failing call must print error JSON {cniVersion, code, msg}"))
}

/// A failed call at the network level.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin could not be run or broke the protocol.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The plugin answered with error JSON.
    #[error("{command} failed: plugin {plugin} returned error {error}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The verb.
        command: CniCommand,
        /// The error JSON.
        error: ErrorReply,
    },
    /// A call that must produce a result (ADD, VERSION) printed nothing.
    #[error("{command}: plugin {plugin} exited 0 but printed no result")]
    NoResult {
        /// The plugin type.
        plugin: String,
        /// The verb.
        command: CniCommand,
    },
    /// A VERSION answer without a usable `supportedVersions`.
    #[error("VERSION: plugin {plugin} printed {output}, which has no supportedVersions list")]
    BadVersionReply {
        /// The plugin type.
        plugin: String,
        /// The JSON printed.
        output: String,
    },
}

impl CallError {
    /// The CNI error code when the plugin answered with error JSON.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Plugin { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// A plugin's answer to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionReply {
    /// The version of this answer's format.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The versions the plugin supports, as printed.
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

/// One attachment: the key a runtime (and a plugin's state) uses, plus the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's namespace path.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// How GC names the still-valid attachments. The spec key is `cni.dev/valid-attachments`;
/// libcni 1.2 also sends the spelling of an earlier draft, `cni.dev/attachments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcKeys {
    /// Only `cni.dev/valid-attachments`.
    Spec,
    /// Both keys with the same list, as libcni sends them.
    Both,
}

/// The libcni-like runtime for one network configuration list.
pub struct CniRuntime {
    exec: Box<dyn PluginExec>,
    bin_dir: PathBuf,
    conf: ConfList,
    version: CniVersion,
    args: String,
}

impl fmt::Debug for CniRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CniRuntime")
            .field("bin_dir", &self.bin_dir)
            .field("network", &self.conf.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl CniRuntime {
    /// A runtime for `conf` whose plugins are found in `bin_dir` (also passed as
    /// `CNI_PATH`). It speaks the conflist's `cniVersion` until [`CniRuntime::negotiate`].
    pub fn new(exec: Box<dyn PluginExec>, bin_dir: PathBuf, conf: ConfList) -> Self {
        let version = conf.cni_version;
        Self {
            exec,
            bin_dir,
            conf,
            version,
            args: String::new(),
        }
    }

    /// Sends `args` as `CNI_ARGS` (`K=V;K2=V2`) with every ADD, CHECK and DEL (empty by
    /// default).
    pub fn with_cni_args(mut self, args: impl Into<String>) -> Self {
        self.args = args.into();
        self
    }

    /// The configuration list.
    pub fn conf(&self) -> &ConfList {
        &self.conf
    }

    /// The version written into every plugin configuration.
    pub fn version(&self) -> CniVersion {
        self.version
    }

    /// Where the executable of `plugin_type` is looked for.
    pub fn binary(&self, plugin_type: &str) -> PathBuf {
        self.bin_dir.join(plugin_type)
    }

    /// Calls VERSION on every plugin of the list, then speaks the highest version all of
    /// them support that the conflist allows. The VERSION answers are returned either way.
    pub fn negotiate(
        &mut self,
    ) -> (
        Vec<Result<VersionReply, CallError>>,
        Result<Negotiated, NegotiateError>,
    ) {
        let replies: Vec<_> = (0..self.conf.plugins.len())
            .map(|i| self.version_of(i))
            .collect();
        let mut plugins = Vec::new();
        for (i, reply) in replies.iter().enumerate() {
            match reply {
                Ok(r) => plugins.push(PluginVersions {
                    plugin: self.conf.plugin_type(i).to_string(),
                    supported: r
                        .supported_versions
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect(),
                }),
                Err(e) => {
                    let err = NegotiateError::Version {
                        plugin: self.conf.plugin_type(i).to_string(),
                        message: e.to_string(),
                    };
                    return (replies, Err(err));
                }
            }
        }
        let outcome = negotiate(self.conf.ceiling(), plugins).map_err(NegotiateError::from);
        if let Ok(n) = &outcome {
            self.version = n.version;
        }
        (replies, outcome)
    }

    /// Asks plugin `index` which versions it supports.
    pub fn version_of(&self, index: usize) -> Result<VersionReply, CallError> {
        let plugin = self.conf.plugin_type(index).to_string();
        let stdin = serde_json::json!({ "cniVersion": self.conf.cni_version.to_string() });
        let call = PluginCall {
            env: vec![
                ("CNI_COMMAND".into(), "VERSION".into()),
                ("CNI_PATH".into(), self.cni_path()),
            ],
            stdin: stdin.to_string().into_bytes(),
        };
        let value = self
            .call(index, CniCommand::Version, &call)?
            .ok_or_else(|| CallError::NoResult {
                plugin: plugin.clone(),
                command: CniCommand::Version,
            })?;
        serde_json::from_value(value.clone()).map_err(|_| CallError::BadVersionReply {
            plugin,
            output: value.to_string(),
        })
    }

    /// ADD: runs the plugins in order, each with the previous one's result as `prevResult`,
    /// and returns the last result (what libcni caches).
    pub fn add(&self, att: &Attachment) -> Result<Value, CallError> {
        let mut prev: Option<Value> = None;
        for i in 0..self.conf.plugins.len() {
            let conf = self.conf.plugin_config(i, self.version, prev.as_ref());
            let call = self.attachment_call(CniCommand::Add, att, &conf);
            let result = self.call(i, CniCommand::Add, &call)?;
            prev = Some(result.ok_or_else(|| CallError::NoResult {
                plugin: self.conf.plugin_type(i).to_string(),
                command: CniCommand::Add,
            })?);
        }
        prev.ok_or_else(|| CallError::NoResult {
            plugin: String::new(),
            command: CniCommand::Add,
        })
    }

    /// CHECK: runs the plugins in order, each with the cached ADD result as `prevResult`.
    pub fn check(&self, att: &Attachment, cached: &Value) -> Result<(), CallError> {
        for i in 0..self.conf.plugins.len() {
            let conf = self.conf.plugin_config(i, self.version, Some(cached));
            let call = self.attachment_call(CniCommand::Check, att, &conf);
            self.call(i, CniCommand::Check, &call)?;
        }
        Ok(())
    }

    /// DEL: runs the plugins in reverse order, with the cached ADD result as `prevResult`
    /// when there is one (spec 0.4.0 and later). Every plugin runs even if one fails; the
    /// first error is returned.
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<(), CallError> {
        let prev = cached.filter(|_| self.version >= CniVersion::V0_4_0);
        let mut first_err = None;
        for i in (0..self.conf.plugins.len()).rev() {
            let conf = self.conf.plugin_config(i, self.version, prev);
            let call = self.attachment_call(CniCommand::Del, att, &conf);
            if let Err(e) = self.call(i, CniCommand::Del, &call) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// GC: runs every plugin with the still-valid attachments under `keys`.
    pub fn gc(&self, valid: &[&Attachment], keys: GcKeys) -> Result<(), CallError> {
        let list: Vec<Value> = valid
            .iter()
            .map(|a| serde_json::json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        for i in 0..self.conf.plugins.len() {
            let mut conf = self.conf.plugin_config(i, self.version, None);
            conf.insert(
                "cni.dev/valid-attachments".into(),
                Value::Array(list.clone()),
            );
            if keys == GcKeys::Both {
                conf.insert("cni.dev/attachments".into(), Value::Array(list.clone()));
            }
            let call = self.network_call(CniCommand::Gc, &conf);
            self.call(i, CniCommand::Gc, &call)?;
        }
        Ok(())
    }

    /// STATUS: asks every plugin whether it is ready for ADDs.
    pub fn status(&self) -> Result<(), CallError> {
        for i in 0..self.conf.plugins.len() {
            let conf = self.conf.plugin_config(i, self.version, None);
            let call = self.network_call(CniCommand::Status, &conf);
            self.call(i, CniCommand::Status, &call)?;
        }
        Ok(())
    }

    /// The exact input ADD/DEL/CHECK would give plugin `index` for `att` (without
    /// `prevResult`), for checks that then break one piece of it.
    pub fn attachment_call_for(
        &self,
        index: usize,
        command: CniCommand,
        att: &Attachment,
    ) -> PluginCall {
        let conf = self.conf.plugin_config(index, self.version, None);
        self.attachment_call(command, att, &conf)
    }

    /// Runs plugin `index` with an arbitrary input and returns the raw output.
    pub fn invoke_raw(&self, index: usize, call: &PluginCall) -> Result<RawOutput, ExecError> {
        self.exec
            .exec(&self.binary(self.conf.plugin_type(index)), call)
    }

    fn cni_path(&self) -> String {
        self.bin_dir.display().to_string()
    }

    fn attachment_call(
        &self,
        command: CniCommand,
        att: &Attachment,
        conf: &Map<String, Value>,
    ) -> PluginCall {
        PluginCall {
            env: vec![
                ("CNI_COMMAND".into(), command.as_str().into()),
                ("CNI_CONTAINERID".into(), att.container_id.clone()),
                ("CNI_NETNS".into(), att.netns.display().to_string()),
                ("CNI_IFNAME".into(), att.ifname.clone()),
                ("CNI_ARGS".into(), self.args.clone()),
                ("CNI_PATH".into(), self.cni_path()),
            ],
            stdin: Value::Object(conf.clone()).to_string().into_bytes(),
        }
    }

    fn network_call(&self, command: CniCommand, conf: &Map<String, Value>) -> PluginCall {
        PluginCall {
            env: vec![
                ("CNI_COMMAND".into(), command.as_str().into()),
                ("CNI_PATH".into(), self.cni_path()),
            ],
            stdin: Value::Object(conf.clone()).to_string().into_bytes(),
        }
    }

    fn call(
        &self,
        index: usize,
        command: CniCommand,
        call: &PluginCall,
    ) -> Result<Option<Value>, CallError> {
        let plugin = self.conf.plugin_type(index);
        let started = Instant::now();
        let raw = self.invoke_raw(index, call)?;
        tracing::debug!(
            %plugin,
            %command,
            container_id = call.get("CNI_CONTAINERID").unwrap_or_default(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            exit = %raw.describe_exit(),
            "plugin call"
        );
        match interpret(plugin, &raw)? {
            Reply::Success(value) => Ok(value),
            Reply::Failure(error) => Err(CallError::Plugin {
                plugin: plugin.to_string(),
                command,
                error,
            }),
        }
    }
}

/// Why no version could be agreed on with the plugins.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    /// A plugin's VERSION call failed.
    #[error("cannot learn which versions plugin {plugin} supports: {message}")]
    Version {
        /// The plugin type.
        plugin: String,
        /// The failure.
        message: String,
    },
    /// The answers have no usable version in common.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    /// Answers a call to the named plugin.
    type Script = Box<dyn Fn(&str, &PluginCall) -> RawOutput + Send + Sync>;

    /// A fake runtime-side executor: records every call and answers from a script.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(String, PluginCall)>>,
        answer: Option<Script>,
    }

    fn ok(stdout: &str) -> RawOutput {
        RawOutput {
            status: ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
        }
    }

    fn failed(code: i32, stdout: &str) -> RawOutput {
        RawOutput {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: b"boom".to_vec(),
        }
    }

    impl PluginExec for std::sync::Arc<Recorder> {
        fn exec(&self, binary: &Path, call: &PluginCall) -> Result<RawOutput, ExecError> {
            let name = binary
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.calls
                .lock()
                .expect("lock")
                .push((name.clone(), call.clone()));
            Ok(match &self.answer {
                Some(f) => f(&name, call),
                None => ok(""),
            })
        }
    }

    fn stdin_of(call: &PluginCall) -> Value {
        serde_json::from_slice(&call.stdin).expect("stdin is JSON")
    }

    fn chain() -> ConfList {
        ConfList::parse(
            r#"{"cniVersion":"1.1.0","name":"net","plugins":[{"type":"main"},{"type":"meta"}]}"#,
            "test",
        )
        .expect("parses")
    }

    fn runtime(rec: &std::sync::Arc<Recorder>) -> CniRuntime {
        CniRuntime::new(
            Box::new(rec.clone()),
            PathBuf::from("/opt/cni/bin"),
            chain(),
        )
    }

    fn att() -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: PathBuf::from("/run/netns/p1"),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn add_runs_plugins_in_order_passing_each_result_as_prev_result() {
        let rec = std::sync::Arc::new(Recorder {
            answer: Some(Box::new(|name: &str, _: &PluginCall| {
                ok(&json!({"cniVersion":"1.1.0","from":name}).to_string())
            })),
            ..Default::default()
        });
        let result = runtime(&rec).add(&att()).expect("add succeeds");
        assert_eq!(
            result["from"], "meta",
            "the list's result is the last plugin's"
        );
        let calls = rec.calls.lock().expect("lock");
        let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["main", "meta"]);
        let first = stdin_of(&calls[0].1);
        assert!(first.get("prevResult").is_none());
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.1.0");
        assert_eq!(stdin_of(&calls[1].1)["prevResult"]["from"], "main");
        let env = &calls[0].1;
        assert_eq!(env.get("CNI_COMMAND"), Some("ADD"));
        assert_eq!(env.get("CNI_CONTAINERID"), Some("c1"));
        assert_eq!(env.get("CNI_NETNS"), Some("/run/netns/p1"));
        assert_eq!(env.get("CNI_IFNAME"), Some("eth0"));
        assert_eq!(env.get("CNI_PATH"), Some("/opt/cni/bin"));
    }

    #[test]
    fn del_runs_in_reverse_with_the_cached_result_and_check_in_order() {
        let rec = std::sync::Arc::new(Recorder::default());
        let rt = runtime(&rec);
        let cached = json!({"cniVersion":"1.1.0","ips":[]});
        rt.del(&att(), Some(&cached)).expect("del");
        rt.check(&att(), &cached).expect("check");
        let calls = rec.calls.lock().expect("lock");
        let seen: Vec<(String, Option<&str>)> = calls
            .iter()
            .map(|(n, c)| (n.clone(), c.get("CNI_COMMAND")))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("meta".to_string(), Some("DEL")),
                ("main".to_string(), Some("DEL")),
                ("main".to_string(), Some("CHECK")),
                ("meta".to_string(), Some("CHECK")),
            ]
        );
        for (_, call) in calls.iter() {
            assert_eq!(stdin_of(call)["prevResult"], cached);
        }
    }

    #[test]
    fn del_keeps_going_after_a_failing_plugin_and_reports_the_error() {
        let rec = std::sync::Arc::new(Recorder {
            answer: Some(Box::new(|name: &str, _: &PluginCall| {
                if name == "meta" {
                    failed(1, r#"{"cniVersion":"1.1.0","code":11,"msg":"try again"}"#)
                } else {
                    ok("")
                }
            })),
            ..Default::default()
        });
        let err = runtime(&rec).del(&att(), None).unwrap_err();
        assert_eq!(err.code(), Some(11));
        assert_eq!(rec.calls.lock().expect("lock").len(), 2);
    }

    #[test]
    fn gc_sends_valid_attachments_under_the_requested_keys() {
        let rec = std::sync::Arc::new(Recorder::default());
        let rt = runtime(&rec);
        let a = att();
        rt.gc(&[&a], GcKeys::Spec).expect("gc");
        rt.gc(&[&a], GcKeys::Both).expect("gc");
        let calls = rec.calls.lock().expect("lock");
        assert_eq!(calls.len(), 4);
        let spec = stdin_of(&calls[0].1);
        assert_eq!(
            spec["cni.dev/valid-attachments"],
            json!([{"containerID":"c1","ifname":"eth0"}])
        );
        assert!(spec.get("cni.dev/attachments").is_none());
        let both = stdin_of(&calls[2].1);
        assert_eq!(
            both["cni.dev/attachments"],
            both["cni.dev/valid-attachments"]
        );
        assert_eq!(calls[0].1.get("CNI_COMMAND"), Some("GC"));
        assert_eq!(calls[0].1.get("CNI_CONTAINERID"), None);
    }

    #[test]
    fn negotiation_rewrites_the_version_sent_to_plugins() {
        let rec = std::sync::Arc::new(Recorder {
            answer: Some(Box::new(|name: &str, call: &PluginCall| {
                if call.get("CNI_COMMAND") == Some("VERSION") {
                    let versions = if name == "main" {
                        json!(["0.4.0", "1.0.0", "1.1.0"])
                    } else {
                        json!(["0.4.0", "1.0.0"])
                    };
                    ok(&json!({"cniVersion":"1.0.0","supportedVersions":versions}).to_string())
                } else {
                    ok(r#"{"cniVersion":"1.0.0"}"#)
                }
            })),
            ..Default::default()
        });
        let mut rt = runtime(&rec);
        let (replies, negotiated) = rt.negotiate();
        assert_eq!(replies.len(), 2);
        let n = negotiated.expect("negotiates");
        assert_eq!(n.version, CniVersion::V1_0_0);
        assert_eq!(
            n.require(CniVersion::V1_1_0, "GC").unwrap_err(),
            "plugin meta supports up to 1.0.0; GC needs 1.1.0"
        );
        rt.add(&att()).expect("add");
        let calls = rec.calls.lock().expect("lock");
        let add = calls
            .iter()
            .find(|(_, c)| c.get("CNI_COMMAND") == Some("ADD"));
        let (_, add) = add.expect("an ADD call");
        assert_eq!(stdin_of(add)["cniVersion"], "1.0.0");
    }

    #[test]
    fn replies_are_interpreted_per_the_exec_protocol() {
        assert_eq!(interpret("p", &ok("")).expect("ok"), Reply::Success(None));
        assert_eq!(
            interpret("p", &ok(r#"{"a":1}"#)).expect("ok"),
            Reply::Success(Some(json!({"a":1})))
        );
        let reply = interpret(
            "p",
            &failed(
                1,
                r#"{"cniVersion":"1.0.0","code":7,"msg":"bad","details":"more"}"#,
            ),
        )
        .expect("error json");
        match reply {
            Reply::Failure(e) => {
                assert_eq!(e.code, 7);
                assert_eq!(e.to_string(), "code 7: bad (more)");
            }
            other => panic!("expected failure, got {other:?}"),
        }
        let err = interpret("p", &failed(2, "panic: oops")).unwrap_err();
        assert!(
            err.to_string().contains("must print error JSON")
                && err.to_string().contains("exited 2"),
            "{err}"
        );
        assert!(interpret("p", &ok("not json")).is_err());
    }

    #[test]
    fn add_without_a_result_is_an_error() {
        let rec = std::sync::Arc::new(Recorder::default());
        let err = runtime(&rec).add(&att()).unwrap_err();
        assert!(
            matches!(
                err,
                CallError::NoResult {
                    command: CniCommand::Add,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn the_real_executor_passes_env_and_stdin_and_enforces_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("echoer");
        std::fs::write(
            &script,
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = SLEEP ]; then sleep 5; fi\n\
             if [ \"$CNI_COMMAND\" = DAEMON ]; then sleep 5 & exit 0; fi\n\
             printf '{\"cmd\":\"%s\",\"stray\":\"%s\",\"in\":' \"$CNI_COMMAND\" \"${CNI_STRAY:-}\"\ncat\nprintf '}'\n",
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let ns = NetNs::current().expect("current netns");
        let exec = NetnsExec::new(ns, Duration::from_millis(300));
        let call = PluginCall {
            env: vec![("CNI_COMMAND".into(), "ADD".into())],
            stdin: br#"{"x":1}"#.to_vec(),
        };
        let raw = exec.exec(&script, &call).expect("runs");
        assert!(raw.status.success());
        let v: Value = serde_json::from_slice(&raw.stdout).expect("json");
        assert_eq!(v, json!({"cmd":"ADD","stray":"","in":{"x":1}}));
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
        let started = Instant::now();
        let daemon = exec
            .exec(&script, &call.clone().with("CNI_COMMAND", "DAEMON"))
            .expect("a plugin leaving a child behind still returns");
        assert!(daemon.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not held by the child"
        );
        assert!(matches!(
            exec.exec(&dir.path().join("missing"), &call),
            Err(ExecError::NotFound { .. })
        ));
    }
}
