//! The kernel operations the plugin needs, as small intent-named async functions over one
//! rtnetlink connection bound to one network namespace. Dumps are retried when the kernel
//! flags them NLM_F_DUMP_INTR (the table changed mid-dump).

use std::net::IpAddr;

use futures::StreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nodekit_nsutil::{NetNs, NsError};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
};

/// How often a dump interrupted by concurrent changes is retried before giving up.
const DUMP_RETRIES: usize = 10;

/// Where a route sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTarget {
    /// Via this next hop (on a connected subnet).
    Via(IpAddr),
    /// Via this next hop, onlink through this device (a VXLAN tunnel to that node).
    Tunnel {
        /// The next hop (the remote node's address, resolved by a neighbour entry).
        gateway: IpAddr,
        /// Interface index of the tunnel device.
        device: u32,
    },
    /// Dropped: a block this node owns, for addresses no pod holds.
    Blackhole,
}

/// Metric of blackhole routes, above a bridge's connected route for the same block.
pub const BLACKHOLE_METRIC: u32 = 4096;

/// A route's destination, target and protocol, read back from the kernel.
pub fn route_summary(route: &RouteMessage) -> Option<(IpNetwork, RouteTarget, u8)> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute};
    let dst_ip = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    })?;
    let dst = IpNetwork::new(dst_ip, route.header.destination_prefix_length).ok()?;
    let target = if route.header.kind == RouteType::BlackHole {
        RouteTarget::Blackhole
    } else {
        let gw = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })?;
        let onlink = route
            .header
            .flags
            .contains(netlink_packet_route::route::RouteFlags::Onlink);
        let device = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        match (onlink, device) {
            (true, Some(device)) => RouteTarget::Tunnel {
                gateway: gw,
                device,
            },
            _ => RouteTarget::Via(gw),
        }
    };
    Some((dst, target, u8::from(route.header.protocol)))
}

/// A failed kernel operation, naming what it was doing and to which object.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink request failed.
    #[error("{op} {target}: {source}")]
    Request {
        /// The operation ("create veth", "add route"...).
        op: &'static str,
        /// The object (interface name, address, route).
        target: String,
        /// rtnetlink's error (carries the errno).
        #[source]
        source: rtnetlink::Error,
    },
    /// A dump kept being interrupted.
    #[error("{what} dump interrupted {DUMP_RETRIES} times in a row")]
    DumpInterrupted {
        /// What was dumped.
        what: &'static str,
    },
    /// An object expected to exist does not.
    #[error("{what} {name} not found")]
    NotFound {
        /// Kind of object.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An interface of that name exists but is something else.
    #[error("{name} exists but is a {found}, not a {wanted}")]
    WrongKind {
        /// Interface name.
        name: String,
        /// What it is.
        found: String,
        /// What we need.
        wanted: &'static str,
    },
    /// Opening the socket (or entering the namespace) failed.
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// Entering the namespace failed.
    #[error(transparent)]
    Namespace(#[from] NsError),
}

impl NetlinkError {
    /// The errno of a failed request, if the kernel sent one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(-msg.raw_code()),
            _ => None,
        }
    }
}

fn request(
    op: &'static str,
    target: impl ToString,
) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let target = target.to_string();
    move |source| NetlinkError::Request { op, target, source }
}

