//! Attach: the session's streams joined to the container's monitor through its attach socket
//! ([`crate::attach_socket`]). Output arrives as the container writes it (a terminal's on
//! stdout); input, the end of input and resizes go to the monitor, which owns the container's
//! stdin and terminal. The session ends when the container's output ends (it exited) or the
//! client leaves; the container keeps running either way.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::channel::ids;
use super::streams::{Outcome, Streams, TermSize};
use crate::attach_socket::{self, ClientMessage, MAX_PACKET};

/// How long a departed client's input may take to reach the monitor.
const INPUT_END_GRACE: Duration = Duration::from_secs(1);

/// Joins `streams` to the monitor serving `socket` until either side ends.
pub async fn run(socket: &Path, streams: Streams) -> Outcome {
    match relay(socket, streams).await {
        Ok(()) => Outcome::Exited(0),
        Err(err) => Outcome::Failed(format!("attaching through {}: {err}", socket.display())),
    }
}

async fn relay(socket: &Path, streams: Streams) -> io::Result<()> {
    let conn = Arc::new(attach_socket::connect(socket)?);
    let input = tokio::spawn(send_input(conn.clone(), streams.stdin, streams.resize));
    let (stdout, stderr, mut client_gone) = (streams.stdout, streams.stderr, streams.client_gone);
    let output = async {
        let mut packet = vec![0u8; MAX_PACKET];
        loop {
            let n = attach_socket::read_packet(&conn, &mut packet).await?;
            let Some((&channel, data)) = packet[..n].split_first() else {
                return Ok::<_, io::Error>(());
            };
            let out = match channel {
                ids::STDOUT => stdout.as_ref(),
                ids::STDERR => stderr.as_ref(),
                _ => None,
            };
            if let Some(out) = out {
                if !out.send(Bytes::copy_from_slice(data)).await {
                    return Ok(());
                }
            }
        }
    };
    let client_left = tokio::select! {
        result = output => {
            input.abort();
            result?;
            false
        }
        _ = &mut client_gone => true,
    };
    if client_left {
        // The client's input channels closed with it: let the input task say so.
        if tokio::time::timeout(INPUT_END_GRACE, input).await.is_err() {
            tracing::warn!("attach input did not end with its client");
        }
    }
    Ok(())
}

/// Sends the client's input and resizes to the monitor; once stdin ends, says so (a
/// `stdin_once` container then gets end of file).
async fn send_input(
    to_monitor: Arc<UnixStream>,
    mut stdin: Option<mpsc::Receiver<Bytes>>,
    mut resize: Option<mpsc::Receiver<TermSize>>,
) -> io::Result<()> {
    loop {
        tokio::select! {
            data = next(&mut stdin), if stdin.is_some() => match data {
                Some(data) => {
                    for chunk in data.chunks(MAX_PACKET - 1) {
                        let packet = ClientMessage::Stdin(chunk).encode();
                        attach_socket::write_packet(&to_monitor, &packet).await?;
                    }
                }
                None => {
                    stdin = None;
                    let packet = ClientMessage::StdinEnd.encode();
                    attach_socket::write_packet(&to_monitor, &packet).await?;
                }
            },
            size = next(&mut resize), if resize.is_some() => match size {
                Some(size) => {
                    let packet = ClientMessage::Resize(size).encode();
                    attach_socket::write_packet(&to_monitor, &packet).await?;
                }
                None => resize = None,
            },
            else => return Ok(()),
        }
    }
}

async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => None,
    }
}
