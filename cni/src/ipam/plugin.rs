//! The `nodekit-ipam` plugin: the CNI IPAM contract over [`super::allocator`] and a datastore.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;

use super::allocator::{self, Assigned};
use super::config::IpamNetConf;
use super::model::{Handle, Pool};
use super::store::{transact_with, Datastore};
use super::IpamError;
use crate::skel::{NetConfHeader, Plugin};
use crate::spec::{code, default_dst, CmdArgs, CniResult, ErrorResult, IpConfig, Route};

/// The IPAM plugin (stateless: everything lives in the datastore).
#[derive(Debug, Default)]
pub struct IpamPlugin;

/// The parsed request every command starts from: config validated, pools built, store open.
struct Request {
    conf: IpamNetConf,
    pools: Vec<Pool>,
    store: Box<dyn Datastore>,
    node: String,
}

impl Request {
    fn new(args: &CmdArgs) -> Result<Self, IpamError> {
        let conf = IpamNetConf::parse(&args.stdin)?;
        let pools = conf
            .ipam
            .pools
            .iter()
            .map(|p| p.to_pool())
            .collect::<Result<Vec<_>, _>>()?;
        let store = conf.ipam.datastore.open()?;
        let node = conf.node();
        Ok(Self {
            conf,
            pools,
            store,
            node,
        })
    }

    /// Pools an ADD may use: CNI_ARGS `IP_POOLS=a,b`, else every pool in the datastore
    /// (so a pool added with `nodekitctl` relieves exhaustion at once).
    fn pool_names(&self, args: &CmdArgs) -> Option<Vec<String>> {
        args.arg("IP_POOLS")
            .map(|list| list.split(',').map(str::to_string).collect())
    }

    fn ensure_pools(&self, state: &mut super::model::IpamState) -> Result<(), IpamError> {
        for (pool, conf) in self.pools.iter().zip(&self.conf.ipam.pools) {
            allocator::ensure_pool(state, pool.clone(), conf.overrides())?;
        }
        Ok(())
    }

    fn choice<'a>(&self, pools: Option<&'a [String]>) -> allocator::Choice<'a> {
        allocator::Choice {
            pools,
            strict_affinity: !self.conf.may_borrow(),
        }
    }

    fn handle_id(&self, args: &CmdArgs) -> String {
        Handle::id_for(&self.conf.name, &args.container_id, &args.ifname)
    }
}

impl Plugin for IpamPlugin {
    fn add(&self, args: &CmdArgs, _conf: &NetConfHeader) -> Result<CniResult, ErrorResult> {
        let req = Request::new(args)?;
        let handle = Handle {
            id: req.handle_id(args),
            network: req.conf.name.clone(),
            container_id: args.container_id.clone(),
            ifname: args.ifname.clone(),
            node: req.node.clone(),
            netns: args
                .netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            addresses: Vec::new(),
            pod: args
                .arg("K8S_POD_NAMESPACE")
                .zip(args.arg("K8S_POD_NAME"))
                .map(|(ns, name)| format!("{ns}/{name}")),
        };
        let names = req.pool_names(args);
        let (assigned, vxlan_mtu) = transact_with(req.store.as_ref(), |state| {
            req.ensure_pools(state)?;
            let assigned = allocator::assign(state, handle.clone(), &req.choice(names.as_deref()))?;
            Ok((assigned, state.vxlan_mtu_of(&req.node)))
        })?;
        tracing::info!(handle = %handle.id, addresses = ?assigned, "assigned");
        Ok(result_for(
            &assigned,
            req.conf.ipam.routes.clone(),
            vxlan_mtu,
        ))
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConfHeader) -> Result<(), ErrorResult> {
        let req = Request::new(args)?;
        let id = req.handle_id(args);
        let released = transact_with(req.store.as_ref(), |state| {
            Ok(allocator::release(state, &id))
        })?;
        tracing::info!(handle = %id, released = released.is_some(), "released");
        Ok(())
    }

    fn check(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult> {
        let req = Request::new(args)?;
        let id = req.handle_id(args);
        let state = req.store.read()?;
        let Some(handle) = state.handles().get(&id) else {
            return Err(IpamError::CheckFailed {
                handle: id,
                reason: "no addresses are allocated to it".into(),
            }
            .into());
        };
        if let Some(prev) = conf.prev_result()? {
            let held: BTreeSet<IpNetwork> = handle.addresses.iter().copied().collect();
            for ip in &prev.ips {
                let same = held.iter().any(|h| h.ip() == ip.address.ip());
                if !same {
                    return Err(IpamError::CheckFailed {
                        handle: id,
                        reason: format!("prevResult has {} but IPAM holds {:?}", ip.address, held),
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    fn status(&self, args: &CmdArgs, _conf: &NetConfHeader) -> Result<(), ErrorResult> {
        let not_available = |e: IpamError| ErrorResult::new(code::NOT_AVAILABLE, e.to_string());
        let req = Request::new(args).map_err(not_available)?;
        let names = req.pool_names(args);
        let mut state = req.store.read().map_err(not_available)?;
        req.ensure_pools(&mut state).map_err(not_available)?;
        allocator::check_available(&state, &req.node, &req.choice(names.as_deref()))
            .map_err(not_available)
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConfHeader) -> Result<(), ErrorResult> {
        let req = Request::new(args)?;
        let valid = conf.gc_valid();
        let released = transact_with(req.store.as_ref(), |state| {
            let stale: Vec<String> = state
                .handles()
                .values()
                .filter(|h| h.network == req.conf.name && h.node == req.node)
                .filter(|h| {
                    !valid
                        .iter()
                        .any(|v| v.container_id == h.container_id && v.ifname == h.ifname)
                })
                .map(|h| h.id.clone())
                .collect();
            for id in &stale {
                allocator::release(state, id);
            }
            Ok(stale)
        })?;
        tracing::info!(?released, "gc released stale handles");
        Ok(())
    }
}

/// The result: `routes` when configured, else a default route per family, whose MTU is
/// `vxlan_mtu` (the node's underlay MTU less VXLAN's overhead) for encapsulated pools.
fn result_for(assigned: &[Assigned], routes: Option<Vec<Route>>, vxlan_mtu: u32) -> CniResult {
    let default_routes = || {
        assigned
            .iter()
            .map(|a| Route {
                dst: default_dst(a.address.is_ipv4()),
                gw: None,
                mtu: a.encapsulated.then_some(vxlan_mtu),
            })
            .collect()
    };
    CniResult {
        cni_version: String::new(),
        interfaces: Vec::new(),
        ips: assigned
            .iter()
            .map(|a| IpConfig {
                address: a.address,
                gateway: Some(a.gateway),
                interface: None,
            })
            .collect(),
        routes: routes.unwrap_or_else(default_routes),
        dns: Default::default(),
    }
}
