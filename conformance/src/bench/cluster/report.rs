//! Presenting a [`ClusterReport`]: the phase table, netd memory, the goals, and the JSON
//! file. Pure formatting over the figures, unit-tested with a hand-made report.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{ClusterReport, Figure, NetdUsage};
use crate::bench::report::{format_ms, WriteError};
use crate::bench::stats::median_sorted;

/// The goal: etcd ADD median at most this many times the file store's.
pub const ADD_RATIO_GOAL: f64 = 2.0;
/// The goal: a claimed block routed on every other node within this many milliseconds.
pub const CONVERGENCE_GOAL_MS: f64 = 200.0;
/// The goal: each netd's resident memory under this many MiB.
pub const NETD_RSS_GOAL_MIB: f64 = 20.0;

/// A figure read against its goal (nothing is asserted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goal {
    /// What is measured, as printed.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit: `x`, `ms`, `MiB`.
    pub unit: &'static str,
    /// The bound it should stay under (at most, for the ratio).
    pub goal: f64,
    /// Whether it does.
    pub met: bool,
}

/// The three goals: etcd/file ADD median, claim -> route (slowest claim), netd VmRSS (the
/// largest).
pub fn goals(r: &ClusterReport) -> Vec<Goal> {
    let ratio = if r.file_add.summary.median_ms > 0.0 {
        r.etcd_add.summary.median_ms / r.file_add.summary.median_ms
    } else {
        f64::INFINITY
    };
    let convergence = r.claim_to_route.summary.max_ms;
    let rss = max_mib(&r.netd, |m| m.rss_kib);
    vec![
        Goal {
            name: "etcd ADD median / file store ADD median".into(),
            value: ratio,
            unit: "x",
            goal: ADD_RATIO_GOAL,
            met: ratio <= ADD_RATIO_GOAL,
        },
        Goal {
            name: format!(
                "block claim -> route on every other node, slowest of {} claims",
                r.claim_to_route.summary.n
            ),
            value: convergence,
            unit: "ms",
            goal: CONVERGENCE_GOAL_MS,
            met: convergence < CONVERGENCE_GOAL_MS,
        },
        Goal {
            name: format!("netd VmRSS, largest of {} nodes", r.netd.len()),
            value: rss,
            unit: "MiB",
            goal: NETD_RSS_GOAL_MIB,
            met: rss < NETD_RSS_GOAL_MIB,
        },
    ]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn max_mib(netds: &[NetdUsage], field: impl Fn(&NetdUsage) -> u64) -> f64 {
    netds.iter().map(|m| mib(field(m))).fold(0.0, f64::max)
}

fn median_mib(netds: &[NetdUsage], field: impl Fn(&NetdUsage) -> u64) -> f64 {
    let mut values: Vec<f64> = netds.iter().map(|m| mib(field(m))).collect();
    values.sort_by(f64::total_cmp);
    median_sorted(&values).unwrap_or(0.0)
}

fn row(out: &mut String, cols: [&str; 6]) {
    let [phase, n, median, p95, max, rate] = cols;
    let line = format!("{phase:<44}{n:<6}{median:<10}{p95:<10}{max:<10}{rate}");
    let _ = writeln!(out, "{}", line.trim_end());
}

fn figure_row(out: &mut String, phase: &str, f: &Figure, rate: Option<&str>) {
    let s = &f.summary;
    let rate = match rate {
        Some(unit) => format!("{:.1}{unit}", s.ops_per_s),
        None => String::new(),
    };
    row(
        out,
        [
            phase,
            &s.n.to_string(),
            &format_ms(s.median_ms),
            &format_ms(s.p95_ms),
            &format_ms(s.max_ms),
            &rate,
        ],
    );
}

/// The phase table.
pub fn table(r: &ClusterReport) -> String {
    let mut out = String::new();
    row(&mut out, ["phase", "n", "median", "p95", "max", "rate"]);
    figure_row(
        &mut out,
        "file store ADD, 1 node, sequential",
        &r.file_add,
        Some("/s"),
    );
    figure_row(
        &mut out,
        "file store DEL, 1 node, sequential",
        &r.file_del,
        Some("/s"),
    );
    figure_row(
        &mut out,
        "etcd ADD, node 1, sequential",
        &r.etcd_add,
        Some("/s"),
    );
    figure_row(
        &mut out,
        "etcd DEL, node 1, sequential",
        &r.etcd_del,
        Some("/s"),
    );
    figure_row(
        &mut out,
        &format!("etcd ADD, {} nodes x {} in flight", r.nodes, r.concurrency),
        &r.burst_add,
        Some(" addresses/s"),
    );
    figure_row(
        &mut out,
        &format!("claim -> route on all {} other nodes", r.nodes - 1),
        &r.claim_to_route,
        None,
    );
    figure_row(&mut out, "  the claiming ADD itself", &r.claim_add, None);
    out
}

/// The whole printout: header, table, addresses, netd memory, goals.
pub fn render(r: &ClusterReport) -> String {
    let mut out = format!(
        "nodekit-bench cluster: {} nodes x {} pods, {} mode, {} ADDs in flight per node in the burst; netd resync {} ms; plugin calls timed spawn to exit (waitpid), the sequential file store and etcd calls alternating; claim -> route timed from the claiming ADD's start to the route notification on the slowest node\n\n",
        r.nodes, r.pods, r.mode.key(), r.concurrency, r.netd_resync_ms
    );
    let _ = writeln!(
        out,
        "machine load average (1 min): {:.1} at the start, {:.1} at the end, on {} CPUs\n",
        r.load_average[0],
        r.load_average[1],
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    out.push_str(&table(r));
    let burst_pods = r.burst_add.summary.n;
    let _ = writeln!(
        out,
        "\nburst addresses: {} distinct for {burst_pods} pods{}",
        r.distinct_addresses,
        if r.distinct_addresses == burst_pods {
            ""
        } else {
            " (some pods got no address)"
        }
    );
    let _ = writeln!(
        out,
        "netd memory after the run: VmRSS median {:.1} MiB, max {:.1} MiB; peak VmHWM max {:.1} MiB",
        median_mib(&r.netd, |m| m.rss_kib),
        max_mib(&r.netd, |m| m.rss_kib),
        max_mib(&r.netd, |m| m.peak_kib),
    );
    let mut cpu: Vec<f64> = r.netd.iter().map(|m| m.cpu_ms as f64).collect();
    cpu.sort_by(f64::total_cmp);
    let _ = writeln!(
        out,
        "CPU time over the run: netd median {:.0} ms, max {:.0} ms per node; etcd {} ms",
        median_sorted(&cpu).unwrap_or(0.0),
        cpu.last().copied().unwrap_or(0.0),
        r.etcd_cpu_ms,
    );
    out.push('\n');
    for g in goals(r) {
        let bound = if g.unit == "x" { "<=" } else { "<" };
        let value = match g.unit {
            "x" => format!("{:.2}x", g.value),
            "ms" => format_ms(g.value),
            _ => format!("{:.1} {}", g.value, g.unit),
        };
        let space = if g.unit == "x" { "" } else { " " };
        let _ = writeln!(
            out,
            "{}: {value} (goal {bound} {}{space}{}): {}",
            g.name,
            g.goal,
            g.unit,
            if g.met { "met" } else { "MISSED" }
        );
    }
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a ClusterReport,
    goals: Vec<Goal>,
}

/// The figures as JSON: the report's fields plus `goals`.
pub fn to_json(r: &ClusterReport) -> Result<String, WriteError> {
    Ok(serde_json::to_string_pretty(&JsonReport {
        report: r,
        goals: goals(r),
    })?)
}

/// Writes [`to_json`] to `path`.
pub fn write_json(path: &Path, r: &ClusterReport) -> Result<(), WriteError> {
    let text = to_json(r)?;
    std::fs::write(path, text + "\n").map_err(|source| WriteError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Summary;
    use crate::bench::Target;
    use std::time::Duration;

    fn figure(ms: &[u64], total_ms: u64) -> Figure {
        let samples: Vec<Duration> = ms.iter().map(|v| Duration::from_millis(*v)).collect();
        Figure {
            summary: Summary::of(&samples, Duration::from_millis(total_ms)).expect("some"),
            samples_ms: ms.iter().map(|v| *v as f64).collect(),
        }
    }

    fn report() -> ClusterReport {
        ClusterReport {
            nodes: 3,
            pods: 2,
            concurrency: 2,
            mode: Target::Routed,
            netd_resync_ms: 2000,
            file_add: figure(&[4, 4], 8),
            file_del: figure(&[3, 3], 6),
            etcd_add: figure(&[6, 6], 12),
            etcd_del: figure(&[5, 5], 10),
            burst_add: figure(&[10, 20, 30, 40, 50, 60], 100),
            distinct_addresses: 6,
            claim_to_route: figure(&[30, 250], 600),
            claim_add: figure(&[12, 14], 600),
            netd: vec![
                NetdUsage {
                    node: 1,
                    rss_kib: 6 * 1024,
                    peak_kib: 8 * 1024,
                    cpu_ms: 300,
                },
                NetdUsage {
                    node: 2,
                    rss_kib: 7 * 1024,
                    peak_kib: 7 * 1024,
                    cpu_ms: 500,
                },
            ],
            etcd_cpu_ms: 900,
            load_average: [0.5, 2.25],
        }
    }

    #[test]
    fn goals_read_the_ratio_the_slowest_claim_and_the_largest_netd() {
        let g = goals(&report());
        assert_eq!(g[0].value, 1.5);
        assert!(g[0].met);
        assert_eq!(g[1].value, 250.0);
        assert!(!g[1].met, "one claim took 250 ms");
        assert_eq!(g[2].value, 7.0);
        assert!(g[2].met);
    }

    #[test]
    fn the_printout_has_every_phase_and_the_goal_lines() {
        let text = render(&report());
        assert!(text.starts_with("nodekit-bench cluster: 3 nodes x 2 pods, routed mode"));
        assert!(
            text.contains("machine load average (1 min): 0.5 at the start, 2.2 at the end"),
            "{text}"
        );
        assert!(text.contains("\netcd ADD, 3 nodes x 2 in flight"), "{text}");
        assert!(text.contains("4.00ms    250.0/s\n"), "{text}");
        assert!(
            text.contains("250.0ms\n"),
            "rows without a rate end clean: {text}"
        );
        assert!(text.contains("60.0 addresses/s"), "{text}");
        assert!(
            text.contains("claim -> route on all 2 other nodes"),
            "{text}"
        );
        assert!(
            text.contains("burst addresses: 6 distinct for 6 pods\n"),
            "{text}"
        );
        assert!(
            text.contains("VmRSS median 6.5 MiB, max 7.0 MiB; peak VmHWM max 8.0 MiB"),
            "{text}"
        );
        assert!(
            text.contains("etcd ADD median / file store ADD median: 1.50x (goal <= 2x): met"),
            "{text}"
        );
        assert!(
            text.contains("slowest of 2 claims: 250.0ms (goal < 200 ms): MISSED"),
            "{text}"
        );
        assert!(
            text.contains("largest of 2 nodes: 7.0 MiB (goal < 20 MiB): met"),
            "{text}"
        );
        assert!(
            text.contains(
                "CPU time over the run: netd median 400 ms, max 500 ms per node; etcd 900 ms"
            ),
            "{text}"
        );
    }

    #[test]
    fn json_carries_figures_samples_and_goals() {
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&report()).expect("json")).expect("valid");
        assert_eq!(json["nodes"], 3);
        assert_eq!(json["mode"], "routed");
        assert_eq!(json["etcd_add"]["median_ms"], 6.0);
        assert_eq!(
            json["burst_add"]["samples_ms"].as_array().map(Vec::len),
            Some(6)
        );
        assert_eq!(json["netd"][1]["rss_kib"], 7168);
        assert_eq!(json["goals"][1]["met"], false);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.json");
        write_json(&path, &report()).expect("written");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .ends_with("}\n"));
    }
}
