//! `nodekit-netd`: the per-node daemon that programs routes to other nodes' pods.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nodekit_cni::ipam::config::{DatastoreConf, DEFAULT_ETCD_PREFIX, DEFAULT_FILE_DATASTORE};
use nodekit_cni::ipam::model::NodeInfo;
use nodekit_cni::netd;

/// Registers this node in nodekit's IPAM datastore and keeps its routes to every other
/// node's pod blocks converged (run one per node, in the node's network namespace).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// This node's name (the `nodeName` of the CNI config).
    #[arg(long)]
    node_name: String,
    /// This node's underlay address; other nodes route this node's blocks via it. Give it
    /// twice (one IPv4, one IPv6) to route both families' blocks.
    #[arg(long, required = true, num_args = 1)]
    node_ip: Vec<IpAddr>,
    /// Node label, KEY=VALUE (repeatable); pools select nodes by label.
    #[arg(long, value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Datastore backend.
    #[arg(long, value_enum, default_value = "etcd")]
    datastore: Backend,
    /// File datastore directory (single node).
    #[arg(long, default_value = DEFAULT_FILE_DATASTORE)]
    path: PathBuf,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "NODEKIT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix.
    #[arg(long, default_value = DEFAULT_ETCD_PREFIX)]
    prefix: String,
    /// Resync period in milliseconds: a full pass runs at least this often (datastore changes
    /// wake netd at once through a watch; this also repairs routes changed behind its back).
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// Reconcile once and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    File,
    Etcd,
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{raw:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    nodekit_cni::skel::init_logging();
    let cli = Cli::parse();
    if let Some(bad) = cli.node_ip.iter().find(|ip| !netd::is_usable_node_ip(**ip)) {
        eprintln!("nodekit-netd: --node-ip {bad} cannot carry traffic between nodes");
        return ExitCode::FAILURE;
    }
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = cli.node_ip.iter().partition(|ip| ip.is_ipv4());
    if v4.len() > 1 || v6.len() > 1 {
        eprintln!("nodekit-netd: give --node-ip at most once per address family");
        return ExitCode::FAILURE;
    }
    let conf = match cli.datastore {
        Backend::File => DatastoreConf::File { path: cli.path },
        Backend::Etcd => DatastoreConf::Etcd {
            endpoints: cli.etcd_endpoints,
            prefix: cli.prefix,
        },
    };
    let node = NodeInfo {
        name: cli.node_name,
        ip: v4.first().or(v6.first()).copied(),
        ip6: v4.first().and(v6.first()).copied(),
        labels: cli.label.into_iter().collect(),
        vxlan_mac: None,
        underlay_mtu: None,
    };
    let interval = Duration::from_millis(cli.interval_ms);
    let result = conf
        .open()
        .map_err(netd::NetdError::from)
        .and_then(|store| netd::run(store.as_ref(), &node, interval, cli.once));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodekit-netd: {e}");
            ExitCode::FAILURE
        }
    }
}
