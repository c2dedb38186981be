//! The driver's error and its one mapping to a gRPC status: contract violations carry the
//! code the CSI spec names for them, failures of the machinery below map by what failed.

use nodekit_proto::status::message_with_causes;
use tonic::{Code, Status};

use crate::fstools::FsToolError;
use crate::image::ImageError;
use crate::loopdev::LoopDeviceError;
use crate::mounter::MountError;
use crate::paths::PathError;
use crate::state::StateError;

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume or snapshot does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by an incompatible volume/snapshot, or the target is published
    /// with other arguments.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in flight, or a paging token is invalid.
    #[error("{0}")]
    Aborted(String),
    /// The size asked for is not allowed.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space or topology cannot be satisfied.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The RPC is not offered by this driver (or this mode).
    #[error("{0}")]
    Unimplemented(String),
    /// A request path was refused or could not be resolved.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A loop-device operation failed.
    #[error(transparent)]
    Loop(#[from] LoopDeviceError),
    /// A mount operation failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A filesystem tool failed.
    #[error(transparent)]
    FsTool(#[from] FsToolError),
    /// An image file operation failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Another I/O failure, with what was being done.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl CsiError {
    /// The gRPC code the spec (or the failure's nature) calls for.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Path(PathError::Refused { .. }) => Code::InvalidArgument,
            Self::FsTool(FsToolError::UnsupportedFs { .. }) => Code::InvalidArgument,
            Self::FsTool(FsToolError::OnlineResizeDenied { .. }) => Code::FailedPrecondition,
            Self::FsTool(FsToolError::Missing { .. }) => Code::FailedPrecondition,
            Self::Mount(MountError::UnsupportedFlag { .. }) => Code::InvalidArgument,
            Self::Image(e) if e.is_no_space() => Code::ResourceExhausted,
            _ => Code::Internal,
        }
    }

    /// `volume_id` is missing: INVALID_ARGUMENT naming the field.
    pub fn missing(field: &str) -> Self {
        Self::InvalidArgument(format!("{field} is required"))
    }
}

impl From<CsiError> for Status {
    fn from(err: CsiError) -> Self {
        Status::new(err.code(), message_with_causes(&err))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn contract_errors_keep_their_codes_and_causes_reach_the_message() {
        let s = Status::from(CsiError::Aborted("busy".into()));
        assert_eq!((s.code(), s.message()), (Code::Aborted, "busy"));
        let denied = CsiError::from(FsToolError::OnlineResizeDenied {
            target: PathBuf::from("/dev/loop1"),
        });
        let s = Status::from(denied);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("CAP_SYS_RESOURCE"), "{}", s.message());
        let io = CsiError::from(ImageError::Io {
            op: "copying into",
            path: PathBuf::from("/pool/x"),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        let s = Status::from(io);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("No space left"), "{}", s.message());
    }
}
