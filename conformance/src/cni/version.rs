//! CNI spec versions and the runtime side of version negotiation: which version the runner
//! speaks to a plugin list, and why a check that needs a newer version is skipped.

use std::fmt;
use std::str::FromStr;

/// A CNI spec version (`major.minor.patch`, Semantic Versioning 2.0 without pre-release tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CniVersion {
    major: u32,
    minor: u32,
    patch: u32,
}

impl CniVersion {
    /// Spec 0.3.0: the rich result (`interfaces`, `ips`, `routes`).
    pub const V0_3_0: Self = Self::new(0, 3, 0);
    /// Spec 0.4.0: CHECK and `prevResult` on DEL.
    pub const V0_4_0: Self = Self::new(0, 4, 0);
    /// Spec 1.0.0: `ips[].version` dropped.
    pub const V1_0_0: Self = Self::new(1, 0, 0);
    /// Spec 1.1.0: GC and STATUS.
    pub const V1_1_0: Self = Self::new(1, 1, 0);

    /// The version `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A version string that is not `major.minor[.patch]` with numeric parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CNI version {text:?}: expected MAJOR.MINOR.PATCH")]
pub struct VersionParseError {
    /// The text that failed to parse.
    pub text: String,
}

impl FromStr for CniVersion {
    type Err = VersionParseError;

    /// Parses `1.0.0`; the pre-semver spelling `0.1` is read as `0.1.0`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || VersionParseError {
            text: text.to_string(),
        };
        let parts: Vec<&str> = text.trim().split('.').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(err());
        }
        let num = |s: &str| -> Result<u32, VersionParseError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            s.parse().map_err(|_| err())
        };
        Ok(Self {
            major: num(parts[0])?,
            minor: num(parts[1])?,
            patch: parts.get(2).map(|p| num(p)).transpose()?.unwrap_or(0),
        })
    }
}

/// The versions one plugin reported through `VERSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginVersions {
    /// The plugin's `type` (its executable name).
    pub plugin: String,
    /// The parsable entries of `supportedVersions`, in the order reported.
    pub supported: Vec<CniVersion>,
}

impl PluginVersions {
    /// The newest version the plugin supports, if it reported any.
    pub fn highest(&self) -> Option<CniVersion> {
        self.supported.iter().copied().max()
    }
}

/// Why no version could be agreed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// The plugins of the list have no supported version in common.
    #[error("the plugins of the list support no common CNI version ({listing})")]
    NoCommonVersion {
        /// `plugin: versions` for every plugin, for the message.
        listing: String,
    },
    /// Every common version is newer than the conflist allows.
    #[error("the conflist allows CNI versions up to {ceiling}, but the plugins' common versions start at {lowest_common}")]
    ConflistTooOld {
        /// The highest version the conflist allows.
        ceiling: CniVersion,
        /// The lowest version every plugin supports.
        lowest_common: CniVersion,
    },
}

/// The outcome of version negotiation: the version spoken to every plugin of the list, and
/// what limited it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The version written into every plugin's configuration as `cniVersion`.
    pub version: CniVersion,
    /// The highest version the conflist allows (`cniVersion`, or the newest of `cniVersions`).
    pub ceiling: CniVersion,
    /// What each plugin reported.
    pub plugins: Vec<PluginVersions>,
}

impl Negotiated {
    /// `Ok(())` when `feature` (which needs spec `needed`) can be exercised at the negotiated
    /// version, else the reason to report the check as skipped, naming what limits it:
    /// `plugin bridge supports up to 1.0.0; GC needs 1.1.0`.
    pub fn require(&self, needed: CniVersion, feature: &str) -> Result<(), String> {
        if self.version >= needed {
            return Ok(());
        }
        for p in &self.plugins {
            if let Some(max) = p.highest() {
                if max < needed {
                    return Err(format!(
                        "plugin {} supports up to {max}; {feature} needs {needed}",
                        p.plugin
                    ));
                }
            }
        }
        if self.ceiling < needed {
            return Err(format!(
                "the conflist's cniVersion is {}; {feature} needs {needed}",
                self.ceiling
            ));
        }
        Err(format!(
            "negotiated CNI version is {}; {feature} needs {needed}",
            self.version
        ))
    }
}

