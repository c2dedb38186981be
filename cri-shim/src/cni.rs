//! The runtime side of CNI: load the first network configuration of the conf dir and run its
//! plugins by the CNI exec protocol (env + config on stdin + result on stdout), ADD in list
//! order with `prevResult` chaining, DEL in reverse order, capability args in `runtimeConfig`
//! only for plugins that declare them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What went wrong loading a network configuration or running a plugin.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No usable configuration file in the conf dir (the "cni config uninitialized" state).
    #[error("no valid network config found in {dir}")]
    NoConfig {
        /// The conf dir.
        dir: PathBuf,
    },
    /// A configuration file is not a valid network (list) configuration.
    #[error("invalid network config {path}: {reason}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The plugin named by `type` is in none of the bin dirs.
    #[error("failed to find plugin {plugin:?} in path {dirs:?}")]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// The bin dirs searched.
        dirs: Vec<PathBuf>,
    },
    /// The plugin could not be executed or its output read.
    #[error("plugin type={plugin:?} ({command}): {source}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin answered with an error result (or exited non-zero).
    #[error("plugin type={plugin:?} failed ({command}): {msg}{}", details_suffix(.details))]
    PluginFailed {
        /// The plugin type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The CNI error code (0 when the plugin gave none).
        code: u64,
        /// The plugin's message.
        msg: String,
        /// The plugin's details.
        details: String,
    },
    /// The plugin succeeded but printed something that is not a JSON result.
    #[error("plugin type={plugin:?} ({command}) printed an invalid result: {source}")]
    BadResult {
        /// The plugin type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

/// A network configuration list: the first file of the conf dir, normalised (a single
/// `.conf` network becomes a one-plugin list).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// The network name.
    pub name: String,
    /// The declared CNI version, given to every plugin.
    pub cni_version: String,
    /// The plugin configurations in order.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkList {
    /// Parses a `.conflist` (or, with `single`, a one-network `.conf`) document.
    pub fn parse(path: &Path, bytes: &[u8], single: bool) -> Result<Self, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let doc: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let str_field = |key: &str| doc.get(key).and_then(Value::as_str).map(str::to_string);
        let name = str_field("name").ok_or_else(|| invalid("missing \"name\"".into()))?;
        let cni_version = str_field("cniVersion").unwrap_or_else(|| "0.2.0".into());
        let plugins = if single {
            vec![doc.clone()]
        } else {
            doc.get("plugins")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("missing \"plugins\" array".into()))?
                .iter()
                .map(|p| p.as_object().cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("a plugin is not an object".into()))?
        };
        if plugins.is_empty() {
            return Err(invalid("no plugins".into()));
        }
        if let Some(i) = plugins.iter().position(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        }) {
            return Err(invalid(format!("plugin {i} has no \"type\"")));
        }
        Ok(Self {
            name,
            cni_version,
            plugins,
        })
    }

    /// The configuration as a conflist document, to keep with a sandbox so its DEL runs with
    /// the configuration its ADD used.
    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": self.plugins,
        })
    }

    /// Reads back what [`NetworkList::to_value`] wrote.
    pub fn from_value(value: &Value) -> Result<Self, CniError> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        Self::parse(Path::new("<sandbox state>"), &bytes, false)
    }
}

/// Loads the first valid network configuration in `dir` (files `*.conflist`, `*.conf`,
/// `*.json` in name order, as libcni does); invalid files are skipped.
pub fn load_first(dir: &Path) -> Result<NetworkList, CniError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|path| {
            let ext = path.extension()?.to_str()?;
            let single = match ext {
                "conflist" => false,
                "conf" | "json" => true,
                _ => return None,
            };
            let bytes = std::fs::read(path).ok()?;
            match NetworkList::parse(path, &bytes, single) {
                Ok(list) => Some(list),
                Err(err) => {
                    tracing::warn!(%err, "skipping CNI config");
                    None
                }
            }
        })
        .next()
        .ok_or_else(|| CniError::NoConfig {
            dir: dir.to_path_buf(),
        })
}

