//! The response cache: the generated tokens of fully determined requests, kept to answer the
//! same request again without running the model.
//!
//! A request is *fully determined* when its sampler is greedy (temperature 0, or `top_k` 1) or
//! has an explicit seed: kernels are batch invariant and sampling depends only on (seed, token
//! index), so the same request always generates the same tokens, bit for bit. Its
//! [`CacheKey`] holds everything that changes those tokens or where they end: the served model,
//! the rendered prompt's token ids, the sampling settings (temperature, top_p, top_k, the seed
//! unless greedy, the number of logprobs), `max_tokens`, the stop tokens (`ignore_eos`) and the
//! stop strings. Everything else (the endpoint, `return_token_ids`, streaming, the profile once
//! it allowed caching) only changes how the same tokens are written out, and a cached answer
//! is written out by the same responder as a generated one.
//!
//! A [`CachedAnswer`] is a finished run's token events (ids, logprobs, top logprobs) and how it
//! ended: a stop token, the length limit or a stop string; a cancelled or failed run is never
//! stored. The cache is an LRU bounded in bytes ([`ResponseCache::capacity`]; the sizes are
//! estimates of the heap each entry holds, [`CacheKey::bytes`], [`CachedAnswer::bytes`]): an
//! insert evicts the least recently used entries until it fits, and an entry larger than the
//! whole bound is not stored. It keeps the entries and bytes of each model for the metrics.
//!
//! It does no I/O and knows nothing of HTTP; the server looks it up and fills it
//! (`server::generation`), under one lock.

use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;
use std::sync::Arc;

use crate::api::{EndedBy, GeneratedToken};
use crate::pipeline::GenRequest;

/// Bytes of bookkeeping per entry beyond its key and answer (map slots, the recency index).
const ENTRY_OVERHEAD: usize = 128;

/// What makes two requests' generated tokens the same. Built only by [`CacheKey::new`], which
/// refuses requests that are not fully determined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    model: String,
    prompt: Vec<u32>,
    /// `f32::to_bits` of the temperature (0 for every greedy request).
    temperature: u32,
    top_p: u32,
    top_k: Option<usize>,
    /// The explicit seed; `None` for a greedy request, whose seed changes nothing.
    seed: Option<u64>,
    logprobs: Option<usize>,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    stop: Vec<String>,
}

impl CacheKey {
    /// The key of `request` on the served model `model` with the stop strings `stop`, or
    /// `None` when its output is not fully determined (it samples without an explicit seed).
    pub fn new(model: &str, request: &GenRequest, stop: &[String]) -> Option<Self> {
        let p = request.sampling.params();
        let greedy = request.sampling.is_greedy();
        if !greedy && p.seed.is_none() {
            return None;
        }
        Some(Self {
            model: model.to_owned(),
            prompt: request.prompt.clone(),
            temperature: if greedy { 0 } else { p.temperature.to_bits() },
            top_p: p.top_p.to_bits(),
            top_k: p.top_k,
            seed: if greedy { None } else { p.seed },
            logprobs: p.logprobs,
            max_tokens: request.max_new_tokens,
            stop_tokens: request.stop_tokens.clone(),
            stop: stop.to_vec(),
        })
    }

    /// An estimate of the bytes it holds.
    pub fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.model.len()
            + self.prompt.len() * size_of::<u32>()
            + self.stop_tokens.len() * size_of::<u32>()
            + self
                .stop
                .iter()
                .map(|s| size_of::<String>() + s.len())
                .sum::<usize>()
    }
}

/// A finished run as the answer loop saw it: every generated token, then how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    tokens: Vec<GeneratedToken>,
    ended: EndedBy,
}

impl CachedAnswer {
    /// The answer of a run that ended on its own (a stop token, the length limit, a stop
    /// string); `None` for a cancelled one, which a replay must not repeat.
    pub fn new(tokens: Vec<GeneratedToken>, ended: EndedBy) -> Option<Self> {
        match ended {
            EndedBy::StopToken | EndedBy::Length | EndedBy::StopString => {
                Some(Self { tokens, ended })
            }
            EndedBy::Cancel => None,
        }
    }

    /// The generated tokens, in order.
    pub fn tokens(&self) -> &[GeneratedToken] {
        &self.tokens
    }

    /// How the run ended after its last token.
    pub fn ended(&self) -> EndedBy {
        self.ended
    }

    /// An estimate of the bytes it holds.
    pub fn bytes(&self) -> usize {
        size_of::<Self>()
            + self
                .tokens
                .iter()
                .map(|t| size_of::<GeneratedToken>() + t.top.len() * size_of::<(u32, f32)>())
                .sum::<usize>()
    }
}

/// The entries and bytes the cache holds for one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub entries: usize,
    pub bytes: usize,
}

#[derive(Debug)]
struct Slot {
    answer: Arc<CachedAnswer>,
    bytes: usize,
    /// The tick of its last use: its place in `ResponseCache::recency`.
    used: u64,
}

