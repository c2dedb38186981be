//! The operations behind `nodekitctl`: pool management, usage report, leak check and release.
//! Each returns the text to print, so the CLI stays a thin parser.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::ipam::allocator::{self, usage};
use crate::ipam::check::{self, Finding};
use crate::ipam::model::{NodeInfo, Pool};
use crate::ipam::store::{transact_with, Datastore};
use crate::ipam::IpamError;

/// Output format of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned text.
    #[default]
    Table,
    /// JSON document.
    Json,
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// `ipam pool add`: creates a pool (idempotent for an identical one). `pool` carries the
/// optional attributes (disabled, nodeSelector, strictAffinity) on top of [`Pool::new`].
pub fn pool_add(store: &dyn Datastore, pool: Pool) -> Result<String, IpamError> {
    pool.validate()?;
    let (name, cidr, disabled) = (pool.name.clone(), pool.cidr, pool.disabled);
    transact_with(store, |state| {
        allocator::ensure_pool(state, pool.clone(), allocator::Overrides::ALL)
    })?;
    Ok(format!(
        "pool {name} {cidr} (/{} blocks){}\n",
        pool.block_size,
        if disabled { " disabled" } else { "" }
    ))
}

/// `node list`: nodes with address and labels.
pub fn node_list(store: &dyn Datastore, format: Format) -> Result<String, IpamError> {
    let state = store.read()?;
    let nodes: Vec<&NodeInfo> = state.nodes().values().collect();
    if format == Format::Json {
        return Ok(json(&nodes));
    }
    let mut out = format!("{:<24} {:<40} LABELS\n", "NAME", "IP");
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let ip = n.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(out, "{:<24} {:<40} {}", n.name, ip, labels.join(","));
    }
    Ok(out)
}

/// `node set`: registers or updates a node's address and labels (labels merge; `k=` removes).
pub fn node_set(
    store: &dyn Datastore,
    name: &str,
    ip: Option<IpAddr>,
    labels: &[(String, String)],
) -> Result<String, IpamError> {
    transact_with(store, |state| {
        let mut node = state
            .nodes()
            .get(name)
            .cloned()
            .unwrap_or_else(|| NodeInfo {
                name: name.to_string(),
                ..Default::default()
            });
        if ip.is_some() {
            node.ip = ip;
        }
        for (k, v) in labels {
            if v.is_empty() {
                node.labels.remove(k);
            } else {
                node.labels.insert(k.clone(), v.clone());
            }
        }
        state.put_node(node);
        Ok(())
    })?;
    Ok(format!("node {name} updated\n"))
}

/// `node remove`: releases a departed node's allocations and blocks.
pub fn node_remove(store: &dyn Datastore, name: &str) -> Result<String, IpamError> {
    let removal = transact_with(store, |state| Ok(allocator::remove_node(state, name)))?;
    Ok(format!(
        "node {name} removed: {} allocation(s) released, {} block(s) returned, {} block(s) kept for addresses other nodes borrowed\n",
        removal.handles, removal.blocks, removal.orphaned
    ))
}

/// `ipam pool disable|enable`.
pub fn pool_set_disabled(
    store: &dyn Datastore,
    name: &str,
    disabled: bool,
) -> Result<String, IpamError> {
    transact_with(store, |state| {
        let pool = state.pool_mut(name).ok_or_else(|| IpamError::UnknownPool {
            name: name.to_string(),
        })?;
        pool.disabled = disabled;
        Ok(())
    })?;
    Ok(format!(
        "pool {name} {}\n",
        if disabled { "disabled" } else { "enabled" }
    ))
}

/// `ipam pool remove`: only when nothing is allocated from it.
pub fn pool_remove(store: &dyn Datastore, name: &str) -> Result<String, IpamError> {
    transact_with(store, |state| allocator::remove_pool(state, name))?;
    Ok(format!("pool {name} removed\n"))
}

/// `ipam pool list`.
pub fn pool_list(store: &dyn Datastore, format: Format) -> Result<String, IpamError> {
    let state = store.read()?;
    let pools: Vec<&Pool> = state.pools().values().collect();
    if format == Format::Json {
        return Ok(json(&pools));
    }
    let mut out = format!(
        "{:<20} {:<28} {:>6} {:>8}\n",
        "NAME", "CIDR", "BLOCK", "DISABLED"
    );
    for p in pools {
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:>6} {:>8}",
            p.name,
            p.cidr.to_string(),
            format!("/{}", p.block_size),
            p.disabled
        );
    }
    Ok(out)
}

#[derive(Serialize)]
struct BlockReport {
    cidr: IpNetwork,
    pool: String,
    affinity: Option<String>,
    size: u32,
    usable: u32,
    used: usize,
}

