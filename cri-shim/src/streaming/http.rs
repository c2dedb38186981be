//! The HTTP face: `GET|POST /{exec,attach,portforward}/TOKEN` with a WebSocket upgrade.
//! The token is consumed first (a second use, or an unknown or expired token, is 404); the
//! WebSocket handshake is answered here and the session runs on the upgraded connection.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::channel::{self, Protocol};
use super::websocket::{self, StdioFlags};
use super::{attach, exec, portforward, spdy, StreamRequest, StreamingServer};
use crate::streaming::streams::Outcome;

/// The header naming the stream protocols of a SPDY upgrade.
const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

type Reply = Response<Full<Bytes>>;

/// Accepts connections until the runtime shuts down.
pub(super) async fn serve(server: Arc<StreamingServer>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "accepting a streaming connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&server, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(err) = conn.await {
                tracing::debug!(%err, "streaming connection ended");
            }
        });
    }
}

fn text(status: StatusCode, message: impl Into<String>) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(message.into() + "\n")));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

fn handle(server: &Arc<StreamingServer>, req: Request<Incoming>) -> Reply {
    route(server, req).unwrap_or_else(|(status, message)| text(status, message))
}

fn route(
    server: &Arc<StreamingServer>,
    mut req: Request<Incoming>,
) -> Result<Reply, (StatusCode, String)> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "use GET or POST".into()));
    }
    let not_found = || (StatusCode::NOT_FOUND, "404 page not found".to_string());
    let mut segments = req.uri().path().trim_start_matches('/').split('/');
    let (Some(kind), Some(token), None) = (segments.next(), segments.next(), segments.next())
    else {
        return Err(not_found());
    };
    let request = server
        .cache
        .take(token)
        .filter(|r| r.path() == kind)
        .ok_or_else(not_found)?;
    if upgrade_is(req.headers(), "spdy/3.1") {
        return upgrade_spdy(server, req, request);
    }
    if !upgrade_is(req.headers(), "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "a WebSocket (v5/v4.channel.k8s.io) or SPDY/3.1 upgrade is required".into(),
        ));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or((StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key".into()))?
        .as_bytes()
        .to_vec();
    let requested: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let supported = match request {
        StreamRequest::PortForward(_) => channel::PORT_FORWARD,
        _ => channel::REMOTE_COMMAND,
    };
    let protocol = channel::negotiate(&requested, supported).ok_or_else(|| {
        let names: Vec<&str> = supported
            .iter()
            .map(|p| p.name)
            .filter(|n| !n.is_empty())
            .collect();
        (
            StatusCode::BAD_REQUEST,
            format!("requested protocol(s) {requested:?} are not supported; supports {names:?}"),
        )
    })?;
    let session = session(server, request, req.uri().query(), true)?;
    spawn_session(&mut req, session, Transport::WebSocket(protocol));
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = HeaderValue::from_str(&derive_accept_key(&key))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if !protocol.name.is_empty() {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol.name),
        );
    }
    Ok(reply)
}

/// Answers a SPDY/3.1 upgrade: the client's first `X-Stream-Protocol-Version` this server
/// speaks is echoed back, none is 403 like the kubelet's.
fn upgrade_spdy(
    server: &Arc<StreamingServer>,
    mut req: Request<Incoming>,
    request: StreamRequest,
) -> Result<Reply, (StatusCode, String)> {
    let wanted = match request {
        StreamRequest::PortForward(_) => spdy::PORT_FORWARD_PROTOCOL,
        _ => spdy::REMOTE_COMMAND_PROTOCOL,
    };
    let offered: Vec<&str> = req
        .headers()
        .get_all(STREAM_PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if !offered.contains(&wanted) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts [{wanted:?}]"
            ),
        ));
    }
    let session = session(server, request, req.uri().query(), false)?;
    spawn_session(&mut req, session, Transport::Spdy);
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(STREAM_PROTOCOL_HEADER, HeaderValue::from_static(wanted));
    Ok(reply)
}

/// Runs `session` on the connection once hyper hands it over after the 101.
fn spawn_session(req: &mut Request<Incoming>, session: Session, transport: Transport) {
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session.run(TokioIo::new(upgraded), transport).await,
            Err(err) => tracing::warn!(%err, "streaming upgrade failed"),
        }
    });
}

