//! The VXLAN overlay netd owns: device `nk.vxlan` (sized from the underlay link's MTU), and
//! on it one neighbour entry (next hop -> MAC) and one FDB entry (MAC -> node address) per
//! node some route tunnels to. Both sets are reconciled level-triggered: entries of nodes no
//! route tunnels to any more (a removed node) are deleted, missing or wrong ones rewritten.
//! Only entries on `nk.vxlan` are ever touched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::ipam::model::{vxlan_mtu, IpamState, NodeInfo, VxlanMode, DEFAULT_UNDERLAY_MTU};
use crate::netlink::{Netlink, NetlinkError, RouteTarget};

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

/// The nodes some desired route tunnels to, with their VXLAN MACs: each needs a neighbour
/// entry (next hop -> MAC) and an FDB entry (MAC -> node address) on the VXLAN device.
pub fn tunnel_peers(
    state: &IpamState,
    desired: &BTreeMap<IpNetwork, RouteTarget>,
) -> Vec<(IpAddr, [u8; 6])> {
    // Each node's blocks share its gateway: look every gateway up once, in order.
    let gateways: BTreeSet<IpAddr> = desired
        .values()
        .filter_map(|t| match t {
            RouteTarget::Tunnel { gateway, .. } => Some(*gateway),
            _ => None,
        })
        .collect();
    gateways
        .into_iter()
        .filter_map(|gw| {
            let node = state
                .nodes()
                .values()
                .find(|n| n.address(gw.is_ipv4()) == Some(gw))?;
            Some((gw, parse_mac(node.vxlan_mac.as_deref()?)?))
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// The VXLAN device, created when some pool encapsulates and this node has an IPv4 address,
/// with the node's underlay MTU less the VXLAN overhead.
pub async fn ensure_tunnel(
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
                    vxlan_mtu(node.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU)),
                )
                .await?;
            Ok(Some(device))
        }
        _ => Ok(None),
    }
}

/// What one pass changed on the VXLAN device, by peer address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersReconciled {
    /// Peers whose neighbour or FDB entry was added or corrected.
    pub set: Vec<IpAddr>,
    /// Stale neighbour or FDB entries removed.
    pub removed: Vec<IpAddr>,
}

/// Makes the permanent neighbour entries and the FDB entries of `device` exactly `peers`.
pub async fn reconcile_peers(
    nl: &Netlink,
    device: u32,
    peers: &[(IpAddr, [u8; 6])],
) -> Result<PeersReconciled, NetlinkError> {
    let mut done = PeersReconciled::default();
    let neighbours: BTreeSet<(IpAddr, [u8; 6])> =
        nl.permanent_neighbours(device).await?.into_iter().collect();
    let fdb: BTreeSet<([u8; 6], IpAddr)> = nl.fdb_entries(device).await?.into_iter().collect();
    for &(ip, mac) in peers {
        let mut set = false;
        if !neighbours.contains(&(ip, mac)) {
            nl.ensure_neighbour(device, ip, mac).await?;
            set = true;
        }
        if !fdb.contains(&(mac, ip)) {
            nl.ensure_fdb(device, mac, ip).await?;
            set = true;
        }
        if set {
            done.set.push(ip);
        }
    }
    let wanted: BTreeSet<(IpAddr, [u8; 6])> = peers.iter().copied().collect();
    let wanted_ips: BTreeSet<IpAddr> = peers.iter().map(|(ip, _)| *ip).collect();
    for (ip, _) in &neighbours {
        // A peer whose MAC changed was just replaced in place: only unknown IPs go.
        if !wanted_ips.contains(ip) {
            nl.delete_neighbour(device, *ip).await?;
            done.removed.push(*ip);
        }
    }
    for (mac, ip) in &fdb {
        if !wanted.contains(&(*ip, *mac)) {
            nl.delete_fdb(device, *mac, *ip).await?;
            done.removed.push(*ip);
        }
    }
    done.removed.sort();
    done.removed.dedup();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_local_unicast_and_parse_back() {
        let mac = vxlan_mac("n1");
        assert_eq!(mac, vxlan_mac("n1"));
        assert_ne!(mac, vxlan_mac("n2"));
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
        let text = crate::netlink::format_mac(&mac);
        assert_eq!(parse_mac(&text), Some(mac));
        assert_eq!(parse_mac("02:00:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }
}