/// An rtnetlink connection inside one namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Connects in the caller's namespace; the connection task runs on the current runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Connects inside `ns`: the socket is created on a thread that entered `ns` (a socket
    /// belongs to the namespace it was created in), then driven by the current runtime.
    pub fn connect_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns.run(move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.next().await {
            Some(Ok(link)) => Ok(Some(link)),
            Some(Err(e)) if is_errno(&e, libc::ENODEV) => Ok(None),
            Some(Err(e)) => Err(request("get link", name)(e)),
            None => Ok(None),
        }
    }

    /// Every link, consistent (retried on NLM_F_DUMP_INTR).
    pub async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        let msgs = self
            .dump("links", || {
                RouteNetlinkMessage::GetLink(LinkMessage::default())
            })
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Every address of interface `index`, consistent.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NetlinkError> {
        let msgs = self
            .dump("addresses", || {
                RouteNetlinkMessage::GetAddress(AddressMessage::default())
            })
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let ip = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    IpNetwork::new(ip, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// Every route of the main table, consistent.
    pub async fn routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut all = Vec::new();
        for v4 in [true, false] {
            let msgs = self
                .dump("routes", || {
                    let msg = if v4 {
                        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
                    } else {
                        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
                    };
                    RouteNetlinkMessage::GetRoute(msg)
                })
                .await?;
            all.extend(msgs.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            }));
        }
        Ok(all)
    }

    async fn dump(
        &self,
        what: &'static str,
        make: impl Fn() -> RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        for _ in 0..DUMP_RETRIES {
            let mut req = NetlinkMessage::from(make());
            req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut handle = self.handle.clone();
            let mut stream = handle.request(req).map_err(request("dump", what))?;
            let mut out = Vec::new();
            let mut interrupted = false;
            while let Some(msg) = stream.next().await {
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(err) if err.code.is_some() => {
                        return Err(request("dump", what)(rtnetlink::Error::NetlinkError(err)))
                    }
                    _ => {}
                }
            }
            if !interrupted {
                return Ok(out);
            }
            tracing::debug!(what, "dump interrupted, retrying");
        }
        Err(NetlinkError::DumpInterrupted { what })
    }

    /// Creates a veth pair: `host` here, `peer` born directly inside `peer_ns` (no move), both
    /// with `mtu`; `host_mac` fixes the host side's address (routed mode's ee:ee:...).
    pub async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_ns: &NetNs,
        mtu: u32,
        host_mac: Option<[u8; 6]>,
    ) -> Result<(), NetlinkError> {
        use std::os::fd::{AsFd, AsRawFd};
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_ns.as_fd().as_raw_fd())
            .build();
        let mut builder = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        if let Some(mac) = host_mac {
            builder = builder.address(mac.to_vec());
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(request("create veth", format!("{host} (peer {peer})")))
    }

    /// Deletes the link called `name`; `Ok(false)` when it was already gone.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(request("delete link", name)(e)),
        }
    }

    /// Makes sure a bridge `name` exists and is up, with a stable MAC (so adding ports never
    /// changes it) and `mtu`; tolerates a concurrent creator.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
    ) -> Result<LinkMessage, NetlinkError> {
        self.ensure_link(name, InfoKind::Bridge, "bridge", || {
            LinkBridge::new(name)
                .mtu(mtu)
                .address(mac.to_vec())
                .up()
                .build()
        })
        .await
    }

    /// The link `name` of kind `kind`, created from `build()` when absent; a concurrent
    /// creator is fine, an existing link of another kind is an error.
    async fn ensure_link(
        &self,
        name: &str,
        kind: InfoKind,
        wanted: &'static str,
        build: impl FnOnce() -> LinkMessage,
    ) -> Result<LinkMessage, NetlinkError> {
        if let Some(link) = self.link(name).await? {
            return check_kind(link, name, kind, wanted);
        }
        match self.handle.link().add(build()).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(request("create link", name)(e)),
        }
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| NetlinkError::NotFound {
                what: wanted,
                name: name.to_string(),
            })?;
        check_kind(link, name, kind, wanted)
    }

    /// Sets a link up.
    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request("set up", name))
    }

    /// Sets a link's MTU.
    pub async fn set_mtu(&self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request("set mtu", name))
    }

    /// Sets an interface alias (IFLA_IFALIAS), used to tag host veths with their attachment.
    pub async fn set_alias(&self, index: u32, name: &str, alias: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request("set alias", name))
    }

    /// Enslaves `port` to `bridge`, sets hairpin mode, and brings the port up.
    pub async fn attach_to_bridge(
        &self,
        port: u32,
        name: &str,
        bridge: u32,
        hairpin: bool,
    ) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(port)
            .controller(bridge)
            .up()
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request("enslave", name))?;
        if hairpin {
            let msg = LinkBridgePort::new(port).hairpin(true).build();
            self.handle
                .link()
                .set_port(msg)
                .execute()
                .await
                .map_err(request("set hairpin", name))?;
        }
        Ok(())
    }

    /// Adds `addr` to interface `index` (no DAD: the address is usable at once); already
    /// present is fine.
    pub async fn ensure_address(
        &self,
        index: u32,
        name: &str,
        addr: IpNetwork,
    ) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(index, addr.ip(), addr.prefix());
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(request("add address", format!("{addr} on {name}"))(e)),
        }
    }

    /// Adds a route to `dst` out of interface `index`, via `gw` when given (onlink: the
    /// gateway need not be in a connected subnet), scope link when there is no gateway.
    /// An identical route already present is fine.
    pub async fn ensure_route(
        &self,
        dst: IpNetwork,
        gw: Option<IpAddr>,
        index: u32,
        name: &str,
    ) -> Result<(), NetlinkError> {
        let target = format!("{dst} via {gw:?} dev {name}");
        let invalid = |e: String| NetlinkError::Request {
            op: "build route",
            target: target.clone(),
            source: rtnetlink::Error::InvalidNla(e),
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.ip(), dst.prefix())
            .map_err(|e| invalid(e.to_string()))?
            .output_interface(index);
        builder = match gw {
            Some(gw) => builder
                .gateway(gw)
                .map_err(|e| invalid(e.to_string()))?
                .onlink(),
            None => builder.scope(RouteScope::Link),
        };
        match self.handle.route().add(builder.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(request("add route", target.clone())(e)),
        }
    }

    /// Makes the main table route to `dst` what `target` says (replacing whatever route to
    /// `dst` had that metric), tagged with `protocol` so its owner can find its routes again.
    pub async fn replace_route(
        &self,
        dst: IpNetwork,
        target: RouteTarget,
        protocol: u8,
    ) -> Result<(), NetlinkError> {
        let label = format!("{dst} {target:?}");
        let invalid = |e: String| NetlinkError::Request {
            op: "build route",
            target: label.clone(),
            source: rtnetlink::Error::InvalidNla(e),
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.ip(), dst.prefix())
            .map_err(|e| invalid(e.to_string()))?
            .protocol(RouteProtocol::from(protocol));
        builder = match target {
            RouteTarget::Via(gw) => builder.gateway(gw).map_err(|e| invalid(e.to_string()))?,
            RouteTarget::Tunnel { gateway, device } => builder
                .gateway(gateway)
                .map_err(|e| invalid(e.to_string()))?
                .output_interface(device)
                .onlink(),
            RouteTarget::Blackhole => builder
                .kind(RouteType::BlackHole)
                .priority(BLACKHOLE_METRIC),
        };
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(request("replace route", label.clone()))
    }

    /// Deletes exactly `route` (as dumped); already gone is fine.
    pub async fn delete_route(&self, route: RouteMessage) -> Result<(), NetlinkError> {
        match self.handle.route().del(route).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            Err(e) => Err(request("delete route", "")(e)),
        }
    }

    /// Makes sure a VXLAN device exists and is up (VNI, UDP port, local address, MAC, MTU,
    /// no learning: netd programs FDB and neighbour entries itself); an existing one gets
    /// `mtu` if it has another. Returns its index.
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: std::net::Ipv4Addr,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        let link = self
            .ensure_link(name, InfoKind::Vxlan, "vxlan", || {
                rtnetlink::LinkVxlan::new(name, vni)
                    .port(port)
                    .local(local)
                    .learning(false)
                    .mtu(mtu)
                    .address(mac.to_vec())
                    .up()
                    .build()
            })
            .await?;
        if link_mtu(&link) != Some(mtu) {
            self.set_mtu(link.header.index, name, mtu).await?;
        }
        Ok(link.header.index)
    }

    /// A permanent FDB entry on a VXLAN device: frames for `mac` go to `remote`.
    pub async fn ensure_fdb(
        &self,
        device: u32,
        mac: [u8; 6],
        remote: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(device, &mac)
            .destination(remote)
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(request("add fdb entry", remote))
    }

    /// The interface that has `ip` configured, with that address and its prefix.
    pub async fn link_with_address(
        &self,
        ip: IpAddr,
    ) -> Result<Option<(LinkMessage, IpNetwork)>, NetlinkError> {
        for link in self.links().await? {
            if let Some(net) = self
                .addresses(link.header.index)
                .await?
                .into_iter()
                .find(|n| n.ip() == ip)
            {
                return Ok(Some((link, net)));
            }
        }
        Ok(None)
    }

    /// The FDB entries of VXLAN device `device` that send a MAC to a remote (one per MAC
    /// and remote; the device's own multicast addresses are left out).
    pub async fn fdb_entries(&self, device: u32) -> Result<Vec<([u8; 6], IpAddr)>, NetlinkError> {
        let msgs = self
            .dump("fdb", || {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                RouteNetlinkMessage::GetNeighbour(msg)
            })
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == device => {
                    let mac = neighbour_mac(&n)?;
                    let remote = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(d) => neighbour_ip(d),
                        _ => None,
                    })?;
                    Some((mac, remote))
                }
                _ => None,
            })
            .collect())
    }

    /// Deletes the FDB entry sending `mac` to `remote` on `device`; already gone is fine.
    pub async fn delete_fdb(
        &self,
        device: u32,
        mac: [u8; 6],
        remote: IpAddr,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = device;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
            NeighbourAttribute::Destination(remote.into()),
        ];
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(request("delete fdb entry", remote)(e)),
        }
    }

    /// The permanent neighbour entries (IPv4 and IPv6) on interface `index`: the ones
    /// [`Netlink::ensure_neighbour`] makes, not those the kernel resolves by itself. One dump
    /// of both families, which the kernel already narrows to the interface (NDA_IFINDEX).
    pub async fn permanent_neighbours(
        &self,
        index: u32,
    ) -> Result<Vec<(IpAddr, [u8; 6])>, NetlinkError> {
        let msgs = self
            .dump("neighbours", || {
                let mut msg = NeighbourMessage::default();
                msg.attributes = vec![NeighbourAttribute::IfIndex(index)];
                RouteNetlinkMessage::GetNeighbour(msg)
            })
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == index && n.header.state == NeighbourState::Permanent =>
                {
                    let ip = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(d) => neighbour_ip(d),
                        _ => None,
                    })?;
                    Some((ip, neighbour_mac(&n)?))
                }
                _ => None,
            })
            .collect())
    }

    /// Deletes the neighbour entry for `ip` on interface `index`; already gone is fine.
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.ifindex = index;
        msg.attributes = vec![NeighbourAttribute::Destination(ip.into())];
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(request("delete neighbour", ip)(e)),
        }
    }

    /// A permanent neighbour entry, so the pod never has to resolve its gateway.
    pub async fn ensure_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request("add neighbour", ip))
    }
}

fn check_kind(
    link: LinkMessage,
    name: &str,
    kind: InfoKind,
    wanted: &'static str,
) -> Result<LinkMessage, NetlinkError> {
    let found = link_kind(&link);
    if found.as_ref() == Some(&kind) {
        Ok(link)
    } else {
        Err(NetlinkError::WrongKind {
            name: name.to_string(),
            found: found
                .map(|k| k.to_string())
                .unwrap_or_else(|| "device".into()),
            wanted,
        })
    }
}

/// The link's kind (veth, bridge...).
pub fn link_kind(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// The link's MTU.
pub fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

/// A neighbour or FDB entry's link-layer address, when it is a MAC.
fn neighbour_mac(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}

/// An entry's destination as an IP address (FDB dumps carry it as raw bytes).
fn neighbour_ip(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// The link's MAC in colon form.
pub fn link_mac(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(format_mac(mac)),
            _ => None,
        })
        .unwrap_or_default()
}

/// The link's name.
pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The ifindex of a veth's peer (IFLA_LINK), in the peer's namespace.
pub fn link_peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// The link's alias.
pub fn link_alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Lower-case colon-separated MAC.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn is_errno(err: &rtnetlink::Error, errno: i32) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if -msg.raw_code() == errno)
}
