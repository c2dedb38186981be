//! `nodekitctl`: administer nodekit's IPAM datastore (pools, usage, leak check and release).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use nodekit_cni::ctl::{self, Format};
use nodekit_cni::ipam::config::{DatastoreConf, DEFAULT_ETCD_PREFIX, DEFAULT_FILE_DATASTORE};
use nodekit_cni::ipam::model::{Pool, VxlanMode};

/// Administer nodekit's IPAM: pools, usage, leaked allocations.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Datastore backend.
    #[arg(long, value_enum, default_value = "file")]
    datastore: Backend,
    /// Directory of the file datastore (the `ipam.datastore.path` of the network config).
    #[arg(long, env = "NODEKIT_DATASTORE_PATH", default_value = DEFAULT_FILE_DATASTORE)]
    path: PathBuf,
    /// etcd client URLs, comma-separated (with `--datastore etcd`).
    #[arg(long, env = "NODEKIT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix (with `--datastore etcd`).
    #[arg(long, default_value = DEFAULT_ETCD_PREFIX)]
    prefix: String,
    /// Output format of reports.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Top,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The embedded file store.
    File,
    /// etcd v3.
    Etcd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Vxlan {
    Never,
    Always,
    CrossSubnet,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Top {
    /// IP address management.
    #[command(subcommand)]
    Ipam(Ipam),
    /// Nodes known to the IPAM.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes with address and labels.
    List,
    /// Register or update a node (labels merge; KEY= removes one).
    Set {
        /// Node name.
        name: String,
        /// Underlay address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// Label, KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_label)]
        label: Vec<(String, String)>,
    },
    /// Release a departed node's allocations and blocks.
    Remove {
        /// Node name.
        name: String,
    },
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{raw:?} is not KEY=VALUE"))
}

#[derive(Subcommand)]
enum Ipam {
    /// Manage IP pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Usage per pool and per block (size, used, affinity).
    Show,
    /// List allocations whose attachment no longer exists.
    Check {
        /// Only handles allocated by this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Release allocations by handle, by address, or everything `check` finds.
    Release {
        /// Handle ID (NETWORK.CONTAINERID.IFNAME).
        #[arg(long)]
        handle: Vec<String>,
        /// An allocated address.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Release what `ipam check` reports.
        #[arg(long)]
        from_check: bool,
        /// With --from-check: only this node's handles.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Add a pool (no-op when an identical one exists).
    Add {
        /// Pool name.
        name: String,
        /// Range, network-aligned (10.244.0.0/16, fd00:10::/64).
        cidr: IpNetwork,
        /// Block prefix length (default 26 for IPv4, 122 for IPv6).
        #[arg(long)]
        block_size: Option<u8>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// Only nodes with this label allocate from it (repeatable, KEY=VALUE).
        #[arg(long, value_parser = parse_label)]
        node_selector: Vec<(String, String)>,
        /// Never lend single addresses of this pool's blocks to other nodes.
        #[arg(long)]
        strict_affinity: bool,
        /// Masquerade pod traffic leaving the pools (nodekit-netd programs it).
        #[arg(long)]
        nat_outgoing: bool,
        /// VXLAN towards other nodes: never, always, or cross-subnet.
        #[arg(long, value_enum, default_value = "never")]
        vxlan_mode: Vxlan,
    },
    /// List pools.
    List,
    /// Stop new allocations from a pool (existing ones stay).
    Disable {
        /// Pool name.
        name: String,
    },
    /// Allow allocations from a disabled pool again.
    Enable {
        /// Pool name.
        name: String,
    },
    /// Remove a pool that holds no allocations.
    Remove {
        /// Pool name.
        name: String,
    },
}

fn main() -> ExitCode {
    nodekit_cni::skel::init_logging();
    let cli = Cli::parse();
    let format = match cli.output {
        Output::Table => Format::Table,
        Output::Json => Format::Json,
    };
    let conf = match cli.datastore {
        Backend::File => DatastoreConf::File { path: cli.path },
        Backend::Etcd => DatastoreConf::Etcd {
            endpoints: cli.etcd_endpoints,
            prefix: cli.prefix,
        },
    };
    let result = conf.open().and_then(|store| {
        let store = store.as_ref();
        match cli.command {
            Top::Ipam(Ipam::Pool(PoolCmd::Add {
                name,
                cidr,
                block_size,
                disabled,
                node_selector,
                strict_affinity,
                nat_outgoing,
                vxlan_mode,
            })) => Pool::new(&name, cidr, block_size).and_then(|pool| {
                ctl::pool_add(
                    store,
                    Pool {
                        disabled,
                        node_selector: node_selector.into_iter().collect(),
                        strict_affinity,
                        nat_outgoing,
                        vxlan_mode: match vxlan_mode {
                            Vxlan::Never => VxlanMode::Never,
                            Vxlan::Always => VxlanMode::Always,
                            Vxlan::CrossSubnet => VxlanMode::CrossSubnet,
                        },
                        ..pool
                    },
                )
            }),
            Top::Node(NodeCmd::List) => ctl::node_list(store, format),
            Top::Node(NodeCmd::Set { name, ip, label }) => ctl::node_set(store, &name, ip, &label),
            Top::Node(NodeCmd::Remove { name }) => ctl::node_remove(store, &name),
            Top::Ipam(Ipam::Pool(PoolCmd::List)) => ctl::pool_list(store, format),
            Top::Ipam(Ipam::Pool(PoolCmd::Disable { name })) => {
                ctl::pool_set_disabled(store, &name, true)
            }
            Top::Ipam(Ipam::Pool(PoolCmd::Enable { name })) => {
                ctl::pool_set_disabled(store, &name, false)
            }
            Top::Ipam(Ipam::Pool(PoolCmd::Remove { name })) => ctl::pool_remove(store, &name),
            Top::Ipam(Ipam::Show) => ctl::show(store, format),
            Top::Ipam(Ipam::Check { node }) => {
                ctl::check(store, node.as_deref()).map(|f| ctl::render_findings(&f, format))
            }
            Top::Ipam(Ipam::Release {
                handle,
                ip,
                from_check,
                node,
            }) => ctl::release(store, &handle, &ip, from_check.then_some(node.as_deref())),
        }
    });
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodekitctl: {e}");
            ExitCode::FAILURE
        }
    }
}
