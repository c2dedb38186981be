//! nodekit's conformance runner: suites of checks that drive node-side plugins only through
//! their public contracts (for CNI, the exec protocol), inside an embedded lab of network
//! namespaces, and report every check as passed, skipped (with a reason) or failed (with a
//! message), on the terminal, as JSON and as JUnit.
//!
//! Suites: `cni` (see [`cni`]), `device-plugin` (see [`device_plugin`]), `csi` (see [`csi`]),
//! `cri` (see [`cri`]).

pub mod bench;
pub mod cni;
pub mod cri;
pub mod csi;
pub mod device_plugin;
pub mod inspect;
pub mod lab;
pub mod report;
pub mod suite;

use std::path::PathBuf;

use regex::Regex;

use crate::report::{ReportError, Reporter, Summary};

/// The suites this runner knows, in run order.
pub const SUITES: &[&str] = &[cni::SUITE, device_plugin::SUITE, csi::SUITE, cri::SUITE];

/// What to run and where to report it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Suites to run; empty means every suite.
    pub suites: Vec<String>,
    /// Only tests whose full name matches.
    pub focus: Option<Regex>,
    /// No tests whose full name matches.
    pub skip: Option<Regex>,
    /// Where to write the JUnit report.
    pub junit: Option<PathBuf>,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// The plugins suite `cni` runs against.
    pub cni: cni::CniTarget,
    /// The plugin suite `device-plugin` runs against.
    pub device_plugin: device_plugin::DevicePluginTarget,
    /// The driver suite `csi` runs against.
    pub csi: csi::CsiTarget,
    /// The runtimes suite `cri` runs against, in turn.
    pub cri: Vec<cri::CriTarget>,
}

/// Why a run could not complete (failing checks are not errors: they are in the summary).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `--suite` named a suite that does not exist.
    #[error("unknown suite {name:?}; known suites: {}", SUITES.join(", "))]
    UnknownSuite {
        /// The name given.
        name: String,
    },
    /// Suite `cni` could not be set up.
    #[error("suite cni: {0}")]
    Cni(#[from] cni::CniSuiteError),
    /// Suite `device-plugin` could not be set up.
    #[error("suite device-plugin: {0}")]
    DevicePlugin(#[from] device_plugin::DevicePluginSuiteError),
    /// Suite `csi` could not be set up.
    #[error("suite csi: {0}")]
    Csi(#[from] csi::CsiSuiteError),
    /// Suite `cri` could not be set up.
    #[error("suite cri: {0}")]
    Cri(#[from] cri::CriSuiteError),
    /// A report could not be written.
    #[error(transparent)]
    Report(#[from] ReportError),
}

impl RunOptions {
    /// Whether the test called `name` is selected by `--focus` and `--skip`.
    pub fn selects(&self, name: &str) -> bool {
        self.focus.as_ref().is_none_or(|re| re.is_match(name))
            && self.skip.as_ref().is_none_or(|re| !re.is_match(name))
    }

    /// The suites to run, validated.
    pub fn suites(&self) -> Result<Vec<&'static str>, RunError> {
        if self.suites.is_empty() {
            return Ok(SUITES.to_vec());
        }
        let mut out = Vec::new();
        for name in &self.suites {
            let known = SUITES
                .iter()
                .find(|s| **s == name.as_str())
                .ok_or_else(|| RunError::UnknownSuite { name: name.clone() })?;
            if !out.contains(known) {
                out.push(*known);
            }
        }
        Ok(out)
    }
}

/// Runs the selected suites, printing a progress line per test and the summary line to
/// `reporter`, then writes the requested reports. Reports are written even when a suite
/// stops on a setup error, which is then returned.
pub fn run(opts: &RunOptions, reporter: &mut Reporter) -> Result<Summary, RunError> {
    let suites = opts.suites()?;
    let selects = |name: &str| opts.selects(name);
    let mut outcome = Ok(());
    for suite in suites {
        let result = match suite {
            cni::SUITE => cni::run(&opts.cni, &selects, reporter).map_err(RunError::from),
            device_plugin::SUITE => {
                device_plugin::run(&opts.device_plugin, &selects, reporter).map_err(RunError::from)
            }
            csi::SUITE => csi::run(&opts.csi, &selects, reporter).map_err(RunError::from),
            cri::SUITE => cri::run(&opts.cri, &selects, reporter).map_err(RunError::from),
            _ => Ok(()),
        };
        if let Err(e) = result {
            outcome = Err(e);
            break;
        }
    }
    let summary = reporter.finish();
    if let Some(path) = &opts.json {
        report::write_file(path, &report::to_json(reporter.records())?)?;
    }
    if let Some(path) = &opts.junit {
        report::write_file(path, &report::to_junit(reporter.records())?)?;
    }
    outcome.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RunOptions {
        RunOptions {
            suites: Vec::new(),
            focus: None,
            skip: None,
            junit: None,
            json: None,
            cni: cni::CniTarget::Reference,
            device_plugin: device_plugin::DevicePluginTarget::Nodekit,
            csi: csi::CsiTarget::Nodekit,
            cri: vec![cri::CriTarget::Nodekit(cri::lab::OciRuntime::Runc)],
        }
    }

    #[test]
    fn focus_and_skip_filter_by_full_name() {
        let mut o = opts();
        assert!(o.selects("cni[bridge] ADD returns a spec-shaped result"));
        o.focus = Some(Regex::new("DEL").expect("regex"));
        assert!(o.selects("cni[bridge] DEL is idempotent: a second DEL succeeds"));
        assert!(!o.selects("cni[bridge] ADD returns a spec-shaped result"));
        o.skip = Some(Regex::new(r"^cni\[routed\]").expect("regex"));
        assert!(!o.selects("cni[routed] DEL is idempotent: a second DEL succeeds"));
    }

    #[test]
    fn unknown_suites_are_rejected_listing_the_known_ones() {
        let mut o = opts();
        assert_eq!(
            o.suites().expect("all"),
            vec!["cni", "device-plugin", "csi", "cri"]
        );
        o.suites = vec!["cni".into(), "cni".into()];
        assert_eq!(o.suites().expect("dedup"), vec!["cni"]);
        o.suites = vec!["no-such-suite".into()];
        let err = o.suites().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown suite \"no-such-suite\"; known suites: cni, device-plugin, csi, cri"
        );
    }

    #[test]
    fn a_run_selecting_nothing_reports_zero_tests_and_writes_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts();
        o.focus = Some(Regex::new("no such test").expect("regex"));
        o.json = Some(dir.path().join("r.json"));
        o.junit = Some(dir.path().join("r.xml"));
        let mut reporter = Reporter::new(Box::new(std::io::sink()));
        if !std::path::Path::new("/usr/lib/cni/bridge").is_file() {
            // The binary check runs before selection; without the plugins this is an error.
            assert!(run(&o, &mut reporter).is_err());
            return;
        }
        let summary = run(&o, &mut reporter).expect("runs");
        assert_eq!(summary, Summary::default());
        let json = std::fs::read_to_string(dir.path().join("r.json")).expect("json written");
        assert!(json.contains("\"tests\": []"), "{json}");
        assert!(dir.path().join("r.xml").is_file());
    }
}
