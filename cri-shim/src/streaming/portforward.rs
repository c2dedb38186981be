//! PortForward: one TCP connection to `localhost:PORT` inside a sandbox's network namespace
//! per forwarded port, joined on a throwaway thread that entered the namespace (the socket
//! stays in it), then driven by tokio like any other socket.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use bytes::Bytes;
use nodekit_nsutil::NetNs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::streams::Output;

/// Why a port could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    /// The sandbox's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] nodekit_nsutil::NsError),
    /// Nothing accepts connections on the port.
    #[error("connecting to localhost:{port} in the pod: {source}")]
    Connect {
        /// The port.
        port: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connecting thread could not be joined.
    #[error("connecting thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Connects to `localhost:port` (IPv4, then IPv6) in the namespace at `netns`, or in the
/// shim's own for a hostNetwork sandbox.
pub async fn connect(netns: Option<PathBuf>, port: u16) -> Result<TcpStream, PortForwardError> {
    let stream = tokio::task::spawn_blocking(move || match netns {
        Some(path) => NetNs::open(&path)?.run(|| dial(port)),
        None => Ok(dial(port)),
    })
    .await??;
    let stream = stream.map_err(|source| PortForwardError::Connect { port, source })?;
    stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
        .map_err(|source| PortForwardError::Connect { port, source })
}

fn dial(port: u16) -> std::io::Result<std::net::TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    std::net::TcpStream::connect(v4)
        .or_else(|_| std::net::TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))))
}

/// Relays between the client (`inbound` data, `out` for replies) and `stream`: the end of
/// the client's data half-closes the connection, the end of the port's output ends the relay.
pub async fn relay(stream: TcpStream, mut inbound: mpsc::Receiver<Bytes>, out: Output) {
    let (mut reader, mut writer) = stream.into_split();
    let upstream = async {
        while let Some(data) = inbound.recv().await {
            if writer.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            if !out.send(Bytes::copy_from_slice(&buf[..n])).await {
                break;
            }
        }
    };
    tokio::pin!(downstream);
    tokio::select! {
        () = &mut downstream => return,
        () = upstream => {}
    }
    downstream.await;
}

/// Parses the `port` query parameters of a WebSocket port-forward URL (`port=80&port=81,82`).
pub fn query_ports(query: Option<&str>) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        let Some(value) = pair.strip_prefix("port=") else {
            continue;
        };
        for p in value.split(',') {
            match p.parse::<u16>() {
                Ok(port @ 1..) => ports.push(port),
                _ => return Err(format!("unable to parse {p:?} as a port")),
            }
        }
    }
    Ok(ports)
}

/// The ports of a PortForward request, validated.
pub fn request_ports(ports: &[i32]) -> Result<Vec<u16>, String> {
    ports
        .iter()
        .map(|p| match u16::try_from(*p) {
            Ok(port @ 1..) => Ok(port),
            _ => Err(format!("invalid port {p}")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_repeated_or_comma_separated_query_parameters() {
        assert_eq!(
            query_ports(Some("port=80&x=1&port=81,82")),
            Ok(vec![80, 81, 82])
        );
        assert_eq!(query_ports(None), Ok(vec![]));
        assert!(query_ports(Some("port=0")).is_err());
        assert!(query_ports(Some("port=http")).is_err());
        assert_eq!(request_ports(&[8080]), Ok(vec![8080]));
        assert!(request_ports(&[70000]).is_err());
    }

    #[tokio::test]
    async fn relay_half_closes_after_the_client_and_reads_until_the_server_closes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // The client's end of data arrives as end of file, and the reply still goes back.
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut conn, &mut buf).unwrap();
            std::io::Write::write_all(&mut conn, &[&buf[..], &buf[..]].concat()).unwrap();
        });
        let stream = connect(None, port).await.unwrap();
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        in_tx.send(Bytes::from_static(b"ping")).await.unwrap();
        drop(in_tx);
        relay(stream, in_rx, Output::new(7, out_tx)).await;
        let mut got = Vec::new();
        while let Some((id, data)) = out_rx.recv().await {
            assert_eq!(id, 7);
            got.extend_from_slice(&data);
        }
        assert_eq!(got, b"pingping");
        server.join().unwrap();
    }
}
