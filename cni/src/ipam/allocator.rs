//! Address assignment over an [`IpamState`]: own blocks first, then a newly claimed block,
//! then a single address borrowed from another node's block; pure logic, run inside a
//! datastore transaction so every decision is atomic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::model::{Block, Handle, IpamState, Pool};
use super::IpamError;

/// One address handed to an attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The address with its block's prefix length.
    pub address: IpNetwork,
    /// The block gateway.
    pub gateway: IpAddr,
    /// The pool may encapsulate (VXLAN) towards other nodes.
    pub encapsulated: bool,
}

/// How full a pool is, for messages, `ipam show` and STATUS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolUsage {
    /// Pool name.
    pub name: String,
    /// Pool range.
    pub cidr: IpNetwork,
    /// Block prefix.
    #[serde(rename = "blockSize")]
    pub block_size: u8,
    /// Whether new allocations are refused.
    pub disabled: bool,
    /// Addresses pods can get in the pool.
    pub capacity: u128,
    /// Addresses allocated.
    pub used: u128,
    /// Blocks claimed.
    pub blocks: usize,
    /// Allocations per node that made them.
    #[serde(rename = "byNode")]
    pub by_node: BTreeMap<String, u128>,
}

impl std::fmt::Display for PoolUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pool {} ({}, /{} blocks: {} usable, {} in use",
            self.name, self.cidr, self.block_size, self.capacity, self.used
        )?;
        if !self.by_node.is_empty() {
            let nodes: Vec<String> = self
                .by_node
                .iter()
                .map(|(n, c)| format!("{n} {c}"))
                .collect();
            write!(f, " by node: {}", nodes.join(", "))?;
        }
        if self.disabled {
            write!(f, "; disabled")?;
        }
        write!(f, ")")
    }
}

/// Which pools an assignment may use, and how.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choice<'a> {
    /// Only these pools (CNI_ARGS `IP_POOLS`); `None`: every pool selecting the node.
    pub pools: Option<&'a [String]>,
    /// Never borrow from other nodes' blocks, whatever the pools say (the IPAM config's
    /// global `strictAffinity`).
    pub strict_affinity: bool,
}

/// Assigns one address per family of the candidate pools to `handle` (dual-stack when pools
/// of both families apply). A handle that already holds addresses gets the same ones back.
/// All-or-nothing: on error the caller's transaction is dropped, so nothing is held.
pub fn assign(
    state: &mut IpamState,
    mut handle: Handle,
    choice: &Choice,
) -> Result<Vec<Assigned>, IpamError> {
    if let Some(existing) = state.handles().get(&handle.id) {
        return Ok(existing
            .addresses
            .iter()
            .map(|a| assigned_from(state, *a))
            .collect());
    }
    let candidates = candidate_pools(state, choice.pools, &handle.node)?;
    let mut assigned = Vec::new();
    for v4 in [true, false] {
        let family: Vec<Pool> = candidates
            .iter()
            .filter(|p| p.is_v4() == v4)
            .cloned()
            .collect();
        if family.is_empty() {
            continue;
        }
        let got = assign_one(state, &family, &handle, v4, choice.strict_affinity)?;
        handle.addresses.push(got.address);
        assigned.push(got);
    }
    state.put_handle(handle);
    Ok(assigned)
}

/// Releases every address of `handle_id`; returns the handle when it existed.
pub fn release(state: &mut IpamState, handle_id: &str) -> Option<Handle> {
    let handle = state.remove_handle(handle_id)?;
    for addr in &handle.addresses {
        let key = IpNetwork::new(addr.network(), addr.prefix())
            .map(|n| n.to_string())
            .unwrap_or_default();
        let ordinal = state.blocks().get(&key).and_then(|block| {
            let ordinal = block.ordinal(addr.ip())?;
            (block.allocations.get(&ordinal).map(String::as_str) == Some(handle_id))
                .then_some(ordinal)
        });
        if let (Some(ordinal), Some(block)) = (ordinal, state.block_mut(&key)) {
            block.allocations.remove(&ordinal);
        }
        give_back_if_unneeded(state, &key, &handle.node);
    }
    Some(Arc::unwrap_or_clone(handle))
}

