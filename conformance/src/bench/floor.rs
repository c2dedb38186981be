//! The floor: the bare kernel work of wiring a pod, done in-process through rtnetlink with
//! no plugin process, no IPAM and no state, as a lower bound for the plugins' figures.
//!
//! ADD: create a veth pair whose peer is born inside the pod namespace (`IFLA_NET_NS_FD` on
//! the peer, as nodekit does), set the host end up, then — on a netlink socket opened by a
//! thread inside the pod namespace — look the pod end up, set it up, add its address and a
//! default route. DEL: delete the host end (the kernel removes the pod end with it).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use futures::TryStreamExt;
use nodekit_nsutil::{NetNs, NsError};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use tokio::runtime::Runtime;

/// The MTU of both veth ends, as in the plugins' configurations.
const MTU: u32 = 1500;

/// A floor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// A namespace could not be entered.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// The worker's tokio runtime could not be built.
    #[error("cannot start a tokio runtime for the floor: {0}")]
    Runtime(#[source] std::io::Error),
    /// A netlink socket could not be opened in a namespace.
    #[error("cannot open a netlink socket in {ns}: {source}")]
    Socket {
        /// The namespace path.
        ns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{op} {target}: {source}")]
    Request {
        /// What was being done ("create veth", "add route"...).
        op: &'static str,
        /// The object it was done to.
        target: String,
        /// rtnetlink's error (carries the errno).
        #[source]
        source: rtnetlink::Error,
    },
    /// The pod end of the veth is not in the pod namespace after creation.
    #[error("{ifname} not found in {ns} right after creating it")]
    Vanished {
        /// The interface name.
        ifname: String,
        /// The pod namespace path.
        ns: String,
    },
}

fn request(op: &'static str, target: &str) -> impl FnOnce(rtnetlink::Error) -> FloorError {
    let target = target.to_string();
    move |source| FloorError::Request { op, target, source }
}

/// One pod to wire: names, namespace and IPv4 addressing.
#[derive(Debug, Clone, Copy)]
pub struct FloorPod<'a> {
    /// The host end's name (at most 15 bytes).
    pub host: &'a str,
    /// The pod end's name inside the pod.
    pub ifname: &'a str,
    /// The pod namespace.
    pub ns: &'a NetNs,
    /// The pod's address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway (added onlink).
    pub gateway: Ipv4Addr,
}

/// The address of pod `index`: `10.99.0.0/16` from `.0.2` up, skipping `.0` and `.1` in
/// each /24-sized step of 200 so no address is a network or broadcast one. Distinct for
/// `index < 51_200`.
pub fn pod_address(index: usize) -> Ipv4Addr {
    let hi = (index / 200) % 256;
    let lo = index % 200 + 2;
    Ipv4Addr::new(10, 99, hi as u8, lo as u8)
}

/// The floor's gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// One benchmark worker's netlink context: a single-threaded tokio runtime and a netlink
/// connection inside the node namespace, reused for every operation of the worker.
#[derive(Debug)]
pub struct FloorWorker {
    rt: Runtime,
    node: Handle,
}

impl FloorWorker {
    /// A worker whose node-side socket lives in `node_ns` (created on a thread inside it).
    pub fn new(node_ns: &NetNs) -> Result<Self, FloorError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(FloorError::Runtime)?;
        let (_driver, node) = connect_in(&rt, node_ns)?;
        Ok(Self { rt, node })
    }

    /// Wires `pod` (see the module docs). The pod-side socket is opened and closed within
    /// the call, as a plugin must for every pod.
    pub fn add(&self, pod: &FloorPod<'_>) -> Result<(), FloorError> {
        self.rt.block_on(async {
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(pod.ifname.to_string())
                .mtu(MTU)
                .setns_by_fd(pod.ns.as_fd().as_raw_fd())
                .build();
            let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(pod.host.to_string())
                .mtu(MTU)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            self.node
                .link()
                .add(veth)
                .execute()
                .await
                .map_err(request("create veth", pod.host))?;
            self.node
                .link()
                .set(LinkUnspec::new_with_name(pod.host).up().build())
                .execute()
                .await
                .map_err(request("set up", pod.host))?;

            let (conn, handle) = connect_in(&self.rt, pod.ns)?;
            let result = configure_pod(&handle, pod).await;
            drop(handle);
            // The connection ends once its last handle is gone; wait so the socket is
            // closed inside this operation.
            let _ = conn.await;
            result
        })
    }

    /// Deletes the host end `host` (one request, by name).
    pub fn del(&self, host: &str) -> Result<(), FloorError> {
        self.rt.block_on(async {
            self.node
                .link()
                .del_with_message(LinkUnspec::new_with_name(host).build())
                .execute()
                .await
                .map_err(request("delete link", host))
        })
    }
}

