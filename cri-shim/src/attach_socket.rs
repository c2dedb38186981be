//! The attach socket between a container's monitor and the shim's Attach sessions (conmon's
//! attach socket): a `SOCK_SEQPACKET` unix socket in the container's state directory, one
//! message per packet, each starting with its `channel.k8s.io` channel number
//! ([`crate::streaming::channel::ids`]). The client sends stdin data (`STDIN`), terminal sizes
//! (`RESIZE`, rows then columns as little-endian u16) and the end of its stdin (`CLOSE`,
//! which closes the container's stdin when it was created `stdin_once`); the monitor sends the
//! container's output (`STDOUT`, `STDERR`; a terminal's output is `STDOUT`).
//!
//! Paths are reached through `/proc/self/fd/N/NAME` on an open handle of their directory, so
//! state directories of any length fit the 108 bytes of `sun_path`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::streaming::channel::ids;
use crate::streaming::streams::TermSize;

/// The socket's file name in the container's state directory.
pub const SOCKET_NAME: &str = "attach";

/// The largest packet either side sends (well under the socket buffer, so a packet always
/// fits an empty one).
pub const MAX_PACKET: usize = 32 * 1024;

/// What an attach client asks of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// Bytes for the container's stdin.
    Stdin(&'a [u8]),
    /// The client's terminal size.
    Resize(TermSize),
    /// The client's stdin ended (it closed it, or the session is over).
    StdinEnd,
}

impl ClientMessage<'_> {
    /// The packet carrying this message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientMessage::Stdin(data) => [&[ids::STDIN][..], data].concat(),
            ClientMessage::Resize(size) => {
                let [r0, r1] = size.height.to_le_bytes();
                let [c0, c1] = size.width.to_le_bytes();
                vec![ids::RESIZE, r0, r1, c0, c1]
            }
            ClientMessage::StdinEnd => vec![ids::CLOSE],
        }
    }
}

/// The client message in `packet`; `None` for an unknown or malformed one (ignored).
pub fn decode_client(packet: &[u8]) -> Option<ClientMessage<'_>> {
    match packet {
        [ids::STDIN, data @ ..] => Some(ClientMessage::Stdin(data)),
        [ids::RESIZE, r0, r1, c0, c1] => Some(ClientMessage::Resize(TermSize {
            height: u16::from_le_bytes([*r0, *r1]),
            width: u16::from_le_bytes([*c0, *c1]),
        })),
        [ids::CLOSE] => Some(ClientMessage::StdinEnd),
        _ => None,
    }
}

/// A unix socket address for `path` whatever its length: `/proc/self/fd/N/NAME`, valid while
/// the directory handle lives.
struct ShortAddress {
    _dir: File,
    addr: SocketAddrUnix,
}

impl ShortAddress {
    fn new(path: &Path) -> io::Result<Self> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a socket path", path.display()),
            ));
        };
        let dir = File::open(dir)?;
        let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        let addr = SocketAddrUnix::new(short.as_path())?;
        Ok(Self { _dir: dir, addr })
    }
}

/// Binds and listens on a non-blocking attach socket at `path` (a stale file from an earlier
/// monitor is replaced), readable by root only.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    listen_unix(path, SocketType::SEQPACKET)
}

/// Binds and listens on a non-blocking unix socket of `socket_type` at `path`, whatever the
/// path's length (a stale file is replaced), readable by root only. Also the monitor's
/// console socket.
pub fn listen_unix(path: &Path, socket_type: SocketType) -> io::Result<OwnedFd> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        socket_type,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&socket, &ShortAddress::new(path)?.addr)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&socket, 8)?;
    Ok(socket)
}

/// Connects to the attach socket at `path`, as a tokio stream to use with [`read_packet`] and
/// [`write_packet`] only (tokio's own reads take a short read as "drained" and would leave a
/// queued packet unseen; dropping a write half would shut the connection down).
pub fn connect(path: &Path) -> io::Result<tokio::net::UnixStream> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&socket, &ShortAddress::new(path)?.addr)?;
    let stream = std::os::unix::net::UnixStream::from(socket);
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// Receives one packet (`buf` of [`MAX_PACKET`] holds any) into `buf`; 0 is the end, which
/// includes a peer that closed with input unread (ECONNRESET).
pub async fn read_packet(stream: &tokio::net::UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(0),
            read => return read,
        }
    }
}

/// Sends `packet` (at most [`MAX_PACKET`] bytes) as one packet.
pub async fn write_packet(stream: &tokio::net::UnixStream, packet: &[u8]) -> io::Result<()> {
    loop {
        stream.writable().await?;
        match stream.try_write(packet) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            written => return written.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_round_trip() {
        let size = TermSize {
            width: 300,
            height: 40,
        };
        for msg in [
            ClientMessage::Stdin(b"echo hi\n"),
            ClientMessage::Stdin(b""),
            ClientMessage::Resize(size),
            ClientMessage::StdinEnd,
        ] {
            assert_eq!(decode_client(&msg.encode()), Some(msg));
        }
        assert_eq!(decode_client(b""), None);
        assert_eq!(decode_client(&[ids::RESIZE, 1]), None);
        assert_eq!(decode_client(&[ids::STDOUT, b'x']), None);
    }

    #[tokio::test]
    async fn long_paths_bind_and_connect_with_packet_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(100)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join(SOCKET_NAME);
        assert!(path.as_os_str().len() > 108);
        let listener = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let server = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC).unwrap();
        write_packet(&client, b"one").await.unwrap();
        write_packet(&client, b"two").await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) =
            rustix::net::recv(&server, &mut buf[..], rustix::net::RecvFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"one");
        let (n, _) =
            rustix::net::recv(&server, &mut buf[..], rustix::net::RecvFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"two");
        rustix::net::send(&server, b"out", rustix::net::SendFlags::empty()).unwrap();
        rustix::net::send(&server, b"more", rustix::net::SendFlags::empty()).unwrap();
        drop(server);
        let mut got = vec![0u8; MAX_PACKET];
        let n = read_packet(&client, &mut got).await.unwrap();
        assert_eq!(&got[..n], b"out");
        let n = read_packet(&client, &mut got).await.unwrap();
        assert_eq!(&got[..n], b"more");
        assert_eq!(read_packet(&client, &mut got).await.unwrap(), 0);
    }
}
