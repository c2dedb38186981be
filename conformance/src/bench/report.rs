//! Presenting a [`BenchReport`]: the latency table, the goal ratios, and the JSON file.
//! Pure formatting over the figures, unit-tested with hand-made reports.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{BenchReport, Measurement, Op, Target};

/// A ratio between two medians, with the goal it is read against (nothing is asserted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// What is compared, as printed: `ours/reference ADD median (bridge)`.
    pub name: String,
    /// The concurrency level of both medians.
    pub concurrency: usize,
    /// numerator / denominator, when both were measured.
    pub value: Option<f64>,
    /// The goal: the ratio should be at most this.
    pub goal: f64,
    /// Why there is no value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

impl Ratio {
    /// Whether the value meets the goal (`None` without a value).
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| v <= self.goal)
    }
}

/// Writing the JSON file failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The figures could not be serialised.
    #[error("cannot serialise the figures: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `1.23ms` (two decimals below 100 ms, one above).
pub fn format_ms(ms: f64) -> String {
    if ms < 100.0 {
        format!("{ms:.2}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

fn row(out: &mut String, cols: [&str; 7]) {
    let [target, op, conc, n, median, p95, ops] = cols;
    let _ = writeln!(
        out,
        "{target:<20}{op:<9}{conc:<6}{n:<6}{median:<10}{p95:<10}{ops}"
    );
}

fn measurement_row(out: &mut String, m: &Measurement) {
    row(
        out,
        [
            m.target.label(),
            m.op.as_str(),
            &m.concurrency.to_string(),
            &m.summary.n.to_string(),
            &format_ms(m.summary.median_ms),
            &format_ms(m.summary.p95_ms),
            &format!("{:.1}", m.summary.ops_per_s),
        ],
    );
}

/// The table: a header, then one group per (concurrency, verb) with a row per target, then
/// the VERSION (bare exec) rows; groups are separated by blank lines.
pub fn table(report: &BenchReport) -> String {
    let mut out = String::new();
    row(
        &mut out,
        ["target", "op", "conc", "n", "median", "p95", "ops/s"],
    );
    let mut groups: Vec<(Op, usize)> = Vec::new();
    for conc in &report.levels {
        groups.push((Op::Add, *conc));
        groups.push((Op::Del, *conc));
    }
    groups.push((Op::Version, 1));
    let mut first = true;
    for (op, conc) in groups {
        let rows: Vec<&Measurement> = Target::ALL
            .iter()
            .filter_map(|t| report.get(*t, op, conc))
            .collect();
        if rows.is_empty() {
            continue;
        }
        if !first {
            out.push('\n');
        }
        first = false;
        for m in rows {
            measurement_row(&mut out, m);
        }
    }
    out
}

fn median(report: &BenchReport, target: Target, op: Op, conc: usize) -> Result<f64, String> {
    report
        .get(target, op, conc)
        .map(|m| m.summary.median_ms)
        .ok_or_else(|| format!("{} not measured", target.label()))
}

fn ratio(
    report: &BenchReport,
    name: String,
    conc: usize,
    goal: f64,
    (num, den): ((Target, Op), (Target, Op)),
) -> Ratio {
    let value = median(report, num.0, num.1, conc)
        .and_then(|n| median(report, den.0, den.1, conc).map(|d| (n, d)))
        .and_then(|(n, d)| {
            if d > 0.0 {
                Ok(n / d)
            } else {
                Err(format!("{} median is zero", den.0.label()))
            }
        });
    let (value, missing) = match value {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    Ratio {
        name,
        concurrency: conc,
        value,
        goal,
        missing,
    }
}

/// The goal ratios at every measured concurrency level, for bridge and routed mode:
/// ours/reference ADD median (goal <= 0.5), ours/reference DEL median (<= 1.0), ours DEL /
/// floor DEL (<= 1.2). Names carry the level when it is not 1.
pub fn ratios(report: &BenchReport) -> Vec<Ratio> {
    let mut out = Vec::new();
    for conc in &report.levels {
        let conc = *conc;
        let suffix = if conc == 1 {
            String::new()
        } else {
            format!(", concurrency {conc}")
        };
        for (what, goal, den) in [
            (
                "ours/reference ADD median",
                0.5,
                (Target::Reference, Op::Add),
            ),
            (
                "ours/reference DEL median",
                1.0,
                (Target::Reference, Op::Del),
            ),
            ("ours DEL / floor DEL", 1.2, (Target::Floor, Op::Del)),
        ] {
            for mode in [Target::Bridge, Target::Routed] {
                let op = den.1;
                out.push(ratio(
                    report,
                    format!("{what} ({}{suffix})", mode.key()),
                    conc,
                    goal,
                    ((mode, op), den),
                ));
            }
        }
    }
    out
}

/// The ratio lines: `ours/reference ADD median (bridge): 0.42x (goal <= 0.5x)`, or
/// `...: n/a (reference bridge not measured)`.
pub fn ratio_lines(ratios: &[Ratio]) -> String {
    let mut out = String::new();
    for r in ratios {
        let _ = match (r.value, &r.missing) {
            (Some(v), _) => writeln!(out, "{}: {v:.2}x (goal <= {:.1}x)", r.name, r.goal),
            (None, why) => writeln!(
                out,
                "{}: n/a ({})",
                r.name,
                why.as_deref().unwrap_or("not measured")
            ),
        };
    }
    out
}

/// The whole printout: a header line, the table, skipped targets, the ratios.
pub fn render(report: &BenchReport) -> String {
    let levels: Vec<String> = report.levels.iter().map(ToString::to_string).collect();
    let settle = if report.settle_ms > 0 {
        format!("; pods held {} ms before DEL", report.settle_ms)
    } else {
        String::new()
    };
    let mut out = format!(
        "nodekit-bench: {} pods per phase, concurrency {}; plugin calls timed spawn to exit (waitpid){settle}\n\n",
        report.pods,
        levels.join(" and ")
    );
    out.push_str(&table(report));
    if !report.skipped.is_empty() {
        out.push('\n');
        for s in &report.skipped {
            let _ = writeln!(out, "skipped {}: {}", s.target.label(), s.reason);
        }
    }
    out.push('\n');
    out.push_str(&ratio_lines(&ratios(report)));
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a BenchReport,
    ratios: Vec<Ratio>,
}

/// The figures as JSON: `{pods, levels, settle_ms, results: [{target, op, concurrency, n,
/// median_ms, p95_ms, mean_ms, min_ms, max_ms, total_ms, ops_per_s, samples_ms}], skipped,
/// ratios: [{name, concurrency, value, goal}]}`.
pub fn to_json(report: &BenchReport) -> Result<String, WriteError> {
    Ok(serde_json::to_string_pretty(&JsonReport {
        report,
        ratios: ratios(report),
    })?)
}

/// Writes [`to_json`] to `path`.
pub fn write_json(path: &Path, report: &BenchReport) -> Result<(), WriteError> {
    let text = to_json(report)?;
    std::fs::write(path, text + "\n").map_err(|source| WriteError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Summary;
    use crate::bench::Skipped;
    use std::time::Duration;

    fn m(target: Target, op: Op, conc: usize, median_ms: u64) -> Measurement {
        let samples = vec![Duration::from_millis(median_ms); 4];
        let summary = Summary::of(&samples, Duration::from_millis(median_ms * 4)).expect("some");
        Measurement {
            target,
            op,
            concurrency: conc,
            summary,
            samples_ms: samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
        }
    }

    fn report() -> BenchReport {
        BenchReport {
            pods: 4,
            levels: vec![1, 2],
            settle_ms: 0,
            results: vec![
                m(Target::Floor, Op::Add, 1, 1),
                m(Target::Floor, Op::Del, 1, 4),
                m(Target::Bridge, Op::Add, 1, 2),
                m(Target::Bridge, Op::Del, 1, 5),
                m(Target::Reference, Op::Add, 1, 8),
                m(Target::Reference, Op::Del, 1, 5),
                m(Target::Bridge, Op::Add, 2, 3),
                m(Target::Bridge, Op::Version, 1, 1),
            ],
            skipped: vec![Skipped {
                target: Target::Routed,
                reason: "test".into(),
            }],
        }
    }

    #[test]
    fn the_table_groups_rows_by_verb_and_concurrency_in_target_order() {
        let text = table(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("target"), "{text}");
        assert!(lines[0].contains("median") && lines[0].ends_with("ops/s"));
        assert!(lines[1].starts_with("floor (netlink)     ADD      1     4     1.00ms"));
        assert!(lines[2].starts_with("nodekit bridge      ADD"));
        assert!(lines[3].starts_with("reference bridge    ADD"));
        assert_eq!(lines[4], "");
        assert!(lines[5].starts_with("floor (netlink)     DEL"));
        assert!(
            lines[9].starts_with("nodekit bridge      ADD      2"),
            "{text}"
        );
        assert!(
            lines[11].starts_with("nodekit bridge      VERSION  1"),
            "{text}"
        );
        assert!(lines[1].ends_with("1000.0"), "{text}");
    }

    #[test]
    fn ratios_compare_medians_against_their_goals() {
        let rs = ratios(&report());
        let by_name = |n: &str| rs.iter().find(|r| r.name == n).expect(n).clone();
        let add = by_name("ours/reference ADD median (bridge)");
        assert_eq!(add.value, Some(0.25));
        assert_eq!(add.met(), Some(true));
        let del = by_name("ours/reference DEL median (bridge)");
        assert_eq!(del.value, Some(1.0));
        assert_eq!(del.met(), Some(true));
        let floor = by_name("ours DEL / floor DEL (bridge)");
        assert_eq!(floor.value, Some(1.25));
        assert_eq!(floor.met(), Some(false));
        let routed = by_name("ours/reference ADD median (routed)");
        assert_eq!(routed.value, None);
        assert_eq!(
            routed.missing.as_deref(),
            Some("nodekit routed not measured")
        );
        let conc = by_name("ours/reference ADD median (bridge, concurrency 2)");
        assert_eq!(
            conc.missing.as_deref(),
            Some("reference bridge not measured")
        );
        assert_eq!(rs.len(), 12);
    }

    #[test]
    fn ratio_lines_read_as_specified() {
        let text = ratio_lines(&ratios(&report()));
        assert!(
            text.contains("ours/reference ADD median (bridge): 0.25x (goal <= 0.5x)\n"),
            "{text}"
        );
        assert!(text.contains("ours DEL / floor DEL (bridge): 1.25x (goal <= 1.2x)\n"));
        assert!(text
            .contains("ours/reference DEL median (routed): n/a (nodekit routed not measured)\n"));
    }

    #[test]
    fn render_mentions_skipped_targets_and_json_carries_everything() {
        let r = report();
        let text = render(&r);
        assert!(text.contains("skipped nodekit routed: test"), "{text}");
        assert!(text.starts_with("nodekit-bench: 4 pods per phase, concurrency 1 and 2"));
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&r).expect("json")).expect("valid");
        assert_eq!(json["pods"], 4);
        assert_eq!(json["settle_ms"], 0);
        assert_eq!(json["results"][0]["target"], "floor");
        assert_eq!(json["results"][0]["op"], "ADD");
        assert_eq!(json["results"][0]["median_ms"], 1.0);
        assert_eq!(
            json["results"][0]["samples_ms"].as_array().map(Vec::len),
            Some(4)
        );
        assert_eq!(json["ratios"][0]["goal"], 0.5);
        assert_eq!(json["skipped"][0]["target"], "routed");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bench.json");
        write_json(&path, &r).expect("written");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .ends_with("}\n"));
    }

    #[test]
    fn milliseconds_are_formatted_compactly() {
        assert_eq!(format_ms(1.104), "1.10ms");
        assert_eq!(format_ms(0.5), "0.50ms");
        assert_eq!(format_ms(123.45), "123.5ms");
    }
}
