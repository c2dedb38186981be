//! The shim's error, and its one mapping to gRPC status codes.

use nodekit_proto::status::message_with_causes;
use tonic::{Code, Status};

use crate::cgroups::CgroupError;
use crate::cni::CniError;
use crate::image::ImageError;
use crate::oci::spec::SpecError;
use crate::oci::user::UserError;
use crate::pause::PauseError;
use crate::runtime::RuntimeError;
use crate::store::StoreError;
use crate::streaming::StreamingError;

/// Why a CRI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// A request field is missing or invalid; `field` is its path in the request.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field path (`config.metadata.name`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No sandbox, container or image with that ID.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// sandbox, container or image.
        kind: &'static str,
        /// The ID or name asked for.
        id: String,
    },
    /// The name is taken by another sandbox or container.
    #[error("{kind} name {name:?} is reserved for {id}")]
    NameReserved {
        /// sandbox or container.
        kind: &'static str,
        /// The name.
        name: String,
        /// Its holder.
        id: String,
    },
    /// The object is in the wrong state for the call.
    #[error("{kind} {id} is {state}: {why}")]
    WrongState {
        /// sandbox or container.
        kind: &'static str,
        /// Its ID.
        id: String,
        /// Its state.
        state: &'static str,
        /// What could not be done.
        why: &'static str,
    },
    /// Attach asked for stdin of a container created without it (as containerd answers).
    #[error("container {id} was created without stdin: attach cannot send it input")]
    StdinNotEnabled {
        /// The container.
        id: String,
    },
    /// The streaming server refused to park the request.
    #[error(transparent)]
    Streaming(#[from] StreamingError),
    /// The RPC is not supported by this runtime.
    #[error("{0} is not implemented by nodekit-cri")]
    Unimplemented(&'static str),
    /// The network configuration is missing (the node's CNI is not installed yet).
    #[error("network plugin not ready: cni config uninitialized ({0})")]
    NetworkNotReady(CniError),
    /// A CNI plugin failed.
    #[error("failed to set up or tear down the pod network: {0}")]
    Cni(#[source] CniError),
    /// The OCI runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Image store or pull failure.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The `--pause-image` could not be found or pulled for a new sandbox.
    #[error("pause image {image:?}: {source}")]
    PauseImage {
        /// The `--pause-image` reference.
        image: String,
        /// Why it is not there.
        #[source]
        source: ImageError,
    },
    /// State files.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime spec could not be built from the request.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The container user could not be resolved.
    #[error("config.linux.security_context: {0}")]
    User(#[from] UserError),
    /// The pause process failed.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// A network namespace could not be created or removed.
    #[error(transparent)]
    Netns(#[from] nodekit_nsutil::NsError),
    /// Cgroup setup or cleanup failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Mounting or unmounting a container's root filesystem failed.
    #[error("{what} {path}: {source}")]
    Mount {
        /// mount or unmount.
        what: &'static str,
        /// The mount point.
        path: std::path::PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

impl CriError {
    /// INVALID_ARGUMENT for the request field `field`, saying `reason`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// `value`, or INVALID_ARGUMENT for `field` when it is empty.
    pub fn non_empty<'a>(value: &'a str, field: &'static str) -> Result<&'a str, Self> {
        if value.is_empty() {
            return Err(Self::invalid(field, "must not be empty"));
        }
        Ok(value)
    }
}

impl From<CniError> for CriError {
    fn from(e: CniError) -> Self {
        match e {
            CniError::NoConfig { .. } => CriError::NetworkNotReady(e),
            other => CriError::Cni(other),
        }
    }
}

impl From<CriError> for Status {
    fn from(e: CriError) -> Self {
        let code = match &e {
            CriError::InvalidArgument { .. } | CriError::Spec(_) | CriError::User(_) => {
                Code::InvalidArgument
            }
            CriError::Image(ImageError::InvalidReference { .. }) => Code::InvalidArgument,
            CriError::NotFound { .. }
            | CriError::Image(ImageError::NotFound(_) | ImageError::RemoteNotFound { .. }) => {
                Code::NotFound
            }
            CriError::Image(ImageError::Unauthorized { .. }) => Code::PermissionDenied,
            CriError::NameReserved { .. } => Code::AlreadyExists,
            CriError::WrongState { .. }
            | CriError::StdinNotEnabled { .. }
            | CriError::NetworkNotReady(_) => Code::FailedPrecondition,
            CriError::Unimplemented(_) => Code::Unimplemented,
            CriError::Streaming(StreamingError::TooManyInFlight(_)) => Code::ResourceExhausted,
            CriError::Runtime(RuntimeError::Timeout(_)) => Code::DeadlineExceeded,
            _ => Code::Unknown,
        };
        Status::new(code, message_with_causes(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_the_causes_their_message_leaves_out() {
        let err = CriError::Image(ImageError::Hosts {
            reference: "r".into(),
            source: crate::image::hosts::HostsError::Read {
                path: "/x".into(),
                source: std::io::Error::other("gone"),
            },
        });
        let status = Status::from(err);
        assert_eq!(status.message().matches("gone").count(), 1, "{status:?}");
    }
}