/// `ipam show`: per pool and per block, size, use and affinity.
pub fn show(store: &dyn Datastore, format: Format) -> Result<String, IpamError> {
    let state = store.read()?;
    let pools = usage(&state);
    let blocks: Vec<BlockReport> = state
        .blocks()
        .values()
        .map(|b| BlockReport {
            cidr: b.cidr,
            pool: b.pool.clone(),
            affinity: b.affinity.clone(),
            size: b.size(),
            usable: b.usable(),
            used: b.allocations.len(),
        })
        .collect();
    if format == Format::Json {
        return Ok(json(
            &serde_json::json!({ "pools": pools, "blocks": blocks }),
        ));
    }
    let mut out = format!(
        "{:<20} {:<28} {:>10} {:>8} {:>7}  BY NODE\n",
        "POOL", "CIDR", "CAPACITY", "USED", "BLOCKS"
    );
    for p in &pools {
        let nodes: Vec<String> = p.by_node.iter().map(|(n, c)| format!("{n}={c}")).collect();
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:>10} {:>8} {:>7}  {}{}",
            p.name,
            p.cidr.to_string(),
            p.capacity,
            p.used,
            p.blocks,
            nodes.join(","),
            if p.disabled { " (disabled)" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "\n{:<28} {:<20} {:<16} {:>6} {:>6} {:>6}",
        "BLOCK", "POOL", "AFFINITY", "SIZE", "USABLE", "USED"
    );
    for b in &blocks {
        let _ = writeln!(
            out,
            "{:<28} {:<20} {:<16} {:>6} {:>6} {:>6}",
            b.cidr.to_string(),
            b.pool,
            b.affinity.as_deref().unwrap_or("-"),
            b.size,
            b.usable,
            b.used
        );
    }
    Ok(out)
}

/// Whether an attachment is still alive on this machine: its recorded namespace opens.
pub fn attachment_is_live(netns: &str) -> bool {
    !netns.is_empty() && nodekit_nsutil::NetNs::open(netns).is_ok()
}

/// `ipam check`: the leaks found (for `node` only when given).
pub fn check(store: &dyn Datastore, node: Option<&str>) -> Result<Vec<Finding>, IpamError> {
    let state = store.read()?;
    Ok(check::find_leaks(&state, node, |h| {
        attachment_is_live(&h.netns)
    }))
}

/// Renders check findings.
pub fn render_findings(findings: &[Finding], format: Format) -> String {
    if format == Format::Json {
        return json(&findings);
    }
    if findings.is_empty() {
        return "no leaked allocations\n".into();
    }
    let mut out = String::new();
    for f in findings {
        let addrs: Vec<String> = f.addresses.iter().map(ToString::to_string).collect();
        let pod = f
            .pod
            .as_deref()
            .map(|p| format!(" (pod {p})"))
            .unwrap_or_default();
        let _ = writeln!(out, "{}{pod}  {}  {}", f.handle, addrs.join(","), f.reason);
    }
    let _ = writeln!(
        out,
        "{} leaked; release them with `nodekitctl ipam release --from-check`",
        findings.len()
    );
    out
}

/// `ipam release`: by handle ID, by address, or everything `check` finds (re-checked inside
/// the transaction, so a pod that came back meanwhile is kept).
pub fn release(
    store: &dyn Datastore,
    handles: &[String],
    ips: &[IpAddr],
    from_check: Option<Option<&str>>,
) -> Result<String, IpamError> {
    let released = transact_with(store, |state| {
        let mut findings: Vec<Finding> = Vec::new();
        if let Some(node) = from_check {
            findings.extend(check::find_leaks(state, node, |h| {
                attachment_is_live(&h.netns)
            }));
        }
        for id in handles {
            findings.push(Finding {
                handle: id.clone(),
                addresses: vec![],
                pod: None,
                reason: String::new(),
            });
        }
        for ip in ips {
            let holder = state.blocks().values().find_map(|b| {
                let ordinal = b.ordinal(*ip)?;
                b.allocations.get(&ordinal).cloned()
            });
            match holder {
                Some(handle) => findings.push(Finding {
                    handle,
                    addresses: vec![],
                    pod: None,
                    reason: String::new(),
                }),
                None => {
                    return Err(IpamError::CheckFailed {
                        handle: ip.to_string(),
                        reason: "this address is not allocated".into(),
                    })
                }
            }
        }
        Ok(check::release_findings(state, &findings))
    })?;
    Ok(format!("released {released} allocation(s)\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::file_store::FileStore;
    use crate::ipam::model::Handle;

    #[test]
    fn pool_lifecycle_show_and_release_by_ip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let pool = |name: &str, cidr: &str, bs| Pool::new(name, cidr.parse().unwrap(), bs).unwrap();
        pool_add(&store, pool("a", "10.9.0.0/24", Some(28))).unwrap();
        assert!(pool_add(&store, pool("b", "10.9.0.128/25", None))
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        let handle = Handle {
            id: "n.c.eth0".into(),
            network: "n".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            node: "n1".into(),
            netns: "/run/netns/none".into(),
            addresses: vec![],
            pod: None,
        };
        let got = transact_with(&store, |s| {
            allocator::assign(s, handle.clone(), &allocator::Choice::default())
        })
        .unwrap();
        let text = show(&store, Format::Table).unwrap();
        assert!(
            text.contains("10.9.0.0/28") && text.contains("n1=1"),
            "{text}"
        );
        assert!(pool_remove(&store, "a")
            .unwrap_err()
            .to_string()
            .contains("still holds"));
        let findings = check(&store, None).unwrap();
        assert_eq!(findings.len(), 1);
        release(&store, &[], &[got[0].address.ip()], None).unwrap();
        assert!(check(&store, None).unwrap().is_empty());
        pool_set_disabled(&store, "a", true).unwrap();
        assert!(pool_list(&store, Format::Table).unwrap().contains("true"));
        pool_remove(&store, "a").unwrap();
        assert!(store.read().unwrap().pools().is_empty());
    }
}
