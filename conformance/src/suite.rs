//! What every suite shares: a named check, the selection of a target's checks by full name,
//! running each one with its error or panic turned into a failure, recording it, and showing
//! the end of a daemon's log after a failure.

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use crate::report::{Outcome, Reporter, Status, TestRecord};

/// A check with its sentence-like name; `F` is the suite's entry-point type.
#[derive(Debug, Clone, Copy)]
pub struct Check<F> {
    /// The name, read after the target prefix: `cni[bridge] ADD returns a spec-shaped result`.
    pub name: &'static str,
    /// The check.
    pub run: F,
}

/// The prefix of a target's test names: `cni[bridge]`.
pub fn group(suite: &str, label: &str) -> String {
    format!("{suite}[{label}]")
}

/// The full name of every check of `checks` in `group`, in order.
pub fn names<F>(group: &str, checks: &[Check<F>]) -> Vec<String> {
    checks
        .iter()
        .map(|c| format!("{group} {}", c.name))
        .collect()
}

/// The checks of `checks` whose full name in `group` `selected` accepts, with that name.
pub fn select<'c, F>(
    group: &str,
    checks: &'c [Check<F>],
    selected: &dyn Fn(&str) -> bool,
) -> Vec<(String, &'c Check<F>)> {
    checks
        .iter()
        .map(|c| (format!("{group} {}", c.name), c))
        .filter(|(name, _)| selected(name))
        .collect()
}

/// Runs `tests` in order, each through [`guarded`], and records each under `suite` and
/// `group`; returns every test with its status.
pub fn run_tests<T, E: Display>(
    reporter: &mut Reporter,
    suite: &str,
    group: &str,
    tests: Vec<(String, T)>,
    mut run: impl FnMut(&T) -> Result<Outcome, E>,
) -> Vec<(T, Status)> {
    let mut statuses = Vec::with_capacity(tests.len());
    for (name, test) in tests {
        let started = Instant::now();
        let outcome = guarded(|| run(&test));
        statuses.push((test, outcome.status()));
        reporter.record(TestRecord::new(
            suite,
            group,
            name,
            &outcome,
            started.elapsed(),
        ));
    }
    statuses
}

/// Whether any of `statuses` (from [`run_tests`]) failed.
pub fn any_failed<T>(statuses: &[(T, Status)]) -> bool {
    statuses.iter().any(|(_, s)| *s == Status::Failed)
}

/// Runs one check, turning its error or panic into a failure.
pub fn guarded<E: Display>(f: impl FnOnce() -> Result<Outcome, E>) -> Outcome {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Outcome::Failed(format!("the check panicked: {what}"))
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Notes `log` (a tail of the `what` log: `driver`, `plugin`...) under a header naming it.
pub fn note_log(reporter: &mut Reporter, group: &str, what: &str, log: &str) {
    reporter.note(&format!("== {group}: last lines of the {what} log:"));
    for line in log.lines() {
        reporter.note(&format!("   {line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(_: &()) -> Result<Outcome, String> {
        Ok(Outcome::passed())
    }

    fn fail(_: &()) -> Result<Outcome, String> {
        Err("broken".into())
    }

    type TestFn = fn(&()) -> Result<Outcome, String>;

    const CHECKS: &[Check<TestFn>] = &[
        Check {
            name: "passes",
            run: pass,
        },
        Check {
            name: "fails",
            run: fail,
        },
    ];

    #[test]
    fn selection_and_names_use_the_full_name() {
        let group = group("s", "t");
        assert_eq!(names(&group, CHECKS), vec!["s[t] passes", "s[t] fails"]);
        let picked = select(&group, CHECKS, &|n| n.ends_with("fails"));
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].0, "s[t] fails");
    }

    #[test]
    fn errors_and_panics_are_recorded_as_failures() {
        let mut reporter = Reporter::new(Box::new(std::io::sink()));
        let tests = select("s[t]", CHECKS, &|_| true);
        let statuses = run_tests(&mut reporter, "s", "s[t]", tests, |c| (c.run)(&()));
        let got: Vec<Status> = statuses.iter().map(|(_, s)| *s).collect();
        assert_eq!(got, vec![Status::Passed, Status::Failed]);
        assert!(any_failed(&statuses));
        assert_eq!(reporter.records()[1].message.as_deref(), Some("broken"));
        let panicked = guarded(|| -> Result<Outcome, String> { panic!("boom") });
        assert_eq!(panicked, Outcome::Failed("the check panicked: boom".into()));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
