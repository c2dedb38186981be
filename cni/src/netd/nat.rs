//! `natOutgoing`: pod traffic from a pool with `natOutgoing` to anywhere outside every pool
//! is masqueraded behind the node's address. The rules form one nftables table per family
//! (`ip nodekit`, `ip6 nodekit`) owned by netd and replaced whole in a single nft transaction
//! (add, delete, re-create), so no packet ever sees half a ruleset.

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

use crate::ipam::model::IpamState;

/// Name of netd's nftables tables.
pub const NAT_TABLE: &str = "nodekit";

/// What the NAT tables should express.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatPlan {
    /// Every pool range: traffic to these is never masqueraded.
    pub pools: Vec<IpNetwork>,
    /// Ranges of pools with `natOutgoing`.
    pub masquerade: Vec<IpNetwork>,
}

/// The plan the datastore's pools call for.
pub fn nat_plan(state: &IpamState) -> NatPlan {
    NatPlan {
        pools: state.pools().values().map(|p| p.cidr).collect(),
        masquerade: state
            .pools()
            .values()
            .filter(|p| p.nat_outgoing)
            .map(|p| p.cidr)
            .collect(),
    }
}

/// The nft JSON batch that replaces both tables with `plan` (or removes them when nothing
/// is masqueraded).
pub fn ruleset(plan: &NatPlan) -> Value {
    let mut cmds = Vec::new();
    for (family, proto, v4) in [("ip", "ip", true), ("ip6", "ip6", false)] {
        let table = json!({"family": family, "name": NAT_TABLE});
        cmds.push(json!({"add": {"table": table}}));
        cmds.push(json!({"delete": {"table": table}}));
        let masquerade: Vec<&IpNetwork> = plan
            .masquerade
            .iter()
            .filter(|n| n.is_ipv4() == v4)
            .collect();
        if masquerade.is_empty() {
            continue;
        }
        cmds.push(json!({"add": {"table": table}}));
        cmds.push(json!({"add": {"chain": {
            "family": family, "table": NAT_TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"
        }}}));
        let matches = |field: &str, net: &IpNetwork| {
            json!({"match": {"op": "==",
                "left": {"payload": {"protocol": proto, "field": field}},
                "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix()}}}})
        };
        let rule = |expr: Vec<Value>| json!({"add": {"rule": {"family": family, "table": NAT_TABLE, "chain": "postrouting", "expr": expr}}});
        for pool in plan.pools.iter().filter(|n| n.is_ipv4() == v4) {
            cmds.push(rule(vec![matches("daddr", pool), json!({"return": null})]));
        }
        for net in masquerade {
            cmds.push(rule(vec![
                matches("saddr", net),
                json!({"masquerade": null}),
            ]));
        }
    }
    json!({ "nftables": cmds })
}

/// Applies `plan` atomically with `nft` (in the caller's network namespace).
pub fn apply(plan: &NatPlan) -> Result<(), String> {
    let batch: nftables::schema::Nftables = serde_json::from_value(ruleset(plan))
        .map_err(|e| format!("building the nft batch: {e}"))?;
    nftables::helper::apply_ruleset(&batch).map_err(|e| format!("nft: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_replaces_the_tables_and_skips_traffic_between_pools() {
        let plan = NatPlan {
            pools: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.245.0.0/16".parse().unwrap(),
            ],
            masquerade: vec!["10.244.0.0/16".parse().unwrap()],
        };
        let batch = ruleset(&plan);
        let cmds = batch["nftables"].as_array().unwrap();
        // ip: add, delete, add, chain, 2 returns, 1 masquerade; ip6: add, delete.
        assert_eq!(cmds.len(), 9);
        assert!(cmds[1]["delete"]["table"]["name"] == NAT_TABLE);
        assert_eq!(
            cmds[6]["add"]["rule"]["expr"][1],
            json!({"masquerade": null})
        );
        let parsed: Result<nftables::schema::Nftables, _> = serde_json::from_value(batch);
        assert!(parsed.is_ok(), "{parsed:?}");
        let none = ruleset(&NatPlan::default());
        assert_eq!(
            none["nftables"].as_array().unwrap().len(),
            4,
            "only removals"
        );
    }
}