/// Serves an Exec or Attach session (`run` gets its streams) over the negotiated transport.
async fn serve_remote_command<F, Fut>(
    io: TokioIo<Upgraded>,
    transport: Transport,
    flags: StdioFlags,
    run: F,
) where
    F: FnOnce(super::streams::Streams) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    match transport {
        Transport::WebSocket(protocol) => {
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            websocket::serve_remote_command(ws, protocol, flags, run).await;
        }
        Transport::Spdy => spdy::serve_remote_command(io, flags, run).await,
    }
}

/// Whether the request asks to upgrade to `protocol` (case-insensitive, `Connection: upgrade`).
fn upgrade_is(headers: &HeaderMap, protocol: &str) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, protocol)
}

/// The framing negotiated for a session.
enum Transport {
    WebSocket(Protocol),
    Spdy,
}

/// A session ready to run once the connection is upgraded.
enum Session {
    Exec {
        server: Arc<StreamingServer>,
        request: nodekit_proto::cri::v1::ExecRequest,
    },
    Attach {
        socket: std::path::PathBuf,
        flags: StdioFlags,
    },
    PortForward {
        ports: Vec<u16>,
        netns: Option<std::path::PathBuf>,
    },
}

/// Checks what can be checked before answering the handshake. WebSocket port forwards
/// name their ports up front (request or query); SPDY ones per stream.
fn session(
    server: &Arc<StreamingServer>,
    request: StreamRequest,
    query: Option<&str>,
    ports_up_front: bool,
) -> Result<Session, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    match request {
        StreamRequest::Exec(request) => Ok(Session::Exec {
            server: server.clone(),
            request,
        }),
        StreamRequest::Attach(request) => {
            // The container's own settings decide: a terminal has one output and resizes.
            let rec = server
                .manager
                .running_container(&request.container_id, "attach needs a running container")
                .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
            let tty = rec.config.0.tty;
            Ok(Session::Attach {
                socket: server.manager.attach_socket(&rec.id),
                flags: StdioFlags {
                    stdin: request.stdin && rec.config.0.stdin,
                    stdout: request.stdout,
                    stderr: request.stderr && !tty,
                    tty,
                },
            })
        }
        StreamRequest::PortForward(request) => {
            let mut ports = portforward::request_ports(&request.port).map_err(bad)?;
            if ports.is_empty() {
                ports = portforward::query_ports(query).map_err(bad)?;
            }
            if ports_up_front && (ports.is_empty() || ports.len() > 127) {
                return Err(bad(
                    "between 1 and 127 ports (query parameter \"port\") are required".into(),
                ));
            }
            let netns = server
                .manager
                .ready_sandbox_netns(&request.pod_sandbox_id)
                .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
            Ok(Session::PortForward { ports, netns })
        }
    }
}

impl Session {
    async fn run(self, io: TokioIo<Upgraded>, transport: Transport) {
        match (self, transport) {
            (Session::Exec { server, request }, transport) => {
                let flags = StdioFlags {
                    stdin: request.stdin,
                    stdout: request.stdout,
                    stderr: request.stderr,
                    tty: request.tty,
                };
                let run = |streams| async move {
                    let manager = &server.manager;
                    let pid_file = match manager.exec_pid_file(&request.container_id) {
                        Ok(path) => path,
                        Err(err) => return Outcome::Failed(err.to_string()),
                    };
                    let (id, cmd) = (&request.container_id, &request.cmd);
                    exec::run(manager.runtime(), id, cmd, request.tty, &pid_file, streams).await
                };
                serve_remote_command(io, transport, flags, run).await;
            }
            (Session::Attach { socket, flags }, transport) => {
                let run = |streams| async move { attach::run(&socket, streams).await };
                serve_remote_command(io, transport, flags, run).await;
            }
            (Session::PortForward { ports, netns }, Transport::WebSocket(protocol)) => {
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                websocket::serve_port_forward(ws, protocol, ports, netns).await;
            }
            (Session::PortForward { netns, .. }, Transport::Spdy) => {
                spdy::serve_port_forward(io, netns).await;
            }
        }
    }
}
