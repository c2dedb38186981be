//! The shape of an ADD result (spec section 5, "Success"): what the runner requires of it,
//! and the typed view the other checks read (interfaces, addresses).

use std::net::IpAddr;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde_json::Value;

use super::version::CniVersion;

/// One entry of `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultInterface {
    /// `name`.
    pub name: String,
    /// `mac`, if reported.
    pub mac: Option<String>,
    /// `sandbox`, if reported (set for container-side interfaces).
    pub sandbox: Option<String>,
}

/// One entry of `ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultIp {
    /// `address`, in CIDR form.
    pub address: IpNetwork,
    /// `interface`: index into `interfaces`.
    pub interface: Option<usize>,
    /// `gateway`, if reported.
    pub gateway: Option<IpAddr>,
}

/// The parts of an ADD result the checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    /// `cniVersion`.
    pub cni_version: String,
    /// `interfaces`.
    pub interfaces: Vec<ResultInterface>,
    /// `ips`.
    pub ips: Vec<ResultIp>,
    /// The index of the interface whose `sandbox` is `CNI_NETNS` and name is `CNI_IFNAME`.
    pub sandbox_interface: Option<usize>,
}

impl AddResult {
    /// The sandbox interface entry, if the result has one.
    pub fn sandbox(&self) -> Option<&ResultInterface> {
        self.sandbox_interface.and_then(|i| self.interfaces.get(i))
    }

    /// The addresses assigned to the sandbox interface.
    pub fn sandbox_addresses(&self) -> Vec<IpNetwork> {
        self.ips
            .iter()
            .filter(|ip| ip.interface.is_some() && ip.interface == self.sandbox_interface)
            .map(|ip| ip.address)
            .collect()
    }

    /// The address to use to reach the pod: its first IPv4 address, else its first address.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        let addrs = self.sandbox_addresses();
        let pick = addrs.iter().find(|a| a.is_ipv4()).or_else(|| addrs.first());
        pick.map(|a| a.ip())
    }
}

/// What the result was validated against.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    /// The version that was requested (the result must be in that version).
    pub version: CniVersion,
    /// `CNI_NETNS` of the ADD.
    pub netns: &'a Path,
    /// `CNI_IFNAME` of the ADD.
    pub ifname: &'a str,
}

/// Reads a result leniently into an [`AddResult`] (no judgement), for checks that only need
/// the addresses. Malformed entries are dropped.
pub fn read(value: &Value, netns: &Path, ifname: &str) -> AddResult {
    let (result, _) = validate_inner(value, None, netns, ifname);
    result
}

/// Validates a result against the spec for `exp.version` and returns the typed view, or every
/// problem found (one message each).
pub fn validate(value: &Value, exp: Expectation<'_>) -> Result<AddResult, Vec<String>> {
    let (result, problems) = validate_inner(value, Some(exp.version), exp.netns, exp.ifname);
    if problems.is_empty() {
        Ok(result)
    } else {
        Err(problems)
    }
}

