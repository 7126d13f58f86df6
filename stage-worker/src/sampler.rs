//! Token sampling on the last pipeline stage: logits in, one token (and its logprobs) out.
//!
//! Owns the draw (temperature → top-k → top-p → one uniform number) and the logprob report,
//! for a sequence's validated [`SamplingSpec`] (`gptossd_shared::sampling`: the parameters,
//! their validation, the seed and the uniform number behind each draw). Nothing is validated
//! here: a spec cannot exist out of range. Which tokens end a turn is the chat format's
//! business (the supervisor's `chat`), passed in as data. It knows nothing of batches, KV or
//! the tokenizer: the caller hands it one sequence's logits and the index of the token being
//! generated.
//!
//! # Invariants
//!
//! * **Replay determinism.** The uniform number behind the `i`-th generated token of a sequence
//!   is `gptossd_shared::sampling::uniform(seed, i)`, a pure function of its arguments, and the
//!   draw depends on nothing else (not the scratch buffers, not the other sequences): see
//!   `gptossd_shared::sampling` for the rule and how seeds are bound.
//! * **Exact and ordered arithmetic.** Probabilities are computed in f64 from the f32 logits;
//!   every sum runs in a fixed order (ascending id for whole-vocabulary sums, the candidate
//!   order below for the nucleus), and the draw scans in the same order as the sum it is
//!   compared against, so the result never depends on hash or thread order. Across machines
//!   the only remaining difference is the platform `exp` in its last f64 bit.
//! * **Candidate order.** Candidates are ranked by logit descending, ties by id ascending; the
//!   same order drives greedy (argmax, lowest id on ties), top-k, top-p and the top-N logprobs.
//! * **Vocabulary edge.** Only the first [`VOCAB_EDGE`] logits are candidates, whatever length
//!   the caller passes: an id ≥ 201088 is never sampled nor reported (reference §8 item 7).
//! * **Non-finite logits.** NaN counts as −inf (never sampled). If some logits are +inf, they
//!   share all the probability equally and finite logits get none (the limit of the softmax).
//!   If no logit is above −inf, sampling returns [`LogitsError::NoCandidate`]; it never panics.
//!
//! # Logprobs
//!
//! Reported logprobs are the log-softmax of the *raw* logits, before temperature, top-k and
//! top-p, as OpenAI reports them: they describe the model, not the sampling filter. So a token
//! sampled at temperature 0.3 still shows the model's own probability, and an alternative that
//! top-p excluded still appears with its logprob. Impossible tokens (NaN/−inf logits) have
//! logprob −inf; the API layer decides how to print that.
//!
//! # Cost
//!
//! One or two `exp` passes over the vocabulary per token. No full sort: greedy is a scan,
//! top_p = 1 without top_k samples straight from the unsorted softmax, top-k is a partial
//! selection of k, and top-p ranks candidates in growing chunks (256, ×4 …) by partial
//! selection until the nucleus mass is reached, so a typical nucleus costs O(vocab).

use std::cmp::Ordering;

use gptossd_shared::sampling::{uniform, SamplingSpec};
use gptossd_shared::VOCAB_EDGE;
use thiserror::Error;

/// First chunk size of the progressive top-p ranking; each later chunk is 4× larger.
const TOP_P_FIRST_CHUNK: usize = 256;

/// The logits handed to [`sample`] admit no token. An engine fault, not a client one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LogitsError {
    #[error("no logits to sample from (empty slice)")]
    Empty,
    #[error("no candidate token: all {candidates} logits below id {VOCAB_EDGE} are NaN or -inf")]
    NoCandidate { candidates: usize },
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token id, always < [`VOCAB_EDGE`].
    pub token: u32,
    /// Its log-probability under the raw logits (temperature-independent, see module doc).
    pub logprob: f32,
    /// The top-N alternatives `(id, logprob)`, N = `logprobs` (capped at the candidate count);
    /// sorted by logprob descending, ties by id ascending. Empty when `logprobs` is `None`.
    pub top: Vec<(u32, f32)>,
}

/// Reusable buffers for [`sample`], one per thread; their contents never
/// influence the result.
#[derive(Debug, Default)]
pub struct SampleScratch {
    /// Temperature-scaled weights `exp((l - max) / T)` by id.
    weights: Vec<f64>,
    /// `(logit, id)` candidates being ranked.
    ranked: Vec<(f32, u32)>,
}

