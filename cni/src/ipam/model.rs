//! Calico's IPAM data model: pools carved into fixed-size blocks, blocks claimed by nodes
//! (affinity), addresses recorded per block under a handle (one attachment).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::IpamError;

/// Default block prefix for IPv4 pools (64 addresses), as Calico.
pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
/// Default block prefix for IPv6 pools (64 addresses), as Calico.
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

/// A named range that blocks are carved from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// The range, network-aligned.
    pub cidr: IpNetwork,
    /// Prefix length of each block.
    #[serde(rename = "blockSize")]
    pub block_size: u8,
    /// A disabled pool hands out no new addresses; existing ones stay.
    #[serde(default)]
    pub disabled: bool,
    /// Node labels a node must have (all of them) to allocate from this pool; empty: any node.
    #[serde(
        rename = "nodeSelector",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub node_selector: BTreeMap<String, String>,
    /// Never borrow single addresses from other nodes' blocks of this pool.
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: bool,
    /// Masquerade pod traffic from this pool to destinations outside every pool.
    #[serde(rename = "natOutgoing", default)]
    pub nat_outgoing: bool,
    /// When traffic to this pool's blocks on other nodes is VXLAN-encapsulated.
    #[serde(rename = "vxlanMode", default)]
    pub vxlan_mode: VxlanMode,
}

/// Bytes VXLAN adds to every packet: pods of an encapsulated pool get a path MTU this much
/// below their node's underlay MTU.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The underlay MTU assumed for a node that has not recorded its own (netd records it).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The MTU left inside VXLAN over an underlay link of `underlay_mtu`.
pub fn vxlan_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// Calico's encapsulation choice per pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VxlanMode {
    /// Direct routing: nodes share one L2.
    #[default]
    Never,
    /// Always encapsulate.
    Always,
    /// Encapsulate only towards nodes in another subnet.
    CrossSubnet,
}

impl Pool {
    /// A pool with the family's default block size when `block_size` is `None`, validated.
    pub fn new(name: &str, cidr: IpNetwork, block_size: Option<u8>) -> Result<Self, IpamError> {
        let block_size = block_size.unwrap_or(if cidr.is_ipv4() {
            DEFAULT_BLOCK_SIZE_V4
        } else {
            DEFAULT_BLOCK_SIZE_V6
        });
        let pool = Self {
            name: name.to_string(),
            cidr,
            block_size,
            disabled: false,
            node_selector: BTreeMap::new(),
            strict_affinity: false,
            nat_outgoing: false,
            vxlan_mode: VxlanMode::Never,
        };
        pool.validate()?;
        Ok(pool)
    }

    /// Checks name, alignment and block size; every error names the pool and the field.
    pub fn validate(&self) -> Result<(), IpamError> {
        let invalid = |field: &str, reason: String| IpamError::InvalidPool {
            pool: self.name.clone(),
            field: field.to_string(),
            reason,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "name",
                "use letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if self.cidr.network() != self.cidr.ip() {
            return Err(invalid(
                "cidr",
                format!(
                    "{} is not network-aligned (did you mean {}/{}?)",
                    self.cidr,
                    self.cidr.network(),
                    self.cidr.prefix()
                ),
            ));
        }
        let (min, max) = if self.cidr.is_ipv4() {
            (20, 30)
        } else {
            (116, 126)
        };
        if !(min..=max).contains(&self.block_size) {
            return Err(invalid(
                "blockSize",
                format!(
                    "{} is outside {min}..={max} for this family",
                    self.block_size
                ),
            ));
        }
        if self.block_size < self.cidr.prefix() {
            return Err(invalid(
                "blockSize",
                format!(
                    "/{} blocks do not fit in {} (the block must be no larger than the pool)",
                    self.block_size, self.cidr
                ),
            ));
        }
        Ok(())
    }

    /// How many blocks the pool holds.
    pub fn block_count(&self) -> u128 {
        1u128 << (self.block_size - self.cidr.prefix()).min(127)
    }