/// Returns an empty block to its pool when its node has another block of that pool with
/// room, so nodes do not sit on blocks they no longer need.
fn give_back_if_unneeded(state: &mut IpamState, key: &str, node: &str) {
    let Some(block) = state.blocks().get(key) else {
        return;
    };
    if !block.allocations.is_empty() || block.affinity.as_deref() != Some(node) {
        return;
    }
    let pool = block.pool.clone();
    let spare = state.blocks().values().any(|b| {
        b.key() != key
            && b.pool == pool
            && b.affinity.as_deref() == Some(node)
            && b.first_free().is_some()
    });
    if spare {
        state.remove_block(key);
    }
}

/// What removing a node released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRemoval {
    /// Handles (attachments) released.
    pub handles: usize,
    /// Blocks returned to their pools.
    pub blocks: usize,
    /// Blocks kept, without affinity, for addresses other nodes borrowed from them.
    pub orphaned: usize,
}

/// Forgets a departed node: releases its allocations, returns its blocks (blocks still
/// holding addresses borrowed by other nodes lose their affinity instead), drops its record.
pub fn remove_node(state: &mut IpamState, name: &str) -> NodeRemoval {
    let handles: Vec<String> = state
        .handles()
        .values()
        .filter(|h| h.node == name)
        .map(|h| h.id.clone())
        .collect();
    for id in &handles {
        release(state, id);
    }
    let blocks: Vec<(String, bool)> = state
        .blocks()
        .values()
        .filter(|b| b.affinity.as_deref() == Some(name))
        .map(|b| (b.key(), b.allocations.is_empty()))
        .collect();
    let mut removal = NodeRemoval {
        handles: handles.len(),
        blocks: 0,
        orphaned: 0,
    };
    for (key, empty) in blocks {
        if empty {
            state.remove_block(&key);
            removal.blocks += 1;
        } else if let Some(block) = state.block_mut(&key) {
            block.affinity = None;
            removal.orphaned += 1;
        }
    }
    if state.nodes().contains_key(name) {
        state.remove_node(name);
    }
    removal
}

/// Usage of every pool, in name order.
pub fn usage(state: &IpamState) -> Vec<PoolUsage> {
    state
        .pools()
        .values()
        .map(|pool| {
            let mut by_node: BTreeMap<String, u128> = BTreeMap::new();
            let mut used = 0;
            let mut blocks = 0;
            for block in state.blocks().values().filter(|b| b.pool == pool.name) {
                blocks += 1;
                for handle_id in block.allocations.values() {
                    used += 1;
                    let node = state
                        .handles()
                        .get(handle_id)
                        .map(|h| h.node.clone())
                        .unwrap_or_else(|| "?".into());
                    *by_node.entry(node).or_default() += 1;
                }
            }
            PoolUsage {
                name: pool.name.clone(),
                cidr: pool.cidr,
                block_size: pool.block_size,
                disabled: pool.disabled,
                capacity: pool.capacity(),
                used,
                blocks,
                by_node,
            }
        })
        .collect()
}

/// Whether an ADD on `node` would find an address in every family of the candidate pools;
/// the exhaustion error when not (STATUS reports it).
pub fn check_available(state: &IpamState, node: &str, choice: &Choice) -> Result<(), IpamError> {
    let mut probe = state.clone();
    let handle = Handle {
        id: "\0status-probe".into(),
        network: String::new(),
        container_id: String::new(),
        ifname: String::new(),
        node: node.to_string(),
        netns: String::new(),
        addresses: Vec::new(),
        pod: None,
    };
    assign(&mut probe, handle, choice).map(|_| ())
}

/// Which attributes of an existing pool a request sets; the others keep their stored value
/// (so a network config that only names a pool does not undo `nodekitctl` changes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Set `disabled`.
    pub disabled: bool,
    /// Set `nodeSelector`.
    pub node_selector: bool,
    /// Set `strictAffinity`.
    pub strict_affinity: bool,
    /// Set `natOutgoing`.
    pub nat_outgoing: bool,
    /// Set `vxlanMode`.
    pub vxlan_mode: bool,
}

impl Overrides {
    /// Every attribute comes from the request.
    pub const ALL: Self = Self {
        disabled: true,
        node_selector: true,
        strict_affinity: true,
        nat_outgoing: true,
        vxlan_mode: true,
    };
}

