//! The `ipam` section of a network config, as `nodekit-ipam` reads it.

use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::Deserialize;

use super::allocator::Overrides;
use super::etcd_store::EtcdStore;
use super::file_store::FileStore;
use super::model::Pool;
use super::store::Datastore;
use super::IpamError;
use crate::spec::Route;

/// Where the datastore lives when the config names none.
pub const DEFAULT_FILE_DATASTORE: &str = "/var/lib/nodekit/ipam";

/// The network config as the IPAM plugin needs it.
#[derive(Debug, Clone, Deserialize)]
pub struct IpamNetConf {
    /// Network name (part of every handle).
    #[serde(default)]
    pub name: String,
    /// The main plugin's node name, used when `ipam.nodeName` is absent.
    #[serde(rename = "nodeName", default)]
    pub node_name: Option<String>,
    /// The main plugin (`nodekit`, `bridge`...), to know whether it can use a borrowed address.
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The main plugin's mode, when it is `nodekit`.
    #[serde(default)]
    pub mode: Option<String>,
    /// The IPAM section.
    pub ipam: IpamConf,
}

/// The `ipam` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamConf {
    /// Always `nodekit-ipam`.
    #[serde(rename = "type")]
    pub ipam_type: String,
    /// Where pools, blocks and handles are kept.
    #[serde(default)]
    pub datastore: DatastoreConf,
    /// Pools to ensure exist (idempotent); ADD assigns from every enabled pool unless
    /// CNI_ARGS `IP_POOLS=a,b` names some.
    #[serde(default)]
    pub pools: Vec<PoolConf>,
    /// The node allocating (blocks get affinity to it); defaults to the config's `nodeName`,
    /// then the host name.
    #[serde(rename = "nodeName", default)]
    pub node_name: Option<String>,
    /// Routes to return; default: a default route per assigned family.
    #[serde(default)]
    pub routes: Option<Vec<Route>>,
    /// Never borrow addresses from other nodes' blocks, in any pool.
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: bool,
}

/// Which datastore backend, and where.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum DatastoreConf {
    /// The embedded file store in a directory.
    #[serde(rename = "file")]
    File {
        /// Directory of the store.
        path: PathBuf,
    },
    /// etcd v3, shared by every node.
    #[serde(rename = "etcd")]
    Etcd {
        /// Client URLs, `http://IP:PORT`.
        endpoints: Vec<String>,
        /// Key prefix (default `/nodekit`).
        #[serde(default = "default_etcd_prefix")]
        prefix: String,
    },
}

/// Where nodekit's keys live in etcd unless configured.
pub const DEFAULT_ETCD_PREFIX: &str = "/nodekit";

fn default_etcd_prefix() -> String {
    DEFAULT_ETCD_PREFIX.into()
}

impl Default for DatastoreConf {
    fn default() -> Self {
        Self::File {
            path: PathBuf::from(DEFAULT_FILE_DATASTORE),
        }
    }
}

impl DatastoreConf {
    /// Opens the backend.
    pub fn open(&self) -> Result<Box<dyn Datastore>, IpamError> {
        match self {
            Self::File { path } => {
                if !path.is_absolute() {
                    return Err(IpamError::InvalidConfig {
                        field: "ipam.datastore.path".into(),
                        reason: format!("{} must be an absolute path", path.display()),
                    });
                }
                Ok(Box::new(FileStore::open(path)?))
            }
            Self::Etcd { endpoints, prefix } => Ok(Box::new(EtcdStore::open(endpoints, prefix)?)),
        }
    }
}

/// One entry of `ipam.pools`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConf {
    /// Pool name.
    pub name: String,
    /// Range.
    pub cidr: IpNetwork,
    /// Block prefix (default 26 / 122).
    #[serde(rename = "blockSize", default)]
    pub block_size: Option<u8>,
    /// Create (or set) the pool disabled.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Node labels a node needs to allocate from the pool.
    #[serde(rename = "nodeSelector", default)]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// No borrowing from this pool's blocks.
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: Option<bool>,
    /// Masquerade traffic leaving the pools (programmed by nodekit-netd).
    #[serde(rename = "natOutgoing", default)]
    pub nat_outgoing: Option<bool>,
    /// `Never`, `Always` or `CrossSubnet`: VXLAN towards other nodes (nodekit-netd).
    #[serde(rename = "vxlanMode", default)]
    pub vxlan_mode: Option<crate::ipam::model::VxlanMode>,
}

impl PoolConf {
    /// The validated pool.
    pub fn to_pool(&self) -> Result<Pool, IpamError> {
        let mut pool = Pool::new(&self.name, self.cidr, self.block_size)?;
        pool.disabled = self.disabled.unwrap_or(false);
        pool.node_selector = self.node_selector.clone().unwrap_or_default();
        pool.strict_affinity = self.strict_affinity.unwrap_or(false);
        pool.nat_outgoing = self.nat_outgoing.unwrap_or(false);
        pool.vxlan_mode = self.vxlan_mode.unwrap_or_default();
        Ok(pool)
    }

