//! Suite `cni`: drives a CNI plugin list only through the CNI exec protocol, inside the
//! embedded lab, and checks it against the spec (v1.1.0 where the plugins speak it).
//!
//! A *target* is one plugin list under test, with its own lab (node namespace, scratch
//! directory) and its own name prefix: `cni[bridge]` and `cni[routed]` for nodekit's
//! plugins (the default), `cni[reference]` for Debian's reference plugins, `cni[custom]` for
//! any other plugin given by `--cni-bin-dir` and `--cni-config`. With the default target,
//! `cni[multinode-routed]` and `cni[multinode-bridge]` add cross-node checks, each on its own
//! three-node lab (see [`multinode`]).

pub mod checks;
pub mod conf;
pub mod exec;
pub mod multinode;
pub mod result;
pub mod version;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nodekit_nsutil::{NetNs, NsError, NETNS_RUN_DIR};
use serde_json::{json, Value};

use crate::lab::{Lab, LabError};
use crate::report::{Outcome, Reporter};
use crate::suite;
use conf::{ConfError, ConfList};
use exec::{CniRuntime, NegotiateError, NetnsExec, DEFAULT_TIMEOUT};
use version::Negotiated;

/// The suite's name.
pub const SUITE: &str = "cni";

/// Where Debian's containernetworking-plugins install the reference plugins.
pub const REFERENCE_BIN_DIR: &str = "/usr/lib/cni";

/// Which plugins the suite runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CniTarget {
    /// nodekit's `nodekit` and `nodekit-ipam`, found beside the running executable, in
    /// `bridge` mode and again in `routed` mode.
    Nodekit,
    /// Debian's reference plugins (`bridge` + `host-local`) from `/usr/lib/cni`.
    Reference,
    /// Any plugin list: a bin dir and a `.conflist` (or single-plugin `.conf`).
    Custom {
        /// Directory holding the plugin executables (also `CNI_PATH`).
        bin_dir: PathBuf,
        /// The configuration file.
        config: PathBuf,
    },
}

/// Why the suite could not run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum CniSuiteError {
    /// A plugin executable the configuration needs is missing.
    #[error("plugin executable `{name}` not found in {}: {hint}", dir.display())]
    MissingBinary {
        /// The executable's name (a plugin or IPAM `type`).
        name: String,
        /// The bin dir searched.
        dir: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// The configuration is unusable.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// The lab could not be set up.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The multi-node lab could not be set up.
    #[error("multi-node lab: {0}")]
    MultiNode(#[from] crate::lab::multinode::MultiNodeError),
    /// The node namespace could not be opened for plugin execution.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// The runner's own location (the default bin dir) is unknown.
    #[error("cannot locate the nodekit-conformance executable to find the plugins beside it: {0}")]
    CurrentExe(#[source] std::io::Error),
}

/// How a target's configuration is made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConfSource {
    /// nodekit's generated conflist in the given mode (`bridge`, `routed`).
    Nodekit(&'static str),
    /// The reference conflist.
    Reference,
    /// A file.
    File(PathBuf),
}

/// One plugin list under test.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetSpec {
    label: String,
    bin_dir: PathBuf,
    source: ConfSource,
    hint: String,
}

impl TargetSpec {
    /// The prefix of its test names: `cni[bridge]`.
    fn group(&self) -> String {
        suite::group(SUITE, &self.label)
    }

    /// The configuration, with plugin state under `scratch`.
    fn conf(&self, scratch: &Path) -> Result<ConfList, ConfError> {
        match &self.source {
            ConfSource::Nodekit(mode) => ConfList::from_value(
                nodekit_conflist(mode, scratch),
                "generated nodekit conflist",
            ),
            ConfSource::Reference => {
                ConfList::from_value(reference_conflist(scratch), "generated reference conflist")
            }
            ConfSource::File(path) => ConfList::load(path),
        }
    }
}

/// The conflist for nodekit's plugins in `mode`, with the IPAM datastore under `scratch`.
pub fn nodekit_conflist(mode: &str, scratch: &Path) -> Value {
    let mut plugin = json!({
        "type": "nodekit",
        "mode": mode,
        "bridge": "nkc0",
        "mtu": 1500,
        "nodeName": "lab",
        "ipam": {
            "type": "nodekit-ipam",
            "datastore": {"type": "file", "path": scratch.join("ipam").display().to_string()},
            "pools": [{"name": "default", "cidr": "10.244.0.0/16", "blockSize": 26}]
        }
    });
    if mode != "bridge" {
        if let Some(obj) = plugin.as_object_mut() {
            obj.remove("bridge");
        }
    }
    json!({"cniVersion": "1.1.0", "name": "nk-conformance", "plugins": [plugin]})
}

/// The conflist for the reference `bridge` + `host-local` plugins, with host-local's data
/// under `scratch`.
pub fn reference_conflist(scratch: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "nk-reference",
        "plugins": [{
            "type": "bridge",
            "bridge": "nkr0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.88.0.0/16"}]],
                "dataDir": scratch.join("host-local").display().to_string()
            }
        }]
    })
}