    /// The `index`th block's range.
    pub fn block_cidr(&self, index: u128) -> IpNetwork {
        let step = 1u128 << (bits(&self.cidr) - self.block_size);
        let start = to_u128(self.cidr.network()) + index * step;
        network(from_u128(start, self.cidr.is_ipv4()), self.block_size)
    }

    /// The block of this pool containing `ip` (None when outside the pool).
    pub fn block_of(&self, ip: IpAddr) -> Option<IpNetwork> {
        if !self.cidr.contains(ip) {
            return None;
        }
        let block = network(ip, self.block_size);
        Some(network(block.network(), self.block_size))
    }

    /// Addresses a pod can get in one block.
    pub fn usable_per_block(&self) -> u128 {
        let size = 1u128 << (bits(&self.cidr) - self.block_size);
        size - reserved_count(self.cidr.is_ipv4())
    }

    /// Addresses pods can get in the whole pool.
    pub fn capacity(&self) -> u128 {
        self.block_count().saturating_mul(self.usable_per_block())
    }

    /// Whether the pool is IPv4.
    pub fn is_v4(&self) -> bool {
        self.cidr.is_ipv4()
    }

    /// Whether a node with `labels` may allocate from this pool.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A block claimed by a node (or by nobody once released), with its allocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The block's range.
    pub cidr: IpNetwork,
    /// The pool it was carved from.
    pub pool: String,
    /// The node that allocates from it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Ordinal within the block -> handle ID.
    #[serde(default)]
    pub allocations: BTreeMap<u32, String>,
}

impl Block {
    /// A new, empty block.
    pub fn new(cidr: IpNetwork, pool: &str, affinity: Option<&str>) -> Self {
        Self {
            cidr,
            pool: pool.to_string(),
            affinity: affinity.map(str::to_string),
            allocations: BTreeMap::new(),
        }
    }

    /// The key blocks are stored under.
    pub fn key(&self) -> String {
        self.cidr.to_string()
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u32 {
        let host_bits = bits(&self.cidr) - self.cidr.prefix();
        1u32 << host_bits.min(31)
    }

    /// Whether `ordinal` is kept back: the first address (the network / IPv6 subnet-router
    /// anycast), the second (the gateway pods use in bridge mode) and, for IPv4, the last
    /// (broadcast of the block's subnet).
    pub fn is_reserved(&self, ordinal: u32) -> bool {
        ordinal < 2 || (self.cidr.is_ipv4() && ordinal == self.size() - 1)
    }

    /// Addresses pods can get from this block.
    pub fn usable(&self) -> u32 {
        self.size() - reserved_count(self.cidr.is_ipv4()) as u32
    }

    /// The block gateway: its second address.
    pub fn gateway(&self) -> IpAddr {
        self.address(1)
    }

    /// The address at `ordinal`.
    pub fn address(&self, ordinal: u32) -> IpAddr {
        from_u128(
            to_u128(self.cidr.network()) + u128::from(ordinal),
            self.cidr.is_ipv4(),
        )
    }

    /// The ordinal of `ip`, if it lies in the block.
    pub fn ordinal(&self, ip: IpAddr) -> Option<u32> {
        self.cidr
            .contains(ip)
            .then(|| (to_u128(ip) - to_u128(self.cidr.network())) as u32)
    }

    /// The lowest free, unreserved ordinal.
    pub fn first_free(&self) -> Option<u32> {
        (0..self.size()).find(|o| !self.is_reserved(*o) && !self.allocations.contains_key(o))
    }
}

/// One attachment's allocations, so DEL releases exactly what ADD took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// `NETWORK.CONTAINERID.IFNAME`.
    pub id: String,
    /// Network name from the config.
    pub network: String,
    /// CNI_CONTAINERID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// Node that made the allocation.
    pub node: String,
    /// CNI_NETNS at ADD time; `ipam check` treats a vanished namespace as a dead attachment.
    #[serde(default)]
    pub netns: String,
    /// Addresses held, with their block's prefix length.
    pub addresses: Vec<IpNetwork>,
    /// `NAMESPACE/NAME` of the Kubernetes pod (CNI_ARGS), for `ipam check` reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// A node known to the IPAM: its labels select pools; netd registers its address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name (the `nodeName` plugins allocate for).
    pub name: String,
    /// The node's underlay address, routes to its blocks go via it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// A second underlay address of the other family (IPv6 blocks route via an IPv6 one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<IpAddr>,
    /// Labels matched against pools' `nodeSelector`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// MAC of the node's VXLAN device, for other nodes' FDB and neighbour entries.
    #[serde(rename = "vxlanMac", default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mac: Option<String>,
    /// MTU of the underlay link carrying [`NodeInfo::ip`], as netd found it.
    #[serde(
        rename = "underlayMtu",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub underlay_mtu: Option<u32>,
}

