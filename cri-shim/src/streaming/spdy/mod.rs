//! Sessions over SPDY/3.1, what client-go's SPDY executor and port forwarder speak (and
//! what an API server translating WebSocket clients sends on to a kubelet). The client opens
//! one stream per purpose, named by its `streamtype` header: remote commands with protocol
//! `v4.channel.k8s.io` (error, stdin, stdout, stderr, resize), port forwards with
//! `portforward.k8s.io` (a data and an error stream per connection, paired by `requestid`,
//! the port in `port`). Every stream is accepted with an empty SYN_REPLY; the server ends
//! its halves with FIN and the session with GOAWAY.

mod dictionary;
pub mod frame;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::portforward;
use super::streams::{Outcome, Output, Streams, TermSize};
use super::websocket::StdioFlags;
use frame::{Frame, FrameReader, FrameWriter, Headers};

/// The remote command protocol spoken over SPDY.
pub const REMOTE_COMMAND_PROTOCOL: &str = "v4.channel.k8s.io";
/// The port forward protocol spoken over SPDY.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// How long a client may take to open the streams it asked for (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The streams' queue toward the writer.
type FrameTx = mpsc::Sender<Frame>;

/// Starts the task that encodes and writes frames; it stops after writing GOAWAY or once
/// every sender is gone, and then shuts the connection down.
fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut io: W,
) -> (FrameTx, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let task = tokio::spawn(async move {
        let mut writer = FrameWriter::new();
        while let Some(frame) = rx.recv().await {
            let last = matches!(frame, Frame::GoAway { .. });
            if io.write_all(&writer.encode(&frame)).await.is_err() || io.flush().await.is_err() {
                return;
            }
            if last {
                break;
            }
        }
        let _ = io.shutdown().await;
    });
    (tx, task)
}

/// Turns `(stream, data)` output chunks into DATA frames, keeping their order.
fn spawn_data_forwarder(
    frames: FrameTx,
) -> (mpsc::Sender<(u32, Bytes)>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(u32, Bytes)>(64);
    let task = tokio::spawn(async move {
        while let Some((stream_id, data)) = rx.recv().await {
            let frame = Frame::Data {
                stream_id,
                fin: false,
                data,
            };
            if frames.send(frame).await.is_err() {
                return;
            }
        }
    });
    (tx, task)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// What the reader reports to a remote command's setup.
struct Opened {
    kind: String,
    stream_id: u32,
}

/// Serves an Exec or Attach over SPDY: waits for the streams `flags` call for, runs the
/// command, writes its status on the error stream and ends the session.
pub async fn serve_remote_command<IO, F, Fut>(io: IO, flags: StdioFlags, run: F)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    F: FnOnce(Streams) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let (read_half, write_half) = tokio::io::split(io);
    let (frames, writer) = spawn_writer(write_half);
    let (opened_tx, mut opened_rx) = mpsc::channel::<Opened>(8);
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<TermSize>(4);
    let (gone_tx, client_gone) = oneshot::channel();
    let reader = tokio::spawn(read_remote_command(
        FrameReader::new(read_half),
        frames.clone(),
        opened_tx,
        stdin_tx,
        resize_tx,
        gone_tx,
    ));

    // The streams the request asked for; others the client opens are accepted and unused.
    let wanted: Vec<&str> = [
        ("error", true),
        ("stdin", flags.stdin),
        ("stdout", flags.stdout),
        ("stderr", flags.stderr && !flags.tty),
        ("resize", flags.tty),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(kind, _)| *kind)
    .collect();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let all_opened = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !wanted.iter().all(|k| ids.contains_key(*k)) {
            match opened_rx.recv().await {
                Some(o) if wanted.contains(&o.kind.as_str()) => {
                    ids.insert(o.kind, o.stream_id);
                }
                Some(_) => {}
                None => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !all_opened {
        tracing::info!(?ids, ?wanted, "SPDY client did not open its streams");
        reader.abort();
        let _ = frames.send(Frame::GoAway { last_stream_id: 0 }).await;
        drop(frames);
        let _ = writer.await;
        return;
    }

    let (data_tx, forwarder) = spawn_data_forwarder(frames.clone());
    let output = |kind: &str| ids.get(kind).map(|id| Output::new(*id, data_tx.clone()));
    let streams = Streams {
        stdin: flags.stdin.then_some(stdin_rx),
        stdout: output("stdout").filter(|_| flags.stdout),
        stderr: output("stderr").filter(|_| flags.stderr && !flags.tty),
        resize: flags.tty.then_some(resize_rx),
        client_gone,
    };
    let outcome = run(streams).await;
    drop(data_tx);
    let _ = forwarder.await;
    let mut last = Vec::new();
    if let Some(error) = ids.get("error") {
        last.push(Frame::Data {
            stream_id: *error,
            fin: false,
            data: outcome.status_json().into(),
        });
    }
    let max_id = ids.values().copied().max().unwrap_or(0);
    for id in ids.values() {
        last.push(Frame::Data {
            stream_id: *id,
            fin: true,
            data: Bytes::new(),
        });
    }
    last.push(Frame::GoAway {
        last_stream_id: max_id,
    });
    for f in last {
        let _ = frames.send(f).await;
    }
    drop(frames);
    let _ = writer.await;
    reader.abort();
}

/// Accepts the client's streams (reporting each to the setup) and routes stdin and resize
/// data by the stream types; dropping `gone` tells the command the client left.
async fn read_remote_command<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    frames: FrameTx,
    opened: mpsc::Sender<Opened>,
    stdin: mpsc::Sender<Bytes>,
    resize: mpsc::Sender<TermSize>,
    gone: oneshot::Sender<()>,
) {
    let (mut stdin_id, mut resize_id) = (None, None);
    let mut stdin = Some(stdin);
    let mut resize_buf = Vec::new();
    loop {
        let frame = match reader.next().await {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!(%err, "SPDY session ended");
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => {
                let kind = header(&headers, "streamtype")
                    .unwrap_or_default()
                    .to_string();
                match kind.as_str() {
                    "stdin" => stdin_id = Some(stream_id),
                    "resize" => resize_id = Some(stream_id),
                    _ => {}
                }
                let reply = Frame::SynReply {
                    stream_id,
                    fin: false,
                };
                let _ = frames.send(reply).await;
                let _ = opened.send(Opened { kind, stream_id }).await;
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } if Some(stream_id) == stdin_id => {
                if let Some(tx) = &stdin {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        stdin = None;
                    }
                }
                if fin {
                    stdin = None;
                }
            }
            Frame::Data {
                stream_id, data, ..
            } if Some(stream_id) == resize_id => {
                // A stream of JSON objects, split anywhere by the framing.
                resize_buf.extend_from_slice(&data);
                let mut sizes =
                    serde_json::Deserializer::from_slice(&resize_buf).into_iter::<TermSize>();
                let mut used = 0;
                while let Some(Ok(size)) = sizes.next() {
                    used = sizes.byte_offset();
                    let _ = resize.send(size).await;
                }
                resize_buf.drain(..used);
            }
            Frame::Ping(id) => {
                let _ = frames.send(Frame::Ping(id)).await;
            }
            Frame::GoAway { .. } => break,
            Frame::Data { .. }
            | Frame::RstStream { .. }
            | Frame::SynReply { .. }
            | Frame::Ignored => {}
        }
    }
    drop(gone);
}