/// Candidate order: logit descending, then id ascending. Logits are sanitised (no NaN, no −0.0),
/// so this is the numeric order.
fn rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The logits as the sampler sees them: NaN → −inf, −0.0 → +0.0, and, when some are +inf,
/// those become 0 and all others −inf (the softmax limit). Computed per read, never stored.
struct Effective<'a> {
    raw: &'a [f32],
    has_pos_inf: bool,
}

impl Effective<'_> {
    fn get(&self, id: usize) -> f32 {
        let x = self.raw[id];
        if x.is_nan() {
            f32::NEG_INFINITY
        } else if self.has_pos_inf {
            if x == f32::INFINITY {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        } else {
            // Adding +0.0 turns −0.0 into +0.0, so ties at zero rank by id.
            x + 0.0
        }
    }

    fn len(&self) -> usize {
        self.raw.len()
    }
}

/// Samples the `index`-th generated token of a sequence with `spec` from `logits`, reusing
/// `scratch`. Only the first [`VOCAB_EDGE`] logits are candidates.
pub fn sample(
    spec: &SamplingSpec,
    logits: &[f32],
    index: u64,
    scratch: &mut SampleScratch,
) -> Result<Sampled, LogitsError> {
    if logits.is_empty() {
        return Err(LogitsError::Empty);
    }
    let params = spec.params();
    let raw = &logits[..logits.len().min(VOCAB_EDGE as usize)];
    let eff = Effective {
        raw,
        has_pos_inf: raw.contains(&f32::INFINITY),
    };
    // Greedy argmax over the effective logits; also the max for the softmaxes.
    let (best, max) = argmax(&eff);
    if max == f32::NEG_INFINITY {
        return Err(LogitsError::NoCandidate {
            candidates: raw.len(),
        });
    }
    let max64 = f64::from(max);
    let t = params.temperature;
    let greedy = spec.is_greedy();

    // log Σ exp(l - max) over the raw (temperature-free) logits, ascending id. When T = 1
    // the same pass fills the sampling weights.
    let fill = !greedy && t == 1.0;
    if fill {
        scratch.weights.clear();
        scratch.weights.reserve(eff.len());
    }
    let mut raw_sum = 0.0f64;
    for id in 0..eff.len() {
        let w = (f64::from(eff.get(id)) - max64).exp();
        raw_sum += w;
        if fill {
            scratch.weights.push(w);
        }
    }
    let lse = max64 + raw_sum.ln();

    let token = if greedy {
        best
    } else {
        if !fill {
            let t64 = f64::from(t);
            scratch.weights.clear();
            scratch
                .weights
                .extend((0..eff.len()).map(|id| ((f64::from(eff.get(id)) - max64) / t64).exp()));
        }
        let u = uniform(spec.seed(), index);
        draw(spec, &eff, u, scratch)
    };

    let logprob = (f64::from(eff.get(token as usize)) - lse) as f32;
    let top = match params.logprobs {
        Some(n) if n > 0 => top_logprobs(&eff, n, lse, &mut scratch.ranked),
        _ => Vec::new(),
    };
    Ok(Sampled {
        token,
        logprob,
        top,
    })
}

/// Draws with `u` from `scratch.weights` after top-k and top-p.
fn draw(spec: &SamplingSpec, eff: &Effective<'_>, u: f64, scratch: &mut SampleScratch) -> u32 {
    let weights = &scratch.weights;
    let top_p = f64::from(spec.params().top_p);
    // Candidates, in id order: tokens with non-zero weight (others can never be drawn).
    let ranked = &mut scratch.ranked;
    ranked.clear();
    ranked.extend(
        (0..weights.len())
            .filter(|&id| weights[id] > 0.0)
            .map(|id| (eff.get(id), id as u32)),
    );
    let w = |c: &(f32, u32)| weights[c.1 as usize];

    let kept = match spec.params().top_k.filter(|&k| k < ranked.len()) {
        Some(k) => {
            // Top-k by partial selection; top-p then over the renormalised k.
            ranked.select_nth_unstable_by(k - 1, rank);
            ranked.truncate(k);
            ranked.sort_unstable_by(rank);
            let total: f64 = ranked.iter().map(w).sum();
            nucleus_len(ranked, &w, top_p * total)
        }
        // The whole softmax: no ranking, the draw scans in id order.
        None if top_p >= 1.0 => ranked.len(),
        None => {
            let total: f64 = ranked.iter().map(w).sum();
            progressive_nucleus(ranked, &w, top_p * total)
        }
    };
    // The draw scans the kept candidates in the order their mass was summed.
    let nucleus = &ranked[..kept];
    let mass: f64 = nucleus.iter().map(w).sum();
    scan(nucleus.iter().map(|c| (c.1, w(c))), u * mass)
}

