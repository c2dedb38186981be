//! The streaming server behind Exec, Attach and PortForward, as a kubelet expects it (the role of
//! `k8s.io/kubelet/pkg/cri/streaming` in containerd): the RPC validates the request and
//! parks it under a single-use token ([`cache`]); the client (the kubelet's proxy) then opens
//! `http://ADDR/exec/TOKEN` (or `attach/TOKEN`, `portforward/TOKEN`) and upgrades it either
//! to a WebSocket speaking the `channel.k8s.io` protocols ([`channel`], [`websocket`]) or to
//! SPDY/3.1 ([`spdy`]). The sessions themselves run in [`exec`], [`attach`] (through the
//! container monitor's attach socket) and [`portforward`], which know nothing of the wire.

pub mod attach;
pub mod cache;
pub mod channel;
pub mod exec;
mod http;
pub mod portforward;
pub mod spdy;
pub mod streams;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use nodekit_proto::cri::v1 as cri;

use crate::manager::Manager;
use cache::RequestCache;

/// Why a streaming request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The streaming address could not be bound.
    #[error("binding the streaming server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Too many requests wait for their client already.
    #[error("too many streaming requests in flight ({0}); try again later")]
    TooManyInFlight(usize),
    /// No token could be drawn.
    #[error("drawing a streaming token: {0}")]
    Token(#[from] crate::store::StoreError),
}

/// A validated Exec, Attach or PortForward request waiting for its client.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamRequest {
    /// Exec: run a command in a container.
    Exec(cri::ExecRequest),
    /// Attach: join a running container's stdio.
    Attach(cri::AttachRequest),
    /// PortForward: reach ports inside a sandbox's network namespace.
    PortForward(cri::PortForwardRequest),
}

impl StreamRequest {
    /// The URL path segment that serves this kind of request.
    pub fn path(&self) -> &'static str {
        match self {
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward(_) => "portforward",
        }
    }
}

/// The streaming server: its address, its pending requests and the runtime that serves them.
#[derive(Debug)]
pub struct StreamingServer {
    addr: SocketAddr,
    cache: RequestCache,
    manager: Arc<Manager>,
}

impl StreamingServer {
    /// Binds `addr` (port 0: an ephemeral port) and starts serving on the current tokio
    /// runtime. Returns the server, whose [`Self::url`]s name the address actually bound.
    pub async fn start(
        addr: SocketAddr,
        manager: Arc<Manager>,
    ) -> Result<Arc<Self>, StreamingError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let server = Arc::new(Self {
            addr: bound,
            cache: RequestCache::new(cache::TOKEN_TTL, cache::MAX_IN_FLIGHT),
            manager,
        });
        tracing::info!(addr = %bound, "serving Exec, Attach and PortForward streams");
        tokio::spawn(http::serve(server.clone(), listener));
        Ok(server)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Parks `request` under a fresh token and returns the URL its client must open.
    pub fn url(&self, request: StreamRequest) -> Result<String, StreamingError> {
        let kind = request.path();
        let token = self.cache.insert(request)?;
        Ok(format!("http://{}/{kind}/{token}", self.advertised()))
    }

    /// The address put in URLs: the bound one, with loopback for an unspecified IP.
    fn advertised(&self) -> SocketAddr {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        addr
    }
}
