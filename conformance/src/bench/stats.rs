//! Summary statistics of latency samples: median, p95, mean, extremes, and throughput of a
//! phase. Pure functions over durations, so they are unit-tested without any lab.

use std::time::Duration;

use serde::Serialize;

/// The summary of one phase (one target, one verb, one concurrency level).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The median latency in milliseconds (mean of the two middle samples when `n` is even).
    pub median_ms: f64,
    /// The 95th percentile latency in milliseconds (nearest rank).
    pub p95_ms: f64,
    /// The mean latency in milliseconds.
    pub mean_ms: f64,
    /// The fastest sample in milliseconds.
    pub min_ms: f64,
    /// The slowest sample in milliseconds.
    pub max_ms: f64,
    /// Wall time of the whole phase in milliseconds.
    pub total_ms: f64,
    /// Completed operations per second over the whole phase (`n / total`).
    pub ops_per_s: f64,
}

impl Summary {
    /// Summarises `samples` taken during a phase that lasted `total`; `None` when there are
    /// no samples.
    pub fn of(samples: &[Duration], total: Duration) -> Option<Self> {
        let mut ms: Vec<f64> = samples.iter().map(|d| millis(*d)).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let (first, last) = (*ms.first()?, *ms.last()?);
        let total_ms = millis(total);
        Some(Self {
            n,
            median_ms: median_sorted(&ms)?,
            p95_ms: percentile_sorted(&ms, 95.0)?,
            mean_ms: ms.iter().sum::<f64>() / n as f64,
            min_ms: first,
            max_ms: last,
            total_ms,
            ops_per_s: if total_ms > 0.0 {
                n as f64 * 1000.0 / total_ms
            } else {
                0.0
            },
        })
    }
}

/// A duration in fractional milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of ascending `sorted` values: the middle one, or the mean of the two middle
/// ones for an even count; `None` when empty.
pub fn median_sorted(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let mid = n / 2;
    Some(if n % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// The `p`-th percentile (0 < p <= 100) of ascending `sorted` values by the nearest-rank
/// method: the smallest value with at least p% of the samples at or below it. `None` when
/// empty; `p` is clamped into (0, 100].
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let p = p.clamp(f64::MIN_POSITIVE, 100.0);
    let rank = (p / 100.0 * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_sorted(&[1.0, 2.0, 9.0]), Some(2.0));
        assert_eq!(median_sorted(&[1.0, 2.0, 4.0, 9.0]), Some(3.0));
        assert_eq!(median_sorted(&[5.0]), Some(5.0));
        assert_eq!(median_sorted(&[]), None);
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&hundred, 95.0), Some(95.0));
        assert_eq!(percentile_sorted(&hundred, 100.0), Some(100.0));
        assert_eq!(percentile_sorted(&hundred, 50.0), Some(50.0));
        // 30 samples: rank ceil(28.5) = 29.
        let thirty: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(percentile_sorted(&thirty, 95.0), Some(29.0));
        // Few samples: p95 is the largest.
        assert_eq!(percentile_sorted(&[1.0, 2.0, 3.0], 95.0), Some(3.0));
        assert_eq!(percentile_sorted(&[7.0], 95.0), Some(7.0));
        assert_eq!(percentile_sorted(&[], 95.0), None);
        // Out-of-range p is clamped rather than indexing out of bounds.
        assert_eq!(percentile_sorted(&[1.0, 2.0], 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&[1.0, 2.0], 250.0), Some(2.0));
    }

    #[test]
    fn summary_sorts_unordered_samples_and_computes_throughput() {
        let s = Summary::of(&ms(&[4, 1, 3, 2, 10]), Duration::from_millis(20)).expect("some");
        assert_eq!(s.n, 5);
        assert_eq!(s.median_ms, 3.0);
        assert_eq!(s.p95_ms, 10.0);
        assert_eq!(s.mean_ms, 4.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 10.0);
        assert_eq!(s.total_ms, 20.0);
        assert_eq!(s.ops_per_s, 250.0);
    }

    #[test]
    fn summary_of_nothing_is_none_and_zero_total_has_zero_throughput() {
        assert_eq!(Summary::of(&[], Duration::from_secs(1)), None);
        let s = Summary::of(&ms(&[0]), Duration::ZERO).expect("some");
        assert_eq!(s.ops_per_s, 0.0);
    }

    #[test]
    fn sub_millisecond_samples_keep_their_fraction() {
        let samples = [Duration::from_micros(250), Duration::from_micros(750)];
        let s = Summary::of(&samples, Duration::from_millis(1)).expect("some");
        assert!((s.median_ms - 0.5).abs() < 1e-9, "{}", s.median_ms);
        assert!((s.ops_per_s - 2000.0).abs() < 1e-6, "{}", s.ops_per_s);
    }
}
