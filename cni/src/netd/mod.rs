//! `nodekit-netd`, the node network daemon: registers the node in the IPAM datastore, then
//! keeps the node's routes to every other node's pods equal to what the datastore says, in a
//! level-triggered loop (kube-rs style: compute the whole desired set each pass, converge,
//! repeat), so a restart, a route deleted by hand or a departed node all converge.
//!
//! Routes (all in the main table, tagged with protocol [`RTPROT_NODEKIT`] so netd only ever
//! touches its own): each other node's block via that node's underlay address; a blackhole for
//! each own block (a pod's /32 from the plugin is more specific); a /32 (/128) via the holder
//! for every address borrowed from a block of another node.

pub mod nat;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::ipam::model::{IpamState, NodeInfo, VxlanMode, UNDERLAY_MTU, VXLAN_OVERHEAD};
use crate::ipam::store::{transact_with, Datastore};
use crate::ipam::IpamError;
use crate::netlink::{format_mac, route_summary, Netlink, NetlinkError, RouteTarget};

/// The routing protocol number marking netd's routes (`ip route show proto 78`).
pub const RTPROT_NODEKIT: u8 = 78;

/// What netd can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    /// The datastore failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Programming routes failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Programming the NAT table failed.
    #[error("natOutgoing: {0}")]
    Nat(String),
}

/// Which routes one reconcile pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Routes added or corrected.
    pub set: Vec<IpNetwork>,
    /// Stale routes removed.
    pub removed: Vec<IpNetwork>,
}

/// Registers (or updates) `node` with its underlay address and labels; labels merge.
pub fn register(store: &dyn Datastore, node: &NodeInfo) -> Result<(), IpamError> {
    transact_with(store, |state| {
        let mut record = state.nodes().get(&node.name).cloned().unwrap_or_default();
        record.name = node.name.clone();
        record.ip = node.ip.or(record.ip);
        record.ip6 = node.ip6.or(record.ip6);
        record.labels.extend(node.labels.clone());
        record.vxlan_mac = node.vxlan_mac.clone().or(record.vxlan_mac);
        if state.nodes().get(&node.name) != Some(&record) {
            state.put_node(record);
        }
        Ok(())
    })
}

/// Name of the VXLAN device netd creates when a pool asks for encapsulation.
pub const VXLAN_DEVICE: &str = "nk.vxlan";
/// VXLAN network identifier (Calico's default).
pub const VXLAN_VNI: u32 = 4096;
/// VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// The MAC of a node's VXLAN device, derived from its name (stable across restarts).
pub fn vxlan_mac(node: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("vxlan/{node}").as_bytes());
    [0x02, d[0], d[1], d[2], d[3], d[4]]
}

/// How this node reaches the others: its underlay subnet (for `CrossSubnet`) and its VXLAN
/// device, when one exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Underlay {
    /// The subnet of this node's `--node-ip`.
    pub subnet: Option<IpNetwork>,
    /// Index of the VXLAN device.
    pub vxlan_device: Option<u32>,
}

/// The routes node `me` should have, by destination.
pub fn desired_routes(
    state: &IpamState,
    me: &str,
    underlay: &Underlay,
) -> BTreeMap<IpNetwork, RouteTarget> {
    let ip_of = |node: &str, family_v4: bool| state.nodes().get(node)?.address(family_v4);
    let target = |pool: &str, ip: IpAddr| {
        let mode = state
            .pools()
            .get(pool)
            .map(|p| p.vxlan_mode)
            .unwrap_or_default();
        let encapsulate = match mode {
            VxlanMode::Never => false,
            VxlanMode::Always => true,
            VxlanMode::CrossSubnet => !underlay.subnet.is_some_and(|s| s.contains(ip)),
        };
        match (encapsulate, underlay.vxlan_device) {
            (true, Some(device)) => RouteTarget::Tunnel {
                gateway: ip,
                device,
            },
            _ => RouteTarget::Via(ip),
        }
    };
    let mut routes = BTreeMap::new();
    for block in state.blocks().values() {
        let v4 = block.cidr.is_ipv4();
        match block.affinity.as_deref() {
            Some(owner) if owner == me => {
                routes.insert(block.cidr, RouteTarget::Blackhole);
            }
            Some(owner) => {
                if let Some(ip) = ip_of(owner, v4) {
                    routes.insert(block.cidr, target(&block.pool, ip));
                }
            }
            None => {}
        }
        for (ordinal, handle_id) in &block.allocations {
            let Some(holder) = state.handles().get(handle_id).map(|h| h.node.as_str()) else {
                continue;
            };
            if Some(holder) == block.affinity.as_deref() || holder == me {
                continue;
            }
            if let Some(ip) = ip_of(holder, v4) {
                routes.insert(
                    IpNetwork::from(block.address(*ordinal)),
                    target(&block.pool, ip),
                );
            }
        }
    }
    routes
}