    /// The attributes this entry sets on an existing pool: the ones it names.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            disabled: self.disabled.is_some(),
            node_selector: self.node_selector.is_some(),
            strict_affinity: self.strict_affinity.is_some(),
            nat_outgoing: self.nat_outgoing.is_some(),
            vxlan_mode: self.vxlan_mode.is_some(),
        }
    }
}

impl IpamNetConf {
    /// Parses stdin; an unknown key is code 2 naming it, a bad value names the field.
    pub fn parse(bytes: &[u8]) -> Result<Self, IpamError> {
        let invalid = |e: serde_json::Error| IpamError::InvalidConfig {
            field: "ipam".into(),
            reason: e.to_string(),
        };
        let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
        let ipam = &raw["ipam"];
        reject_unknown(
            ipam,
            "ipam",
            &[
                "type",
                "datastore",
                "pools",
                "nodeName",
                "routes",
                "strictAffinity",
            ],
        )?;
        reject_unknown(
            &ipam["datastore"],
            "ipam.datastore",
            &["type", "path", "endpoints", "prefix"],
        )?;
        for (i, pool) in ipam["pools"].as_array().into_iter().flatten().enumerate() {
            reject_unknown(
                pool,
                &format!("ipam.pools[{i}]"),
                &[
                    "name",
                    "cidr",
                    "blockSize",
                    "disabled",
                    "nodeSelector",
                    "strictAffinity",
                    "natOutgoing",
                    "vxlanMode",
                ],
            )?;
        }
        serde_json::from_value(raw).map_err(invalid)
    }

    /// Whether an address borrowed from another node's block would work for the main plugin.
    /// Bridge wiring (the reference `bridge`, and `nodekit` in its default bridge mode) puts
    /// the block prefix on the pod, so a borrowed address would sit on a subnet the node's
    /// bridge does not route: such configs never borrow, they report exhaustion instead.
    pub fn may_borrow(&self) -> bool {
        let bridged = self.plugin_type == "bridge"
            || (self.plugin_type == "nodekit" && self.mode.as_deref() != Some("routed"));
        !bridged && !self.ipam.strict_affinity
    }

    /// The node name to allocate for.
    pub fn node(&self) -> String {
        self.ipam
            .node_name
            .clone()
            .or_else(|| self.node_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "localhost".into())
            })
    }
}

/// Code 2 for a key of `obj` (at `path`) that is not in `known`.
fn reject_unknown(obj: &serde_json::Value, path: &str, known: &[&str]) -> Result<(), IpamError> {
    let Some(map) = obj.as_object() else {
        return Ok(());
    };
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(IpamError::UnsupportedField {
            key: format!("{path}.{key}"),
            known: known.join(", "),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape_and_rejects_unknown_fields() {
        let conf = IpamNetConf::parse(
            br#"{"name":"net","nodeName":"n1","ipam":{"type":"nodekit-ipam",
            "datastore":{"type":"file","path":"/tmp/x"},
            "pools":[{"name":"default","cidr":"10.244.0.0/16","blockSize":26}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.node(), "n1");
        assert_eq!(conf.ipam.pools[0].to_pool().unwrap().block_size, 26);
        let err = IpamNetConf::parse(br#"{"ipam":{"type":"nodekit-ipam","pols":[]}}"#).unwrap_err();
        assert!(
            matches!(&err, IpamError::UnsupportedField { key, .. } if key == "ipam.pols"),
            "{err}"
        );
        let err = IpamNetConf::parse(
            br#"{"ipam":{"type":"nodekit-ipam","pools":[{"name":"a","cidr":"10.0.0.0/8","blocksize":24}]}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("ipam.pools[0].blocksize"), "{err}");
        let err = IpamNetConf::parse(
            br#"{"ipam":{"type":"nodekit-ipam","datastore":{"type":"zookeeper"}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("zookeeper"), "{err}");
    }

    #[test]
    fn only_routed_wiring_may_borrow() {
        let conf = |json: &str| IpamNetConf::parse(json.as_bytes()).unwrap();
        assert!(
            conf(r#"{"type":"nodekit","mode":"routed","ipam":{"type":"nodekit-ipam"}}"#)
                .may_borrow()
        );
        assert!(!conf(r#"{"type":"nodekit","ipam":{"type":"nodekit-ipam"}}"#).may_borrow());
        assert!(!conf(r#"{"type":"bridge","ipam":{"type":"nodekit-ipam"}}"#).may_borrow());
        assert!(!conf(
            r#"{"type":"nodekit","mode":"routed","ipam":{"type":"nodekit-ipam","strictAffinity":true}}"#
        )
        .may_borrow());
    }

    #[test]
    fn relative_datastore_paths_are_refused() {
        let conf = DatastoreConf::File {
            path: "rel/dir".into(),
        };
        let err = conf.open().err().unwrap();
        assert!(err.to_string().contains("ipam.datastore.path"));
    }
}