impl Handle {
    /// The handle ID of an attachment.
    pub fn id_for(network: &str, container_id: &str, ifname: &str) -> String {
        format!("{network}.{container_id}.{ifname}")
    }
}

/// The whole IPAM state a transaction sees. Mutations go through methods that remember which
/// records changed, so a commit writes exactly those (no copy of the state, no diff), and a
/// failed transaction's state is simply thrown away. Blocks and handles are `Arc`s, so the
/// copies made for reports are cheap.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IpamState {
    /// Pools by name.
    #[serde(default)]
    pools: BTreeMap<String, Pool>,
    /// Blocks by CIDR string.
    #[serde(default)]
    blocks: BTreeMap<String, Arc<Block>>,
    /// Handles by ID.
    #[serde(default)]
    handles: BTreeMap<String, Arc<Handle>>,
    /// Nodes by name.
    #[serde(default)]
    nodes: BTreeMap<String, NodeInfo>,
    /// Records changed since the last [`IpamState::take_changes`].
    #[serde(skip)]
    changed: BTreeSet<RecordKey>,
}

/// Which record changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordKey {
    /// A pool, by name.
    Pool(String),
    /// A block, by CIDR.
    Block(String),
    /// A handle, by ID.
    Handle(String),
    /// A node, by name.
    Node(String),
}

/// One changed record with its new value (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A pool written or deleted.
    Pool(String, Option<Pool>),
    /// A block written or deleted.
    Block(String, Option<Arc<Block>>),
    /// A handle written or deleted.
    Handle(String, Option<Arc<Handle>>),
    /// A node written or deleted.
    Node(String, Option<NodeInfo>),
}

impl PartialEq for IpamState {
    fn eq(&self, other: &Self) -> bool {
        self.pools == other.pools
            && self.blocks == other.blocks
            && self.handles == other.handles
            && self.nodes == other.nodes
    }
}

impl Eq for IpamState {}

impl NodeInfo {
    /// The node's underlay address of a family, if it has one.
    pub fn address(&self, v4: bool) -> Option<IpAddr> {
        [self.ip, self.ip6]
            .into_iter()
            .flatten()
            .find(|ip| ip.is_ipv4() == v4)
    }

    /// The MTU pods of this node get in an encapsulated pool: its recorded underlay MTU
    /// (else [`DEFAULT_UNDERLAY_MTU`]) less [`VXLAN_OVERHEAD`].
    pub fn vxlan_mtu(&self) -> u32 {
        vxlan_mtu(self.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU))
    }
}

impl IpamState {
    /// Pools by name.
    pub fn pools(&self) -> &BTreeMap<String, Pool> {
        &self.pools
    }

    /// Blocks by CIDR string.
    pub fn blocks(&self) -> &BTreeMap<String, Arc<Block>> {
        &self.blocks
    }

    /// Handles by ID.
    pub fn handles(&self) -> &BTreeMap<String, Arc<Handle>> {
        &self.handles
    }

    /// Nodes by name.
    pub fn nodes(&self) -> &BTreeMap<String, NodeInfo> {
        &self.nodes
    }

    /// The VXLAN pod MTU of node `name` ([`NodeInfo::vxlan_mtu`]; the default underlay's
    /// for a node not registered yet).
    pub fn vxlan_mtu_of(&self, name: &str) -> u32 {
        self.nodes
            .get(name)
            .map_or(vxlan_mtu(DEFAULT_UNDERLAY_MTU), NodeInfo::vxlan_mtu)
    }

