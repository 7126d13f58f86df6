//! Request deadlines, adapted per profile to the pace it is observed to generate at.
//!
//! A request's timeout, counted from its arrival, is
//!
//! ```text
//! queue budget + TTFT budget + max_tokens × p95 time per output token × slack
//! ```
//!
//! at most the profile's ceiling ([`TimeoutSettings`]). The p95 is exact (nearest rank) over the
//! mean time per output token of the profile's last [`PACE_WINDOW`] finished requests; until
//! [`PACE_MIN_SAMPLES`] have finished the pace is unknown and the timeout is the ceiling. Only
//! requests the model generated count (a cached answer says nothing of the model's pace), and
//! only those with at least two tokens (one token has no pace).
//!
//! Owns the pace windows; does no I/O and reads no clock (the caller measures), so plain unit
//! tests cover it. What happens at the deadline (the sequence cancelled, a 504 or an error
//! event) is the server's business (`server::generation`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::config::{ProfileName, TimeoutSettings};

/// Finished requests per profile whose pace is kept.
pub const PACE_WINDOW: usize = 64;

/// Finished requests a profile needs before its pace is trusted (before that: the ceiling).
pub const PACE_MIN_SAMPLES: usize = 8;

/// The timeout of a request of `max_tokens` on a profile with `settings`, whose p95 time per
/// output token is `p95_per_token` (`None`: not known yet, the ceiling).
pub fn timeout(
    settings: &TimeoutSettings,
    p95_per_token: Option<Duration>,
    max_tokens: usize,
) -> Duration {
    let Some(per_token) = p95_per_token else {
        return settings.ceiling;
    };
    let decode = per_token.as_secs_f64() * max_tokens as f64 * settings.slack;
    // A decode estimate too large for a Duration is past any ceiling.
    let decode = Duration::try_from_secs_f64(decode).unwrap_or(Duration::MAX);
    settings
        .queue_budget
        .saturating_add(settings.ttft_budget)
        .saturating_add(decode)
        .min(settings.ceiling)
}

/// One profile's recent pace: the mean time per output token of its last finished requests.
#[derive(Debug, Clone, Default)]
struct Window {
    samples: VecDeque<Duration>,
}

impl Window {
    fn push(&mut self, per_token: Duration) {
        if self.samples.len() == PACE_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(per_token);
    }

    /// The nearest-rank p95, once there are [`PACE_MIN_SAMPLES`] samples.
    fn p95(&self) -> Option<Duration> {
        if self.samples.len() < PACE_MIN_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let rank = (95 * sorted.len()).div_ceil(100).max(1);
        sorted.get(rank - 1).copied()
    }
}

/// The pace windows of every profile. `Sync`: handlers observe and read it concurrently.
#[derive(Debug, Default)]
pub struct Paces {
    windows: Mutex<BTreeMap<ProfileName, Window>>,
}

impl Paces {
    /// Records a request of `profile` the model generated: `tokens` tokens, the last
    /// `decode_time` after the first. Fewer than two tokens say nothing and are ignored.
    pub fn observe(&self, profile: ProfileName, tokens: usize, decode_time: Duration) {
        let Some(gaps) = tokens.checked_sub(1).filter(|&g| g > 0) else {
            return;
        };
        let per_token = decode_time / u32::try_from(gaps).unwrap_or(u32::MAX);
        self.lock().entry(profile).or_default().push(per_token);
    }

    /// The profile's p95 time per output token, when known.
    pub fn p95(&self, profile: ProfileName) -> Option<Duration> {
        self.lock().get(&profile).and_then(Window::p95)
    }

    /// The timeout of a request of `max_tokens` on `profile` now.
    pub fn timeout(
        &self,
        profile: ProfileName,
        settings: &TimeoutSettings,
        max_tokens: usize,
    ) -> Duration {
        timeout(settings, self.p95(profile), max_tokens)
    }

    /// A poisoned lock only means a panic elsewhere mid-push: the windows are still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ProfileName, Window>> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TimeoutSettings {
        TimeoutSettings {
            ceiling: Duration::from_secs(600),
            queue_budget: Duration::from_secs(30),
            ttft_budget: Duration::from_secs(20),
            slack: 2.0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_timeout_is_the_budgets_plus_the_paced_decode_at_most_the_ceiling() {
        let s = settings();
        // 30 s + 20 s + 500 tokens × 10 ms × 2 = 60 s.
        assert_eq!(timeout(&s, Some(ms(10)), 500), Duration::from_secs(60));
        assert_eq!(timeout(&s, Some(ms(10)), 0), Duration::from_secs(50));
        // 30 + 20 + 100 000 × 10 ms × 2 = 2050 s: the ceiling.
        assert_eq!(timeout(&s, Some(ms(10)), 100_000), s.ceiling);
        assert_eq!(timeout(&s, Some(Duration::MAX), usize::MAX), s.ceiling);
        // An unknown pace: the ceiling.
        assert_eq!(timeout(&s, None, 1), s.ceiling);
    }

    #[test]
    fn the_pace_is_unknown_until_enough_requests_finished_then_their_p95() {
        let paces = Paces::default();
        let p = ProfileName::Balanced;
        for _ in 1..PACE_MIN_SAMPLES {
            paces.observe(p, 11, ms(100)); // 10 ms per token
        }
        assert_eq!(paces.p95(p), None);
        assert_eq!(paces.timeout(p, &settings(), 500), settings().ceiling);
        paces.observe(p, 11, ms(100));
        assert_eq!(paces.p95(p), Some(ms(10)));
        assert_eq!(paces.timeout(p, &settings(), 500), Duration::from_secs(60));
        // Another profile knows nothing yet.
        assert_eq!(paces.p95(ProfileName::LatencyFirst), None);
        // One token, or none, has no pace.
        paces.observe(ProfileName::LatencyFirst, 1, ms(5));
        paces.observe(ProfileName::LatencyFirst, 0, ms(5));
        assert!(paces.lock().get(&ProfileName::LatencyFirst).is_none());
    }

    #[test]
    fn the_p95_is_by_nearest_rank_over_the_last_requests_only() {
        let paces = Paces::default();
        let p = ProfileName::QualityFirst;
        // 20 requests at 1..=20 ms per token: the 95th percentile is the 19th, 19 ms.
        for n in 1..=20 {
            paces.observe(p, 2, ms(n));
        }
        assert_eq!(paces.p95(p), Some(ms(19)));
        // A full window of 1 ms pushes every older sample out.
        for _ in 0..PACE_WINDOW {
            paces.observe(p, 2, ms(1));
        }
        assert_eq!(paces.p95(p), Some(ms(1)));
        assert_eq!(paces.lock()[&p].samples.len(), PACE_WINDOW);
    }
}
