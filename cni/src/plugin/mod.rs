//! The `nodekit` CNI plugin: wires pods in bridge or routed mode and delegates addresses to
//! the IPAM plugin named in the config. A failed ADD undoes everything it did (host veth,
//! which takes the pod end and routes with it, then the IPAM allocation).

pub mod config;
pub mod wiring;

use std::collections::BTreeSet;

use nodekit_nsutil::{NetNs, NsError};

use crate::delegate;
use crate::netlink::{link_alias, link_name, Netlink, NetlinkError};
use crate::skel::{NetConfHeader, Plugin};
use crate::spec::{code, CmdArgs, CniResult, ErrorResult};
use config::{Mode, NodekitConf};
use wiring::{host_veth_name, Attachment};

/// Environment variable of the fault-injection hook used by the tests: `POINT` makes ADD
/// fail at that point, `kill:POINT` makes the process SIGKILL itself there. Points:
/// `after-ipam`, `after-veth`, `after-host`, `after-pod`.
pub const FAULT_ENV: &str = "NODEKIT_FAULT";

/// Everything the plugin can fail with; mapped to CNI codes in one place below.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The config is invalid.
    #[error("invalid nodekit config: {field}: {reason}")]
    Config {
        /// Offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A field has a value this plugin does not support.
    #[error("unsupported field {key} = {value}: {hint}")]
    UnsupportedField {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is supported.
        hint: String,
    },
    /// CNI_NETNS is not a usable network namespace.
    #[error("CNI_NETNS {path}: {source}")]
    Netns {
        /// The path given.
        path: String,
        /// Why it cannot be used.
        #[source]
        source: NsError,
    },
    /// The pod already has an interface of that name.
    #[error("interface {ifname} already exists in {netns}; pick another CNI_IFNAME")]
    InterfaceExists {
        /// CNI_IFNAME.
        ifname: String,
        /// The pod namespace.
        netns: String,
    },
    /// Something we just created disappeared (the namespace was deleted under us...).
    #[error("{what} vanished while being configured")]
    Vanished {
        /// What.
        what: String,
    },
    /// A kernel request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A sysctl could not be written.
    #[error("sysctl {key}: {source}")]
    Sysctl {
        /// The key.
        key: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// CHECK found the attachment differs from prevResult.
    #[error("CHECK: {0}")]
    Check(String),
    /// The fault-injection hook fired.
    #[error("injected fault at {0}")]
    Fault(String),
    /// The tokio runtime could not start.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<PluginError> for ErrorResult {
    fn from(err: PluginError) -> Self {
        let code = match &err {
            PluginError::Config { .. } => code::INVALID_NETWORK_CONFIG,
            PluginError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            PluginError::Netns { .. } => code::INVALID_ENV,
            PluginError::Check(_) => code::UNKNOWN_CONTAINER,
            PluginError::InterfaceExists { .. }
            | PluginError::Vanished { .. }
            | PluginError::Netlink(_)
            | PluginError::Sysctl { .. }
            | PluginError::Fault(_)
            | PluginError::Runtime(_) => code::KERNEL,
        };
        ErrorResult::new(code, err.to_string())
    }
}

/// The `nodekit` plugin.
#[derive(Debug, Default)]
pub struct NodekitPlugin;

fn runtime() -> Result<tokio::runtime::Runtime, PluginError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(PluginError::Runtime)
}

/// The fault-injection hook (see [`FAULT_ENV`]).
fn fault(point: &str) -> Result<(), PluginError> {
    match std::env::var(FAULT_ENV) {
        Ok(v) if v == point => Err(PluginError::Fault(point.to_string())),
        Ok(v) if v.strip_prefix("kill:") == Some(point) => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            Err(PluginError::Fault(point.to_string()))
        }
        _ => Ok(()),
    }
}