/// One port-forward request being assembled from its two streams.
#[derive(Default)]
struct PortPair {
    port: Option<u16>,
    data: Option<u32>,
    error: Option<u32>,
}

/// Serves a PortForward over SPDY until the client closes the connection: every data/error
/// stream pair is one TCP connection to its `port` inside `netns`.
pub async fn serve_port_forward<IO>(io: IO, netns: Option<PathBuf>)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(io);
    let (frames, writer) = spawn_writer(write_half);
    let mut reader = FrameReader::new(read_half);
    let mut pairs: HashMap<String, PortPair> = HashMap::new();
    let mut inbound: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut relays = JoinSet::new();
    loop {
        let frame = match reader.next().await {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!(%err, "SPDY port-forward session ended");
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => {
                let _ = frames
                    .send(Frame::SynReply {
                        stream_id,
                        fin: false,
                    })
                    .await;
                let request = header(&headers, "requestid")
                    .unwrap_or_default()
                    .to_string();
                let pair = pairs.entry(request.clone()).or_default();
                pair.port = pair
                    .port
                    .or_else(|| header(&headers, "port").and_then(|p| p.parse().ok()));
                match header(&headers, "streamtype") {
                    Some("data") => pair.data = Some(stream_id),
                    Some("error") => pair.error = Some(stream_id),
                    _ => {}
                }
                if let PortPair {
                    port: Some(port),
                    data: Some(data),
                    error: Some(error),
                } = *pair
                {
                    pairs.remove(&request);
                    let (tx, rx) = mpsc::channel(16);
                    inbound.insert(data, tx);
                    relays.spawn(forward_one(
                        netns.clone(),
                        port,
                        rx,
                        frames.clone(),
                        (data, error),
                    ));
                }
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if let Some(tx) = inbound.get(&stream_id) {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        inbound.remove(&stream_id);
                    }
                }
                if fin {
                    inbound.remove(&stream_id);
                }
            }
            Frame::RstStream { stream_id, .. } => {
                inbound.remove(&stream_id);
            }
            Frame::Ping(id) => {
                let _ = frames.send(Frame::Ping(id)).await;
            }
            Frame::GoAway { .. } => break,
            Frame::SynReply { .. } | Frame::Ignored => {}
        }
        while relays.try_join_next().is_some() {}
    }
    relays.shutdown().await;
    let _ = frames.send(Frame::GoAway { last_stream_id: 0 }).await;
    drop(frames);
    let _ = writer.await;
}

/// Relays one connection, reports a failure on the error stream, then ends both streams
/// (FIN after everything queued for them).
async fn forward_one(
    netns: Option<PathBuf>,
    port: u16,
    inbound: mpsc::Receiver<Bytes>,
    frames: FrameTx,
    (data_id, error_id): (u32, u32),
) {
    let (tx, mut rx) = mpsc::channel::<(u32, Bytes)>(16);
    let data = Output::new(data_id, tx.clone());
    let error = Output::new(error_id, tx);
    let work = async move {
        match portforward::connect(netns, port).await {
            Ok(stream) => portforward::relay(stream, inbound, data).await,
            Err(err) => {
                tracing::info!(port, %err, "port forward failed");
                error.send(err.to_string().into()).await;
            }
        }
    };
    let pump = async {
        while let Some((stream_id, data)) = rx.recv().await {
            let frame = Frame::Data {
                stream_id,
                fin: false,
                data,
            };
            if frames.send(frame).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(work, pump);
    for stream_id in [data_id, error_id] {
        let _ = frames
            .send(Frame::Data {
                stream_id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }
}
