//! Per-profile SLOs: whether each profile meets what its owner expects of it (p95 time to
//! first token, p95 end-to-end latency, error rate) over a sliding window.
//!
//! Owns the window of recent requests per profile and the set of SLOs in breach. It does no
//! I/O and reads no clock: the caller passes `now`, so plain unit tests cover its decisions
//! (like the scheduler). The server feeds it one [`Sample`] per finished request, calls
//! [`SloTracker::evaluate`] (on each sample and on a timer, so a breach also clears when the
//! window empties), logs the [`Transition`]s, exports [`SloTracker::breaches`] as
//! `gptossd_slo_breach{profile,slo}` and lets `/health` report them.
//!
//! Rules:
//! - Percentiles are exact over the samples in the window (nearest rank: the smallest value
//!   with at least 95 % of the samples at or below it). Failed requests count towards the
//!   error rate only; cancelled ones towards the latencies they have.
//! - A profile with fewer than `min_requests` samples in the window judges nothing: its
//!   breaches clear (one slow request is not a trend).
//! - A breach is *of a threshold*: observed > threshold. It starts once and clears once; the
//!   transitions say so, so the log holds one warning per start and one record per clear.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::{ProfileName, SloThresholds};

/// The SLOs, by the name of their config key (also the `slo` label in `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slo {
    TtftP95,
    E2eP95,
    ErrorRate,
}

impl Slo {
    pub const ALL: [Slo; 3] = [Slo::TtftP95, Slo::E2eP95, Slo::ErrorRate];

    pub fn as_str(self) -> &'static str {
        match self {
            Slo::TtftP95 => "ttft_p95_ms",
            Slo::E2eP95 => "e2e_p95_ms",
            Slo::ErrorRate => "error_rate",
        }
    }
}

/// One finished request, as the SLOs see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// Time to first token (none when no token came).
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    /// Failed on the server's side (a 5xx, or an error mid-generation).
    pub failed: bool,
}

/// An SLO in breach: what was observed against what is expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub profile: ProfileName,
    pub slo: Slo,
    /// Milliseconds for the latencies, a fraction for the error rate.
    pub observed: f64,
    pub threshold: f64,
    /// Requests in the window the verdict rests on.
    pub requests: usize,
}

impl Breach {
    /// "balanced: p95 time to first token 2450 ms over 2000 ms (37 requests in 300 s)".
    pub fn reason(&self, window: Duration) -> String {
        let what = match self.slo {
            Slo::TtftP95 => format!(
                "p95 time to first token {:.0} ms over {:.0} ms",
                self.observed, self.threshold
            ),
            Slo::E2eP95 => format!(
                "p95 end-to-end latency {:.0} ms over {:.0} ms",
                self.observed, self.threshold
            ),
            Slo::ErrorRate => format!(
                "error rate {:.1} % over {:.1} %",
                self.observed * 100.0,
                self.threshold * 100.0
            ),
        };
        format!(
            "{}: {what} ({} requests in {} s)",
            self.profile,
            self.requests,
            window.as_secs()
        )
    }
}

/// A change in the set of breaches.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Started(Breach),
    Cleared { profile: ProfileName, slo: Slo },
}

/// The sliding windows and the current breaches.
#[derive(Debug)]
pub struct SloTracker {
    window: Duration,
    min_requests: usize,
    thresholds: BTreeMap<ProfileName, SloThresholds>,
    samples: BTreeMap<ProfileName, VecDeque<Sample>>,
    breaches: BTreeMap<(ProfileName, Slo), Breach>,
}

impl SloTracker {
    pub fn new(
        window: Duration,
        min_requests: usize,
        thresholds: impl IntoIterator<Item = (ProfileName, SloThresholds)>,
    ) -> Self {
        Self {
            window,
            min_requests: min_requests.max(1),
            thresholds: thresholds.into_iter().collect(),
            samples: BTreeMap::new(),
            breaches: BTreeMap::new(),
        }
    }

    /// New thresholds and window (a reload); the samples so far are kept and judged anew.
    pub fn configure(
        &mut self,
        window: Duration,
        min_requests: usize,
        thresholds: impl IntoIterator<Item = (ProfileName, SloThresholds)>,
    ) {
        self.window = window;
        self.min_requests = min_requests.max(1);
        self.thresholds = thresholds.into_iter().collect();
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Adds a finished request of `profile`.
    pub fn observe(&mut self, profile: ProfileName, sample: Sample) {
        self.samples.entry(profile).or_default().push_back(sample);
    }

    /// Drops samples older than the window and judges every profile; returns what changed.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Transition> {
        let mut changes = Vec::new();
        for (&profile, thresholds) in &self.thresholds {
            let samples = self.samples.entry(profile).or_default();
            while samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > self.window)
            {
                samples.pop_front();
            }
            for slo in Slo::ALL {
                let verdict = judge(samples, slo, thresholds, self.min_requests).map(
                    |(observed, threshold)| Breach {
                        profile,
                        slo,
                        observed,
                        threshold,
                        requests: samples.len(),
                    },
                );
                match (verdict, self.breaches.contains_key(&(profile, slo))) {
                    (Some(b), false) => {
                        changes.push(Transition::Started(b.clone()));
                        self.breaches.insert((profile, slo), b);
                    }
                    (Some(b), true) => {
                        self.breaches.insert((profile, slo), b);
                    }
                    (None, true) => {
                        self.breaches.remove(&(profile, slo));
                        changes.push(Transition::Cleared { profile, slo });
                    }
                    (None, false) => {}
                }
            }
        }
        changes
    }

    /// The SLOs in breach at the last [`SloTracker::evaluate`], by profile then SLO.
    pub fn breaches(&self) -> Vec<Breach> {
        self.breaches.values().cloned().collect()
    }

    /// Whether `profile`'s `slo` is in breach.
    #[cfg(test)]
    pub fn in_breach(&self, profile: ProfileName, slo: Slo) -> bool {
        self.breaches.contains_key(&(profile, slo))
    }
}

