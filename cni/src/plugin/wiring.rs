//! Wiring one pod interface: the veth pair, the host side (bridge port, or routed host veth
//! with a /32 route) and the pod side (addresses, gateway, routes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use nodekit_nsutil::NetNs;
use sha2::{Digest, Sha256};

use super::config::{Mode, NodekitConf};
use super::PluginError;
use netlink_packet_route::link::LinkMessage;

use crate::netlink::{link_mac, link_name, link_peer_index, Netlink};
use crate::spec::{CniResult, Interface, IpConfig, Route};

/// The MAC of every host veth in routed mode (as Calico): pods resolve their gateway to it.
pub const ROUTED_HOST_MAC: [u8; 6] = [0xee; 6];
/// The IPv4 gateway pods use in routed mode, answered by the host veth.
pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway in routed mode: the link-local address derived from [`ROUTED_HOST_MAC`].
pub const ROUTED_GATEWAY_V6: Ipv6Addr =
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Prefix of the alias tagging host veths with their attachment, for GC.
pub const ALIAS_PREFIX: &str = "nodekit";

/// The host veth name of an attachment: `nk` + 13 hex digits of a hash of container ID and
/// ifname, so DEL and GC find it without any state, and it fits IFNAMSIZ.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("nk{}", &hex[..13])
}

/// The alias of a host veth: `nodekit/NETWORK/CONTAINERID/IFNAME`.
pub fn host_veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}/{network}/{container_id}/{ifname}")
}

/// A locally administered MAC derived from the bridge name, fixed at creation so adding
/// ports never changes the bridge's address under the pods' ARP caches.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [0x02, d[0], d[1], d[2], d[3], d[4]]
}

/// What is being wired.
pub struct Attachment<'a> {
    /// Plugin config.
    pub conf: &'a NodekitConf,
    /// Container ID.
    pub container_id: &'a str,
    /// Interface name in the pod.
    pub ifname: &'a str,
    /// The pod's namespace.
    pub pod_ns: &'a NetNs,
}

/// The links [`prepare`] made, for [`configure`] to finish.
pub struct Prepared {
    node: Netlink,
    pod: Netlink,
    host: LinkMessage,
    bridge: Option<LinkMessage>,
}

/// Phase one, which needs no address and so runs while IPAM works: the veth pair (reused
/// when a repeated ADD finds it intact), its alias, and in bridge mode the bridge and the
/// port. On error the caller removes the host veth, which takes the pod end with it.
pub async fn prepare(
    at: &Attachment<'_>,
    fault: impl Fn(&str) -> Result<(), PluginError>,
) -> Result<Prepared, PluginError> {
    let conf = at.conf;
    let host_name = host_veth_name(at.container_id, at.ifname);
    let node = Netlink::connect()?;
    let pod = Netlink::connect_in(at.pod_ns)?;
    let routed = conf.mode == Mode::Routed;
    // A repeated ADD finds its own pair and re-applies the (idempotent) configuration without
    // disturbing the running pod; a host veth without its pod end is a leftover and replaced.
    let existing = node.link(&host_name).await?;
    let pod_end = pod.link(at.ifname).await?;
    let reuse = match (&existing, &pod_end) {
        (Some(host), Some(peer)) => link_peer_index(peer) == Some(host.header.index),
        _ => false,
    };
    if !reuse {
        // Deleting a leftover host end may have taken a pod end with it: look again then.
        let taken = match existing {
            Some(_) => {
                node.delete_link(&host_name).await?;
                pod.link(at.ifname).await?.is_some()
            }
            None => pod_end.is_some(),
        };
        if taken {
            return Err(PluginError::InterfaceExists {
                ifname: at.ifname.to_string(),
                netns: at.pod_ns.path().display().to_string(),
            });
        }
        node.create_veth(
            &host_name,
            at.ifname,
            at.pod_ns,
            conf.mtu,
            routed.then_some(ROUTED_HOST_MAC),
        )
        .await?;
    }
    fault("after-veth")?;
    let host = node
        .link(&host_name)
        .await?
        .ok_or_else(|| PluginError::Vanished {
            what: host_name.clone(),
        })?;
    node.set_alias(
        host.header.index,
        &host_name,
        &host_veth_alias(&conf.name, at.container_id, at.ifname),
    )
    .await?;
    let bridge = match conf.mode {
        Mode::Bridge => {
            // A bridge port needs no addresses of its own: no IPv6 link-local, no DAD.
            set_sysctls(&[(
                format!("net/ipv6/conf/{host_name}/disable_ipv6"),
                "1",
                false,
            )])?;
            let bridge = node
                .ensure_bridge(&conf.bridge, conf.mtu, bridge_mac(&conf.bridge))
                .await?;
            node.attach_to_bridge(
                host.header.index,
                &host_name,
                bridge.header.index,
                conf.hairpin_mode,
            )
            .await?;
            Some(bridge)
        }
        Mode::Routed => None,
    };
    Ok(Prepared {
        node,
        pod,
        host,
        bridge,
    })
}

