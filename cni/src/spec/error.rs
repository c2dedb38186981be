//! The CNI error document and the code table (SPEC.md "Error" section, plus ours >= 100).

use serde::{Deserialize, Serialize};

/// Well-known error codes. 1-99 are the spec's; 100+ are nodekit's own, documented in the README.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (bad JSON).
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later: a transient condition (datastore busy or unreachable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: pods would have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// nodekit: every candidate IP pool is full for this node.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// nodekit: a kernel (netlink, namespace, sysctl) operation failed.
    pub const KERNEL: u32 = 101;
    /// nodekit: the IPAM datastore is corrupt or unreadable.
    pub const DATASTORE: u32 = 102;
    /// nodekit: a delegated plugin could not be run or answered nonsense.
    pub const DELEGATE: u32 = 103;
}

/// The JSON a plugin prints on stdout when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResult {
    /// The config's version (or our latest when the config could not be read).
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// One of [`code`].
    pub code: u32,
    /// A short message saying what failed and naming the field or variable.
    pub msg: String,
    /// Longer context, often the underlying OS error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorResult {
    /// An error with `code` and `msg`, no details yet.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: super::LATEST_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds context to the message, keeping the code: "context: msg".
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.msg = format!("{context}: {}", self.msg);
        self
    }
}

impl std::fmt::Display for ErrorResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorResult {}
