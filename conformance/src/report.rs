//! Test outcomes and how they are reported: a progress line per test as it finishes, the
//! summary line, a JSON report and a JUnit report.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use serde::Serialize;

/// How one test ended (the `Passed / Skipped(reason) / Failed(message)` model of youki's
/// contest). A pass may carry a note recording which of several allowed behaviours was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour conforms.
    Passed(Option<String>),
    /// The test does not apply; the reason says why.
    Skipped(String),
    /// The behaviour does not conform; the message says how.
    Failed(String),
}

impl Outcome {
    /// A pass without a note.
    pub fn passed() -> Self {
        Self::Passed(None)
    }

    /// A pass with a note.
    pub fn passed_with(note: impl Into<String>) -> Self {
        Self::Passed(Some(note.into()))
    }

    /// The status word of the outcome.
    pub fn status(&self) -> Status {
        match self {
            Self::Passed(_) => Status::Passed,
            Self::Skipped(_) => Status::Skipped,
            Self::Failed(_) => Status::Failed,
        }
    }

    /// The note, reason or message.
    pub fn message(&self) -> Option<&str> {
        match self {
            Self::Passed(note) => note.as_deref(),
            Self::Skipped(m) | Self::Failed(m) => Some(m),
        }
    }
}

/// The status of a finished test, as written in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Conforms.
    Passed,
    /// Does not conform.
    Failed,
    /// Not applicable.
    Skipped,
}

/// One finished test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestRecord {
    /// The full name, e.g. `cni[bridge] ADD returns a spec-shaped result`.
    pub name: String,
    /// The suite (`cni`).
    pub suite: String,
    /// The group within the suite (the target, e.g. `cni[bridge]`), for JUnit.
    #[serde(skip)]
    pub group: String,
    /// Passed, failed or skipped.
    pub status: Status,
    /// Wall time of the test.
    pub duration_ms: u64,
    /// The note, skip reason or failure message.
    pub message: Option<String>,
}

impl TestRecord {
    /// A record for `outcome`.
    pub fn new(suite: &str, group: &str, name: String, outcome: &Outcome, took: Duration) -> Self {
        Self {
            name,
            suite: suite.to_string(),
            group: group.to_string(),
            status: outcome.status(),
            duration_ms: took.as_millis() as u64,
            message: outcome.message().map(str::to_string),
        }
    }

    /// The progress line: `PASS  name (12 ms)`, `SKIP  name (12 ms): reason`,
    /// `FAIL  name (12 ms): message`.
    pub fn progress_line(&self) -> String {
        let word = match self.status {
            Status::Passed => "PASS",
            Status::Failed => "FAIL",
            Status::Skipped => "SKIP",
        };
        let mut line = format!("{word}  {} ({} ms)", self.name, self.duration_ms);
        if let Some(m) = &self.message {
            line.push_str(": ");
            line.push_str(m);
        }
        line
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests that were skipped.
    pub skipped: usize,
}

impl Summary {
    /// Counts `records`.
    pub fn of(records: &[TestRecord]) -> Self {
        let mut s = Self::default();
        for r in records {
            match r.status {
                Status::Passed => s.passed += 1,
                Status::Failed => s.failed += 1,
                Status::Skipped => s.skipped += 1,
            }
        }
        s
    }
}

impl fmt::Display for Summary {
    /// Exactly `N passed, N failed, N skipped`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// Writing a report file failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be written.
    #[error("cannot write report {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// JSON serialisation failed.
    #[error("cannot serialise the JSON report: {0}")]
    Json(#[source] serde_json::Error),
    /// JUnit serialisation failed.
    #[error("cannot serialise the JUnit report: {0}")]
    Junit(#[source] quick_junit::SerializeError),
}

/// Collects records and prints each as it arrives.
pub struct Reporter {
    records: Vec<TestRecord>,
    out: Box<dyn Write + Send>,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// A reporter printing progress to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            records: Vec::new(),
            out,
        }
    }

    /// Records a finished test and prints its progress line.
    pub fn record(&mut self, record: TestRecord) {
        let _ = writeln!(self.out, "{}", record.progress_line());
        let _ = self.out.flush();
        self.records.push(record);
    }

