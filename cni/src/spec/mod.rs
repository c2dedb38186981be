//! The CNI wire contract (SPEC.md 1.1.0 and the older versions we still accept): error codes,
//! versions, the result document, and the environment a runtime hands a plugin.

pub(crate) mod args;
mod error;
mod result;

pub use args::{CmdArgs, Command, GcAttachment};
pub use error::{code, ErrorResult};
pub use result::{default_dst, CniResult, Dns, Interface, IpConfig, Route};

/// Every CNI version our plugins accept in a network configuration, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version we speak when nothing else is asked for.
pub const LATEST_VERSION: &str = "1.1.0";

/// Whether `version` is one we can parse configs of and write results for.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Parses `MAJOR.MINOR.PATCH` into a comparable tuple; `None` when it is not a version.
pub fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Whether `version` is at least `min` (both well-formed; malformed compares as too old).
pub fn version_at_least(version: &str, min: &str) -> bool {
    match (parse_version(version), parse_version(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

/// The answer to `CNI_COMMAND=VERSION`.
pub fn version_info(conf_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": conf_version.filter(|v| is_supported(v)).unwrap_or(LATEST_VERSION),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.1.0", "1.0.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("garbage", "0.1.0"));
        assert_eq!(parse_version("1.10.2"), Some((1, 10, 2)));
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
    }

    #[test]
    fn version_answer_echoes_a_supported_config_version() {
        assert_eq!(version_info(Some("0.4.0"))["cniVersion"], "0.4.0");
        assert_eq!(version_info(Some("9.9.9"))["cniVersion"], LATEST_VERSION);
        assert_eq!(version_info(None)["supportedVersions"][4], "1.1.0");
    }
}