fn targets(choice: &CniTarget) -> Result<Vec<TargetSpec>, CniSuiteError> {
    Ok(match choice {
        CniTarget::Nodekit => {
            let exe = std::env::current_exe().map_err(CniSuiteError::CurrentExe)?;
            let bin_dir = exe
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let hint = format!(
                "build nodekit's plugins with `cargo build --release` (or `cargo build`) so they sit beside nodekit-conformance in {}, or point --cni-bin-dir at them",
                bin_dir.display()
            );
            ["bridge", "routed"]
                .into_iter()
                .map(|mode| TargetSpec {
                    label: mode.to_string(),
                    bin_dir: bin_dir.clone(),
                    source: ConfSource::Nodekit(mode),
                    hint: hint.clone(),
                })
                .collect()
        }
        CniTarget::Reference => vec![TargetSpec {
            label: "reference".into(),
            bin_dir: PathBuf::from(REFERENCE_BIN_DIR),
            source: ConfSource::Reference,
            hint: "install the reference plugins: apt-get install containernetworking-plugins"
                .into(),
        }],
        CniTarget::Custom { bin_dir, config } => vec![TargetSpec {
            label: "custom".into(),
            bin_dir: bin_dir.clone(),
            source: ConfSource::File(config.clone()),
            hint: format!(
                "put it in --cni-bin-dir or fix the type in {}",
                config.display()
            ),
        }],
    })
}

/// Everything a check needs: the lab, the runtime speaking the negotiated version, and what
/// negotiation found.
#[derive(Debug)]
pub struct Env {
    /// The target's label (`bridge`, `reference`...).
    pub label: String,
    /// The runtime for the target's plugin list (declared first: dropped before the lab).
    pub rt: CniRuntime,
    /// The lab the plugins run in.
    pub lab: Lab,
    /// The negotiated version, or why there is none.
    pub negotiated: Result<Negotiated, NegotiateError>,
    warm: OnceLock<Result<(), String>>,
}

impl Env {
    /// Makes sure the network exists before a check compares the node's links: network-level
    /// state a first ADD creates (a bridge) is not an attachment's leftover. Runs one ADD and
    /// DEL on a scratch pod, once per target.
    pub fn ensure_warm(&self) -> Result<(), String> {
        self.warm
            .get_or_init(|| {
                let pod = self.lab.pod().map_err(|e| e.to_string())?;
                let att = exec::Attachment {
                    container_id: nodekit_nsutil::unique_name("warmup"),
                    netns: pod.path(),
                    ifname: "eth0".into(),
                };
                let added = self.rt.add(&att);
                let cached = added.as_ref().ok();
                let deleted = self.rt.del(&att, cached);
                match (added, deleted) {
                    (Ok(_), Ok(())) => Ok(()),
                    (Err(e), _) => Err(format!("warm-up ADD failed: {e}")),
                    (_, Err(e)) => Err(format!("warm-up DEL failed: {e}")),
                }
            })
            .clone()
    }
}

/// A test of a target: a plugin's VERSION check or one of [`checks::CHECKS`].
enum TestFn {
    Version(usize),
    Check(checks::CheckFn),
}

/// Runs suite `cni` against `choice`, recording every test whose full name `selected`
/// accepts. Setup problems (missing binaries, no root) end the suite with an error.
pub fn run(
    choice: &CniTarget,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), CniSuiteError> {
    let specs = targets(choice)?;
    // Check every target's executables before building any lab.
    for spec in &specs {
        let conf = spec.conf(Path::new("/nonexistent-scratch"))?;
        for name in conf.executables() {
            if !spec.bin_dir.join(&name).is_file() {
                return Err(CniSuiteError::MissingBinary {
                    name,
                    dir: spec.bin_dir.clone(),
                    hint: spec.hint.clone(),
                });
            }
        }
    }
    // The multi-node targets run nodekit's own plugins (with the default target only).
    let multinode_bin_dir = match (choice, specs.first()) {
        (CniTarget::Nodekit, Some(spec)) => Some((spec.bin_dir.clone(), spec.hint.clone())),
        _ => None,
    };
    if let Some((dir, hint)) = &multinode_bin_dir {
        for name in multinode::EXECUTABLES {
            if !dir.join(name).is_file() {
                return Err(CniSuiteError::MissingBinary {
                    name: name.to_string(),
                    dir: dir.clone(),
                    hint: hint.clone(),
                });
            }
        }
    }
    for spec in &specs {
        run_target(spec, selected, reporter)?;
    }
    if let Some((dir, _)) = &multinode_bin_dir {
        multinode::run(dir, selected, reporter)?;
    }
    Ok(())
}