    /// Prints a line that is not a test (a target starting).
    pub fn note(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    /// Every record so far.
    pub fn records(&self) -> &[TestRecord] {
        &self.records
    }

    /// Prints the summary line and returns the totals.
    pub fn finish(&mut self) -> Summary {
        let summary = Summary::of(&self.records);
        let _ = writeln!(self.out, "{summary}");
        let _ = self.out.flush();
        summary
    }
}

/// The JSON report document.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    tests: &'a [TestRecord],
    summary: Summary,
}

/// The JSON report: `{"tests": [{name, suite, status, duration_ms, message}], "summary": {..}}`.
pub fn to_json(records: &[TestRecord]) -> Result<String, ReportError> {
    serde_json::to_string_pretty(&JsonReport {
        tests: records,
        summary: Summary::of(records),
    })
    .map_err(ReportError::Json)
}

/// The JUnit report: one `<testsuite>` per group (target), one `<testcase>` per test.
pub fn to_junit(records: &[TestRecord]) -> Result<String, ReportError> {
    let mut report = Report::new("nodekit-conformance");
    let mut groups: Vec<&str> = Vec::new();
    for r in records {
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    let mut total = Duration::ZERO;
    for group in groups {
        let mut suite = TestSuite::new(group);
        let mut suite_time = Duration::ZERO;
        for r in records.iter().filter(|r| r.group == group) {
            let mut status = match r.status {
                Status::Passed => TestCaseStatus::success(),
                Status::Skipped => TestCaseStatus::skipped(),
                Status::Failed => TestCaseStatus::non_success(NonSuccessKind::Failure),
            };
            if r.status != Status::Passed {
                if let Some(m) = &r.message {
                    status.set_message(m.as_str());
                }
            }
            let mut case = TestCase::new(r.name.as_str(), status);
            case.set_classname(r.suite.as_str());
            let took = Duration::from_millis(r.duration_ms);
            case.set_time(took);
            if r.status == Status::Passed {
                if let Some(note) = &r.message {
                    case.set_system_out(note.as_str());
                }
            }
            suite_time += took;
            suite.add_test_case(case);
        }
        suite.set_time(suite_time);
        total += suite_time;
        report.add_test_suite(suite);
    }
    report.set_time(total);
    report.to_string().map_err(ReportError::Junit)
}

/// Writes `text` to `path`.
pub fn write_file(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn records() -> Vec<TestRecord> {
        vec![
            TestRecord::new(
                "cni",
                "cni[bridge]",
                "cni[bridge] ADD returns a spec-shaped result".into(),
                &Outcome::passed(),
                Duration::from_millis(12),
            ),
            TestRecord::new(
                "cni",
                "cni[bridge]",
                "cni[bridge] GC removes stale attachments".into(),
                &Outcome::Skipped("plugin bridge supports up to 1.0.0; GC needs 1.1.0".into()),
                Duration::from_millis(0),
            ),
            TestRecord::new(
                "cni",
                "cni[routed]",
                "cni[routed] CHECK succeeds".into(),
                &Outcome::Failed("CHECK failed: <code 7> & \"quotes\"".into()),
                Duration::from_millis(1500),
            ),
        ]
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn progress_lines_and_the_summary_line_have_the_documented_form() {
        let sink = Sink::default();
        let mut reporter = Reporter::new(Box::new(sink.clone()));
        for r in records() {
            reporter.record(r);
        }
        let summary = reporter.finish();
        assert_eq!(
            summary,
            Summary {
                passed: 1,
                failed: 1,
                skipped: 1
            }
        );
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "PASS  cni[bridge] ADD returns a spec-shaped result (12 ms)"
        );
        assert_eq!(
            lines[1],
            "SKIP  cni[bridge] GC removes stale attachments (0 ms): plugin bridge supports up to 1.0.0; GC needs 1.1.0"
        );
        assert!(lines[2].starts_with("FAIL  cni[routed] CHECK succeeds (1500 ms): CHECK failed"));
        assert_eq!(lines[3], "1 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn the_json_report_has_one_entry_per_test() {
        let json = to_json(&records()).expect("json");
        let v: serde_json::Value = serde_json::from_str(&json).expect("parses");
        let tests = v["tests"].as_array().expect("tests array");
        assert_eq!(tests.len(), 3);
        assert_eq!(tests[0]["status"], "passed");
        assert_eq!(tests[0]["suite"], "cni");
        assert_eq!(tests[0]["duration_ms"], 12);
        assert!(tests[0]["message"].is_null());
        assert_eq!(tests[1]["status"], "skipped");
        assert_eq!(tests[2]["status"], "failed");
        assert_eq!(v["summary"]["failed"], 1);
    }

    #[test]
    fn the_junit_report_groups_targets_and_escapes_messages() {
        let xml = to_junit(&records()).expect("junit");
        assert!(
            xml.contains(
                "<testsuites name=\"nodekit-conformance\" tests=\"3\" skipped=\"1\" failures=\"1\""
            ),
            "{xml}"
        );
        assert!(
            xml.contains("<testsuite name=\"cni[bridge]\" tests=\"2\""),
            "{xml}"
        );
        assert!(
            xml.contains("<testsuite name=\"cni[routed]\" tests=\"1\""),
            "{xml}"
        );
        assert!(
            xml.contains("<skipped message=\"plugin bridge supports up to 1.0.0; GC needs 1.1.0\""),
            "{xml}"
        );
        assert!(
            xml.contains("&lt;code 7&gt; &amp; &quot;quotes&quot;"),
            "{xml}"
        );
        assert!(xml.contains("classname=\"cni\""), "{xml}");
    }
}
