//! How a sequence's tokens are sampled: the request's parameters as received
//! ([`SamplingParams`]), their validation, and the one validated form ([`SamplingSpec`]: the
//! parameters with the sequence's resolved seed) that the supervisor keeps with a sequence and
//! sends to the last stage in every step header ([`SampleAt`]). The draw itself (logits in,
//! token out) is the stage worker's (`stage-worker/src/sampler.rs`).
//!
//! # Invariants
//!
//! * **Validated once.** A [`SamplingSpec`] exists only through [`SamplingSpec::new`] (or
//!   [`SamplingParams::spec`]), which checks every field: the API validates a request's
//!   parameters with the same [`SamplingParams::validate`], so the API and the worker cannot
//!   disagree. Decoding one from the wire validates it again (a peer's bytes are never
//!   trusted), so the sampler never sees a field out of range.
//! * **Replay determinism.** The uniform number behind the `i`-th generated token of a sequence
//!   is a pure function of `(seed, i)` ([`uniform`]): a ChaCha8 generator seeded with the
//!   sequence's seed, on stream `i`. Nothing else feeds it — not how many tokens a process
//!   sampled before, not the other sequences in the batch, not the sampler's scratch buffers. A
//!   sequence re-run from a checkpoint after a worker crash therefore samples the same tokens,
//!   provided the caller keeps the spec (and so the seed) with the sequence. A request without
//!   a seed gets one drawn once, when the sequence is created ([`SamplingParams::resolved_seed`],
//!   bound by [`SamplingParams::spec`]); that seed is then part of the sequence's state like
//!   any user-given one. `i` is the 0-based index of the token among the sequence's
//!   *generated* tokens (0 for the first token after the prompt).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Highest accepted temperature (OpenAI's range is 0..=2).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Most top alternatives a request may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_LOGPROBS: usize = 20;

/// A request's sampling parameters as received; [`SamplingSpec::new`] is the only way to
/// sample with them, and it validates them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Logits are divided by this before the softmax; 0 means greedy (argmax). Finite, 0..=2.
    pub temperature: f32,
    /// Nucleus mass, in (0, 1]: keep the smallest prefix of the ranked candidates whose
    /// probability reaches it (at least one token). 1 disables it.
    pub top_p: f32,
    /// Keep only the k highest logits (k ≥ 1); `None` disables it. Applied before top-p.
    pub top_k: Option<usize>,
    /// The request's seed; `None` draws one at creation ([`Self::resolved_seed`]).
    pub seed: Option<u64>,
    /// How many top alternatives to report with each token (0..=20); `None` reports none.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// The model card's recommendation: temperature 1, top_p 1, no seed, no logprobs.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            logprobs: None,
        }
    }
}

/// A sampling parameter out of range; the message names the field, the limit and the value.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number between 0 and {MAX_TEMPERATURE}, got {0}")]
    Temperature(f32),
    #[error("top_p must be greater than 0 and at most 1, got {0}")]
    TopP(f32),
    #[error("top_k must be at least 1 when set, got {0}")]
    TopK(usize),
    #[error("logprobs must be at most {MAX_LOGPROBS}, got {0}")]
    Logprobs(usize),
}

impl SamplingParams {
    /// Checks every field against its range, naming the first one out of range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(SamplingError::Temperature(t));
        }
        // Written so that NaN fails too.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK(0));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(SamplingError::Logprobs(n));
            }
        }
        Ok(())
    }

    /// The seed to store with a new sequence: the request's, or a fresh random one. Call it
    /// once per sequence at creation and keep the result; calling it again without a request
    /// seed gives a different value.
    pub fn resolved_seed(&self) -> u64 {
        self.seed.unwrap_or_else(fresh_seed)
    }

    /// Validates and binds the sequence's seed ([`Self::resolved_seed`]): call it once, when
    /// the sequence is submitted.
    pub fn spec(&self) -> Result<SamplingSpec, SamplingError> {
        SamplingSpec::new(*self, self.resolved_seed())
    }
}

/// A sequence's validated sampling parameters with its resolved seed: the only form the
/// supervisor keeps, sends to the last stage and samples with. Cheap to copy; keep one per
/// sequence (its `seed()` is part of the sequence's state).
///
/// Only constructible through validation ([`Self::new`], [`SamplingParams::spec`]); decoding
/// one (serde) validates it too, and fails on a field out of range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedSpec")]
pub struct SamplingSpec {
    params: SamplingParams,
    seed: u64,
}

/// The wire fields of a [`SamplingSpec`] before validation.
#[derive(Deserialize)]
struct UncheckedSpec {
    params: SamplingParams,
    seed: u64,
}

impl TryFrom<UncheckedSpec> for SamplingSpec {
    type Error = SamplingError;

    fn try_from(raw: UncheckedSpec) -> Result<Self, SamplingError> {
        Self::new(raw.params, raw.seed)
    }
}