fn run_target(
    spec: &TargetSpec,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), CniSuiteError> {
    let group = spec.group();
    let probe = spec.conf(Path::new("/nonexistent-scratch"))?;
    let mut tests: Vec<(String, TestFn)> = Vec::new();
    for (i, ty) in probe.plugin_types().iter().enumerate() {
        tests.push((
            format!("{group} {}", checks::version_check_name(ty)),
            TestFn::Version(i),
        ));
    }
    for check in checks::CHECKS {
        tests.push((format!("{group} {}", check.name), TestFn::Check(check.run)));
    }
    tests.retain(|(name, _)| selected(name));
    if tests.is_empty() {
        return Ok(());
    }

    let lab = Lab::create("node")?;
    let conf = spec.conf(lab.scratch())?;
    let node = NetNs::open(Path::new(NETNS_RUN_DIR).join(lab.node_name()))?;
    let mut rt = CniRuntime::new(
        Box::new(NetnsExec::new(node, DEFAULT_TIMEOUT)),
        spec.bin_dir.clone(),
        conf,
    );
    let (_, negotiated) = rt.negotiate();
    let spoken = match &negotiated {
        Ok(n) => format!(
            "speaking CNI {} (conflist {})",
            n.version,
            rt.conf().cni_version
        ),
        Err(e) => format!("no CNI version negotiated: {e}"),
    };
    reporter.note(&format!(
        "== {group}: network {} from {}, node netns {}, {spoken}",
        rt.conf().name,
        spec.bin_dir.display(),
        lab.node_name()
    ));
    let env = Env {
        label: spec.label.clone(),
        rt,
        lab,
        negotiated,
        warm: OnceLock::new(),
    };
    suite::run_tests(reporter, SUITE, &group, tests, |test| {
        match (test, &env.negotiated) {
            (TestFn::Version(i), _) => checks::version_check(&env, *i),
            (TestFn::Check(f), Ok(_)) => f(&env),
            (TestFn::Check(_), Err(e)) => {
                Ok(Outcome::Failed(format!("no CNI version negotiated: {e}")))
            }
        }
    });
    Ok(())
}

/// Every test name suite `cni` would run against `choice` (for `--list`-style tooling and
/// tests); VERSION tests are named per plugin of the configuration.
pub fn test_names(choice: &CniTarget) -> Result<Vec<String>, CniSuiteError> {
    let mut names = Vec::new();
    for spec in targets(choice)? {
        let group = spec.group();
        let conf = spec.conf(Path::new("/nonexistent-scratch"))?;
        for ty in conf.plugin_types() {
            names.push(format!("{group} {}", checks::version_check_name(ty)));
        }
        names.extend(suite::names(&group, checks::CHECKS));
    }
    if *choice == CniTarget::Nodekit {
        names.extend(multinode::test_names());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_target_runs_bridge_and_routed_modes() {
        let specs = targets(&CniTarget::Nodekit).expect("targets");
        let groups: Vec<String> = specs.iter().map(TargetSpec::group).collect();
        assert_eq!(groups, vec!["cni[bridge]", "cni[routed]"]);
        let scratch = Path::new("/tmp/scratch");
        let bridge = specs[0].conf(scratch).expect("conf");
        assert_eq!(bridge.cni_version, version::CniVersion::V1_1_0);
        assert_eq!(bridge.plugins[0]["mode"], "bridge");
        assert_eq!(bridge.plugins[0]["bridge"], "nkc0");
        assert_eq!(
            bridge.plugins[0]["ipam"]["datastore"]["path"],
            "/tmp/scratch/ipam"
        );
        let routed = specs[1].conf(scratch).expect("conf");
        assert_eq!(routed.plugins[0]["mode"], "routed");
        assert!(routed.plugins[0].get("bridge").is_none());
        assert_eq!(routed.executables(), vec!["nodekit", "nodekit-ipam"]);
    }

    #[test]
    fn the_reference_target_uses_debian_plugins() {
        let specs = targets(&CniTarget::Reference).expect("targets");
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].bin_dir, Path::new("/usr/lib/cni"));
        let conf = specs[0].conf(Path::new("/s")).expect("conf");
        assert_eq!(conf.cni_version, version::CniVersion::V1_0_0);
        assert_eq!(conf.executables(), vec!["bridge", "host-local"]);
        assert_eq!(conf.plugins[0]["ipam"]["dataDir"], "/s/host-local");
    }

    #[test]
    fn a_missing_binary_is_reported_with_how_to_get_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("net.conflist");
        std::fs::write(
            &config,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"nonexistent-plugin"}]}"#,
        )
        .expect("write");
        let choice = CniTarget::Custom {
            bin_dir: dir.path().to_path_buf(),
            config,
        };
        let mut reporter = Reporter::new(Box::new(std::io::sink()));
        let err = run(&choice, &|_| true, &mut reporter).unwrap_err();
        assert!(
            matches!(&err, CniSuiteError::MissingBinary { name, .. } if name == "nonexistent-plugin"),
            "{err}"
        );
        assert!(reporter.records().is_empty());
    }

    #[test]
    fn test_names_read_as_sentences_with_the_target_prefix() {
        let names = test_names(&CniTarget::Reference).expect("names");
        assert!(names[0].starts_with("cni[reference] VERSION of bridge"));
        assert!(names.iter().all(|n| n.starts_with("cni[reference] ")));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "names are unique");
    }
}
