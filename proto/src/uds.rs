//! gRPC over unix domain sockets, the transport CSI, CRI and device plugins all use.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a unix socket could not be bound or connected.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// The socket's parent directory could not be created.
    #[error("creating socket directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket sits at the path; it is left alone.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A leftover socket file could not be inspected or removed.
    #[error("removing stale socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("binding unix socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The connection or the HTTP/2 handshake failed.
    #[error("connecting to unix socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// tonic needs an HTTP URI even when the connector ignores it; gRPC peers ignore the authority.
const PLACEHOLDER_URI: &str = "http://[::]:50051";

/// Connects a gRPC channel to the unix socket at `path`; fails if nothing listens there.
/// The channel redials the same path if the connection drops.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, UdsError> {
    let path = path.as_ref().to_path_buf();
    let target = path.clone();
    Endpoint::from_static(PLACEHOLDER_URI)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { UnixStream::connect(target).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| UdsError::Connect { path, source })
}

/// Listens on the unix socket at `path`, for `Server::serve_with_incoming[_shutdown]`.
///
/// Creates the parent directory and replaces a stale socket left by an earlier run (a
/// non-socket file at `path` is an error, never removed). Must run inside a tokio runtime.
/// The socket file stays after the listener is dropped; the next `bind` replaces it.
pub fn bind(path: impl AsRef<Path>) -> Result<UnixListenerStream, UdsError> {
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| UdsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|source| UdsError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(UnixListenerStream::new(listener))
}

/// The socket path of a gRPC endpoint as CSI, CRI and kubelet flags spell it:
/// `unix:///abs.sock` and `unix:rel.sock` give the path after the scheme, anything else is
/// taken as a path already. Checking the result (absolute? exists?) is the caller's.
pub fn endpoint_path(endpoint: &str) -> &Path {
    Path::new(
        endpoint
            .strip_prefix("unix://")
            .or_else(|| endpoint.strip_prefix("unix:"))
            .unwrap_or(endpoint),
    )
}

fn remove_stale_socket(path: &Path) -> Result<(), UdsError> {
    let stale = |source| UdsError::RemoveStale {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(stale),
        Ok(_) => Err(UdsError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(stale(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths_drop_the_unix_scheme() {
        for (endpoint, path) in [
            ("unix:///run/csi/csi.sock", "/run/csi/csi.sock"),
            ("unix:/run/cri.sock", "/run/cri.sock"),
            ("unix://rel.sock", "rel.sock"),
            ("/plain/path.sock", "/plain/path.sock"),
        ] {
            assert_eq!(endpoint_path(endpoint), Path::new(path), "{endpoint}");
        }
    }

    #[tokio::test]
    async fn bind_creates_the_parent_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/plugin.sock");
        let _listener = bind(&path).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("socket exists");
        assert!(meta.file_type().is_socket());
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plugin.sock");
        drop(bind(&path).expect("first bind"));
        assert!(
            path.exists(),
            "the first listener leaves its socket file behind"
        );
        let _listener = bind(&path).expect("second bind over the stale socket");
    }

    #[tokio::test]
    async fn bind_refuses_to_remove_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").expect("write");
        let err = bind(&path).expect_err("must not replace a regular file");
        assert!(matches!(err, UdsError::NotASocket { .. }), "{err:?}");
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    }

    #[tokio::test]
    async fn connect_fails_when_nothing_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = connect(dir.path().join("absent.sock"))
            .await
            .expect_err("no listener");
        assert!(matches!(err, UdsError::Connect { .. }), "{err:?}");
    }
}
