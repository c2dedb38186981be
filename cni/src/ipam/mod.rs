//! nodekit's IPAM: Calico-style pools, per-node blocks and handles ([`model`]), the
//! assignment logic ([`allocator`]), the datastore behind a trait ([`store`]) with the
//! embedded crash-safe file backend ([`file_store`]), and the `nodekit-ipam` plugin ([`plugin`]).

pub mod allocator;
pub mod check;
pub mod config;
pub mod etcd_store;
pub mod file_store;
pub mod model;
pub mod plugin;
pub mod store;

use std::path::PathBuf;

use crate::spec::{code, ErrorResult};
use allocator::PoolUsage;

/// Everything IPAM can fail with; each maps to one CNI code in [`From<IpamError> for ErrorResult`].
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A pool definition is wrong.
    #[error("pool {pool:?}: invalid {field}: {reason}")]
    InvalidPool {
        /// Pool name.
        pool: String,
        /// The offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A pool of that name exists with another range, or ranges overlap.
    #[error("pool {name:?} conflicts with existing pool {existing:?}: {reason}")]
    PoolConflict {
        /// Pool being added.
        name: String,
        /// Pool already there.
        existing: String,
        /// What clashes.
        reason: String,
    },
    /// The IPAM config is malformed.
    #[error("invalid ipam config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field (`ipam.datastore.path`...).
        field: String,
        /// Why.
        reason: String,
    },
    /// The config has a key the IPAM does not know (a typo, usually).
    #[error("unsupported field {key} in the ipam config (known: {known})")]
    UnsupportedField {
        /// Dotted path of the key.
        key: String,
        /// The keys that are supported there.
        known: String,
    },
    /// A pool named by config, CNI_ARGS or CLI does not exist.
    #[error("IP pool {name:?} does not exist (list them with `nodekitctl ipam pool list`)")]
    UnknownPool {
        /// Pool name.
        name: String,
    },
    /// Pools exist but none selects this node.
    #[error("no IP pool selects node {node}: {pools}; label the node (`nodekitctl node set`) or add a pool for it")]
    NoPoolForNode {
        /// The node.
        node: String,
        /// The pools and their selectors.
        pools: String,
    },
    /// There are no pools at all.
    #[error("no IP pool is defined: set ipam.pools in the network config or run `nodekitctl ipam pool add NAME CIDR`")]
    NoPools,
    /// A pool still holds addresses.
    #[error("pool {name:?} still holds {used} allocated addresses: release them or disable the pool instead")]
    PoolInUse {
        /// Pool name.
        name: String,
        /// Addresses allocated.
        used: u128,
    },
    /// No address is free in any candidate pool of a family.
    #[error("no free {family} address for node {node}: {}. Add an {family} pool (`nodekitctl ipam pool add NAME CIDR`) or free leaked addresses (`nodekitctl ipam check`, then `nodekitctl ipam release`)", describe(pools))]
    Exhausted {
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The node asking.
        node: String,
        /// Usage of the candidate pools of that family.
        pools: Vec<PoolUsage>,
    },
    /// CHECK found no allocation for the attachment, or different addresses.
    #[error("attachment {handle}: {reason}")]
    CheckFailed {
        /// Handle ID.
        handle: String,
        /// What differs.
        reason: String,
    },
    /// Another process has held the datastore lock too long.
    #[error("datastore lock {path} held by pid {holder} for {held_ms} ms; try again later")]
    LockTimeout {
        /// Lock file.
        path: PathBuf,
        /// Holder's pid.
        holder: u32,
        /// How long it has held it.
        held_ms: u64,
    },
    /// The etcd datastore cannot be reached (or did not answer in time).
    #[error("etcd at {endpoints} is unreachable: {reason}; try again later")]
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// The client's error.
        reason: String,
    },
    /// Every attempt of a transaction lost a race with other writers.
    #[error("the datastore stayed contended for {attempts} attempts; try again later")]
    Contended {
        /// Attempts made.
        attempts: usize,
    },
    /// Reading or writing the datastore failed.
    #[error("datastore {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The datastore holds something we cannot read.
    #[error("datastore is corrupt: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
}

fn describe(pools: &[PoolUsage]) -> String {
    if pools.is_empty() {
        return "no pool of that family".into();
    }
    pools
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<IpamError> for ErrorResult {
    fn from(err: IpamError) -> Self {
        let code = match &err {
            IpamError::InvalidPool { .. }
            | IpamError::PoolConflict { .. }
            | IpamError::InvalidConfig { .. }
            | IpamError::UnknownPool { .. }
            | IpamError::NoPools
            | IpamError::NoPoolForNode { .. }
            | IpamError::PoolInUse { .. } => code::INVALID_NETWORK_CONFIG,
            IpamError::Exhausted { .. } => code::POOL_EXHAUSTED,
            IpamError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            IpamError::CheckFailed { .. } => code::UNKNOWN_CONTAINER,
            IpamError::LockTimeout { .. }
            | IpamError::Unavailable { .. }
            | IpamError::Contended { .. } => code::TRY_AGAIN_LATER,
            IpamError::Io { .. } => code::IO_FAILURE,
            IpamError::Corrupt { .. } => code::DATASTORE,
        };
        ErrorResult::new(code, err.to_string())
    }
}