/// Argmax of the effective logits, lowest id on ties; `(0, −inf)` when none is above −inf.
fn argmax(eff: &Effective<'_>) -> (u32, f32) {
    let mut best = 0u32;
    let mut max = f32::NEG_INFINITY;
    for id in 0..eff.len() {
        let x = eff.get(id);
        if x > max {
            max = x;
            best = id as u32;
        }
    }
    (best, max)
}

/// The first `(id, w)` at which the running sum exceeds `target`. The running sum over the
/// whole iterator equals the total `target` was scaled from (same terms, same order) and
/// `target` < total, so a token with positive weight is always found; the fallback (last
/// positive weight) only guards against a caller breaking that.
fn scan(items: impl Iterator<Item = (u32, f64)>, target: f64) -> u32 {
    let mut cum = 0.0f64;
    let mut last = None;
    for (id, w) in items {
        if w > 0.0 {
            cum += w;
            last = Some(id);
            if cum > target {
                return id;
            }
        }
    }
    last.unwrap_or(0)
}

/// Length of the smallest prefix of `ranked` whose weight reaches `target` (at least 1 when
/// `ranked` is not empty; all of it if rounding keeps the sum below).
fn nucleus_len(ranked: &[(f32, u32)], w: &impl Fn(&(f32, u32)) -> f64, target: f64) -> usize {
    let mut cum = 0.0f64;
    for (i, c) in ranked.iter().enumerate() {
        cum += w(c);
        if cum >= target {
            return i + 1;
        }
    }
    ranked.len()
}

/// Ranks `ranked` chunk by chunk (partial selection of the best remaining, then a sort of that
/// chunk) until the weight of the ranked prefix reaches `target`; returns the nucleus length.
/// `ranked[..len]` is then in candidate order.
fn progressive_nucleus(
    ranked: &mut [(f32, u32)],
    w: &impl Fn(&(f32, u32)) -> f64,
    target: f64,
) -> usize {
    let mut done = 0usize;
    let mut chunk = TOP_P_FIRST_CHUNK;
    let mut cum = 0.0f64;
    while done < ranked.len() {
        let rest = &mut ranked[done..];
        let take = chunk.min(rest.len());
        if take < rest.len() {
            rest.select_nth_unstable_by(take - 1, rank);
        }
        rest[..take].sort_unstable_by(rank);
        for (i, c) in rest[..take].iter().enumerate() {
            cum += w(c);
            if cum >= target {
                return done + i + 1;
            }
        }
        done += take;
        chunk = chunk.saturating_mul(4);
    }
    ranked.len()
}