/// `Some((observed, threshold))` when `slo` is missed over `samples`.
fn judge(
    samples: &VecDeque<Sample>,
    slo: Slo,
    t: &SloThresholds,
    min_requests: usize,
) -> Option<(f64, f64)> {
    if samples.len() < min_requests {
        return None;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (observed, threshold) = match slo {
        Slo::TtftP95 => (
            p95(samples.iter().filter_map(|s| s.ttft).map(ms))?,
            ms(t.ttft_p95),
        ),
        Slo::E2eP95 => (
            p95(samples.iter().filter(|s| !s.failed).map(|s| ms(s.e2e)))?,
            ms(t.e2e_p95),
        ),
        Slo::ErrorRate => (
            samples.iter().filter(|s| s.failed).count() as f64 / samples.len() as f64,
            t.error_rate,
        ),
    };
    (observed > threshold).then_some((observed, threshold))
}

/// Nearest-rank 95th percentile; none for no values.
fn p95(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (v.len() * 95).div_ceil(100).max(1);
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> SloThresholds {
        SloThresholds {
            ttft_p95: Duration::from_millis(1000),
            e2e_p95: Duration::from_millis(10_000),
            error_rate: 0.1,
        }
    }

    fn tracker() -> SloTracker {
        SloTracker::new(
            Duration::from_secs(60),
            5,
            [(ProfileName::Balanced, thresholds())],
        )
    }

    fn sample(at: Instant, ttft_ms: u64, failed: bool) -> Sample {
        Sample {
            at,
            ttft: Some(Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(ttft_ms * 2),
            failed,
        }
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        assert_eq!(p95((1..=100).map(f64::from)), Some(95.0));
        assert_eq!(p95((1..=20).map(f64::from)), Some(19.0));
        assert_eq!(p95([7.0].into_iter()), Some(7.0));
        assert_eq!(p95(std::iter::empty()), None);
    }

    #[test]
    fn a_breach_starts_once_and_clears_once() {
        let mut t = tracker();
        let t0 = Instant::now();
        for i in 0..10 {
            t.observe(ProfileName::Balanced, sample(t0, 1500 + i, false));
        }
        let changes = t.evaluate(t0);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let Transition::Started(b) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!((b.profile, b.slo), (ProfileName::Balanced, Slo::TtftP95));
        assert_eq!(b.observed, 1509.0);
        assert_eq!(b.threshold, 1000.0);
        assert!(b
            .reason(t.window())
            .contains("p95 time to first token 1509 ms over 1000 ms"));
        // Still in breach: no new transition, however often it is evaluated.
        t.observe(ProfileName::Balanced, sample(t0, 1700, false));
        assert!(t.evaluate(t0 + Duration::from_secs(1)).is_empty());
        assert!(t.in_breach(ProfileName::Balanced, Slo::TtftP95));
        // The slow requests age out of the window: one clear.
        let later = t0 + Duration::from_secs(61);
        for _ in 0..10 {
            t.observe(ProfileName::Balanced, sample(later, 100, false));
        }
        assert_eq!(
            t.evaluate(later),
            vec![Transition::Cleared {
                profile: ProfileName::Balanced,
                slo: Slo::TtftP95
            }]
        );
        assert!(t.breaches().is_empty());
    }

    #[test]
    fn too_few_requests_judge_nothing_and_an_empty_window_clears() {
        let mut t = tracker();
        let t0 = Instant::now();
        for _ in 0..4 {
            t.observe(ProfileName::Balanced, sample(t0, 5000, true));
        }
        assert!(t.evaluate(t0).is_empty(), "4 requests are not a trend");
        t.observe(ProfileName::Balanced, sample(t0, 5000, true));
        let started = t.evaluate(t0);
        assert_eq!(started.len(), 2, "ttft and error rate: {started:?}");
        // No request for a whole window: nothing left to judge, both clear.
        let cleared = t.evaluate(t0 + Duration::from_secs(120));
        assert_eq!(cleared.len(), 2, "{cleared:?}");
        assert!(t.breaches().is_empty());
    }

    #[test]
    fn failures_count_towards_the_error_rate_not_the_latency() {
        let mut t = tracker();
        let t0 = Instant::now();
        for i in 0..20 {
            // Fast successes; 3 failures of 20 (15 % > 10 %) with a long e2e each.
            let mut s = sample(t0, 100, i < 3);
            if s.failed {
                s.e2e = Duration::from_secs(60);
                s.ttft = None;
            }
            t.observe(ProfileName::Balanced, s);
        }
        t.evaluate(t0);
        let b = t.breaches();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].slo, Slo::ErrorRate);
        assert!((b[0].observed - 0.15).abs() < 1e-12);
    }
}
