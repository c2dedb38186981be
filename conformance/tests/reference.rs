//! Runs the built `nodekit-conformance --reference` against Debian's reference CNI plugins
//! and checks that the report is honest: the core checks pass, the 1.1.0-only checks are
//! skipped with a reason, every failure says why, and the exit status matches the failures.
//! Needs root (the lab creates network namespaces) and containernetworking-plugins.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn require_reference_plugins() {
    if !Path::new("/usr/lib/cni/bridge").is_file()
        || !Path::new("/usr/lib/cni/host-local").is_file()
    {
        panic!(
            "/usr/lib/cni/bridge and /usr/lib/cni/host-local are missing: \
             install containernetworking-plugins (apt-get install containernetworking-plugins)"
        );
    }
}

fn status_of<'a>(tests: &'a [Value], name: &str) -> (&'a str, &'a str) {
    let full = format!("cni[reference] {name}");
    let test = tests
        .iter()
        .find(|t| t["name"] == full.as_str())
        .unwrap_or_else(|| panic!("the report has no test {full:?}"));
    (
        test["status"].as_str().unwrap_or_default(),
        test["message"].as_str().unwrap_or_default(),
    )
}

#[test]
fn the_reference_plugins_pass_the_core_checks_and_the_report_is_honest() {
    require_reference_plugins();
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("report.json");
    let junit_path = dir.path().join("report.xml");
    let out = Command::new(env!("CARGO_BIN_EXE_nodekit-conformance"))
        .arg("--reference")
        .args(["--suite", "cni"])
        .arg("--json")
        .arg(&json_path)
        .arg("--junit")
        .arg(&junit_path)
        .output()
        .expect("run nodekit-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "the run must complete (exit 0 or 1), got {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).expect("the JSON report is written"),
    )
    .expect("the JSON report parses");
    let tests = report["tests"].as_array().expect("tests array").clone();
    for t in &tests {
        assert_eq!(t["suite"], "cni", "{t}");
        assert!(t["duration_ms"].is_u64(), "{t}");
        let status = t["status"].as_str().unwrap_or_default();
        assert!(["passed", "failed", "skipped"].contains(&status), "{t}");
        if status != "passed" {
            let message = t["message"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "a {status} test must say why: {t}");
        }
    }
    let count = |s: &str| tests.iter().filter(|t| t["status"] == s).count();
    let (passed, failed, skipped) = (count("passed"), count("failed"), count("skipped"));

    // The exit status and the summary line reflect the failures honestly.
    assert_eq!(
        out.status.success(),
        failed == 0,
        "exit status {:?} with {failed} failed tests\n{stdout}",
        out.status
    );
    let summary = format!("{passed} passed, {failed} failed, {skipped} skipped");
    assert_eq!(
        stdout.lines().last(),
        Some(summary.as_str()),
        "the last line is the summary\n{stdout}"
    );

    // Every check of the suite is in the report, once.
    let expected = [
        "VERSION of bridge reports supportedVersions including the conflist's cniVersion",
        "ADD returns a spec-shaped result",
        "ADD creates the interface in the pod netns with the reported addresses and MAC",
        "ADD assigns addresses inside the configured pool",
        "two pods on the node reach each other over TCP and ICMP",
        "a repeated ADD of the same container and ifname is handled per spec",
        "CHECK with the ADD result as prevResult succeeds",
        "DEL removes the pod interface and its host-side peer",
        "DEL is idempotent: a second DEL succeeds",
        "DEL after the pod netns is deleted succeeds",
        "DEL of a never-added container succeeds",
        "GC removes attachments missing from the valid list and keeps the valid one",
        "STATUS reports the plugins ready",
        "ADD with an unsupported cniVersion fails with code 1 and leaves nothing behind",
        "ADD with malformed JSON config fails with code 6 and leaves nothing behind",
        "a call without CNI_COMMAND fails with code 4 and leaves nothing behind",
        "ADD without CNI_CONTAINERID fails with code 4 and leaves nothing behind",
        "ADD without CNI_IFNAME fails with code 4 and leaves nothing behind",
        "ADD into a netns path that does not exist fails with error JSON and leaves nothing behind",
        "ADD with an ifname longer than 15 characters fails with error JSON and leaves nothing behind",
        "20 parallel ADDs get distinct addresses and 20 parallel DELs leave no host links",
    ];
    assert_eq!(tests.len(), expected.len(), "{stdout}");
    for name in expected {
        status_of(&tests, name);
    }

    // The core checks pass for the reference plugins.
    for name in [
        "VERSION of bridge reports supportedVersions including the conflist's cniVersion",
        "ADD returns a spec-shaped result",
        "ADD creates the interface in the pod netns with the reported addresses and MAC",
        "two pods on the node reach each other over TCP and ICMP",
        "CHECK with the ADD result as prevResult succeeds",
        "DEL removes the pod interface and its host-side peer",
        "DEL is idempotent: a second DEL succeeds",
        "DEL after the pod netns is deleted succeeds",
        "DEL of a never-added container succeeds",
        "20 parallel ADDs get distinct addresses and 20 parallel DELs leave no host links",
    ] {
        let (status, message) = status_of(&tests, name);
        assert_eq!(status, "passed", "{name}: {message}\n{stdout}");
    }

    // The reference plugins speak up to 1.0.0: GC and STATUS are skipped, saying why.
    for (name, verb) in [
        (
            "GC removes attachments missing from the valid list and keeps the valid one",
            "GC",
        ),
        ("STATUS reports the plugins ready", "STATUS"),
    ] {
        let (status, message) = status_of(&tests, name);
        assert_eq!(status, "skipped", "{name}: {message}");
        assert_eq!(
            message,
            format!("plugin bridge supports up to 1.0.0; {verb} needs 1.1.0"),
            "{name}"
        );
    }

    // The JUnit report covers the same tests.
    let junit = std::fs::read_to_string(&junit_path).expect("the JUnit report is written");
    assert!(
        junit.contains(&format!("tests=\"{}\"", tests.len())),
        "{junit}"
    );
    assert_eq!(junit.matches("<testcase ").count(), tests.len());

    // The lab left nothing behind.
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("nk-node-{}-", out_pid_hint(&stdout))))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "leftover namespaces: {leftovers:?}");
}

/// The runner's pid, read from the node namespace name in its target header line
/// (`... node netns nk-node-PID-N, ...`).
fn out_pid_hint(stdout: &str) -> String {
    stdout
        .split("nk-node-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .unwrap_or("unknown")
        .to_string()
}