/// Makes `pool` exist: a no-op when an identical pool is there, an error when its name or
/// range clashes with another pool. Of an existing pool only the `overrides` change.
pub fn ensure_pool(
    state: &mut IpamState,
    pool: Pool,
    overrides: Overrides,
) -> Result<(), IpamError> {
    for existing in state.pools().values() {
        let conflict = |reason: String| IpamError::PoolConflict {
            name: pool.name.clone(),
            existing: existing.name.clone(),
            reason,
        };
        if existing.name == pool.name {
            if existing.cidr != pool.cidr || existing.block_size != pool.block_size {
                return Err(conflict(format!(
                    "it has cidr {} with /{} blocks, the request says {} with /{}",
                    existing.cidr, existing.block_size, pool.cidr, pool.block_size
                )));
            }
        } else if existing.cidr.is_ipv4() == pool.cidr.is_ipv4()
            && (existing.cidr.contains(pool.cidr.network())
                || pool.cidr.contains(existing.cidr.network()))
        {
            return Err(conflict(format!(
                "{} overlaps {}",
                pool.cidr, existing.cidr
            )));
        }
    }
    let pool = match state.pools().get(&pool.name) {
        Some(existing) => Pool {
            disabled: if overrides.disabled {
                pool.disabled
            } else {
                existing.disabled
            },
            node_selector: if overrides.node_selector {
                pool.node_selector
            } else {
                existing.node_selector.clone()
            },
            strict_affinity: if overrides.strict_affinity {
                pool.strict_affinity
            } else {
                existing.strict_affinity
            },
            nat_outgoing: if overrides.nat_outgoing {
                pool.nat_outgoing
            } else {
                existing.nat_outgoing
            },
            vxlan_mode: if overrides.vxlan_mode {
                pool.vxlan_mode
            } else {
                existing.vxlan_mode
            },
            ..pool
        },
        None => pool,
    };
    if state.pools().get(&pool.name) != Some(&pool) {
        state.put_pool(pool);
    }
    Ok(())
}

/// Removes an empty pool and its (empty) blocks.
pub fn remove_pool(state: &mut IpamState, name: &str) -> Result<(), IpamError> {
    if !state.pools().contains_key(name) {
        return Err(IpamError::UnknownPool {
            name: name.to_string(),
        });
    }
    let used: u128 = state
        .blocks()
        .values()
        .filter(|b| b.pool == name)
        .map(|b| b.allocations.len() as u128)
        .sum();
    if used > 0 {
        return Err(IpamError::PoolInUse {
            name: name.to_string(),
            used,
        });
    }
    let blocks: Vec<String> = state
        .blocks()
        .values()
        .filter(|b| b.pool == name)
        .map(|b| b.key())
        .collect();
    for key in blocks {
        state.remove_block(&key);
    }
    state.remove_pool(name);
    Ok(())
}