fn open_netns(args: &CmdArgs) -> Result<NetNs, PluginError> {
    let path = args.netns.clone().unwrap_or_default();
    NetNs::open(&path).map_err(|source| PluginError::Netns {
        path: path.display().to_string(),
        source,
    })
}

impl Plugin for NodekitPlugin {
    fn add(&self, args: &CmdArgs, header: &NetConfHeader) -> Result<CniResult, ErrorResult> {
        let conf = NodekitConf::parse(&args.stdin)?;
        let prev = header.prev_result()?;
        let pod_ns = open_netns(args)?;
        let rt = runtime()?;
        let at = Attachment {
            conf: &conf,
            container_id: &args.container_id,
            ifname: &args.ifname,
            pod_ns: &pod_ns,
        };
        // IPAM runs in its own process while the links that need no address are made.
        let ipam = delegate::spawn(conf.ipam_type(), "ADD", args)?;
        let prepared = rt.block_on(wiring::prepare(&at, fault));
        let assigned = ipam.wait();
        let wired = match (assigned, prepared) {
            (Ok(Some(ipam)), Ok(prepared)) if !ipam.ips.is_empty() => fault("after-ipam")
                .and_then(|()| rt.block_on(wiring::configure(&at, prepared, &ipam, fault)))
                .map_err(ErrorResult::from),
            (Ok(_), Ok(_)) => Err(ErrorResult::new(
                code::DELEGATE,
                format!("{} returned no addresses", conf.ipam_type()),
            )),
            (Err(ipam_err), _) => {
                rollback_links(&rt, args);
                return Err(ipam_err);
            }
            (Ok(_), Err(err)) => Err(err.into()),
        };
        wired.map(|result| chain(prev, result)).inspect_err(|err| {
            tracing::warn!(%err, "ADD failed, rolling back");
            rollback_links(&rt, args);
            if let Err(e) = delegate::run(conf.ipam_type(), "DEL", args) {
                tracing::error!(%e, "rollback: IPAM release failed");
            }
        })
    }

    fn del(&self, args: &CmdArgs, _header: &NetConfHeader) -> Result<(), ErrorResult> {
        let conf = NodekitConf::parse(&args.stdin)?;
        // The IPAM release is always reached, whatever happens to the interfaces, and runs
        // while the kernel tears the veth down (the slow part of DEL).
        let release = delegate::spawn(conf.ipam_type(), "DEL", args)?;
        let unwired =
            runtime().and_then(|rt| rt.block_on(wiring::detach(&args.container_id, &args.ifname)));
        release.wait()?;
        unwired.map_err(Into::into)
    }

    fn check(&self, args: &CmdArgs, header: &NetConfHeader) -> Result<(), ErrorResult> {
        let conf = NodekitConf::parse(&args.stdin)?;
        let prev = header.prev_result()?.ok_or_else(|| {
            ErrorResult::new(code::INVALID_NETWORK_CONFIG, "CHECK needs prevResult")
        })?;
        let pod_ns = open_netns(args)?;
        runtime()?.block_on(check_wiring(&conf, args, &pod_ns, &prev))?;
        delegate::run(conf.ipam_type(), "CHECK", args)?;
        Ok(())
    }

    fn status(&self, args: &CmdArgs, _header: &NetConfHeader) -> Result<(), ErrorResult> {
        let conf = NodekitConf::parse(&args.stdin)?;
        delegate::run(conf.ipam_type(), "STATUS", args)?;
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, header: &NetConfHeader) -> Result<(), ErrorResult> {
        let conf = NodekitConf::parse(&args.stdin)?;
        let valid = header.gc_valid();
        let removed = runtime()?.block_on(gc_host_veths(&conf, &valid))?;
        tracing::info!(?removed, "gc removed stale host veths");
        delegate::run(conf.ipam_type(), "GC", args)?;
        Ok(())
    }
}

/// Removes the host veth of a failed ADD (the pod end and host routes go with it).
fn rollback_links(rt: &tokio::runtime::Runtime, args: &CmdArgs) {
    if let Err(e) = rt.block_on(wiring::detach(&args.container_id, &args.ifname)) {
        tracing::error!(%e, "rollback: removing host veth failed");
    }
}