fn validate_inner(
    value: &Value,
    version: Option<CniVersion>,
    netns: &Path,
    ifname: &str,
) -> (AddResult, Vec<String>) {
    let mut problems = Vec::new();
    let mut result = AddResult {
        cni_version: String::new(),
        interfaces: Vec::new(),
        ips: Vec::new(),
        sandbox_interface: None,
    };
    let Some(obj) = value.as_object() else {
        problems.push("the result is not a JSON object".to_string());
        return (result, problems);
    };
    match obj.get("cniVersion").and_then(Value::as_str) {
        Some(v) => {
            result.cni_version = v.to_string();
            if let Some(want) = version {
                if v.parse::<CniVersion>().ok() != Some(want) {
                    problems.push(format!(
                        "cniVersion is {v:?} but {want} was requested; a result must use the requested version"
                    ));
                }
            }
        }
        None => problems.push("cniVersion is missing".to_string()),
    }
    if version.is_some_and(|v| v < CniVersion::V0_3_0) {
        problems.push("results before spec 0.3.0 (ip4/ip6) are not checked by this runner".into());
        return (result, problems);
    }

    match obj.get("interfaces") {
        None => problems
            .push("interfaces is missing; a main plugin must report the sandbox interface".into()),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(o) = item.as_object() else {
                    problems.push(format!("interfaces[{i}] is not an object"));
                    continue;
                };
                let name = match o.get("name").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => {
                        problems.push(format!("interfaces[{i}].name is missing or empty"));
                        String::new()
                    }
                };
                let mac = match o.get("mac") {
                    None => None,
                    Some(Value::String(m)) => {
                        if !valid_mac(m) {
                            problems
                                .push(format!("interfaces[{i}].mac {m:?} is not a MAC address"));
                        }
                        Some(m.clone())
                    }
                    Some(_) => {
                        problems.push(format!("interfaces[{i}].mac is not a string"));
                        None
                    }
                };
                let sandbox = match o.get("sandbox") {
                    None => None,
                    Some(Value::String(s)) if s.is_empty() => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        problems.push(format!("interfaces[{i}].sandbox is not a string"));
                        None
                    }
                };
                result
                    .interfaces
                    .push(ResultInterface { name, mac, sandbox });
            }
        }
        Some(_) => problems.push("interfaces is not an array".into()),
    }
    let netns_str = netns.display().to_string();
    result.sandbox_interface = result
        .interfaces
        .iter()
        .position(|i| i.sandbox.as_deref() == Some(netns_str.as_str()) && i.name == ifname);
    match result.sandbox_interface {
        Some(i) => {
            if result.interfaces[i].mac.is_none() {
                problems.push(format!("the sandbox interface {ifname} has no mac"));
            }
        }
        None => problems.push(format!(
            "no interface has sandbox {netns_str:?} and name {ifname:?} (got {})",
            describe_interfaces(&result.interfaces)
        )),
    }

    match obj.get("ips") {
        None => problems.push("ips is missing".into()),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                problems.push("ips is empty".into());
            }
            for (i, item) in items.iter().enumerate() {
                let Some(o) = item.as_object() else {
                    problems.push(format!("ips[{i}] is not an object"));
                    continue;
                };
                let address = match o.get("address").and_then(Value::as_str) {
                    Some(a) => match a.parse::<IpNetwork>() {
                        Ok(net) if a.contains('/') => Some(net),
                        _ => {
                            problems.push(format!(
                                "ips[{i}].address {a:?} is not an address in CIDR form"
                            ));
                            None
                        }
                    },
                    None => {
                        problems.push(format!("ips[{i}].address is missing"));
                        None
                    }
                };
                let interface = match o.get("interface") {
                    None => {
                        problems.push(format!("ips[{i}].interface is missing"));
                        None
                    }
                    Some(v) => match v.as_u64() {
                        Some(idx) if (idx as usize) < result.interfaces.len() => {
                            if Some(idx as usize) != result.sandbox_interface {
                                problems.push(format!(
                                    "ips[{i}].interface {idx} points at {:?}, not the sandbox interface {ifname}",
                                    result.interfaces[idx as usize].name
                                ));
                            }
                            Some(idx as usize)
                        }
                        _ => {
                            problems.push(format!(
                                "ips[{i}].interface {v} is not an index into interfaces ({} entries)",
                                result.interfaces.len()
                            ));
                            None
                        }
                    },
                };
                let gateway = match o.get("gateway") {
                    None => None,
                    Some(g) => match g.as_str().and_then(|g| g.parse::<IpAddr>().ok()) {
                        Some(ip) => Some(ip),
                        None => {
                            problems.push(format!("ips[{i}].gateway {g} is not an IP address"));
                            None
                        }
                    },
                };
                if version.is_some_and(|v| v < CniVersion::V1_0_0) {
                    let want = address.map(|a| if a.is_ipv4() { "4" } else { "6" });
                    match o.get("version").and_then(Value::as_str) {
                        Some(v) if Some(v) == want || want.is_none() => {}
                        Some(v) => problems.push(format!(
                            "ips[{i}].version is {v:?} but the address is IPv{}",
                            want.unwrap_or("?")
                        )),
                        None => problems.push(format!(
                            "ips[{i}].version is missing (required before spec 1.0.0)"
                        )),
                    }
                }
                if let Some(address) = address {
                    result.ips.push(ResultIp {
                        address,
                        interface,
                        gateway,
                    });
                }
            }
        }
        Some(_) => problems.push("ips is not an array".into()),
    }

    match obj.get("routes") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.get("dst").and_then(Value::as_str) {
                    Some(d) if d.contains('/') && d.parse::<IpNetwork>().is_ok() => {}
                    _ => problems.push(format!("routes[{i}].dst is missing or not in CIDR form")),
                }
                if let Some(gw) = item.get("gw") {
                    if gw.as_str().and_then(|g| g.parse::<IpAddr>().ok()).is_none() {
                        problems.push(format!("routes[{i}].gw {gw} is not an IP address"));
                    }
                }
            }
        }
        Some(_) => problems.push("routes is not an array".into()),
    }

    match obj.get("dns") {
        None => {}
        Some(Value::Object(dns)) => {
            for key in ["nameservers", "search", "options"] {
                match dns.get(key) {
                    None => {}
                    Some(Value::Array(items))
                        if key == "nameservers" && items.iter().all(Value::is_string) =>
                    {
                        for ns in items.iter().filter_map(Value::as_str) {
                            if ns.parse::<IpAddr>().is_err() {
                                problems.push(format!(
                                    "dns.nameservers entry {ns:?} is not an IP address"
                                ));
                            }
                        }
                    }
                    Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
                    Some(_) => problems.push(format!("dns.{key} is not an array of strings")),
                }
            }
            if dns.get("domain").is_some_and(|d| !d.is_string()) {
                problems.push("dns.domain is not a string".into());
            }
        }
        Some(_) => problems.push("dns is not an object".into()),
    }
    (result, problems)
}