    /// Writes a node.
    pub fn put_node(&mut self, node: NodeInfo) {
        self.changed.insert(RecordKey::Node(node.name.clone()));
        self.nodes.insert(node.name.clone(), node);
    }

    /// Deletes a node.
    pub fn remove_node(&mut self, name: &str) -> Option<NodeInfo> {
        self.changed.insert(RecordKey::Node(name.to_string()));
        self.nodes.remove(name)
    }

    /// Writes a pool.
    pub fn put_pool(&mut self, pool: Pool) {
        self.changed.insert(RecordKey::Pool(pool.name.clone()));
        self.pools.insert(pool.name.clone(), pool);
    }

    /// A pool to modify.
    pub fn pool_mut(&mut self, name: &str) -> Option<&mut Pool> {
        let pool = self.pools.get_mut(name)?;
        self.changed.insert(RecordKey::Pool(name.to_string()));
        Some(pool)
    }

    /// Deletes a pool.
    pub fn remove_pool(&mut self, name: &str) -> Option<Pool> {
        self.changed.insert(RecordKey::Pool(name.to_string()));
        self.pools.remove(name)
    }

    /// Writes a block.
    pub fn put_block(&mut self, block: Block) {
        self.changed.insert(RecordKey::Block(block.key()));
        self.blocks.insert(block.key(), Arc::new(block));
    }

    /// A block to modify (copied first if a report still shares it).
    pub fn block_mut(&mut self, key: &str) -> Option<&mut Block> {
        let block = self.blocks.get_mut(key)?;
        self.changed.insert(RecordKey::Block(key.to_string()));
        Some(Arc::make_mut(block))
    }

    /// Deletes a block.
    pub fn remove_block(&mut self, key: &str) -> Option<Arc<Block>> {
        self.changed.insert(RecordKey::Block(key.to_string()));
        self.blocks.remove(key)
    }

    /// Writes a handle.
    pub fn put_handle(&mut self, handle: Handle) {
        self.changed.insert(RecordKey::Handle(handle.id.clone()));
        self.handles.insert(handle.id.clone(), Arc::new(handle));
    }

    /// Deletes a handle.
    pub fn remove_handle(&mut self, id: &str) -> Option<Arc<Handle>> {
        self.changed.insert(RecordKey::Handle(id.to_string()));
        self.handles.remove(id)
    }

    /// The records changed since the last call, with their current values; forgets them.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|key| match key {
                RecordKey::Pool(k) => {
                    let v = self.pools.get(&k).cloned();
                    Change::Pool(k, v)
                }
                RecordKey::Block(k) => {
                    let v = self.blocks.get(&k).cloned();
                    Change::Block(k, v)
                }
                RecordKey::Handle(k) => {
                    let v = self.handles.get(&k).cloned();
                    Change::Handle(k, v)
                }
                RecordKey::Node(k) => {
                    let v = self.nodes.get(&k).cloned();
                    Change::Node(k, v)
                }
            })
            .collect()
    }

    /// Applies changes read back from a datastore (they are not changes of this state).
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            match change {
                Change::Pool(k, Some(v)) => drop(self.pools.insert(k, v)),
                Change::Pool(k, None) => drop(self.pools.remove(&k)),
                Change::Block(k, Some(v)) => drop(self.blocks.insert(k, v)),
                Change::Block(k, None) => drop(self.blocks.remove(&k)),
                Change::Handle(k, Some(v)) => drop(self.handles.insert(k, v)),
                Change::Handle(k, None) => drop(self.handles.remove(&k)),
                Change::Node(k, Some(v)) => drop(self.nodes.insert(k, v)),
                Change::Node(k, None) => drop(self.nodes.remove(&k)),
            }
        }
    }
}

fn reserved_count(v4: bool) -> u128 {
    if v4 {
        3
    } else {
        2
    }
}

fn bits(net: &IpNetwork) -> u8 {
    if net.is_ipv4() {
        32
    } else {
        128
    }
}