/// Picks the version to speak: the highest version every plugin supports that the conflist
/// allows — `min(conflist cniVersion, highest common version)` when both are listed.
pub fn negotiate(
    ceiling: CniVersion,
    plugins: Vec<PluginVersions>,
) -> Result<Negotiated, NegotiationError> {
    let mut common: Option<Vec<CniVersion>> = None;
    for p in &plugins {
        common = Some(match common {
            None => p.supported.clone(),
            Some(c) => c.into_iter().filter(|v| p.supported.contains(v)).collect(),
        });
    }
    let common = common.unwrap_or_default();
    if common.is_empty() {
        let listing = plugins
            .iter()
            .map(|p| {
                let vs: Vec<String> = p.supported.iter().map(ToString::to_string).collect();
                format!("{}: [{}]", p.plugin, vs.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(NegotiationError::NoCommonVersion { listing });
    }
    let version = common.iter().copied().filter(|v| *v <= ceiling).max();
    match version {
        Some(version) => Ok(Negotiated {
            version,
            ceiling,
            plugins,
        }),
        None => Err(NegotiationError::ConflistTooOld {
            ceiling,
            lowest_common: common.iter().copied().min().unwrap_or(ceiling),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> CniVersion {
        s.parse().expect("valid version")
    }

    fn plugin(name: &str, versions: &[&str]) -> PluginVersions {
        PluginVersions {
            plugin: name.to_string(),
            supported: versions.iter().map(|s| v(s)).collect(),
        }
    }

    const REFERENCE: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

    #[test]
    fn versions_parse_and_order_numerically() {
        assert_eq!(v("1.1.0"), CniVersion::V1_1_0);
        assert_eq!(v("0.1"), CniVersion::new(0, 1, 0));
        assert!(v("0.10.0") > v("0.9.0"));
        assert!(v("1.0.0") > v("0.4.0"));
        assert_eq!(v("0.3.1").to_string(), "0.3.1");
        for bad in ["", "1", "1.x.0", "1.0.0.0", "1.0.0-rc1", "-1.0.0"] {
            assert!(bad.parse::<CniVersion>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn negotiation_takes_the_conflist_version_when_every_plugin_supports_it() {
        let n = negotiate(
            v("1.0.0"),
            vec![plugin("bridge", REFERENCE), plugin("portmap", REFERENCE)],
        )
        .expect("negotiates");
        assert_eq!(n.version, CniVersion::V1_0_0);
    }

    #[test]
    fn negotiation_lowers_a_newer_conflist_to_what_every_plugin_supports() {
        let n = negotiate(
            v("1.1.0"),
            vec![
                plugin("nodekit", &["0.4.0", "1.0.0", "1.1.0"]),
                plugin("bridge", REFERENCE),
            ],
        )
        .expect("negotiates");
        assert_eq!(n.version, CniVersion::V1_0_0);
        assert_eq!(
            n.require(CniVersion::V1_1_0, "GC").unwrap_err(),
            "plugin bridge supports up to 1.0.0; GC needs 1.1.0"
        );
        assert!(n.require(CniVersion::V0_4_0, "CHECK").is_ok());
    }

    #[test]
    fn negotiation_never_exceeds_the_conflist_version() {
        let n = negotiate(
            v("0.4.0"),
            vec![plugin("nodekit", &["0.4.0", "1.0.0", "1.1.0"])],
        )
        .expect("negotiates");
        assert_eq!(n.version, CniVersion::V0_4_0);
        assert_eq!(
            n.require(CniVersion::V1_1_0, "STATUS").unwrap_err(),
            "the conflist's cniVersion is 0.4.0; STATUS needs 1.1.0"
        );
    }

    #[test]
    fn negotiation_picks_the_highest_common_version_below_an_unlisted_ceiling() {
        let n = negotiate(v("0.4.5"), vec![plugin("x", REFERENCE)]).expect("negotiates");
        assert_eq!(n.version, CniVersion::V0_4_0);
    }

    #[test]
    fn negotiation_fails_without_a_common_version() {
        let err = negotiate(
            v("1.0.0"),
            vec![plugin("a", &["0.3.1"]), plugin("b", &["1.0.0"])],
        )
        .unwrap_err();
        assert!(matches!(err, NegotiationError::NoCommonVersion { .. }));
        assert!(err.to_string().contains("a: [0.3.1]"), "{err}");
        let err = negotiate(v("0.2.0"), vec![plugin("a", &["1.0.0"])]).unwrap_err();
        assert_eq!(
            err,
            NegotiationError::ConflistTooOld {
                ceiling: v("0.2.0"),
                lowest_common: v("1.0.0")
            }
        );
    }
}