/// Phase two, once IPAM has answered: gateways on the bridge or routed host settings and
/// host routes, then the pod side (addresses, gateway neighbour, routes). Returns the result.
pub async fn configure(
    at: &Attachment<'_>,
    prepared: Prepared,
    ipam: &CniResult,
    fault: impl Fn(&str) -> Result<(), PluginError>,
) -> Result<CniResult, PluginError> {
    let conf = at.conf;
    let Prepared {
        node,
        pod,
        host,
        bridge,
    } = prepared;
    let host_name = link_name(&host).unwrap_or_default().to_string();
    let host_index = host.header.index;
    let mut interfaces = Vec::new();
    if let Some(bridge) = &bridge {
        for ip in &ipam.ips {
            if let Some(gw) = ip.gateway {
                let gw_net =
                    IpNetwork::new(gw, ip.address.prefix()).map_err(|e| PluginError::Config {
                        field: "ipam result gateway".into(),
                        reason: e.to_string(),
                    })?;
                node.ensure_address(bridge.header.index, &conf.bridge, gw_net)
                    .await?;
            }
        }
        interfaces.push(Interface {
            name: conf.bridge.clone(),
            mac: link_mac(bridge),
            ..Default::default()
        });
    } else {
        let has_v6 = ipam.ips.iter().any(|ip| ip.address.is_ipv6());
        configure_routed_host(&host_name, has_v6)?;
        node.set_up(host_index, &host_name).await?;
        for ip in &ipam.ips {
            node.ensure_route(host_route(ip.address.ip()), None, host_index, &host_name)
                .await?;
        }
    }
    interfaces.push(Interface {
        name: host_name.clone(),
        mac: link_mac(&host),
        ..Default::default()
    });
    fault("after-host")?;

    let pod_link = pod
        .link(at.ifname)
        .await?
        .ok_or_else(|| PluginError::Vanished {
            what: at.ifname.to_string(),
        })?;
    let pod_index = pod_link.header.index;
    let mut ips = Vec::new();
    for ip in &ipam.ips {
        let address = match conf.mode {
            Mode::Bridge => ip.address,
            Mode::Routed => host_route(ip.address.ip()),
        };
        pod.ensure_address(pod_index, at.ifname, address).await?;
        ips.push(IpConfig {
            address,
            gateway: Some(pod_gateway(conf.mode, ip)),
            interface: Some(interfaces.len()),
        });
    }
    // An encapsulating pool asks for a smaller MTU than the config's: both veth ends take it.
    let mtu = ipam
        .routes
        .iter()
        .filter_map(|r| r.mtu)
        .chain([conf.mtu])
        .min()
        .unwrap_or(conf.mtu);
    if mtu < conf.mtu {
        node.set_mtu(host_index, &host_name, mtu).await?;
        pod.set_mtu(pod_index, at.ifname, mtu).await?;
    }
    pod.set_up(pod_index, at.ifname).await?;
    let routes = pod_routes(ipam, &ips);
    if conf.mode == Mode::Routed {
        for ip in &ips {
            if let Some(gw) = ip.gateway {
                pod.ensure_neighbour(pod_index, gw, ROUTED_HOST_MAC).await?;
                if gw.is_ipv4() {
                    pod.ensure_route(host_route(gw), None, pod_index, at.ifname)
                        .await?;
                }
            }
        }
    }
    for route in &routes {
        pod.ensure_route(route.dst, route.gw, pod_index, at.ifname)
            .await?;
    }
    fault("after-pod")?;
    interfaces.push(Interface {
        name: link_name(&pod_link).unwrap_or(at.ifname).to_string(),
        mac: link_mac(&pod_link),
        mtu: (mtu < conf.mtu).then_some(mtu),
        sandbox: Some(at.pod_ns.path().display().to_string()),
    });
    Ok(CniResult {
        cni_version: String::new(),
        interfaces,
        ips,
        routes,
        dns: conf.dns.clone().unwrap_or_else(|| ipam.dns.clone()),
    })
}

