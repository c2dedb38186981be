//! `ipam check`: finds addresses held for attachments that no longer exist (a runtime that
//! never called DEL, a crash between steps) and records inconsistent with each other, so
//! `ipam release` can give them back.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::allocator;
use super::model::{Handle, IpamState};

/// One leaked or inconsistent allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The handle ID the addresses are recorded under.
    pub handle: String,
    /// The addresses concerned.
    pub addresses: Vec<IpNetwork>,
    /// Why it is reported.
    pub reason: String,
    /// The Kubernetes pod it was allocated for, when the runtime said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Every allocation whose attachment is dead by `is_live`, plus block allocations with no
/// handle. Handles of other nodes are skipped when `node` is given.
pub fn find_leaks(
    state: &IpamState,
    node: Option<&str>,
    is_live: impl Fn(&Handle) -> bool,
) -> Vec<Finding> {
    let mut findings: Vec<Finding> = state
        .handles()
        .values()
        .filter(|h| node.is_none_or(|n| h.node == n))
        .filter(|h| !is_live(h))
        .map(|h| Finding {
            handle: h.id.clone(),
            addresses: h.addresses.clone(),
            pod: h.pod.clone(),
            reason: if h.netns.is_empty() {
                "no network namespace was recorded for the attachment".into()
            } else {
                format!("network namespace {} no longer exists", h.netns)
            },
        })
        .collect();
    let mut orphans: std::collections::BTreeMap<String, Vec<IpNetwork>> = Default::default();
    for block in state.blocks().values() {
        for (ordinal, handle) in &block.allocations {
            if !state.handles().contains_key(handle) {
                if let Ok(addr) = IpNetwork::new(block.address(*ordinal), block.cidr.prefix()) {
                    orphans.entry(handle.clone()).or_default().push(addr);
                }
            }
        }
    }
    findings.extend(orphans.into_iter().map(|(handle, addresses)| Finding {
        handle,
        addresses,
        reason: "allocated in a block but no handle records it".into(),
        pod: None,
    }));
    findings
}

/// Releases what `findings` name: the handles and any orphan block allocations.
pub fn release_findings(state: &mut IpamState, findings: &[Finding]) -> usize {
    let ids: BTreeSet<&str> = findings.iter().map(|f| f.handle.as_str()).collect();
    let mut released = 0;
    for id in &ids {
        if allocator::release(state, id).is_some() {
            released += 1;
        }
    }
    let touched: Vec<String> = state
        .blocks()
        .values()
        .filter(|b| b.allocations.values().any(|h| ids.contains(h.as_str())))
        .map(|b| b.key())
        .collect();
    for key in touched {
        if let Some(block) = state.block_mut(&key) {
            let before = block.allocations.len();
            block.allocations.retain(|_, h| !ids.contains(h.as_str()));
            released += before - block.allocations.len();
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::model::Pool;

    #[test]
    fn dead_attachments_and_orphans_are_found_and_released() {
        let mut state = IpamState::default();
        let pool = Pool::new("p", "10.0.0.0/24".parse().unwrap(), None).unwrap();
        state.put_pool(pool);
        for (id, netns) in [("live", "/run/netns/a"), ("dead", "/run/netns/gone")] {
            let handle = Handle {
                id: id.into(),
                network: "n".into(),
                container_id: id.into(),
                ifname: "eth0".into(),
                node: "n1".into(),
                netns: netns.into(),
                addresses: vec![],
                pod: None,
            };
            allocator::assign(&mut state, handle, &allocator::Choice::default()).unwrap();
        }
        let key = state.blocks().keys().next().unwrap().clone();
        state
            .block_mut(&key)
            .unwrap()
            .allocations
            .insert(40, "ghost".into());
        let findings = find_leaks(&state, None, |h| h.id == "live");
        let handles: Vec<&str> = findings.iter().map(|f| f.handle.as_str()).collect();
        assert_eq!(handles, vec!["dead", "ghost"]);
        assert!(findings[0].reason.contains("/run/netns/gone"));
        assert_eq!(release_findings(&mut state, &findings), 2);
        assert!(find_leaks(&state, None, |h| h.id == "live").is_empty());
        let used: usize = state.blocks().values().map(|b| b.allocations.len()).sum();
        assert_eq!(used, 1);
        assert!(find_leaks(&state, Some("other-node"), |_| false).is_empty());
    }
}
