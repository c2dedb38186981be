//! Sessions over an upgraded WebSocket: a writer task drains the output queue into
//! messages, a reader task routes incoming messages to stdin, resize or forwarded ports, and
//! the command or the port relays run in between. The connection is closed once the
//! session's final status is written.

use std::future::Future;
use std::path::PathBuf;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::channel::{ids, Codec, Frame, Protocol};
use super::portforward;
use super::streams::{Outcome, Output, Streams};

/// An upgraded streaming connection.
pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Which standard streams a remote command asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdioFlags {
    /// Standard input.
    pub stdin: bool,
    /// Standard output.
    pub stdout: bool,
    /// Standard error.
    pub stderr: bool,
    /// A terminal (resize events apply).
    pub tty: bool,
}

/// Room for queued output chunks before producers wait for the client.
const QUEUE: usize = 64;

/// Serves an Exec or Attach: `run` gets the session's streams and reports the outcome,
/// which is written on the error channel before the connection closes.
pub async fn serve_remote_command<F, Fut>(ws: Ws, protocol: Protocol, flags: StdioFlags, run: F)
where
    F: FnOnce(Streams) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let (sink, source) = ws.split();
    let (out_tx, writer) = spawn_writer(sink, protocol.codec);
    let (stdin_tx, stdin_rx) = optional_channel(flags.stdin);
    let (resize_tx, resize_rx) = optional_channel(flags.tty);
    let (gone_tx, client_gone) = oneshot::channel();
    let reader = tokio::spawn(read_remote_command(
        source, protocol, stdin_tx, resize_tx, gone_tx,
    ));
    // The client learns the session is up from an empty message on its first output channel.
    let first = match (flags.stdout, flags.stderr) {
        (true, _) => ids::STDOUT,
        (false, true) => ids::STDERR,
        _ => ids::ERROR,
    };
    let _ = out_tx.send((first.into(), Bytes::new())).await;
    let output = |on: bool, id: u8| on.then(|| Output::new(id.into(), out_tx.clone()));
    let streams = Streams {
        stdin: stdin_rx,
        stdout: output(flags.stdout, ids::STDOUT),
        stderr: output(flags.stderr && !flags.tty, ids::STDERR),
        resize: resize_rx,
        client_gone,
    };
    let outcome = run(streams).await;
    let status = if protocol.version >= 4 {
        Some(outcome.status_json())
    } else {
        outcome.plain_message()
    };
    if let Some(status) = status {
        let _ = out_tx.send((ids::ERROR.into(), status.into())).await;
    }
    drop(out_tx);
    let _ = writer.await;
    reader.abort();
}

/// Serves a PortForward of `ports` (data channel 2i and error channel 2i+1 for port i, each
/// opened with the port number in little-endian) in the namespace `netns`.
pub async fn serve_port_forward(
    ws: Ws,
    protocol: Protocol,
    ports: Vec<u16>,
    netns: Option<PathBuf>,
) {
    let (sink, mut source) = ws.split();
    let (out_tx, writer) = spawn_writer(sink, protocol.codec);
    let mut inbound = Vec::with_capacity(ports.len());
    let mut relays = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let data = Output::new(2 * i as u32, out_tx.clone());
        let error = Output::new(2 * i as u32 + 1, out_tx.clone());
        let prefix = Bytes::copy_from_slice(&port.to_le_bytes());
        data.send(prefix.clone()).await;
        error.send(prefix).await;
        let (tx, rx) = mpsc::channel(16);
        inbound.push(tx);
        let netns = netns.clone();
        relays.spawn(async move {
            match portforward::connect(netns, port).await {
                Ok(stream) => portforward::relay(stream, rx, data).await,
                Err(err) => {
                    tracing::info!(port, %err, "port forward failed");
                    error.send(err.to_string().into()).await;
                }
            }
        });
    }
    drop(out_tx);
    let codec = protocol.codec;
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            let Some((channel, data)) = payload(&msg).and_then(|m| codec.decode(m)) else {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
                continue;
            };
            if channel % 2 == 0 {
                if let Some(tx) = inbound.get(usize::from(channel / 2)) {
                    let _ = tx.send(data.into()).await;
                }
            }
        }
    });
    // Done when every port is, or when the client leaves.
    tokio::select! {
        () = async { while relays.join_next().await.is_some() {} } => reader.abort(),
        _ = &mut reader => relays.shutdown().await,
    }
    let _ = writer.await;
}

/// Routes a remote command's incoming messages until the client closes; dropping `gone`
/// then tells the command.
async fn read_remote_command(
    mut source: SplitStream<Ws>,
    protocol: Protocol,
    mut stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<super::streams::TermSize>>,
    gone: oneshot::Sender<()>,
) {
    while let Some(Ok(msg)) = source.next().await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
        let Some((channel, data)) = payload(&msg).and_then(|m| protocol.codec.decode(m)) else {
            continue;
        };
        match channel {
            ids::STDIN => {
                if let Some(tx) = &stdin {
                    if tx.send(data.into()).await.is_err() {
                        stdin = None;
                    }
                }
            }
            ids::RESIZE => {
                let size = serde_json::from_slice(&data);
                if let (Some(tx), Ok(size)) = (&resize, size) {
                    let _ = tx.send(size).await;
                }
            }
            ids::CLOSE if protocol.version >= 5 && data.first() == Some(&ids::STDIN) => {
                stdin = None;
            }
            _ => {}
        }
    }
    drop(gone);
}

/// The bytes of a data message (binary, or text for the base64 protocols).
fn payload(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

/// Starts the task writing queued `(channel, data)` chunks as messages; once every sender
/// is gone it closes the connection.
fn spawn_writer(
    mut sink: SplitSink<Ws, Message>,
    codec: Codec,
) -> (mpsc::Sender<(u32, Bytes)>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(u32, Bytes)>(QUEUE);
    let task = tokio::spawn(async move {
        while let Some((channel, data)) = rx.recv().await {
            let msg = match codec.encode(channel as u8, &data) {
                Frame::Binary(b) => Message::Binary(b),
                Frame::Text(t) => Message::Text(t.into()),
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        // A normal-closure code: client-go reads "no status" (1005) as a broken stream.
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
        let _ = sink.close().await;
    });
    (tx, task)
}

fn optional_channel<T>(on: bool) -> (Option<mpsc::Sender<T>>, Option<mpsc::Receiver<T>>) {
    if on {
        let (tx, rx) = mpsc::channel(16);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    }
}