fn network(ip: IpAddr, prefix: u8) -> IpNetwork {
    let total = if ip.is_ipv4() { 32 } else { 128 };
    let host_bits = u32::from(total - prefix);
    let mask = if host_bits >= 128 {
        0
    } else {
        !0u128 << host_bits
    };
    let masked = from_u128(to_u128(ip) & mask, ip.is_ipv4());
    // The prefix is within range because callers pass a validated pool or block prefix.
    IpNetwork::new(masked, prefix).unwrap_or_else(|_| IpNetwork::from(masked))
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((value as u32).into())
    } else {
        IpAddr::V6(value.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_carved_into_aligned_blocks() {
        let pool = Pool::new("p", "10.244.0.0/16".parse().unwrap(), None).unwrap();
        assert_eq!(pool.block_size, 26);
        assert_eq!(pool.block_count(), 1024);
        assert_eq!(pool.block_cidr(0).to_string(), "10.244.0.0/26");
        assert_eq!(pool.block_cidr(5).to_string(), "10.244.1.64/26");
        assert_eq!(
            pool.block_of("10.244.1.70".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.244.1.64/26"
        );
        assert_eq!(pool.usable_per_block(), 61);
        let v6 = Pool::new("p6", "fd00:10::/112".parse().unwrap(), None).unwrap();
        assert_eq!(v6.block_size, 122);
        assert_eq!(v6.block_cidr(1).to_string(), "fd00:10::40/122");
        assert_eq!(v6.usable_per_block(), 62);
    }

    #[test]
    fn the_vxlan_mtu_is_the_nodes_underlay_mtu_less_the_overhead() {
        assert_eq!(vxlan_mtu(9000), 8950);
        assert_eq!(vxlan_mtu(1400), 1350);
        assert_eq!(vxlan_mtu(20), 0);
        let mut state = IpamState::default();
        state.put_node(NodeInfo {
            name: "jumbo".into(),
            underlay_mtu: Some(9000),
            ..Default::default()
        });
        state.put_node(NodeInfo {
            name: "old".into(),
            ..Default::default()
        });
        assert_eq!(state.vxlan_mtu_of("jumbo"), 8950);
        assert_eq!(
            state.vxlan_mtu_of("old"),
            1450,
            "not recorded: 1500 assumed"
        );
        assert_eq!(state.vxlan_mtu_of("unknown"), 1450);
        let json = serde_json::to_value(&state.nodes()["jumbo"]).unwrap();
        assert_eq!(json["underlayMtu"], 9000);
        let json = serde_json::to_value(&state.nodes()["old"]).unwrap();
        assert!(json.get("underlayMtu").is_none(), "{json}");
    }

    #[test]
    fn invalid_pools_name_the_field() {
        let err = Pool::new("p", "10.244.0.1/16".parse().unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("cidr"), "{err}");
        let err = Pool::new("p", "10.244.0.0/24".parse().unwrap(), Some(31)).unwrap_err();
        assert!(err.to_string().contains("blockSize"), "{err}");
        let err = Pool::new("p", "10.244.0.0/24".parse().unwrap(), Some(22)).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let err = Pool::new("bad name", "10.0.0.0/24".parse().unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
    }

    #[test]
    fn blocks_reserve_network_gateway_and_broadcast() {
        let block = Block::new("10.0.0.0/29".parse().unwrap(), "p", Some("n1"));
        assert_eq!(block.size(), 8);
        assert_eq!(block.usable(), 5);
        assert_eq!(block.gateway().to_string(), "10.0.0.1");
        assert_eq!(block.first_free(), Some(2));
        assert!(block.is_reserved(7));
        assert_eq!(block.ordinal("10.0.0.6".parse().unwrap()), Some(6));
        assert_eq!(block.ordinal("10.0.0.9".parse().unwrap()), None);
        let v6 = Block::new("fd00::/126".parse().unwrap(), "p", None);
        assert_eq!(v6.usable(), 2);
        assert_eq!(v6.address(3).to_string(), "fd00::3");
    }
}