/// The `n` best `(id, logprob)` under the raw log-softmax, candidate order.
fn top_logprobs(
    eff: &Effective<'_>,
    n: usize,
    lse: f64,
    ranked: &mut Vec<(f32, u32)>,
) -> Vec<(u32, f32)> {
    ranked.clear();
    ranked.extend((0..eff.len()).map(|id| (eff.get(id), id as u32)));
    let n = n.min(ranked.len());
    if n < ranked.len() {
        ranked.select_nth_unstable_by(n - 1, rank);
    }
    let best = &mut ranked[..n];
    best.sort_unstable_by(rank);
    best.iter()
        .map(|&(l, id)| (id, (f64::from(l) - lse) as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gptossd_shared::sampling::{SamplingParams, MAX_LOGPROBS};

    fn params(temperature: f32, top_p: f32, top_k: Option<usize>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(7),
            logprobs: None,
        }
    }

    fn sampler(p: SamplingParams) -> SamplingSpec {
        SamplingSpec::new(p, p.seed.unwrap_or(0)).expect("valid test params")
    }

    /// Samples with fresh scratch buffers.
    fn sample1(spec: &SamplingSpec, logits: &[f32], index: u64) -> Result<Sampled, LogitsError> {
        sample(spec, logits, index, &mut SampleScratch::default())
    }

    /// softmax(l / t) in f64.
    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| ((f64::from(l) - m) / t).exp())
            .collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    fn counts(s: &SamplingSpec, logits: &[f32], draws: u64) -> Vec<u64> {
        let mut c = vec![0u64; logits.len()];
        let mut scratch = SampleScratch::default();
        for i in 0..draws {
            let tok = sample(s, logits, i, &mut scratch).expect("sample").token;
            c[tok as usize] += 1;
        }
        c
    }

    /// Every count within 5 standard errors of its expectation.
    fn assert_matches(c: &[u64], p: &[f64], draws: u64) {
        let n = draws as f64;
        for (id, (&k, &pi)) in c.iter().zip(p).enumerate() {
            let sd = (n * pi * (1.0 - pi)).sqrt().max(1e-9);
            let z = (k as f64 - n * pi) / sd;
            assert!(
                z.abs() < 5.0,
                "token {id}: {k} draws, expected {:.1} (p={pi:.4}), z={z:.2}",
                n * pi
            );
        }
    }

    /// A pseudo-random vocabulary-sized logit vector (deterministic, no rng crate needed).
    fn big_logits(salt: u64) -> Vec<f32> {
        let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..VOCAB_EDGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Roughly uniform in [-8, 8), with a few sharper peaks.
                let v = (x >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0;
                if x.is_multiple_of(5000) {
                    v + 10.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_id_on_ties() {
        let s = sampler(params(0.0, 1.0, None));
        assert_eq!(sample1(&s, &[0.1, 3.0, -2.0, 2.9], 0).unwrap().token, 1);
        assert_eq!(sample1(&s, &[1.0, 5.0, 2.0, 5.0, 5.0], 0).unwrap().token, 1);
        // −0.0 and +0.0 tie: lowest id.
        assert_eq!(sample1(&s, &[-1.0, -0.0, 0.0], 0).unwrap().token, 1);
        assert_eq!(sample1(&s, &[-1.0, 0.0, -0.0], 0).unwrap().token, 1);
        // Any index, any seed: greedy ignores the draw.
        for i in 0..50 {
            assert_eq!(sample1(&s, &[1.0, 5.0, 2.0, 5.0], i).unwrap().token, 1);
        }
    }

    #[test]
    fn greedy_on_full_vocabulary() {
        let logits = big_logits(3);
        let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
        for (i, &l) in logits.iter().enumerate() {
            if l > max {
                best = i;
                max = l;
            }
        }
        let s = sampler(params(0.0, 1.0, None));
        assert_eq!(sample1(&s, &logits, 0).unwrap().token as usize, best);
    }

    #[test]
    fn same_seed_and_index_same_token_different_index_differs() {
        let logits = [0.0f32; 16];
        let s = sampler(params(1.0, 1.0, None));
        let a: Vec<u32> = (0..200)
            .map(|i| sample1(&s, &logits, i).unwrap().token)
            .collect();
        let b: Vec<u32> = (0..200)
            .map(|i| sample1(&s, &logits, i).unwrap().token)
            .collect();
        assert_eq!(a, b);
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 12,
            "only {} distinct tokens",
            distinct.len()
        );
        let other = sampler(SamplingParams {
            seed: Some(8),
            ..params(1.0, 1.0, None)
        });
        let c: Vec<u32> = (0..200)
            .map(|i| sample1(&other, &logits, i).unwrap().token)
            .collect();
        assert_ne!(a, c, "a different seed must give a different sequence");
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 3.0, 2.0];
        let draws = 20_000;
        let c = counts(&sampler(params(1.0, 1.0, None)), &logits, draws);
        assert_matches(&c, &softmax(&logits, 1.0), draws);
    }

    #[test]
    fn temperature_scaling_sharpens() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 3.0, 2.0];
        let draws = 20_000;
        let hot = counts(&sampler(params(1.0, 1.0, None)), &logits, draws);
        let cold = counts(&sampler(params(0.5, 1.0, None)), &logits, draws);
        assert_matches(&cold, &softmax(&logits, 0.5), draws);
        assert!(
            cold[4] > hot[4] + 2_000,
            "argmax {} at T=0.5 vs {} at T=1",
            cold[4],
            hot[4]
        );
        let flat = counts(&sampler(params(2.0, 1.0, None)), &logits, draws);
        assert_matches(&flat, &softmax(&logits, 2.0), draws);
        assert!(flat[4] < hot[4]);
    }

    #[test]
    fn top_k_and_top_p_renormalise() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 3.0, 2.0];
        let draws = 20_000;
        // top_k = 3: ids 4, 1, 5 (tie 1/5 both kept, ranked by id).
        let c = counts(&sampler(params(1.0, 1.0, Some(3))), &logits, draws);
        let sub = softmax(&[3.0, 2.0, 2.0], 1.0);
        let expect = [0.0, sub[1], 0.0, 0.0, sub[0], sub[2]];
        assert_matches(&c, &expect, draws);
        // top_k = 2 keeps 4 and the lower id of the tie (1), never 5.
        let c = counts(&sampler(params(1.0, 1.0, Some(2))), &logits, draws);
        assert_eq!(c[5], 0);
        assert_eq!(c[1] + c[4], draws);
        // top_p: softmax ≈ [.069 .187 .042 .009 .507 .187]: nucleus 0.65 = {4, 1} (1 before 5).
        let p = softmax(&logits, 1.0);
        assert!(p[4] < 0.65 && p[4] + p[1] >= 0.65);
        let c = counts(&sampler(params(1.0, 0.65, None)), &logits, draws);
        let z = p[4] + p[1];
        let expect = [0.0, p[1] / z, 0.0, 0.0, p[4] / z, 0.0];
        assert_matches(&c, &expect, draws);
        // top_k then top_p on the renormalised top-k distribution.
        let c = counts(&sampler(params(1.0, 0.65, Some(3))), &logits, draws);
        let expect = [
            0.0,
            sub[1] / (sub[0] + sub[1]),
            0.0,
            0.0,
            sub[0] / (sub[0] + sub[1]),
            0.0,
        ];
        assert!(sub[0] < 0.65 && sub[0] + sub[1] >= 0.65);
        assert_matches(&c, &expect, draws);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = big_logits(11);
        let g = sampler(params(0.0, 1.0, None));
        let k1 = sampler(params(1.5, 0.9, Some(1)));
        let want = sample1(&g, &logits, 0).unwrap().token;
        for i in 0..5 {
            assert_eq!(sample1(&k1, &logits, i).unwrap().token, want);
        }
        let small = [2.0f32, 7.0, 7.0, 1.0];
        for i in 0..100 {
            assert_eq!(sample1(&k1, &small, i).unwrap().token, 1);
        }
    }

    #[test]
    fn tiny_top_p_keeps_only_the_top_token() {
        let s = sampler(params(2.0, 1e-6, None));
        let logits = [1.0f32, 1.5, 1.4, 0.0];
        for i in 0..500 {
            assert_eq!(sample1(&s, &logits, i).unwrap().token, 1);
        }
        let big = big_logits(5);
        let want = sample1(&sampler(params(0.0, 1.0, None)), &big, 0)
            .unwrap()
            .token;
        for i in 0..5 {
            assert_eq!(sample1(&s, &big, i).unwrap().token, want);
        }
    }

    /// Reference nucleus draw with a full sort, same summation orders as the fast path.
    fn naive_draw(logits: &[f32], t: f64, top_p: f64, top_k: Option<usize>, u: f64) -> u32 {
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((f64::from(l) - m) / t).exp())
            .collect();
        let mut order: Vec<(f32, u32)> = (0..logits.len())
            .filter(|&i| w[i] > 0.0)
            .map(|i| (logits[i], i as u32))
            .collect();
        order.sort_by(rank);
        let total: f64 = match top_k {
            Some(k) => {
                order.truncate(k);
                order.iter().map(|c| w[c.1 as usize]).sum()
            }
            None => w.iter().sum(),
        };
        let mut cum = 0.0;
        let mut keep = order.len();
        for (i, c) in order.iter().enumerate() {
            cum += w[c.1 as usize];
            if cum >= top_p * total {
                keep = i + 1;
                break;
            }
        }
        let nucleus = &order[..keep];
        let mass: f64 = nucleus.iter().map(|c| w[c.1 as usize]).sum();
        let mut cum = 0.0;
        for c in nucleus {
            cum += w[c.1 as usize];
            if cum > u * mass {
                return c.1;
            }
        }
        unreachable!("the scan reaches the mass")
    }

    #[test]
    fn fast_paths_match_full_sort_on_full_vocabulary() {
        let cases: [(f32, f32, Option<usize>); 5] = [
            (1.0, 0.9, None),
            (0.7, 0.95, None),
            (1.3, 0.5, Some(50)),
            (1.0, 1.0, Some(40)),
            (1.0, 0.999, None),
        ];
        for (n, &(t, p, k)) in cases.iter().enumerate() {
            let logits = big_logits(100 + n as u64);
            let s = sampler(params(t, p, k));
            let mut scratch = SampleScratch::default();
            for i in 0..6 {
                let got = sample(&s, &logits, i, &mut scratch).unwrap().token;
                let want = naive_draw(&logits, f64::from(t), f64::from(p), k, uniform(7, i));
                assert_eq!(
                    got, want,
                    "case {n} (T={t}, top_p={p}, top_k={k:?}) index {i}"
                );
            }
        }
    }

    #[test]
    fn logprobs_equal_log_softmax_and_are_sorted() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 3.0, 2.0, f32::NAN];
        let m = 3.0f64;
        let z: f64 = logits[..6].iter().map(|&l| (f64::from(l) - m).exp()).sum();
        let lp = |id: usize| f64::from(logits[id]) - m - z.ln();
        // Temperature does not change the reported logprobs.
        for t in [0.0f32, 0.5, 1.0, 2.0] {
            let s = sampler(SamplingParams {
                logprobs: Some(4),
                ..params(t, 1.0, None)
            });
            for i in 0..20 {
                let out = sample1(&s, &logits, i).unwrap();
                assert!((f64::from(out.logprob) - lp(out.token as usize)).abs() < 1e-6);
                let ids: Vec<u32> = out.top.iter().map(|x| x.0).collect();
                assert_eq!(ids, [4, 1, 5, 0], "descending, tie 1/5 by id");
                for &(id, l) in &out.top {
                    assert!((f64::from(l) - lp(id as usize)).abs() < 1e-6);
                }
                assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
            }
        }
        // Asking for more than the vocabulary returns all of it; NaN last with −inf.
        let s = sampler(SamplingParams {
            logprobs: Some(20),
            ..params(1.0, 1.0, None)
        });
        let out = sample1(&s, &logits, 0).unwrap();
        assert_eq!(out.top.len(), 7);
        assert_eq!(out.top[6], (6, f32::NEG_INFINITY));
        // No logprobs requested: empty list, chosen logprob still there.
        let out = sample1(&sampler(params(1.0, 1.0, None)), &logits, 0).unwrap();
        assert!(out.top.is_empty());
        assert!((f64::from(out.logprob) - lp(out.token as usize)).abs() < 1e-6);
    }

    #[test]
    fn logprobs_on_full_vocabulary_match_f64() {
        let logits = big_logits(9);
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
        let lse = m + logits
            .iter()
            .map(|&l| (f64::from(l) - m).exp())
            .sum::<f64>()
            .ln();
        let mut sorted: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        sorted.sort_by(rank);
        let s = sampler(SamplingParams {
            logprobs: Some(MAX_LOGPROBS),
            ..params(0.8, 0.9, None)
        });
        let out = sample1(&s, &logits, 3).unwrap();
        assert_eq!(out.top.len(), MAX_LOGPROBS);
        for (j, &(id, l)) in out.top.iter().enumerate() {
            assert_eq!(id, sorted[j].1);
            assert!((f64::from(l) - (f64::from(sorted[j].0) - lse)).abs() < 1e-5);
        }
        let chosen = f64::from(logits[out.token as usize]) - lse;
        assert!((f64::from(out.logprob) - chosen).abs() < 1e-5);
    }

    #[test]
    fn ids_at_or_past_vocab_edge_are_never_sampled() {
        let edge = VOCAB_EDGE as usize;
        let mut logits = vec![-5.0f32; edge + 16];
        logits[100] = 0.0;
        logits[101] = 0.0;
        for l in &mut logits[edge..] {
            *l = 100.0;
        }
        let greedy = sampler(SamplingParams {
            logprobs: Some(5),
            ..params(0.0, 1.0, None)
        });
        let out = sample1(&greedy, &logits, 0).unwrap();
        assert_eq!(out.token, 100);
        assert!(out.top.iter().all(|&(id, _)| id < VOCAB_EDGE));
        for p in [
            params(1.0, 1.0, None),
            params(2.0, 0.9, None),
            params(1.0, 1.0, Some(10)),
        ] {
            let s = sampler(p);
            for i in 0..30 {
                assert!(sample1(&s, &logits, i).unwrap().token < VOCAB_EDGE);
            }
        }
        // Only the edge and beyond are finite: nothing to sample.
        let mut only_past = vec![f32::NEG_INFINITY; edge + 2];
        only_past[edge] = 1.0;
        assert_eq!(
            sample1(&greedy, &only_past, 0),
            Err(LogitsError::NoCandidate { candidates: edge })
        );
    }

    #[test]
    fn nan_and_infinite_logits() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        for p in [
            params(0.0, 1.0, None),
            params(1.0, 1.0, None),
            params(1.0, 0.5, Some(3)),
        ] {
            let s = sampler(p);
            for i in 0..200 {
                let tok = sample1(&s, &[nan, 0.0, nan, ninf, 0.0], i).unwrap().token;
                assert!(tok == 1 || tok == 4, "NaN/−inf token {tok} sampled");
            }
            assert_eq!(
                sample1(&s, &[nan, ninf, nan], 0),
                Err(LogitsError::NoCandidate { candidates: 3 })
            );
            assert_eq!(sample1(&s, &[], 0), Err(LogitsError::Empty));
            // +inf logits take all the mass, shared equally.
            for i in 0..200 {
                let tok = sample1(&s, &[5.0, f32::INFINITY, nan, f32::INFINITY], i).unwrap();
                assert!(tok.token == 1 || tok.token == 3);
                assert!((tok.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
            }
        }
        // Greedy among +inf: lowest id.
        let g = sampler(params(0.0, 1.0, None));
        assert_eq!(
            sample1(&g, &[f32::INFINITY, 1.0, f32::INFINITY], 0)
                .unwrap()
                .token,
            0
        );
    }

    #[test]
    fn a_spec_rebuilt_from_its_stored_seed_replays_exactly() {
        let unseeded = SamplingParams::default();
        let s = unseeded.spec().unwrap();
        let restored = SamplingSpec::new(unseeded, s.seed()).unwrap();
        let logits = [0.3f32, 0.1, 0.2, 0.4, 0.0];
        for i in 0..50 {
            assert_eq!(sample1(&s, &logits, i), sample1(&restored, &logits, i));
        }
    }

    #[test]
    fn replay_token_alone_equals_token_in_sequence() {
        // A sequence sampled step by step in a busy process (interleaved with another
        // sequence, shared scratch) versus each step re-sampled alone after a "crash".
        let p = SamplingParams {
            logprobs: Some(3),
            ..params(0.9, 0.95, Some(64))
        };
        let s = SamplingSpec::new(p, 1234).unwrap();
        let other = SamplingSpec::new(params(1.0, 1.0, None), 5).unwrap();
        let step_logits = |i: u64| -> Vec<f32> {
            (0..300)
                .map(|id| ((id as u64 * 31 + i * 17) % 97) as f32 / 13.0)
                .collect()
        };
        let mut scratch = SampleScratch::default();
        let mut in_sequence = Vec::new();
        for i in 0..60u64 {
            let _ = sample(&other, &big_logits(i), i * 3, &mut scratch).unwrap();
            in_sequence.push(sample(&s, &step_logits(i), i, &mut scratch).unwrap());
        }
        for i in (0..60u64).rev() {
            let replayed =
                sample1(&SamplingSpec::new(p, 1234).unwrap(), &step_logits(i), i).unwrap();
            assert_eq!(
                replayed, in_sequence[i as usize],
                "token {i} differs on replay"
            );
        }
    }
}