/// Opens a netlink connection inside `ns` (the socket is created by a thread that entered
/// it) and spawns its driver on `rt`; the driver ends when the last handle is dropped.
fn connect_in(
    rt: &Runtime,
    ns: &NetNs,
) -> Result<(tokio::task::JoinHandle<()>, Handle), FloorError> {
    let runtime = rt.handle().clone();
    let (conn, handle, _) = ns
        .run(move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })?
        .map_err(|source| FloorError::Socket {
            ns: ns.path().display().to_string(),
            source,
        })?;
    Ok((rt.spawn(conn), handle))
}

/// The pod side: look the pod end up, set it up, add the address and the default route.
async fn configure_pod(pod_nl: &Handle, pod: &FloorPod<'_>) -> Result<(), FloorError> {
    let link = pod_nl
        .link()
        .get()
        .match_name(pod.ifname.to_string())
        .execute()
        .try_next()
        .await
        .map_err(request("get link", pod.ifname))?
        .ok_or_else(|| FloorError::Vanished {
            ifname: pod.ifname.to_string(),
            ns: pod.ns.path().display().to_string(),
        })?;
    let index = link.header.index;
    pod_nl
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(request("set up", pod.ifname))?;
    pod_nl
        .address()
        .add(index, pod.address.into(), pod.prefix)
        .execute()
        .await
        .map_err(request("add address", pod.ifname))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(pod.gateway)
        .output_interface(index)
        .onlink()
        .build();
    pod_nl
        .route()
        .add(route)
        .execute()
        .await
        .map_err(request("add default route", pod.ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_are_distinct_and_usable() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..51_200 {
            let a = pod_address(i);
            assert!(seen.insert(a), "{a} repeated at {i}");
            let last = a.octets()[3];
            assert!((2..=201).contains(&last), "{a}");
            assert_ne!(a, GATEWAY);
        }
        assert_eq!(pod_address(0), Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(pod_address(200), Ipv4Addr::new(10, 99, 1, 2));
    }

    #[test]
    fn the_floor_wires_a_pod_and_deletes_it_with_its_host_end() {
        let lab = crate::lab::Lab::create("floortest").expect("lab (needs root)");
        let pod = lab.pod().expect("pod");
        let worker = FloorWorker::new(lab.node()).expect("worker");
        let spec = FloorPod {
            host: "nkftest0",
            ifname: "eth0",
            ns: &pod,
            address: pod_address(7),
            prefix: 16,
            gateway: GATEWAY,
        };
        worker.add(&spec).expect("add");
        let node = crate::inspect::dump(lab.node()).expect("node state");
        let host = node.link("nkftest0").expect("host end");
        assert!(host.up);
        assert_eq!(host.kind.as_deref(), Some("veth"));
        let inside = crate::inspect::dump(&pod).expect("pod state");
        let eth0 = inside.link("eth0").expect("pod end born in the pod");
        assert!(eth0.up);
        // The kernel may add the IPv6 link-local at any moment: only IPv4 is the floor's.
        let v4: Vec<_> = inside
            .addrs_of(eth0.index)
            .into_iter()
            .filter(|a| a.is_ipv4())
            .collect();
        assert_eq!(
            v4,
            vec!["10.99.0.9/16".parse::<ipnetwork::IpNetwork>().expect("net")]
        );
        assert!(
            worker.add(&spec).is_err(),
            "a second ADD collides with the existing pair"
        );
        worker.del("nkftest0").expect("del");
        assert!(crate::inspect::dump(lab.node())
            .expect("node state")
            .link("nkftest0")
            .is_none());
        assert!(crate::inspect::dump(&pod)
            .expect("pod state")
            .link("eth0")
            .is_none());
        assert!(
            worker.del("nkftest0").is_err(),
            "the floor does not converge"
        );
    }
}
