//! The environment contract: CNI_COMMAND and friends, validated per command the way the spec
//! lists which variables each operation needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{code, ErrorResult};

/// The operations of the CNI protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Report readiness (1.1.0).
    Status,
    /// Report supported versions.
    Version,
    /// Release resources of attachments not in the valid list (1.1.0).
    Gc,
}

impl Command {
    /// Parses a CNI_COMMAND value.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    /// The minimum config version that has this command.
    pub fn min_version(self) -> &'static str {
        match self {
            Self::Check => "0.4.0",
            Self::Status | Self::Gc => "1.1.0",
            _ => "0.1.0",
        }
    }
}

/// One attachment named by a GC request's valid list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct GcAttachment {
    /// Container ID of the attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
}

/// Everything a runtime passed to one plugin invocation, validated for its command.
#[derive(Debug, Clone)]
pub struct CmdArgs {
    /// The operation.
    pub command: Command,
    /// CNI_CONTAINERID (empty for STATUS/GC/VERSION).
    pub container_id: String,
    /// CNI_NETNS, when given.
    pub netns: Option<PathBuf>,
    /// CNI_IFNAME (empty for STATUS/GC/VERSION).
    pub ifname: String,
    /// CNI_ARGS as key/value pairs.
    pub args: BTreeMap<String, String>,
    /// CNI_PATH split into directories.
    pub path: Vec<PathBuf>,
    /// The network configuration bytes from stdin.
    pub stdin: Vec<u8>,
}

impl CmdArgs {
    /// Reads and validates the CNI_* variables through `get` (the process environment in a
    /// plugin, a map in tests). Errors carry code 4 and name the variable.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        stdin: Vec<u8>,
    ) -> Result<Self, ErrorResult> {
        let invalid = |msg: String| ErrorResult::new(code::INVALID_ENV, msg);
        let raw_command = get("CNI_COMMAND").ok_or_else(|| {
            invalid("required environment variable CNI_COMMAND is missing".into())
        })?;
        let command = Command::parse(&raw_command).ok_or_else(|| {
            invalid(format!(
                "CNI_COMMAND={raw_command:?} is not one of ADD, DEL, CHECK, STATUS, VERSION, GC"
            ))
        })?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> Result<String, ErrorResult> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(invalid(format!(
                    "required environment variable {name} is missing for {raw_command}"
                ))),
            }
        };
        let (container_id, ifname) = if needs_attachment {
            let id = required("CNI_CONTAINERID")?;
            validate_container_id(&id).map_err(invalid)?;
            let ifname = required("CNI_IFNAME")?;
            validate_ifname(&ifname).map_err(invalid)?;
            (id, ifname)
        } else {
            (String::new(), String::new())
        };
        let netns = match command {
            Command::Add | Command::Check => Some(PathBuf::from(required("CNI_NETNS")?)),
            Command::Del => get("CNI_NETNS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            _ => None,
        };
        let path = match command {
            Command::Version => Vec::new(),
            _ => required("CNI_PATH")?
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        };
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default()).map_err(invalid)?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
            stdin,
        })
    }

    /// The CNI_ARGS value of `key`, if given.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.get(key).map(String::as_str)
    }
}

/// CNI_ARGS is `K=V;K2=V2`.
fn parse_cni_args(raw: &str) -> Result<BTreeMap<String, String>, String> {
    raw.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"))
        })
        .collect()
}

/// The spec: a container ID is alphanumeric with `_ . -`, starting with an alphanumeric.
fn validate_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        Ok(())
    } else {
        Err(format!(
            "CNI_CONTAINERID {id:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"
        ))
    }
}

/// Linux interface names: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub(crate) fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "CNI_IFNAME {name:?} must be 1 to 15 characters long"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "CNI_IFNAME {name:?} is not a valid interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn add_needs_every_attachment_variable() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "K8S_POD_NAME=web;IgnoreUnknown=1"),
        ];
        let args = CmdArgs::from_env(env(&full), vec![]).unwrap();
        assert_eq!(args.path.len(), 2);
        assert_eq!(args.arg("K8S_POD_NAME"), Some("web"));
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            let partial: Vec<_> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = CmdArgs::from_env(env(&partial), vec![]).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV);
            assert!(err.msg.contains(missing), "{}", err.msg);
        }
    }

    #[test]
    fn del_tolerates_a_missing_netns_and_status_needs_no_container() {
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ];
        assert!(CmdArgs::from_env(env(&del), vec![])
            .unwrap()
            .netns
            .is_none());
        let status = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")];
        assert_eq!(
            CmdArgs::from_env(env(&status), vec![]).unwrap().command,
            Command::Status
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = CmdArgs::from_env(env(&[("CNI_COMMAND", "FROB")]), vec![]).unwrap_err();
        assert!(err.msg.contains("FROB"));
        let err = CmdArgs::from_env(env(&[]), vec![]).unwrap_err();
        assert!(err.msg.contains("CNI_COMMAND"));
        assert!(validate_ifname("a-very-long-interface").is_err());
        assert!(validate_ifname("eth/0").is_err());
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_container_id("-x").is_err());
        assert!(validate_container_id("abc.def_1-2").is_ok());
        assert!(parse_cni_args("novalue").is_err());
    }
}
