//! The `nodekit` plugin's network configuration (every field is documented in the README).

use serde::Deserialize;

use super::PluginError;
use crate::spec::{args::validate_ifname, Dns};

/// How pods are wired to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Host veths enslaved to a Linux bridge that holds the block gateways.
    #[default]
    Bridge,
    /// Calico style: no bridge, a host route per pod, proxy ARP, gateway 169.254.1.1.
    Routed,
}

/// The plugin's config.
#[derive(Debug, Clone, Deserialize)]
pub struct NodekitConf {
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Wiring mode.
    #[serde(default)]
    pub mode: Mode,
    /// Bridge name (bridge mode).
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// MTU of the bridge and both veth ends.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Node name, passed to IPAM for block affinity.
    #[serde(rename = "nodeName", default)]
    pub node_name: Option<String>,
    /// Let a pod reach itself through its service address (bridge port hairpin).
    #[serde(rename = "hairpinMode", default)]
    pub hairpin_mode: bool,
    /// The IPAM section; only `type` is read here, the rest is the IPAM plugin's.
    pub ipam: Option<IpamRef>,
    /// DNS settings echoed into the result.
    #[serde(default)]
    pub dns: Option<Dns>,
}

/// The part of `ipam` the main plugin needs.
#[derive(Debug, Clone, Deserialize)]
pub struct IpamRef {
    /// IPAM plugin binary name, looked up on CNI_PATH.
    #[serde(rename = "type")]
    pub ipam_type: String,
}

fn default_bridge() -> String {
    "nk0".into()
}

fn default_mtu() -> u32 {
    1500
}

impl NodekitConf {
    /// Parses and validates the whole config before anything is touched.
    pub fn parse(bytes: &[u8]) -> Result<Self, PluginError> {
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| PluginError::Config {
                field: "config".into(),
                reason: e.to_string(),
            })?;
        if let Some(mode) = raw.get("mode") {
            if !matches!(mode.as_str(), Some("bridge" | "routed")) {
                return Err(PluginError::UnsupportedField {
                    key: "mode".into(),
                    value: mode.to_string(),
                    hint: "use \"bridge\" or \"routed\"".into(),
                });
            }
        }
        let conf: Self = serde_json::from_value(raw).map_err(|e| PluginError::Config {
            field: "config".into(),
            reason: e.to_string(),
        })?;
        let invalid = |field: &str, reason: String| PluginError::Config {
            field: field.into(),
            reason,
        };
        if !(68..=65535).contains(&conf.mtu) {
            return Err(invalid(
                "mtu",
                format!("{} is outside 68..=65535", conf.mtu),
            ));
        }
        if conf.mode == Mode::Bridge {
            validate_ifname(&conf.bridge)
                .map_err(|e| invalid("bridge", e.replace("CNI_IFNAME", "bridge")))?;
        }
        match &conf.ipam {
            Some(ipam) if !ipam.ipam_type.is_empty() => {}
            _ => return Err(invalid("ipam.type", "an IPAM plugin is required".into())),
        }
        Ok(conf)
    }

    /// The IPAM plugin to delegate to.
    pub fn ipam_type(&self) -> &str {
        self.ipam
            .as_ref()
            .map(|i| i.ipam_type.as_str())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let conf = NodekitConf::parse(br#"{"name":"n","ipam":{"type":"host-local"}}"#).unwrap();
        assert_eq!(conf.mode, Mode::Bridge);
        assert_eq!(conf.bridge, "nk0");
        assert_eq!(conf.mtu, 1500);
        for (bad, field) in [
            (r#"{"mode":"tunnel","ipam":{"type":"x"}}"#, "tunnel"),
            (r#"{"mtu":20,"ipam":{"type":"x"}}"#, "mtu"),
            (
                r#"{"bridge":"much-too-long-bridge","ipam":{"type":"x"}}"#,
                "bridge",
            ),
            (r#"{"name":"n"}"#, "ipam.type"),
        ] {
            let err = NodekitConf::parse(bad.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }
}