impl SamplingSpec {
    /// Validates `params` and binds the sequence's `seed` (normally `params.resolved_seed()`,
    /// or the seed restored from a checkpoint).
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self { params, seed })
    }

    /// The parameters as the request gave them (validated; `seed` is the request's own, `None`
    /// when it gave none: the bound seed is [`Self::seed`]).
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed that, with the token index, fixes every draw of this sequence.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Greedy (argmax): temperature 0, or top_k 1. The draw's uniform number is not used.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == Some(1)
    }
}

impl Default for SamplingSpec {
    /// [`SamplingParams::default`] with seed 0 (valid by construction).
    fn default() -> Self {
        Self {
            params: SamplingParams::default(),
            seed: 0,
        }
    }
}

/// One token to sample, as a step header asks for it: the sequence's spec and the index of the
/// generated token the draw produces (0 = the first after the prompt).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleAt {
    pub spec: SamplingSpec,
    pub index: u64,
}

/// A random seed for a sequence that came without one. Not cryptographic: SipHash keyed by
/// std's per-thread random keys (which also differ on every call) over the current time.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.finish()
}

/// The uniform number in [0, 1) behind the `index`-th generated token of a sequence seeded
/// with `seed`: 53 bits of the first u64 of ChaCha8 (seeded by `seed_from_u64(seed)`) on
/// stream `index`. A pure function of its arguments — the replay rule of this module.
pub fn uniform(seed: u64, index: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    // 2^-53: exact in f64.
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    (rng.next_u64() >> 11) as f64 * SCALE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_index_same_uniform_different_index_differs() {
        assert_eq!(uniform(42, 5), uniform(42, 5));
        assert_ne!(uniform(42, 5), uniform(43, 5));
        let mut us: Vec<u64> = (0..2000).map(|i| uniform(42, i).to_bits()).collect();
        us.sort_unstable();
        us.dedup();
        assert_eq!(us.len(), 2000, "draws for different indices must differ");
        for i in 0..2000 {
            let u = uniform(42, i);
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let ok = SamplingParams::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..ok
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: 2.5,
                    ..ok
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..ok
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..ok
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..ok }, "top_p"),
            (SamplingParams { top_p: 1.01, ..ok }, "top_p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..ok
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..ok
                },
                "top_k",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..ok
                },
                "logprobs",
            ),
        ];
        for (p, field) in bad {
            let err = p.validate().expect_err(field);
            let msg = err.to_string();
            assert!(msg.starts_with(field), "{msg:?} should name {field}");
            assert!(SamplingSpec::new(p, 0).is_err());
            assert!(p.spec().is_err());
        }
        assert_eq!(
            SamplingParams {
                temperature: 2.5,
                ..ok
            }
            .validate(),
            Err(SamplingError::Temperature(2.5))
        );
        assert!(SamplingError::Logprobs(21).to_string().contains("21"));
        assert!(SamplingError::Logprobs(21).to_string().contains("20"));
        // The edges are accepted.
        for p in [
            SamplingParams {
                temperature: 0.0,
                ..ok
            },
            SamplingParams {
                temperature: 2.0,
                ..ok
            },
            SamplingParams {
                top_p: 1.0,
                top_k: Some(1),
                logprobs: Some(20),
                ..ok
            },
            SamplingParams {
                top_p: 1e-9,
                logprobs: Some(0),
                ..ok
            },
        ] {
            assert_eq!(p.validate(), Ok(()));
        }
    }

    #[test]
    fn seeds_resolve_once() {
        let given = SamplingParams {
            seed: Some(99),
            ..SamplingParams::default()
        };
        assert_eq!(given.resolved_seed(), 99);
        assert_eq!(given.spec().map(|s| s.seed()), Ok(99));
        let unseeded = SamplingParams::default();
        let a = unseeded.resolved_seed();
        let b = unseeded.resolved_seed();
        assert_ne!(a, b, "fresh seeds should differ");
        // The spec keeps the request's own (absent) seed beside the bound one.
        let spec = unseeded.spec().expect("valid");
        assert_eq!(spec.params().seed, None);
    }

    #[test]
    fn a_spec_round_trips_on_the_wire_and_a_bad_one_does_not_decode() {
        let params = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            top_k: Some(40),
            seed: None,
            logprobs: Some(3),
        };
        let at = SampleAt {
            spec: SamplingSpec::new(params, 99).expect("valid"),
            index: 5,
        };
        let bytes = crate::wire::encode(&at).expect("encode");
        let back: SampleAt = crate::wire::decode(&bytes).expect("decode");
        assert_eq!(back, at);
        // A spec out of range (written by hand, as a corrupt or hostile peer could) is refused.
        let forged = UncheckedWire {
            params: SamplingParams {
                top_k: Some(0),
                ..params
            },
            seed: 1,
        };
        let bytes = crate::wire::encode(&forged).expect("encode");
        assert!(crate::wire::decode::<SamplingSpec>(&bytes).is_err());
    }

    /// The field layout of [`SamplingSpec`], serializable without validation.
    #[derive(Serialize)]
    struct UncheckedWire {
        params: SamplingParams,
        seed: u64,
    }
}