fn candidate_pools(
    state: &IpamState,
    pool_names: Option<&[String]>,
    node: &str,
) -> Result<Vec<Pool>, IpamError> {
    let pools: Vec<Pool> = match pool_names {
        Some(names) => names
            .iter()
            .map(|n| {
                state
                    .pools()
                    .get(n)
                    .cloned()
                    .ok_or_else(|| IpamError::UnknownPool { name: n.clone() })
            })
            .collect::<Result<_, _>>()?,
        None => state.pools().values().cloned().collect(),
    };
    if pools.is_empty() {
        return Err(IpamError::NoPools);
    }
    let labels = state
        .nodes()
        .get(node)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    let (selected, others): (Vec<Pool>, Vec<Pool>) =
        pools.into_iter().partition(|p| p.selects(&labels));
    if selected.is_empty() {
        return Err(IpamError::NoPoolForNode {
            node: node.to_string(),
            pools: others
                .iter()
                .map(|p| {
                    let sel: Vec<String> = p
                        .node_selector
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("{} (nodeSelector {})", p.name, sel.join(","))
                })
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(selected)
}

fn assign_one(
    state: &mut IpamState,
    family: &[Pool],
    handle: &Handle,
    v4: bool,
    strict: bool,
) -> Result<Assigned, IpamError> {
    let (node, handle_id) = (handle.node.as_str(), handle.id.as_str());
    let enabled: Vec<&Pool> = family.iter().filter(|p| !p.disabled).collect();
    let in_enabled = |b: &Block| enabled.iter().any(|p| p.name == b.pool);
    // 1. A block this node already holds.
    let own = state
        .blocks()
        .values()
        .filter(|b| b.affinity.as_deref() == Some(node) && in_enabled(b))
        .find_map(|b| b.first_free().map(|o| (b.key(), o)));
    // 2. Claim the lowest free block of an enabled pool.
    let target = own.or_else(|| {
        enabled.iter().find_map(|pool| {
            let block = (0..pool.block_count())
                .map(|i| pool.block_cidr(i))
                .find(|cidr| !state.blocks().contains_key(&cidr.to_string()))?;
            let block = Block::new(block, &pool.name, Some(node));
            let key = block.key();
            let ordinal = block.first_free()?;
            state.put_block(block);
            Some((key, ordinal))
        })
    });
    // 3. Borrow one address from any block with room, unless its pool is strict.
    let borrowable = |b: &Block| {
        enabled
            .iter()
            .any(|p| p.name == b.pool && !p.strict_affinity && !strict)
    };
    let target = target.or_else(|| {
        state
            .blocks()
            .values()
            .filter(|b| borrowable(b))
            .find_map(|b| b.first_free().map(|o| (b.key(), o)))
    });
    let Some((key, ordinal)) = target else {
        let pools = usage(state)
            .into_iter()
            .filter(|u| family.iter().any(|p| p.name == u.name))
            .collect();
        return Err(IpamError::Exhausted {
            family: if v4 { "IPv4" } else { "IPv6" },
            node: node.to_string(),
            pools,
        });
    };
    let block = state.block_mut(&key).ok_or_else(|| IpamError::Corrupt {
        reason: format!("block {key} vanished during assignment"),
    })?;
    block.allocations.insert(ordinal, handle_id.to_string());
    let address = IpNetwork::new(block.address(ordinal), block.cidr.prefix()).map_err(|e| {
        IpamError::Corrupt {
            reason: format!("block {key}: {e}"),
        }
    })?;
    let gateway = block.gateway();
    Ok(Assigned {
        address,
        gateway,
        encapsulated: encapsulated(state, &key),
    })
}

fn assigned_from(state: &IpamState, address: IpNetwork) -> Assigned {
    let key = IpNetwork::new(address.network(), address.prefix())
        .map(|n| n.to_string())
        .unwrap_or_default();
    let gateway = state
        .blocks()
        .get(&key)
        .map(|b| b.gateway())
        .unwrap_or_else(|| address.network());
    Assigned {
        address,
        gateway,
        encapsulated: encapsulated(state, &key),
    }
}

/// Whether the pool of block `key` uses VXLAN towards any node.
fn encapsulated(state: &IpamState, key: &str) -> bool {
    state
        .blocks()
        .get(key)
        .and_then(|b| state.pools().get(&b.pool))
        .is_some_and(|p| p.vxlan_mode != crate::ipam::model::VxlanMode::Never)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn state_with(pools: &[(&str, &str, u8)]) -> IpamState {
        let mut state = IpamState::default();
        for (name, cidr, bs) in pools {
            let pool = Pool::new(name, cidr.parse().unwrap(), Some(*bs)).unwrap();
            state.put_pool(pool);
        }
        state
    }

    fn handle(id: &str, node: &str) -> Handle {
        Handle {
            id: id.into(),
            network: "net".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            node: node.into(),
            netns: String::new(),
            addresses: vec![],
            pod: None,
        }
    }

    #[test]
    fn a_node_fills_its_block_then_claims_the_next() {
        let mut state = state_with(&[("p", "10.0.0.0/24", 29)]);
        let mut seen = HashSet::new();
        for i in 0..7 {
            let got = assign(
                &mut state,
                handle(&format!("h{i}"), "n1"),
                &Choice::default(),
            )
            .unwrap();
            assert_eq!(got.len(), 1);
            assert!(seen.insert(got[0].address.ip()), "duplicate {:?}", got[0]);
        }
        // 5 usable per /29: two blocks claimed, both with affinity n1.
        assert_eq!(state.blocks().len(), 2);
        assert!(state
            .blocks()
            .values()
            .all(|b| b.affinity.as_deref() == Some("n1")));
        let first = assign(&mut state, handle("h0", "n1"), &Choice::default()).unwrap();
        assert_eq!(first[0].address.to_string(), "10.0.0.2/29");
        assert_eq!(first[0].gateway.to_string(), "10.0.0.1");
    }

    #[test]
    fn the_same_handle_gets_the_same_addresses() {
        let mut state = state_with(&[("v4", "10.0.0.0/24", 26), ("v6", "fd00::/120", 122)]);
        let a = assign(&mut state, handle("h", "n1"), &Choice::default()).unwrap();
        let b = assign(&mut state, handle("h", "n1"), &Choice::default()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2, "dual stack gives one of each family");
        assert!(a[0].address.is_ipv4() && a[1].address.is_ipv6());
    }

    #[test]
    fn release_frees_exactly_the_handle() {
        let mut state = state_with(&[("p", "10.0.0.0/24", 26)]);
        let a = assign(&mut state, handle("a", "n1"), &Choice::default()).unwrap();
        assign(&mut state, handle("b", "n1"), &Choice::default()).unwrap();
        assert!(release(&mut state, "a").is_some());
        assert!(
            release(&mut state, "a").is_none(),
            "second release is a no-op"
        );
        let used: usize = state.blocks().values().map(|b| b.allocations.len()).sum();
        assert_eq!(used, 1);
        let c = assign(&mut state, handle("c", "n1"), &Choice::default()).unwrap();
        assert_eq!(
            c[0].address, a[0].address,
            "the freed address is reused first"
        );
    }

    #[test]
    fn exhaustion_names_pool_size_use_and_remedy_and_is_all_or_nothing() {
        let mut state = state_with(&[("small", "10.0.0.0/29", 29), ("v6", "fd00::/126", 126)]);
        for i in 0..2 {
            assign(
                &mut state,
                handle(&format!("h{i}"), "n1"),
                &Choice::default(),
            )
            .unwrap();
        }
        // v6 /126 has 2 usable, v4 /29 has 5: the third dual-stack ADD fails on v6.
        let before = state.clone();
        let mut attempt = state.clone();
        let err = assign(&mut attempt, handle("h2", "n1"), &Choice::default()).unwrap_err();
        let msg = err.to_string();
        for needle in [
            "IPv6",
            "v6",
            "fd00::/126",
            "2 usable",
            "2 in use",
            "n1 2",
            "pool add",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing in {msg}");
        }
        assert_eq!(state, before);
        assert!(check_available(&state, "n1", &Choice::default()).is_err());
        release(&mut state, "h0");
        assert!(check_available(&state, "n1", &Choice::default()).is_ok());
    }

    #[test]
    fn disabled_pools_give_nothing_new_and_say_so() {
        let mut state = state_with(&[("p", "10.0.0.0/24", 26)]);
        state.pool_mut("p").unwrap().disabled = true;
        let err = assign(&mut state, handle("h", "n1"), &Choice::default()).unwrap_err();
        assert!(err.to_string().contains("disabled"), "{err}");
    }

    #[test]
    fn a_node_borrows_when_no_block_is_free() {
        let mut state = state_with(&[("p", "10.0.0.0/29", 29)]);
        assign(&mut state, handle("a", "n1"), &Choice::default()).unwrap();
        let b = assign(&mut state, handle("b", "n2"), &Choice::default()).unwrap();
        assert_eq!(b[0].address.to_string(), "10.0.0.3/29");
        assert_eq!(state.blocks().len(), 1);
    }

    #[test]
    fn named_pools_restrict_the_choice() {
        let mut state = state_with(&[("a", "10.0.0.0/24", 26), ("b", "10.1.0.0/24", 26)]);
        let only_b = ["b".to_string()];
        let choice = Choice {
            pools: Some(&only_b),
            ..Choice::default()
        };
        let got = assign(&mut state, handle("h", "n1"), &choice).unwrap();
        assert!(got[0].address.to_string().starts_with("10.1.0."));
        let unknown = ["zz".to_string()];
        let choice = Choice {
            pools: Some(&unknown),
            ..Choice::default()
        };
        let err = assign(&mut state, handle("x", "n1"), &choice).unwrap_err();
        assert!(err.to_string().contains("zz"));
    }

    #[test]
    fn node_selectors_choose_pools_and_say_why_none_fits() {
        use crate::ipam::model::NodeInfo;
        let mut state = state_with(&[("zone-a", "10.0.0.0/24", 26), ("zone-b", "10.1.0.0/24", 26)]);
        state.pool_mut("zone-a").unwrap().node_selector = [("zone".into(), "a".into())].into();
        state.pool_mut("zone-b").unwrap().node_selector = [("zone".into(), "b".into())].into();
        state.put_node(NodeInfo {
            name: "n1".into(),
            ip: None,
            ip6: None,
            labels: [("zone".into(), "b".into())].into(),
            vxlan_mac: None,
            underlay_mtu: None,
        });
        let got = assign(&mut state, handle("h", "n1"), &Choice::default()).unwrap();
        assert!(got[0].address.to_string().starts_with("10.1.0."));
        let err = assign(&mut state, handle("x", "unlabelled"), &Choice::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("unlabelled") && msg.contains("zone=a"),
            "{msg}"
        );
    }

    #[test]
    fn strict_affinity_forbids_borrowing() {
        let mut state = state_with(&[("p", "10.0.0.0/29", 29)]);
        state.pool_mut("p").unwrap().strict_affinity = true;
        assign(&mut state, handle("a", "n1"), &Choice::default()).unwrap();
        let err = assign(&mut state, handle("b", "n2"), &Choice::default()).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
        // The same through the global setting on a lending pool.
        state.pool_mut("p").unwrap().strict_affinity = false;
        let global = Choice {
            strict_affinity: true,
            ..Choice::default()
        };
        assert!(assign(&mut state, handle("b", "n2"), &global).is_err());
        assert!(assign(&mut state, handle("b", "n2"), &Choice::default()).is_ok());
    }

    #[test]
    fn an_emptied_block_goes_back_when_the_node_has_room_elsewhere() {
        let mut state = state_with(&[("p", "10.0.0.0/24", 29)]);
        for i in 0..6 {
            assign(
                &mut state,
                handle(&format!("h{i}"), "n1"),
                &Choice::default(),
            )
            .unwrap();
        }
        assert_eq!(
            state.blocks().len(),
            2,
            "5 fit the first /29, the 6th claimed a second"
        );
        release(&mut state, "h5");
        assert_eq!(state.blocks().len(), 2, "the only block with room is kept");
        release(&mut state, "h0");
        assign(&mut state, handle("h6", "n1"), &Choice::default()).unwrap();
        assert_eq!(state.blocks().len(), 2);
        for i in 1..5 {
            release(&mut state, &format!("h{i}"));
        }
        release(&mut state, "h6");
        assert_eq!(
            state.blocks().len(),
            1,
            "one empty block is kept for the node, the other returned"
        );
    }

    #[test]
    fn removing_a_node_releases_its_addresses_and_blocks_but_not_borrowers() {
        let mut state = state_with(&[("p", "10.0.0.0/28", 29)]);
        for i in 0..5 {
            assign(
                &mut state,
                handle(&format!("a{i}"), "gone"),
                &Choice::default(),
            )
            .unwrap();
        }
        assign(&mut state, handle("b0", "stays"), &Choice::default()).unwrap();
        // "stays" took the second block; fill it, then borrow from the departed node's block.
        for i in 1..5 {
            assign(
                &mut state,
                handle(&format!("b{i}"), "stays"),
                &Choice::default(),
            )
            .unwrap();
        }
        release(&mut state, "a0");
        let borrowed = assign(&mut state, handle("borrow", "stays"), &Choice::default()).unwrap();
        assert!(borrowed[0].address.to_string().starts_with("10.0.0."));
        let removal = remove_node(&mut state, "gone");
        assert_eq!(removal.handles, 4);
        assert_eq!(
            removal.orphaned, 1,
            "the block with the borrowed address stays, unowned"
        );
        assert!(state.handles().values().all(|h| h.node == "stays"));
        assert_eq!(state.handles().len(), 6);
    }
}
