//! Read-only views of a network namespace through rtnetlink: its links (name, MAC, veth
//! peer index, kind, up), addresses and IPv4 routes. The netlink socket is opened on a thread inside the
//! namespace (via [`NetNs::run`]) with a single-threaded tokio runtime built there, so no
//! runner thread ever changes namespace and nothing here writes to the kernel.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use nodekit_nsutil::{NetNs, NsError};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

/// Inspecting a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// The tokio runtime or the netlink socket could not be created.
    #[error("cannot open a netlink socket in {ns}: {source}")]
    Socket {
        /// The namespace path.
        ns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dump request failed.
    #[error("netlink dump in {ns} failed: {source}")]
    Netlink {
        /// The namespace path.
        ns: String,
        /// The underlying error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// One link of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkView {
    /// The ifindex.
    pub index: u32,
    /// The name.
    pub name: String,
    /// The link-layer address, lower-case `aa:bb:..`.
    pub mac: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// The kind (`veth`, `bridge`, `dummy`...), if the link has one.
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
}

/// One address of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrView {
    /// The ifindex of the link holding it.
    pub index: u32,
    /// The address with its prefix length.
    pub address: IpNetwork,
}

/// A namespace's links and addresses at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// Every link.
    pub links: Vec<LinkView>,
    /// Every address.
    pub addrs: Vec<AddrView>,
}

impl NetState {
    /// The link called `name`.
    pub fn link(&self, name: &str) -> Option<&LinkView> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The link with ifindex `index`.
    pub fn link_by_index(&self, index: u32) -> Option<&LinkView> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The addresses on link `index`.
    pub fn addrs_of(&self, index: u32) -> Vec<IpNetwork> {
        self.addrs
            .iter()
            .filter(|a| a.index == index)
            .map(|a| a.address)
            .collect()
    }

    /// Links present here but not in `before` (compared by index and name), as
    /// `name (kind)` strings for messages.
    pub fn new_links_since(&self, before: &NetState) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| {
                !before
                    .links
                    .iter()
                    .any(|b| b.index == l.index && b.name == l.name)
            })
            .map(|l| match &l.kind {
                Some(k) => format!("{} ({k})", l.name),
                None => l.name.clone(),
            })
            .collect()
    }

    /// Names of the links other than loopback.
    pub fn non_loopback(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| l.name != "lo")
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Dumps the links and addresses of `ns`.
pub fn dump(ns: &NetNs) -> Result<NetState, InspectError> {
    let name = ns.path().display().to_string();
    ns.run(move || dump_here(&name))?
}

/// One IPv4 route of a namespace's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    /// The destination prefix.
    pub dst: IpNetwork,
    /// The next hop, if the route has one.
    pub gateway: Option<IpAddr>,
    /// The routing protocol number (`RTPROT_*`; nodekit-netd uses 78).
    pub protocol: u8,
}

/// Dumps the IPv4 routes of `ns`.
pub fn routes(ns: &NetNs) -> Result<Vec<RouteView>, InspectError> {
    let name = ns.path().display().to_string();
    ns.run(move || routes_here(&name))?
}

fn routes_here(ns: &str) -> Result<Vec<RouteView>, InspectError> {
    let netlink = netlink_err(ns);
    with_netlink(ns, |handle| async move {
        let mut out = Vec::new();
        let mut dump = handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = dump.try_next().await.map_err(&netlink)? {
            if let Some(r) = route_from(&msg) {
                out.push(r);
            }
        }
        Ok(out)
    })
}

/// Runs `work` with an rtnetlink handle opened in the calling thread's namespace (`ns`
/// names it in errors).
fn with_netlink<T, F, Fut>(ns: &str, work: F) -> Result<T, InspectError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, InspectError>>,
{
    let socket = |source| InspectError::Socket {
        ns: ns.to_string(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(socket)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(socket)?;
        let task = tokio::spawn(conn);
        let out = work(handle).await;
        task.abort();
        out
    })
}

/// Maps an rtnetlink error to [`InspectError::Netlink`] naming namespace `ns`.
fn netlink_err(ns: &str) -> impl Fn(rtnetlink::Error) -> InspectError + '_ {
    move |source| InspectError::Netlink {
        ns: ns.to_string(),
        source,
    }
}

/// The view of one route message (a dump's, or a multicast notification's).
pub(crate) fn route_from(msg: &RouteMessage) -> Option<RouteView> {
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let dst = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => ip(d),
            _ => None,
        })
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let gateway = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => ip(g),
        _ => None,
    });
    Some(RouteView {
        dst: IpNetwork::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway,
        protocol: u8::from(msg.header.protocol),
    })
}

fn dump_here(ns: &str) -> Result<NetState, InspectError> {
    let netlink = netlink_err(ns);
    with_netlink(ns, |handle| async move {
        let mut state = NetState::default();
        let mut links = handle.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(&netlink)? {
            state.links.push(link_from(msg));
        }
        let mut addrs = handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(&netlink)? {
            if let Some(a) = addr_from(msg) {
                state.addrs.push(a);
            }
        }
        Ok(state)
    })
}

fn link_from(msg: LinkMessage) -> LinkView {
    let mut link = LinkView {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        peer_index: None,
        kind: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(bytes) => {
                link.mac = Some(
                    bytes
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
            LinkAttribute::Link(peer) => link.peer_index = Some(peer),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn addr_from(msg: AddressMessage) -> Option<AddrView> {
    let mut local: Option<IpAddr> = None;
    let mut address: Option<IpAddr> = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
    // point-to-point links); IPv6 only sends IFA_ADDRESS.
    let ip = local.or(address)?;
    IpNetwork::new(ip, msg.header.prefix_len)
        .ok()
        .map(|address| AddrView {
            index: msg.header.index,
            address,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_nsutil::{unique_name, NamedNetNs};

    #[test]
    fn a_fresh_namespace_has_only_loopback_up_with_its_addresses() {
        let ns = NamedNetNs::create(&unique_name("inspect")).expect("create netns (needs root)");
        let state = dump(&ns).expect("dump");
        let lo = state.link("lo").expect("lo exists");
        assert!(lo.up);
        assert_eq!(lo.mac.as_deref(), Some("00:00:00:00:00:00"));
        assert!(state.non_loopback().is_empty());
        let addrs = state.addrs_of(lo.index);
        assert!(
            addrs.contains(&"127.0.0.1/8".parse().expect("cidr")),
            "{addrs:?}"
        );
        assert!(state.new_links_since(&state).is_empty());
    }
}
