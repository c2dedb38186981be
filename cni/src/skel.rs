//! The common main of our plugins (like libcni's `skel`): read env and stdin, check the
//! version, dispatch to a [`Plugin`], print the result or the error JSON, pick the exit code.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::ExitCode;

use serde::Deserialize;

use crate::spec::{
    self, code, version_at_least, CmdArgs, CniResult, Command, ErrorResult, GcAttachment,
};

/// Fields every network configuration has, parsed before the plugin sees its own fields.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConfHeader {
    /// Version the runtime speaks for this network.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Network name; part of every IPAM handle.
    #[serde(default)]
    pub name: String,
    /// Plugin type (binary name).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Result of the previous plugin of a chain (ADD, CHECK).
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments that are still valid.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// GC: the same list under the key the 1.1.0 draft used.
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<GcAttachment>>,
}

impl NetConfHeader {
    /// The prevResult, parsed.
    pub fn prev_result(&self) -> Result<Option<CniResult>, ErrorResult> {
        self.prev_result
            .clone()
            .map(CniResult::from_value)
            .transpose()
            .map_err(|e| ErrorResult::new(code::DECODE_FAILURE, format!("prevResult: {e}")))
    }

    /// GC's valid list, from whichever key the runtime used.
    pub fn gc_valid(&self) -> BTreeSet<GcAttachment> {
        self.valid_attachments
            .iter()
            .chain(self.attachments.iter())
            .flatten()
            .cloned()
            .collect()
    }
}

/// What a plugin implements; the skeleton has already validated env and version.
pub trait Plugin {
    /// ADD: attach and return the result (in our internal shape).
    fn add(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<CniResult, ErrorResult>;
    /// DEL: detach; must succeed when there is nothing left to remove.
    fn del(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult>;
    /// CHECK: verify the attachment still looks like prevResult says.
    fn check(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult>;
    /// STATUS: Ok when ADD can be serviced.
    fn status(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult>;
    /// GC: release what belongs to attachments outside `conf.gc_valid()`.
    fn gc(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult>;
}

/// Runs one invocation; returns what goes to stdout and whether it succeeded.
pub fn run(
    plugin: &dyn Plugin,
    env: impl Fn(&str) -> Option<String>,
    stdin: Vec<u8>,
) -> (String, bool) {
    let command = env("CNI_COMMAND");
    let (version, outcome) = dispatch(plugin, env, stdin);
    match outcome {
        Ok(Reply::Result(result)) => (result.to_version(&version).to_string(), true),
        Ok(Reply::Version(answer)) => (answer.to_string(), true),
        Ok(Reply::Empty) => (String::new(), true),
        Err(mut err) => {
            err.cni_version = version;
            tracing::warn!(command = ?command, code = err.code, msg = %err.msg, "failed");
            (serde_json::to_string(&err).unwrap_or_default(), false)
        }
    }
}

/// What a successful invocation prints.
enum Reply {
    Result(CniResult),
    Version(serde_json::Value),
    Empty,
}

type Outcome = Result<Reply, ErrorResult>;

fn dispatch(
    plugin: &dyn Plugin,
    env: impl Fn(&str) -> Option<String>,
    stdin: Vec<u8>,
) -> (String, Outcome) {
    let latest = spec::LATEST_VERSION.to_string();
    if env("CNI_COMMAND").as_deref() == Some("VERSION") {
        let conf_version = serde_json::from_slice::<serde_json::Value>(&stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string));
        let answer = spec::version_info(conf_version.as_deref());
        let version = answer["cniVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return (version, Ok(Reply::Version(answer)));
    }
    let args = match CmdArgs::from_env(&env, stdin) {
        Ok(args) => args,
        Err(e) => return (latest, Err(e)),
    };
    let conf: NetConfHeader = match serde_json::from_slice(&args.stdin) {
        Ok(conf) => conf,
        Err(e) => {
            let err = ErrorResult::new(
                code::DECODE_FAILURE,
                format!("network configuration on stdin is not valid: {e}"),
            );
            return (latest, Err(err));
        }
    };
    if !spec::is_supported(&conf.cni_version) {
        let err = ErrorResult::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported; this plugin supports {}",
                conf.cni_version,
                spec::SUPPORTED_VERSIONS.join(", ")
            ),
        );
        return (latest, Err(err));
    }
    let version = conf.cni_version.clone();
    if !version_at_least(&version, args.command.min_version()) {
        let err = ErrorResult::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{:?} needs cniVersion {} or later; the config says {version}",
                args.command,
                args.command.min_version()
            ),
        );
        return (version, Err(err));
    }
    let span = tracing::info_span!("cni", command = ?args.command, container_id = %args.container_id, ifname = %args.ifname);
    let _entered = span.enter();
    let outcome = match args.command {
        Command::Add => plugin.add(&args, &conf).map(Reply::Result),
        Command::Del => plugin.del(&args, &conf).map(|()| Reply::Empty),
        Command::Check => plugin.check(&args, &conf).map(|()| Reply::Empty),
        Command::Status => plugin.status(&args, &conf).map(|()| Reply::Empty),
        Command::Gc => plugin.gc(&args, &conf).map(|()| Reply::Empty),
        Command::Version => Ok(Reply::Empty),
    };
    (version, outcome)
}

/// The `main` of a plugin binary: logs to stderr (never stdout), reads the process
/// environment and stdin, prints, exits 0 or 1.
pub fn plugin_main(plugin: &dyn Plugin) -> ExitCode {
    init_logging();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = ErrorResult::new(code::IO_FAILURE, format!("reading stdin: {e}"));
        println!("{}", serde_json::to_string(&err).unwrap_or_default());
        return ExitCode::FAILURE;
    }
    let (out, ok) = run(plugin, |k| std::env::var(k).ok(), stdin);
    let mut stdout = std::io::stdout().lock();
    if !out.is_empty() {
        let _ = writeln!(stdout, "{out}");
    }
    let _ = stdout.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Installs the stderr subscriber: `NODEKIT_LOG` sets an env-filter; without it, warnings
/// and errors only, through a plain level filter (parsing filter directives compiles regexes,
/// which would cost every plugin invocation a measurable share of its run time).
pub fn init_logging() {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match std::env::var("NODEKIT_LOG") {
        Ok(directives) => builder
            .with_env_filter(tracing_subscriber::EnvFilter::new(directives))
            .try_init(),
        Err(_) => builder.with_max_level(tracing::Level::WARN).try_init(),
    };
}