/// The LRU of answers, bounded in bytes (see the module doc).
#[derive(Debug)]
pub struct ResponseCache {
    capacity: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<Arc<CacheKey>, Slot>,
    /// Keys by last use, least recent first.
    recency: BTreeMap<u64, Arc<CacheKey>>,
    /// Per served model, every model that ever had an entry (0 once evicted, so a gauge set
    /// from it goes back to 0).
    footprints: BTreeMap<String, Footprint>,
}

impl ResponseCache {
    /// An empty cache of at most `capacity` bytes (0: it stores nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            footprints: BTreeMap::new(),
        }
    }

    /// The bound, in bytes.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes held now (at most the capacity).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The entries held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The answer stored under `key`, which becomes the most recently used.
    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.entries.get_mut(key)?;
        if let Some(k) = self.recency.remove(&slot.used) {
            self.recency.insert(tick, k);
        }
        slot.used = tick;
        Some(slot.answer.clone())
    }

    /// Stores `answer` under `key` (replacing what was there), evicting the least recently
    /// used entries until it fits; false when it is larger than the whole cache and was not
    /// stored.
    pub fn insert(&mut self, key: CacheKey, answer: CachedAnswer) -> bool {
        let bytes = key.bytes() + answer.bytes() + ENTRY_OVERHEAD;
        if bytes > self.capacity {
            return false;
        }
        self.remove(&key);
        while self.bytes + bytes > self.capacity {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            self.remove(&oldest);
        }
        self.tick += 1;
        let key = Arc::new(key);
        let footprint = self.footprints.entry(key.model.clone()).or_default();
        footprint.entries += 1;
        footprint.bytes += bytes;
        self.bytes += bytes;
        self.recency.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Slot {
                answer: Arc::new(answer),
                bytes,
                used: self.tick,
            },
        );
        true
    }

    /// Each model's entries and bytes (models whose entries were all evicted show zeros).
    pub fn footprints(&self) -> impl Iterator<Item = (&str, Footprint)> {
        self.footprints.iter().map(|(m, f)| (m.as_str(), *f))
    }

    fn remove(&mut self, key: &CacheKey) {
        let Some(slot) = self.entries.remove(key) else {
            return;
        };
        self.recency.remove(&slot.used);
        self.bytes -= slot.bytes;
        if let Some(f) = self.footprints.get_mut(&key.model) {
            f.entries -= 1;
            f.bytes -= slot.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use gptossd_shared::sampling::{SamplingParams, SamplingSpec};

    use super::*;

    fn request(params: SamplingParams) -> GenRequest {
        GenRequest {
            prompt: vec![1, 2, 3],
            max_new_tokens: 8,
            sampling: params.spec().expect("valid"),
            priority: 0,
            stop_tokens: vec![200_002],
        }
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    fn key(model: &str, prompt: Vec<u32>) -> CacheKey {
        let mut r = request(greedy());
        r.prompt = prompt;
        CacheKey::new(model, &r, &[]).expect("greedy")
    }

    fn answer(tokens: usize) -> CachedAnswer {
        let tokens = (0..tokens as u32)
            .map(|id| GeneratedToken {
                id,
                logprob: -0.5,
                top: Vec::new(),
            })
            .collect();
        CachedAnswer::new(tokens, EndedBy::Length).expect("storable")
    }

    /// The bytes `key` and `answer` take in the cache.
    fn cost(key: &CacheKey, answer: &CachedAnswer) -> usize {
        key.bytes() + answer.bytes() + ENTRY_OVERHEAD
    }

    #[test]
    fn only_fully_determined_requests_have_a_key() {
        let model = "m";
        assert!(CacheKey::new(model, &request(greedy()), &[]).is_some());
        let top_k_one = SamplingParams {
            top_k: Some(1),
            ..SamplingParams::default()
        };
        assert!(CacheKey::new(model, &request(top_k_one), &[]).is_some());
        let seeded = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        assert!(CacheKey::new(model, &request(seeded), &[]).is_some());
        // Temperature 1 without a seed: a fresh sample each time.
        assert!(CacheKey::new(model, &request(SamplingParams::default()), &[]).is_none());
        // A greedy request's seed changes nothing, so it is not part of its key.
        let greedy_seeded = SamplingParams {
            seed: Some(7),
            ..greedy()
        };
        assert_eq!(
            CacheKey::new(model, &request(greedy_seeded), &[]),
            CacheKey::new(model, &request(greedy()), &[])
        );
    }

    #[test]
    fn the_key_includes_every_field_that_changes_the_output() {
        let seeded = SamplingParams {
            temperature: 0.7,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let base_request = request(seeded);
        let base = CacheKey::new("m", &base_request, &["END".into()]).expect("seeded");
        let mut cache = ResponseCache::new(1 << 20);
        assert!(cache.insert(base.clone(), answer(4)));
        assert!(cache.get(&base).is_some(), "the same request hits");

        let with = |f: &dyn Fn(&mut GenRequest, &mut SamplingParams)| {
            let mut r = request(seeded);
            let mut p = seeded;
            f(&mut r, &mut p);
            r.sampling = SamplingSpec::new(p, 1).expect("valid");
            CacheKey::new("m", &r, &["END".into()]).expect("seeded")
        };
        let variants = [
            (
                "model",
                CacheKey::new("other", &base_request, &["END".into()]),
            ),
            ("stop strings", CacheKey::new("m", &base_request, &[])),
            ("prompt", Some(with(&|r, _| r.prompt.push(4)))),
            ("max_tokens", Some(with(&|r, _| r.max_new_tokens = 9))),
            ("stop tokens", Some(with(&|r, _| r.stop_tokens.clear()))),
            ("temperature", Some(with(&|_, p| p.temperature = 0.8))),
            ("top_p", Some(with(&|_, p| p.top_p = 0.9))),
            ("top_k", Some(with(&|_, p| p.top_k = Some(5)))),
            ("seed", Some(with(&|_, p| p.seed = Some(8)))),
            ("logprobs", Some(with(&|_, p| p.logprobs = Some(0)))),
            ("top logprobs", {
                let a = with(&|_, p| p.logprobs = Some(2));
                let b = with(&|_, p| p.logprobs = Some(3));
                assert_ne!(a, b);
                Some(a)
            }),
        ];
        for (field, key) in variants {
            let key = key.expect("a key");
            assert_ne!(key, base, "{field}");
            assert!(cache.get(&key).is_none(), "{field} must be part of the key");
        }
        // The sampler's resolved seed and the priority are not (the explicit seed is).
        assert_eq!(with(&|r, _| r.priority = 5), base);
    }

    #[test]
    fn a_cancelled_run_is_not_an_answer() {
        assert!(CachedAnswer::new(Vec::new(), EndedBy::Cancel).is_none());
        for ended in [EndedBy::StopToken, EndedBy::Length, EndedBy::StopString] {
            let a = CachedAnswer::new(answer(2).tokens, ended).expect("storable");
            assert_eq!((a.tokens().len(), a.ended()), (2, ended));
        }
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_refuses_an_entry_larger_than_all_of_it() {
        let entry = cost(&key("m", vec![0]), &answer(10));
        let mut cache = ResponseCache::new(3 * entry);
        for n in 0..10 {
            assert!(cache.insert(key("m", vec![n]), answer(10)));
            assert!(cache.bytes() <= cache.capacity(), "after {n}");
        }
        assert_eq!((cache.len(), cache.bytes()), (3, 3 * entry));
        assert_eq!(
            cache.footprints().collect::<Vec<_>>(),
            vec![(
                "m",
                Footprint {
                    entries: 3,
                    bytes: 3 * entry
                }
            )]
        );
        // Larger than the whole cache: refused, and nothing else is evicted for it.
        assert!(!cache.insert(key("m", vec![99]), answer(10_000)));
        assert_eq!(cache.len(), 3);
        // A cache of 0 bytes stores nothing.
        let mut off = ResponseCache::new(0);
        assert!(!off.insert(key("m", vec![1]), answer(1)));
        assert!(off.is_empty());
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let entry = cost(&key("m", vec![0]), &answer(4));
        let mut cache = ResponseCache::new(3 * entry);
        let [a, b, c, d] = [1, 2, 3, 4].map(|n| key("m", vec![n]));
        for k in [&a, &b, &c] {
            assert!(cache.insert(k.clone(), answer(4)));
        }
        // Using `a` makes `b` the least recently used.
        assert!(cache.get(&a).is_some());
        assert!(cache.insert(d.clone(), answer(4)));
        assert!(cache.get(&b).is_none(), "b was the least recently used");
        for k in [&a, &c, &d] {
            assert!(cache.get(k).is_some());
        }
        // Replacing an entry does not count it twice.
        assert!(cache.insert(a.clone(), answer(4)));
        assert_eq!((cache.len(), cache.bytes()), (3, 3 * entry));
        // Now `c` is the oldest, then `d`: an entry of nearly twice the size evicts both.
        let big = answer(4 + entry / size_of::<GeneratedToken>());
        let e = key("m", vec![5]);
        assert!(cost(&e, &big) > entry && cost(&e, &big) <= 2 * entry);
        assert!(cache.insert(e.clone(), big));
        assert!(cache.get(&c).is_none() && cache.get(&d).is_none());
        assert!(cache.get(&a).is_some() && cache.get(&e).is_some());
    }

    #[test]
    fn footprints_are_kept_per_model_and_fall_to_zero_on_eviction() {
        let entry = cost(&key("a", vec![0]), &answer(4));
        let mut cache = ResponseCache::new(2 * entry);
        assert!(cache.insert(key("a", vec![1]), answer(4)));
        assert!(cache.insert(key("b", vec![1]), answer(4)));
        assert!(cache.insert(key("b", vec![2]), answer(4)));
        let footprints: BTreeMap<&str, Footprint> = cache.footprints().collect();
        assert_eq!(footprints["a"], Footprint::default());
        assert_eq!(
            footprints["b"],
            Footprint {
                entries: 2,
                bytes: 2 * entry
            }
        );
    }
}