/// The nodes some desired route tunnels to, with their VXLAN MACs: each needs a neighbour
/// entry (next hop -> MAC) and an FDB entry (MAC -> node address) on the VXLAN device.
pub fn tunnel_peers(
    state: &IpamState,
    desired: &BTreeMap<IpNetwork, RouteTarget>,
) -> Vec<(IpAddr, [u8; 6])> {
    let mut peers: Vec<(IpAddr, [u8; 6])> = desired
        .values()
        .filter_map(|t| match t {
            RouteTarget::Tunnel { gateway, .. } => Some(*gateway),
            _ => None,
        })
        .filter_map(|gw| {
            let node = state
                .nodes()
                .values()
                .find(|n| n.address(gw.is_ipv4()) == Some(gw))?;
            Some((gw, parse_mac(node.vxlan_mac.as_deref()?)?))
        })
        .collect();
    peers.sort();
    peers.dedup();
    peers
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// One pass: makes the kernel's protocol-78 routes equal to `desired`.
pub async fn reconcile(
    nl: &Netlink,
    desired: &BTreeMap<IpNetwork, RouteTarget>,
) -> Result<Reconciled, NetlinkError> {
    let mut actual = BTreeMap::new();
    for route in nl.routes().await? {
        if let Some((dst, target, proto)) = route_summary(&route) {
            if proto == RTPROT_NODEKIT {
                actual.insert(dst, (target, route));
            }
        }
    }
    let mut done = Reconciled::default();
    for (dst, target) in desired {
        if actual.get(dst).map(|(t, _)| t) != Some(target) {
            nl.replace_route(*dst, *target, RTPROT_NODEKIT).await?;
            done.set.push(*dst);
        }
    }
    for (dst, (_, route)) in actual {
        if !desired.contains_key(&dst) {
            nl.delete_route(route).await?;
            done.removed.push(dst);
        }
    }
    Ok(done)
}

/// Registers the node, then reconciles routes and NAT at every datastore change and at least
/// every `interval`, forever (one pass when `once`). Errors of a pass are logged and retried
/// on the next one.
pub fn run(
    store: &dyn Datastore,
    node: &NodeInfo,
    interval: std::time::Duration,
    once: bool,
) -> Result<(), NetdError> {
    let node = NodeInfo {
        vxlan_mac: Some(format_mac(&vxlan_mac(&node.name))),
        ..node.clone()
    };
    register(store, &node)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetlinkError::Socket)?;
    let nl = runtime.block_on(async { Netlink::connect() })?;
    let mut underlay = Underlay {
        subnet: match node.ip {
            Some(ip) => runtime.block_on(nl.subnet_of(ip))?,
            None => None,
        },
        vxlan_device: None,
    };
    let mut nat_applied: Option<nat::NatPlan> = None;
    for pass_number in 0u64.. {
        // The NAT tables are rewritten when the plan changes, and every 20 passes anyway in
        // case someone flushed them.
        let pass = store.read().map_err(NetdError::from).and_then(|state| {
            let plan = nat::nat_plan(&state);
            if nat_applied.as_ref() != Some(&plan) || pass_number % 20 == 0 {
                nat::apply(&plan).map_err(NetdError::Nat)?;
                nat_applied = Some(plan);
            }
            runtime.block_on(async {
                underlay.vxlan_device = ensure_tunnel(&nl, &state, &node).await?;
                let desired = desired_routes(&state, &node.name, &underlay);
                if let Some(device) = underlay.vxlan_device {
                    for (ip, mac) in tunnel_peers(&state, &desired) {
                        nl.ensure_neighbour(device, ip, mac).await?;
                        nl.ensure_fdb(device, mac, ip).await?;
                    }
                }
                reconcile(&nl, &desired).await.map_err(NetdError::from)
            })
        });
        match pass {
            Ok(done) if done.set.is_empty() && done.removed.is_empty() => {}
            Ok(done) => {
                tracing::info!(set = ?done.set, removed = ?done.removed, "routes converged")
            }
            Err(err) if once => return Err(err),
            Err(err) => tracing::warn!(%err, "reconcile failed; retrying"),
        }
        if once {
            return Ok(());
        }
        // Woken by the datastore's next change (an etcd watch), or by the resync period,
        // which also repairs kernel state changed behind netd's back.
        if let Err(err) = store.wait_for_change(interval) {
            tracing::warn!(%err, "watching the datastore failed");
            std::thread::sleep(interval);
        }
    }
    Ok(())
}

/// The VXLAN device, created when some pool encapsulates and this node has an IPv4 address.
async fn ensure_tunnel(
    nl: &Netlink,
    state: &IpamState,
    node: &NodeInfo,
) -> Result<Option<u32>, NetlinkError> {
    let needed = state
        .pools()
        .values()
        .any(|p| p.vxlan_mode != VxlanMode::Never);
    match (needed, node.ip) {
        (true, Some(IpAddr::V4(local))) => {
            let device = nl
                .ensure_vxlan(
                    VXLAN_DEVICE,
                    VXLAN_VNI,
                    VXLAN_PORT,
                    local,
                    vxlan_mac(&node.name),
                    UNDERLAY_MTU - VXLAN_OVERHEAD,
                )
                .await?;
            Ok(Some(device))
        }
        _ => Ok(None),
    }
}

