//! Network configuration lists (`.conflist`) as a runtime reads them: the list's version and
//! name, its plugins in order, and the per-plugin configuration handed to each invocation
//! (spec section 3, "Deriving execution configuration from plugin configuration").

use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use super::version::CniVersion;

/// What is wrong with a network configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The file could not be read.
    #[error("cannot read CNI config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not JSON.
    #[error("CNI config {origin} is not valid JSON: {source}")]
    Json {
        /// Where the text came from.
        origin: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A required field is missing or has the wrong type.
    #[error("CNI config {origin}: {field} {problem}")]
    Field {
        /// Where the text came from.
        origin: String,
        /// The JSON path of the field (`plugins[1].type`).
        field: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// `cniVersion` (or an entry of `cniVersions`) is not a version.
    #[error("CNI config {origin}: {source}")]
    Version {
        /// Where the text came from.
        origin: String,
        /// The parse error.
        #[source]
        source: super::version::VersionParseError,
    },
}

/// A parsed network configuration list; a single-plugin `.conf` is wrapped into a list of
/// one, the way libcni's `ConfListFromConf` does.
#[derive(Debug, Clone)]
pub struct ConfList {
    /// `cniVersion` as written.
    pub cni_version: CniVersion,
    /// `cniVersions` (spec 1.1.0), when present.
    pub cni_versions: Vec<CniVersion>,
    /// The network name.
    pub name: String,
    /// `disableCheck`: the runtime must not call CHECK.
    pub disable_check: bool,
    /// `disableGC`: the runtime must not call GC.
    pub disable_gc: bool,
    /// The plugin configuration objects, in execution order; each has a string `type`.
    pub plugins: Vec<Map<String, Value>>,
}

impl ConfList {
    /// Reads and parses a `.conflist` or `.conf` file.
    pub fn load(path: &Path) -> Result<Self, ConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfError::Json {
            origin: origin.to_string(),
            source,
        })?;
        Self::from_value(value, origin)
    }

    /// Interprets an already parsed JSON document.
    pub fn from_value(value: Value, origin: &str) -> Result<Self, ConfError> {
        let field = |field: &str, problem| ConfError::Field {
            origin: origin.to_string(),
            field: field.to_string(),
            problem,
        };
        let version = |text: &str| {
            text.parse::<CniVersion>()
                .map_err(|source| ConfError::Version {
                    origin: origin.to_string(),
                    source,
                })
        };
        let Value::Object(mut top) = value else {
            return Err(field("(document)", "must be a JSON object"));
        };
        let cni_version = match top.get("cniVersion") {
            Some(Value::String(s)) => version(s)?,
            Some(_) => return Err(field("cniVersion", "must be a string")),
            None => return Err(field("cniVersion", "is missing")),
        };
        let cni_versions = match top.get("cniVersions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => version(s),
                    _ => Err(field("cniVersions", "must be an array of strings")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(field("cniVersions", "must be an array of strings")),
        };
        let name = match top.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(field("name", "must not be empty")),
            Some(_) => return Err(field("name", "must be a string")),
            None => return Err(field("name", "is missing")),
        };
        let flag = |key: &str| -> Result<bool, ConfError> {
            match top.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(field(key, "must be a boolean")),
            }
        };
        let disable_check = flag("disableCheck")?;
        let disable_gc = flag("disableGC")?;
        let plugins = match top.remove("plugins") {
            Some(Value::Array(items)) => {
                let mut plugins = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let Value::Object(obj) = item else {
                        return Err(field(&format!("plugins[{i}]"), "must be an object"));
                    };
                    match obj.get("type") {
                        Some(Value::String(t)) if valid_type(t) => {}
                        Some(Value::String(_)) => {
                            return Err(field(
                                &format!("plugins[{i}].type"),
                                "must be a plain executable name",
                            ))
                        }
                        _ => return Err(field(&format!("plugins[{i}].type"), "is missing")),
                    }
                    plugins.push(obj);
                }
                if plugins.is_empty() {
                    return Err(field("plugins", "must list at least one plugin"));
                }
                plugins
            }
            Some(_) => return Err(field("plugins", "must be an array")),
            None => {
                // A single-plugin .conf: the whole object is the plugin configuration.
                match top.get("type") {
                    Some(Value::String(t)) if valid_type(t) => {}
                    _ => return Err(field("plugins", "is missing (and no top-level type)")),
                }
                vec![top.clone()]
            }
        };
        Ok(Self {
            cni_version,
            cni_versions,
            name,
            disable_check,
            disable_gc,
            plugins,
        })
    }

    /// The highest version the list allows: `cniVersion`, or the newest of `cniVersions`.
    pub fn ceiling(&self) -> CniVersion {
        self.cni_versions
            .iter()
            .copied()
            .chain(std::iter::once(self.cni_version))
            .max()
            .unwrap_or(self.cni_version)
    }

    /// The `type` of plugin `index`.
    pub fn plugin_type(&self, index: usize) -> &str {
        self.plugins
            .get(index)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The `type`s of all plugins, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        (0..self.plugins.len())
            .map(|i| self.plugin_type(i))
            .collect()
    }

    /// Every executable the list needs: each plugin's `type` and its `ipam.type`, once each.
    pub fn executables(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.plugins {
            let ipam = p
                .get("ipam")
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str);
            let ty = p.get("type").and_then(Value::as_str);
            for name in [ty, ipam].into_iter().flatten() {
                if valid_type(name) && !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    /// The plugin configuration runtime passes to plugin `index` (spec section 3): the
    /// plugin object with the list's `name` and the negotiated `cniVersion` injected, plus
    /// `prevResult` when given. `runtimeConfig` is not synthesised (no capabilities).
    pub fn plugin_config(
        &self,
        index: usize,
        version: CniVersion,
        prev_result: Option<&Value>,
    ) -> Map<String, Value> {
        let mut conf = self.plugins.get(index).cloned().unwrap_or_default();
        conf.remove("cniVersions");
        conf.insert("cniVersion".into(), Value::String(version.to_string()));
        conf.insert("name".into(), Value::String(self.name.clone()));
        match prev_result {
            Some(prev) => {
                conf.insert("prevResult".into(), prev.clone());
            }
            None => {
                conf.remove("prevResult");
            }
        }
        conf
    }

    /// The address pools the runner can learn from the IPAM sections: `ipam.pools[].cidr`
    /// (nodekit-ipam), `ipam.ranges[][].subnet` and `ipam.subnet` (host-local).
    pub fn pools(&self) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        for p in &self.plugins {
            let Some(ipam) = p.get("ipam") else { continue };
            let parse = |v: Option<&Value>| v.and_then(Value::as_str)?.parse::<IpNetwork>().ok();
            if let Some(Value::Array(pools)) = ipam.get("pools") {
                out.extend(pools.iter().filter_map(|pool| parse(pool.get("cidr"))));
            }
            if let Some(Value::Array(ranges)) = ipam.get("ranges") {
                for set in ranges {
                    if let Value::Array(set) = set {
                        out.extend(set.iter().filter_map(|r| parse(r.get("subnet"))));
                    }
                }
            }
            out.extend(parse(ipam.get("subnet")));
        }
        out
    }
}

