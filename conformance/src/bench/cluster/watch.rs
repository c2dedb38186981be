//! Route notifications of several namespaces, timestamped as they arrive: one rtnetlink
//! socket per namespace (created inside it), subscribed to `RTNLGRP_IPV4_ROUTE`, read by a
//! thread of its own that is always blocked in `poll`, so an event's time is when the kernel
//! published it, not when someone looked. Nothing is polled through dumps.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nodekit_nsutil::{NetNs, NsError};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::inspect::route_from;

/// Receive buffer of each socket: a burst of pod routes must not overflow it.
const RECV_BUFFER: usize = 4 << 20;
/// How often a reader thread looks at its stop flag.
const POLL_TICK: u16 = 100;

/// Subscribing to route notifications failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// The netlink socket could not be opened, subscribed, or given its reader thread.
    #[error("cannot subscribe to route notifications in node {node}: {source}")]
    Socket {
        /// The node.
        node: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A route added in a node's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAdded {
    /// The node.
    pub node: usize,
    /// When the notification arrived.
    pub at: Instant,
    /// The destination.
    pub dst: IpNetwork,
    /// The routing protocol number.
    pub protocol: u8,
}

/// Route notifications of a set of nodes; the readers stop on drop.
pub struct RouteWatch {
    events: Receiver<RouteAdded>,
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
}

impl RouteWatch {
    /// Subscribes in each `(node, namespace)`; notifications flow from this call on.
    pub fn start<'a>(
        namespaces: impl IntoIterator<Item = (usize, &'a NetNs)>,
    ) -> Result<Self, WatchError> {
        let (tx, events) = mpsc::channel();
        let mut watch = Self {
            events,
            stop: Arc::new(AtomicBool::new(false)),
            readers: Vec::new(),
        };
        for (node, ns) in namespaces {
            let socket_err = |source| WatchError::Socket { node, source };
            let socket = ns.run(subscribe)?.map_err(socket_err)?;
            let (tx, stop) = (tx.clone(), Arc::clone(&watch.stop));
            let reader = std::thread::Builder::new()
                .name(format!("routes-n{node}"))
                .spawn(move || read_until_stopped(node, &socket, &tx, &stop))
                .map_err(socket_err)?;
            watch.readers.push(reader);
        }
        Ok(watch)
    }

    /// Throws away every notification received so far.
    pub fn drain(&self) {
        while self.events.try_recv().is_ok() {}
    }

    /// Waits until route `dst` with `protocol` was added on each of `nodes`, or until
    /// `deadline`; returns when it arrived on each node that got it.
    pub fn wait_for(
        &self,
        dst: IpNetwork,
        protocol: u8,
        nodes: &[usize],
        deadline: Instant,
    ) -> Vec<(usize, Instant)> {
        let mut seen: Vec<(usize, Instant)> = Vec::new();
        while seen.len() < nodes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if e.dst == dst && e.protocol == protocol && nodes.contains(&e.node) => {
                    if !seen.iter().any(|(n, _)| *n == e.node) {
                        seen.push((e.node, e.at));
                    }
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        seen
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// A route socket of the calling thread's namespace, in `RTNLGRP_IPV4_ROUTE`.
fn subscribe() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.set_rx_buf_sz(RECV_BUFFER)?;
    socket.add_membership(nix::libc::RTNLGRP_IPV4_ROUTE)?;
    Ok(socket)
}

fn read_until_stopped(node: usize, socket: &Socket, tx: &Sender<RouteAdded>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(POLL_TICK)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!(node, %err, "route notifications: poll failed");
                return;
            }
        }
        let at = Instant::now();
        let buf = match socket.recv_from_full() {
            Ok((buf, _)) => buf,
            Err(err) => {
                // ENOBUFS: notifications were lost; later ones still count.
                tracing::warn!(node, %err, "route notifications: receive failed");
                continue;
            }
        };
        for (dst, protocol) in added_routes(&buf) {
            let event = RouteAdded {
                node,
                at,
                dst,
                protocol,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    }
}

/// The (destination, protocol) of each RTM_NEWROUTE in a datagram.
fn added_routes(mut buf: &[u8]) -> Vec<(IpNetwork, u8)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else {
            break;
        };
        let len = (msg.header.length as usize).max(1).min(buf.len());
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) = &msg.payload {
            if let Some(view) = route_from(route) {
                out.push((view.dst, view.protocol));
            }
        }
        // Messages are 4-byte aligned.
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// The time from `start` to each arrival, in node order.
pub fn delays(start: Instant, seen: &[(usize, Instant)]) -> Vec<(usize, Duration)> {
    let mut out: Vec<(usize, Duration)> = seen
        .iter()
        .map(|(node, at)| (*node, at.saturating_duration_since(start)))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::NetlinkHeader;
    use rtnetlink::packet_route::route::RouteProtocol;
    use rtnetlink::RouteMessageBuilder;

    fn datagram(routes: &[(&str, u8)], del: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (dst, proto) in routes {
            let dst: ipnetwork::Ipv4Network = dst.parse().expect("cidr");
            let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(dst.ip(), dst.prefix())
                .protocol(RouteProtocol::from(*proto))
                .build();
            let inner = if del {
                RouteNetlinkMessage::DelRoute(route)
            } else {
                RouteNetlinkMessage::NewRoute(route)
            };
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), inner.into());
            msg.finalize();
            let mut bytes = vec![0; msg.buffer_len()];
            msg.serialize(&mut bytes);
            out.extend(bytes);
        }
        out
    }

    #[test]
    fn every_added_route_of_a_datagram_is_read_and_deletions_are_not() {
        let buf = datagram(&[("10.90.1.0/26", 78), ("10.244.0.5/32", 4)], false);
        let got = added_routes(&buf);
        assert_eq!(
            got,
            vec![
                ("10.90.1.0/26".parse().expect("cidr"), 78),
                ("10.244.0.5/32".parse().expect("cidr"), 4)
            ]
        );
        assert!(added_routes(&datagram(&[("10.90.1.0/26", 78)], true)).is_empty());
        assert!(added_routes(&[1, 2, 3]).is_empty(), "garbage is ignored");
    }

    #[test]
    fn a_route_added_in_a_watched_namespace_is_seen_with_its_time() {
        let ns = nodekit_nsutil::NamedNetNs::create(&nodekit_nsutil::unique_name("watch"))
            .expect("netns (needs root)");
        let watch = RouteWatch::start([(3, &*ns)]).expect("subscribe");
        let dst: IpNetwork = "10.90.7.0/26".parse().expect("cidr");
        let before = Instant::now();
        ns.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
                tokio::spawn(conn);
                let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix("10.90.7.0".parse().expect("ip"), 26)
                    .kind(rtnetlink::packet_route::route::RouteType::BlackHole)
                    .protocol(RouteProtocol::from(78))
                    .build();
                handle.route().add(route).execute().await.expect("add");
            })
        })
        .expect("enter");
        let seen = watch.wait_for(dst, 78, &[3], Instant::now() + Duration::from_secs(5));
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].1 >= before);
        assert!(
            watch
                .wait_for(dst, 78, &[4], Instant::now() + Duration::from_millis(50))
                .is_empty(),
            "no other node was watched"
        );
    }
}