fn describe_interfaces(ifaces: &[ResultInterface]) -> String {
    if ifaces.is_empty() {
        return "no interfaces".to_string();
    }
    ifaces
        .iter()
        .map(|i| match &i.sandbox {
            Some(s) => format!("{} in {s}", i.name),
            None => format!("{} on the host", i.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `aa:bb:cc:dd:ee:ff` (either case); also accepts longer link-layer addresses.
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() >= 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exp(version: CniVersion) -> Expectation<'static> {
        Expectation {
            version,
            netns: Path::new("/run/netns/pod"),
            ifname: "eth0",
        }
    }

    fn bridge_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "6e:12:34:56:78:9a"},
                {"name": "veth1234", "mac": "6e:12:34:56:78:9b"},
                {"name": "eth0", "mac": "6E:12:34:56:78:9C", "sandbox": "/run/netns/pod"}
            ],
            "ips": [{"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    #[test]
    fn a_bridge_style_result_is_accepted() {
        let r = validate(&bridge_result(), exp(CniVersion::V1_0_0)).expect("valid");
        assert_eq!(r.sandbox_interface, Some(2));
        assert_eq!(
            r.sandbox_addresses(),
            vec!["10.88.0.5/16".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(r.primary_ip(), Some("10.88.0.5".parse().unwrap()));
        assert_eq!(
            r.sandbox().and_then(|s| s.mac.clone()).as_deref(),
            Some("6E:12:34:56:78:9C")
        );
    }

    #[test]
    fn pre_1_0_results_need_ip_versions() {
        let mut v = bridge_result();
        v["cniVersion"] = json!("0.4.0");
        let problems = validate(&v, exp(CniVersion::V0_4_0)).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("ips[0].version is missing")),
            "{problems:?}"
        );
        v["ips"][0]["version"] = json!("4");
        validate(&v, exp(CniVersion::V0_4_0)).expect("valid with version");
        v["ips"][0]["version"] = json!("6");
        assert!(validate(&v, exp(CniVersion::V0_4_0)).is_err());
    }

    #[test]
    fn every_broken_field_is_reported() {
        let v = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "mac": "zz", "sandbox": "/run/netns/other"}],
            "ips": [{"interface": 3, "address": "10.0.0.1"}, {"address": "10.0.0.2/24", "gateway": "x"}],
            "routes": [{"gw": "10.0.0.1"}],
            "dns": {"nameservers": ["not-an-ip"]}
        });
        let problems = validate(&v, exp(CniVersion::V1_0_0)).unwrap_err();
        let expect = [
            "cniVersion is \"0.4.0\" but 1.0.0 was requested",
            "interfaces[0].mac \"zz\"",
            "no interface has sandbox \"/run/netns/pod\"",
            "ips[0].address \"10.0.0.1\" is not an address in CIDR form",
            "ips[0].interface 3 is not an index",
            "ips[1].interface is missing",
            "ips[1].gateway",
            "routes[0].dst",
            "dns.nameservers entry",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.contains(e)),
                "missing {e:?} in {problems:?}"
            );
        }
    }

    #[test]
    fn ips_must_point_at_the_sandbox_interface() {
        let mut v = bridge_result();
        v["ips"][0]["interface"] = json!(0);
        let problems = validate(&v, exp(CniVersion::V1_0_0)).unwrap_err();
        assert!(
            problems[0].contains("not the sandbox interface"),
            "{problems:?}"
        );
    }

    #[test]
    fn macs_are_recognised() {
        assert!(valid_mac("0a:58:0a:f4:00:05"));
        assert!(valid_mac("0A:58:0A:F4:00:05"));
        assert!(!valid_mac("0a:58:0a:f4:00"));
        assert!(!valid_mac("0a-58-0a-f4-00-05"));
    }
}