/// A plugin `type` must name an executable in the bin dir, not a path.
fn valid_type(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains('/') && !t.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const REFERENCE: &str = r#"{"cniVersion":"1.0.0","name":"nk-reference","plugins":[
        {"type":"bridge","bridge":"nkr0","isGateway":true,"ipMasq":false,
         "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"dataDir":"/tmp/x"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn a_conflist_parses_with_plugins_in_order() {
        let c = ConfList::parse(REFERENCE, "test").expect("parses");
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "nk-reference");
        assert_eq!(c.plugin_types(), vec!["bridge", "portmap"]);
        assert_eq!(c.executables(), vec!["bridge", "host-local", "portmap"]);
        assert_eq!(
            c.pools(),
            vec!["10.88.0.0/16".parse::<IpNetwork>().unwrap()]
        );
        assert!(!c.disable_check);
    }

    #[test]
    fn a_single_plugin_conf_is_wrapped_into_a_list() {
        let c = ConfList::parse(
            r#"{"cniVersion":"0.4.0","name":"n","type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}"#,
            "test",
        )
        .expect("parses");
        assert_eq!(c.plugin_types(), vec!["ptp"]);
        assert_eq!(c.pools(), vec!["10.1.0.0/24".parse::<IpNetwork>().unwrap()]);
        let conf = c.plugin_config(0, CniVersion::V0_4_0, None);
        assert_eq!(conf["type"], "ptp");
        assert_eq!(conf["name"], "n");
    }

    #[test]
    fn nodekit_pools_are_found() {
        let c = ConfList::from_value(
            json!({"cniVersion":"1.1.0","name":"nk","plugins":[{"type":"nodekit","ipam":{
                "type":"nodekit-ipam","pools":[{"name":"default","cidr":"10.244.0.0/16","blockSize":26}]}}]}),
            "test",
        )
        .expect("parses");
        assert_eq!(
            c.pools(),
            vec!["10.244.0.0/16".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(c.executables(), vec!["nodekit", "nodekit-ipam"]);
    }

    #[test]
    fn plugin_config_injects_version_name_and_prev_result() {
        let c = ConfList::parse(REFERENCE, "test").expect("parses");
        let prev = json!({"cniVersion":"0.4.0","ips":[]});
        let conf = c.plugin_config(1, CniVersion::V0_4_0, Some(&prev));
        assert_eq!(conf["cniVersion"], "0.4.0");
        assert_eq!(conf["name"], "nk-reference");
        assert_eq!(conf["type"], "portmap");
        assert_eq!(conf["prevResult"], prev);
        let conf = c.plugin_config(0, CniVersion::V1_0_0, None);
        assert!(!conf.contains_key("prevResult"));
        assert_eq!(conf["bridge"], "nkr0");
    }

    #[test]
    fn cni_versions_raise_the_ceiling() {
        let c = ConfList::parse(
            r#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"n","plugins":[{"type":"x"}]}"#,
            "test",
        )
        .expect("parses");
        assert_eq!(c.ceiling(), CniVersion::V1_1_0);
        assert!(!c
            .plugin_config(0, CniVersion::V1_1_0, None)
            .contains_key("cniVersions"));
    }

    #[test]
    fn broken_configs_are_rejected_with_the_field_named() {
        let cases = [
            ("[]", "(document)"),
            (r#"{"name":"n","plugins":[{"type":"x"}]}"#, "cniVersion"),
            (r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#, "name"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "plugins[0].type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
                "plugins[0].type",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, "plugins"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","disableCheck":"yes","type":"x"}"#,
                "disableCheck",
            ),
        ];
        for (text, fieldname) in cases {
            match ConfList::parse(text, "test") {
                Err(ConfError::Field { field, .. }) => assert_eq!(field, fieldname, "{text}"),
                other => panic!("{text}: expected a field error, got {other:?}"),
            }
        }
        assert!(matches!(
            ConfList::parse("{", "test"),
            Err(ConfError::Json { .. })
        ));
        assert!(matches!(
            ConfList::parse(r#"{"cniVersion":"one","name":"n","type":"x"}"#, "test"),
            Err(ConfError::Version { .. })
        ));
    }
}