/// Removes the host veth (and with it the pod end and host routes); `Ok` when already gone.
pub async fn detach(container_id: &str, ifname: &str) -> Result<(), PluginError> {
    let node = Netlink::connect()?;
    node.delete_link(&host_veth_name(container_id, ifname))
        .await?;
    Ok(())
}

/// The gateway a pod uses for `ip`: the block gateway on the bridge, or the routed gateway.
pub fn pod_gateway(mode: Mode, ip: &IpConfig) -> IpAddr {
    match (mode, ip.address.ip()) {
        (Mode::Routed, IpAddr::V4(_)) => ROUTED_GATEWAY_V4.into(),
        (Mode::Routed, IpAddr::V6(_)) => ROUTED_GATEWAY_V6.into(),
        (Mode::Bridge, _) => ip.gateway.unwrap_or_else(|| ip.address.network()),
    }
}

/// The pod's routes: IPAM's (a default route per family when IPAM gives none), each via the
/// family's gateway unless IPAM named one.
fn pod_routes(ipam: &CniResult, ips: &[IpConfig]) -> Vec<Route> {
    let wanted: Vec<Route> = if ipam.routes.is_empty() {
        ips.iter()
            .map(|ip| Route {
                dst: crate::spec::default_dst(ip.address.is_ipv4()),
                gw: None,
                mtu: None,
            })
            .collect()
    } else {
        ipam.routes.clone()
    };
    wanted
        .into_iter()
        .filter_map(|r| {
            let gw = r.gw.or_else(|| {
                ips.iter()
                    .find(|ip| ip.address.is_ipv4() == r.dst.is_ipv4())
                    .and_then(|ip| ip.gateway)
            })?;
            Some(Route {
                dst: r.dst,
                gw: Some(gw),
                mtu: r.mtu,
            })
        })
        .collect()
}

/// A host route (/32 or /128) to `ip`.
pub fn host_route(ip: IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

/// Routed mode's per-interface sysctls: proxy ARP answering at once and forwarding; for
/// IPv6 pods also forwarding and no DAD (the link-local gateway must work at once), and for
/// IPv4-only pods no IPv6 on the host end at all (nothing to configure, cheaper to delete).
fn configure_routed_host(host: &str, has_v6: bool) -> Result<(), PluginError> {
    let mut settings = vec![
        (format!("net/ipv4/conf/{host}/proxy_arp"), "1", true),
        (format!("net/ipv4/neigh/{host}/proxy_delay"), "0", true),
        (format!("net/ipv4/conf/{host}/forwarding"), "1", true),
    ];
    if has_v6 {
        settings.push((format!("net/ipv6/conf/{host}/accept_dad"), "0", true));
        settings.push((format!("net/ipv6/conf/{host}/forwarding"), "1", true));
    } else {
        settings.push((format!("net/ipv6/conf/{host}/disable_ipv6"), "1", false));
    }
    set_sysctls(&settings)
}

/// Writes `(key, value, required)` sysctls of the node namespace (the plugin runs in it); an
/// optional key that does not exist (IPv6 disabled in the kernel) is skipped.
fn set_sysctls(settings: &[(String, &str, bool)]) -> Result<(), PluginError> {
    for (key, value, required) in settings {
        let path = std::path::Path::new("/proc/sys").join(key);
        match std::fs::write(&path, value) {
            Ok(()) => {}
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PluginError::Sysctl {
                    key: key.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_deterministic_and_fit_ifnamsiz() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("nk"));
    }

    #[test]
    fn routed_gateway_v6_is_the_link_local_of_the_host_mac() {
        assert_eq!(ROUTED_GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }

    #[test]
    fn pod_routes_default_per_family_via_the_gateway() {
        let ips = vec![IpConfig {
            address: "10.0.0.5/26".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            interface: Some(1),
        }];
        let routes = pod_routes(&CniResult::default(), &ips);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(routes[0].gw, Some("10.0.0.1".parse().unwrap()));
    }
}