/// Appends our interfaces and IPs to a chain's previous result.
fn chain(prev: Option<CniResult>, mut ours: CniResult) -> CniResult {
    let Some(mut prev) = prev else {
        return ours;
    };
    let offset = prev.interfaces.len();
    for ip in &mut ours.ips {
        ip.interface = ip.interface.map(|i| i + offset);
    }
    prev.interfaces.append(&mut ours.interfaces);
    prev.ips.append(&mut ours.ips);
    prev.routes.append(&mut ours.routes);
    if prev.dns.is_empty() {
        prev.dns = ours.dns;
    }
    prev
}

async fn check_wiring(
    conf: &NodekitConf,
    args: &CmdArgs,
    pod_ns: &NetNs,
    prev: &CniResult,
) -> Result<(), PluginError> {
    let node = Netlink::connect()?;
    let host_name = host_veth_name(&args.container_id, &args.ifname);
    let host = node
        .link(&host_name)
        .await?
        .ok_or_else(|| PluginError::Check(format!("host veth {host_name} is missing")))?;
    if conf.mode == Mode::Bridge {
        let bridge = node
            .link(&conf.bridge)
            .await?
            .ok_or_else(|| PluginError::Check(format!("bridge {} is missing", conf.bridge)))?;
        let enslaved = host.attributes.iter().any(|a| {
            matches!(a, netlink_packet_route::link::LinkAttribute::Controller(i) if *i == bridge.header.index)
        });
        if !enslaved {
            return Err(PluginError::Check(format!(
                "host veth {host_name} is not a port of bridge {}",
                conf.bridge
            )));
        }
    }
    let pod = Netlink::connect_in(pod_ns)?;
    let link = pod.link(&args.ifname).await?.ok_or_else(|| {
        PluginError::Check(format!(
            "interface {} is missing in {}",
            args.ifname,
            pod_ns.path().display()
        ))
    })?;
    let present = pod.addresses(link.header.index).await?;
    let ours = prev
        .interfaces
        .iter()
        .position(|i| i.name == args.ifname && i.sandbox.is_some());
    for ip in prev.ips.iter().filter(|ip| ip.interface == ours) {
        if !present.iter().any(|p| p.ip() == ip.address.ip()) {
            return Err(PluginError::Check(format!(
                "address {} is missing on {}",
                ip.address, args.ifname
            )));
        }
    }
    let routes = pod.routes().await?;
    for route in &prev.routes {
        let found = routes.iter().any(|r| {
            r.header.destination_prefix_length == route.dst.prefix()
                && r.attributes.iter().any(|a| {
                    matches!(a, netlink_packet_route::route::RouteAttribute::Oif(i) if *i == link.header.index)
                })
        });
        if !found {
            return Err(PluginError::Check(format!(
                "route to {} is missing in the pod",
                route.dst
            )));
        }
    }
    Ok(())
}

/// Deletes host veths of this network whose attachment is not in `valid`.
async fn gc_host_veths(
    conf: &NodekitConf,
    valid: &BTreeSet<crate::spec::GcAttachment>,
) -> Result<Vec<String>, PluginError> {
    let node = Netlink::connect()?;
    let prefix = format!("{}/{}/", wiring::ALIAS_PREFIX, conf.name);
    let mut removed = Vec::new();
    for link in node.links().await? {
        let Some(rest) = link_alias(&link).and_then(|a| a.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((container_id, ifname)) = rest.split_once('/') else {
            continue;
        };
        let alive = valid
            .iter()
            .any(|v| v.container_id == container_id && v.ifname == ifname);
        if !alive {
            if let Some(name) = link_name(&link) {
                node.delete_link(name).await?;
                removed.push(name.to_string());
            }
        }
    }
    Ok(removed)
}