/// One attachment of a network to a sandbox: what CNI's env carries plus capability args.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID` (the sandbox ID).
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` pairs, in order.
    pub args: Vec<(String, String)>,
    /// Capability args (`portMappings`, `bandwidth`...), passed in `runtimeConfig` to the
    /// plugins whose `capabilities` ask for them.
    pub capability_args: BTreeMap<String, Value>,
}

/// Runs CNI plugins found in the bin dirs.
#[derive(Debug, Clone)]
pub struct CniExec {
    bin_dirs: Vec<PathBuf>,
}

impl CniExec {
    /// Plugins are looked up in `bin_dirs` in order (they also become `CNI_PATH`).
    pub fn new(bin_dirs: Vec<PathBuf>) -> Self {
        Self { bin_dirs }
    }

    /// ADD: runs every plugin in order, each getting the previous one's result; returns the
    /// last result. The caller runs [`CniExec::del`] if this fails (partial work exists).
    pub async fn add(&self, net: &NetworkList, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &net.plugins {
            let result = self.invoke("ADD", net, plugin, att, prev.as_ref()).await?;
            prev = Some(result.unwrap_or_else(|| serde_json::json!({})));
        }
        Ok(prev.unwrap_or_else(|| serde_json::json!({})))
    }

    /// DEL: runs every plugin in reverse order with the ADD result as `prevResult`. Every
    /// plugin is run even after a failure (so as much as possible is released); the first
    /// error is returned.
    pub async fn del(
        &self,
        net: &NetworkList,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first_err = None;
        for plugin in net.plugins.iter().rev() {
            if let Err(err) = self.invoke("DEL", net, plugin, att, prev).await {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn invoke(
        &self,
        command: &'static str,
        net: &NetworkList,
        plugin: &Map<String, Value>,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let kind = plugin
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let binary = self
            .bin_dirs
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: kind.clone(),
                dirs: self.bin_dirs.clone(),
            })?;
        let stdin = plugin_stdin(net, plugin, att, prev);
        let exec_err = |source| CniError::Exec {
            plugin: kind.clone(),
            command,
            source,
        };
        let cni_path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let cni_args: Vec<String> = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", cni_args.join(";"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(exec_err)?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(&stdin).await.map_err(exec_err)?;
        }
        let out = child.wait_with_output().await.map_err(exec_err)?;
        tracing::debug!(plugin = %kind, command, status = ?out.status, "CNI plugin ran");
        if !out.status.success() {
            let err: Map<String, Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let text = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_string);
            return Err(CniError::PluginFailed {
                plugin: kind,
                command,
                code: err.get("code").and_then(Value::as_u64).unwrap_or(0),
                msg: text("msg").unwrap_or_else(|| {
                    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    format!("{} {stderr}", out.status)
                }),
                details: text("details").unwrap_or_default(),
            });
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|source| CniError::BadResult {
                plugin: kind,
                command,
                source,
            })
    }
}

/// The configuration a plugin reads on stdin: its own object plus the list's name and
/// version, `prevResult`, and the capability args it declared in `runtimeConfig`.
fn plugin_stdin(
    net: &NetworkList,
    plugin: &Map<String, Value>,
    att: &Attachment,
    prev: Option<&Value>,
) -> Vec<u8> {
    let mut conf = plugin.clone();
    conf.insert("name".into(), Value::String(net.name.clone()));
    conf.insert("cniVersion".into(), Value::String(net.cni_version.clone()));
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    let wanted = plugin.get("capabilities").and_then(Value::as_object);
    let runtime_config: Map<String, Value> = att
        .capability_args
        .iter()
        .filter(|(k, _)| wanted.and_then(|w| w.get(*k)).and_then(Value::as_bool) == Some(true))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    serde_json::to_vec(&conf).unwrap_or_default()
}

/// The pod's addresses from an ADD result (any CNI version): the IPs on interfaces inside the
/// sandbox (or not tied to an interface), IPv4 first.
pub fn pod_ips(result: &Value) -> Vec<IpAddr> {
    let ifaces = result.get("interfaces").and_then(Value::as_array);
    let in_sandbox = |idx: Option<u64>| match (idx, ifaces) {
        (Some(i), Some(list)) => list
            .get(i as usize)
            .and_then(|iface| iface.get("sandbox"))
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()),
        _ => true,
    };
    let mut ips: Vec<IpAddr> = match result.get("ips").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter(|ip| in_sandbox(ip.get("interface").and_then(Value::as_u64)))
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .collect::<Vec<_>>(),
        None => ["ip4", "ip6"]
            .iter()
            .filter_map(|k| result.get(k)?.get("ip")?.as_str())
            .collect(),
    }
    .into_iter()
    .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
    .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "abc".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAME".into(), "p".into()),
            ],
            capability_args: [
                ("portMappings".to_string(), json!([{"hostPort": 80}])),
                ("bandwidth".to_string(), json!({"ingressRate": 1})),
            ]
            .into(),
        }
    }

    #[test]
    fn conf_dir_yields_first_valid_file_and_wraps_single_confs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00-bad.conflist"), b"{").unwrap();
        std::fs::write(dir.path().join("05-notes.txt"), b"x").unwrap();
        std::fs::write(
            dir.path().join("10-a.conf"),
            br#"{"cniVersion":"0.4.0","name":"a","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("20-b.conflist"),
            br#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        let net = load_first(dir.path()).unwrap();
        assert_eq!(net.name, "a");
        assert_eq!(net.plugins.len(), 1);
        assert_eq!(NetworkList::from_value(&net.to_value()).unwrap(), net);
    }

    #[test]
    fn empty_or_invalid_conf_dir_is_no_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_first(dir.path()),
            Err(CniError::NoConfig { .. })
        ));
        std::fs::write(
            dir.path().join("a.conflist"),
            br#"{"name":"a","plugins":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            load_first(dir.path()),
            Err(CniError::NoConfig { .. })
        ));
    }

    #[test]
    fn stdin_carries_name_version_prev_result_and_only_declared_capabilities() {
        let net = NetworkList::parse(
            Path::new("t"),
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[
                {"type":"a","capabilities":{"portMappings":true,"bandwidth":false}},
                {"type":"b"}]}"#,
            false,
        )
        .unwrap();
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let a: Value = serde_json::from_slice(&plugin_stdin(
            &net,
            &net.plugins[0],
            &attachment(),
            Some(&prev),
        ))
        .unwrap();
        assert_eq!(a["name"], "n");
        assert_eq!(a["cniVersion"], "1.0.0");
        assert_eq!(a["prevResult"], prev);
        assert_eq!(
            a["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 80}]})
        );
        let b: Value =
            serde_json::from_slice(&plugin_stdin(&net, &net.plugins[1], &attachment(), None))
                .unwrap();
        assert!(b.get("runtimeConfig").is_none() && b.get("prevResult").is_none());
    }

    #[test]
    fn pod_ips_prefers_sandbox_interfaces_and_ipv4() {
        let result = json!({
            "interfaces": [{"name":"cni0"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips": [
                {"address":"fd00::5/64","interface":1},
                {"address":"10.0.0.1/24","interface":0},
                {"address":"10.0.0.5/24","interface":1}
            ]
        });
        let ips: Vec<String> = pod_ips(&result).iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
        let old = json!({"ip4":{"ip":"10.1.0.2/16"}});
        assert_eq!(pod_ips(&old)[0].to_string(), "10.1.0.2");
    }

    fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn add_chains_results_and_del_runs_every_plugin_in_reverse() {
        let bin = tempfile::tempdir().unwrap();
        let log = bin.path().join("calls");
        let record = format!(
            "echo \"$CNI_COMMAND $(basename $0) $CNI_ARGS\" >> {}; cat > /dev/null",
            log.display()
        );
        script(
            bin.path(),
            "first",
            &format!("{record}\necho '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.9.0.2/24\"}}]}}'"),
        );
        script(
            bin.path(),
            "second",
            &format!("{record}\n[ \"$CNI_COMMAND\" = DEL ] && {{ echo '{{\"code\":11,\"msg\":\"boom\"}}'; exit 1; }}\necho '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.9.0.3/24\"}}]}}'"),
        );
        let net = NetworkList::parse(
            Path::new("t"),
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"first"},{"type":"second"}]}"#,
            false,
        )
        .unwrap();
        let exec = CniExec::new(vec![bin.path().to_path_buf()]);
        let result = exec.add(&net, &attachment()).await.unwrap();
        assert_eq!(pod_ips(&result)[0].to_string(), "10.9.0.3");
        let err = exec
            .del(&net, &attachment(), Some(&result))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        assert_eq!(
            calls,
            [
                "ADD first IgnoreUnknown=1;K8S_POD_NAME=p",
                "ADD second IgnoreUnknown=1;K8S_POD_NAME=p",
                "DEL second IgnoreUnknown=1;K8S_POD_NAME=p",
                "DEL first IgnoreUnknown=1;K8S_POD_NAME=p",
            ]
        );
    }

    #[tokio::test]
    async fn missing_plugin_is_named() {
        let net = NetworkList::parse(
            Path::new("t"),
            br#"{"name":"n","plugins":[{"type":"nope"}]}"#,
            false,
        )
        .unwrap();
        let err = CniExec::new(vec!["/nonexistent".into()])
            .add(&net, &attachment())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
