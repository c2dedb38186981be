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

use crate::ipam::model::{IpamState, NodeInfo};
use crate::ipam::store::{transact_with, Datastore};
use crate::ipam::IpamError;
use crate::netlink::{route_summary, Netlink, NetlinkError, RouteTarget};

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
        record.labels.extend(node.labels.clone());
        if state.nodes().get(&node.name) != Some(&record) {
            state.put_node(record);
        }
        Ok(())
    })
}

/// The routes node `me` should have, by destination.
pub fn desired_routes(state: &IpamState, me: &str) -> BTreeMap<IpNetwork, RouteTarget> {
    let ip_of = |node: &str, family_v4: bool| {
        state
            .nodes()
            .get(node)
            .and_then(|n| n.ip)
            .filter(|ip| ip.is_ipv4() == family_v4)
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
                    routes.insert(block.cidr, RouteTarget::Via(ip));
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
                    RouteTarget::Via(ip),
                );
            }
        }
    }
    routes
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

/// Registers the node, then reconciles routes and NAT every `interval`, forever (one pass
/// when `once`). Errors of a pass are logged and retried on the next one.
pub fn run(
    store: &dyn Datastore,
    node: &NodeInfo,
    interval: std::time::Duration,
    once: bool,
) -> Result<(), NetdError> {
    register(store, node)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetlinkError::Socket)?;
    let nl = runtime.block_on(async { Netlink::connect() })?;
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
            let desired = desired_routes(&state, &node.name);
            runtime
                .block_on(reconcile(&nl, &desired))
                .map_err(NetdError::from)
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
        std::thread::sleep(interval);
    }
    Ok(())
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
                labels: Default::default(),
            });
        }
        allocator::assign(&mut state, handle("a1", "a"), None).unwrap();
        for i in 0..5 {
            allocator::assign(&mut state, handle(&format!("b{i}"), "b"), None).unwrap();
        }
        // Both blocks are claimed; c borrows from a's block.
        let borrowed = allocator::assign(&mut state, handle("c1", "c"), None).unwrap()[0].address;
        let on_a = desired_routes(&state, "a");
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
        let on_c = desired_routes(&state, "c");
        assert!(
            !on_c.contains_key(&host),
            "the holder routes its pod itself"
        );
        assert_eq!(on_c.len(), 2);
        allocator::remove_node(&mut state, "b");
        assert!(!desired_routes(&state, "a").contains_key(&"10.0.0.8/29".parse().unwrap()));
    }
}