/// The underlay address family check used by callers validating `--node-ip`.
pub fn is_usable_node_ip(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::allocator::{self, Overrides};
    use crate::ipam::model::{Handle, Pool};

    fn handle(id: &str, node: &str) -> Handle {
        Handle {
            id: id.into(),
            network: "n".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            node: node.into(),
            netns: String::new(),
            addresses: vec![],
            pod: None,
        }
    }

    #[test]
    fn routes_point_at_owners_blackhole_own_blocks_and_follow_borrowed_addresses() {
        let mut state = IpamState::default();
        let pool = Pool::new("p", "10.0.0.0/28".parse().unwrap(), Some(29)).unwrap();
        allocator::ensure_pool(&mut state, pool, Overrides::ALL).unwrap();
        for (name, ip) in [("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")] {
            state.put_node(NodeInfo {
                name: name.into(),
                ip: Some(ip.parse().unwrap()),
                ip6: None,
                labels: Default::default(),
                vxlan_mac: Some(format_mac(&vxlan_mac(name))),
            });
        }
        allocator::assign(&mut state, handle("a1", "a"), &allocator::Choice::default()).unwrap();
        for i in 0..5 {
            allocator::assign(
                &mut state,
                handle(&format!("b{i}"), "b"),
                &allocator::Choice::default(),
            )
            .unwrap();
        }
        // Both blocks are claimed; c borrows from a's block.
        let borrowed =
            allocator::assign(&mut state, handle("c1", "c"), &allocator::Choice::default())
                .unwrap()[0]
                .address;
        let direct = Underlay::default();
        let on_a = desired_routes(&state, "a", &direct);
        assert_eq!(
            on_a[&"10.0.0.0/29".parse().unwrap()],
            RouteTarget::Blackhole
        );
        assert_eq!(
            on_a[&"10.0.0.8/29".parse().unwrap()],
            RouteTarget::Via("192.0.2.2".parse().unwrap())
        );
        let host = IpNetwork::from(borrowed.ip());
        assert_eq!(on_a[&host], RouteTarget::Via("192.0.2.3".parse().unwrap()));
        let on_c = desired_routes(&state, "c", &direct);
        assert!(
            !on_c.contains_key(&host),
            "the holder routes its pod itself"
        );
        assert_eq!(on_c.len(), 2);
        allocator::remove_node(&mut state, "b");
        assert!(!desired_routes(&state, "a", &direct).contains_key(&"10.0.0.8/29".parse().unwrap()));
    }

    #[test]
    fn vxlan_modes_choose_tunnel_or_direct_and_name_their_peers() {
        let mut state = IpamState::default();
        for (name, cidr, mode) in [
            ("always", "10.1.0.0/24", VxlanMode::Always),
            ("cross", "10.2.0.0/24", VxlanMode::CrossSubnet),
        ] {
            let mut pool = Pool::new(name, cidr.parse().unwrap(), Some(26)).unwrap();
            pool.vxlan_mode = mode;
            allocator::ensure_pool(&mut state, pool, Overrides::ALL).unwrap();
        }
        for (name, ip) in [
            ("a", "192.0.2.1"),
            ("near", "192.0.2.2"),
            ("far", "198.51.100.3"),
        ] {
            state.put_node(NodeInfo {
                name: name.into(),
                ip: Some(ip.parse().unwrap()),
                ip6: None,
                labels: Default::default(),
                vxlan_mac: Some(format_mac(&vxlan_mac(name))),
            });
        }
        for (node, pool) in [("near", "always"), ("near", "cross"), ("far", "cross")] {
            let h = handle(&format!("{node}-{pool}"), node);
            let only = [pool.to_string()];
            let choice = allocator::Choice {
                pools: Some(&only),
                ..Default::default()
            };
            allocator::assign(&mut state, h, &choice).unwrap();
        }
        let underlay = Underlay {
            subnet: Some("192.0.2.0/24".parse().unwrap()),
            vxlan_device: Some(7),
        };
        let routes = desired_routes(&state, "a", &underlay);
        let tunnel = |ip: &str| RouteTarget::Tunnel {
            gateway: ip.parse().unwrap(),
            device: 7,
        };
        assert_eq!(routes[&"10.1.0.0/26".parse().unwrap()], tunnel("192.0.2.2"));
        assert_eq!(
            routes[&"10.2.0.0/26".parse().unwrap()],
            RouteTarget::Via("192.0.2.2".parse().unwrap()),
            "same subnet: direct"
        );
        assert_eq!(
            routes[&"10.2.0.64/26".parse().unwrap()],
            tunnel("198.51.100.3")
        );
        let peers = tunnel_peers(&state, &routes);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].1, vxlan_mac("near"));
        // Without a VXLAN device (none created yet), routes fall back to direct.
        let bare = desired_routes(&state, "a", &Underlay::default());
        assert!(bare
            .values()
            .all(|t| !matches!(t, RouteTarget::Tunnel { .. })));
    }
}
