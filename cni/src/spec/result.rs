//! The ADD result document. Held internally in the 1.x shape and written in the shape of the
//! version the config asked for (0.3.x/0.4.0 results carry `version` on every IP).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// An ADD result (also a `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version this result is written in.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Interfaces created or used, host side and sandbox side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned, each pointing into `interfaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes set up in the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings for the runtime to write into the container.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// One network interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address, lower-case colon form.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// MTU, when the plugin set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The sandbox (netns path) for interfaces inside the container; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// One assigned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: IpNetwork,
    /// Default gateway for this subnet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination network.
    pub dst: IpNetwork,
    /// Next hop; the plugin picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Path MTU of the route (1.1.0); nodekit-ipam sets it for VXLAN pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// The default-route destination of a family (`0.0.0.0/0` or `::/0`).
pub fn default_dst(v4: bool) -> IpNetwork {
    const V4: ipnetwork::Ipv4Network =
        match ipnetwork::Ipv4Network::new_checked(std::net::Ipv4Addr::UNSPECIFIED, 0) {
            Some(n) => n,
            None => panic!("0.0.0.0/0 is valid"),
        };
    const V6: ipnetwork::Ipv6Network =
        match ipnetwork::Ipv6Network::new_checked(std::net::Ipv6Addr::UNSPECIFIED, 0) {
            Some(n) => n,
            None => panic!("::/0 is valid"),
        };
    if v4 {
        IpNetwork::V4(V4)
    } else {
        IpNetwork::V6(V6)
    }
}

/// DNS configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// resolv.conf options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// True when nothing is set, so the field is left out of results.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// Parses a result written in any supported version (the `version` field of 0.x IPs is
    /// ignored: the address says its family).
    pub fn from_value(value: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value)
    }

    /// Writes the result in the shape of `version`.
    pub fn to_version(&self, version: &str) -> serde_json::Value {
        let mut copy = self.clone();
        copy.cni_version = version.to_string();
        let mut value = serde_json::to_value(&copy).unwrap_or_default();
        if version.starts_with("0.") {
            if let Some(ips) = value.get_mut("ips").and_then(|v| v.as_array_mut()) {
                for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                    let family = if cfg.address.is_ipv4() { "4" } else { "6" };
                    ip["version"] = serde_json::Value::from(family);
                }
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: None,
                sandbox: Some("/run/netns/x".into()),
            }],
            ips: vec![IpConfig {
                address: "10.0.0.2/26".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                mtu: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn one_x_results_have_no_ip_version_and_omit_empty_fields() {
        let v = sample().to_version("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["ips"][0]["address"], "10.0.0.2/26");
        assert_eq!(v["ips"][0]["interface"], 0);
        assert!(v["ips"][0].get("version").is_none());
        assert!(v.get("dns").is_none());
        assert!(v["routes"][0].get("gw").is_none());
    }

    #[test]
    fn zero_x_results_carry_the_ip_family() {
        let v = sample().to_version("0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    #[test]
    fn parses_an_old_result_with_version_fields() {
        let old = json!({"cniVersion":"0.3.1","ips":[{"version":"6","address":"fd00::5/64"}]});
        let r = CniResult::from_value(old).unwrap();
        assert!(r.ips[0].address.is_ipv6());
    }
}
