//! Which contiguous layers each pipeline stage holds.
//!
//! Owns the decode cost model ([`CostModel`]: the weight bytes a stage reads per decode step)
//! and the split itself ([`split_layers`]), plus the operator's explicit override
//! ([`explicit_split`], the config file's `layers = [7, 7, 7, 3]`).
//!
//! # Invariants of every split returned
//!
//! - The ranges are contiguous, in order, and cover `0..layers` exactly.
//! - Every stage holds at least one layer.
//!
//! # The objective
//!
//! In a pipeline at steady state every stage works on its own micro-batch, so the slowest stage
//! sets the pace. Batch-1 decode is bound by memory bandwidth, so a stage's time is its weight
//! traffic: per layer the attention, router and the top-k experts; stage 0 adds one embedding
//! row (negligible); the last stage adds the final norm and the LM head, which weighs about 10.9
//! layers of the 20b (reference §6). [`split_layers`] minimises the largest stage cost exactly
//! (a small linear-partition problem, solved by dynamic programming in `O(stages × layers²)`).
//! Among the splits with that minimum it prefers the most even layer counts (smallest sum of
//! squared counts), then the one with fewer layers on earlier stages (stage 0 also holds the
//! embedding's memory). The answer is therefore unique and deterministic.
//!
//! It knows nothing of devices, processes or the config file.

use std::ops::Range;

use gptossd_shared::config::ModelConfig;

/// Bytes per bf16 value.
const BF16_BYTES: u64 = 2;
/// MXFP4: a block of 32 weights is 16 bytes of nibbles plus one scale byte.
const MXFP4_BLOCK_WEIGHTS: u64 = 32;
const MXFP4_BLOCK_BYTES: u64 = 17;

/// What one decode step costs each stage, in bytes of weights read.
///
/// Layers all cost the same (GPT-OSS layers have identical shapes; sliding and full attention
/// differ only in KV reads, which depend on the context, not the split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostModel {
    /// Bytes one layer reads per decode token: attention (q, k, v, o with biases, sinks, input
    /// norm), the router, the post-attention norm and `num_experts_per_tok` experts.
    pub layer_bytes: u64,
    /// Extra bytes on stage 0: one embedding row.
    pub first_stage_bytes: u64,
    /// Extra bytes on the last stage: the final norm and the LM head.
    pub last_stage_bytes: u64,
}

impl CostModel {
    /// The batch-1 decode traffic of a GPT-OSS model (bf16 dense weights, MXFP4 experts).
    ///
    /// For gpt-oss-20b: 106,242,112 bytes per layer, 5,760 on stage 0 and
    /// 1,158,272,640 (LM head 1,158,266,880 + final norm 5,760) on the last stage.
    pub fn from_model_config(cfg: &ModelConfig) -> Self {
        let h = cfg.hidden_size as u64;
        let q = cfg.q_dim() as u64;
        let kv = cfg.kv_dim() as u64;
        let heads = cfg.num_attention_heads as u64;
        let experts = cfg.num_local_experts as u64;
        let inter = cfg.intermediate_size as u64;
        let mxfp4 = |weights: u64| weights / MXFP4_BLOCK_WEIGHTS * MXFP4_BLOCK_BYTES;

        // q_proj [q, h], k_proj and v_proj [kv, h], o_proj [h, q], their biases, the sinks
        // and the input norm.
        let attention = BF16_BYTES * (2 * q * h + 2 * kv * h + (q + 2 * kv + h) + heads + h);
        // router weight [E, h] + bias [E], post-attention norm [h].
        let router = BF16_BYTES * (experts * h + experts + h);
        // One expert: gate_up [2I, h] and down [h, I] in MXFP4, biases [2I] and [h] in bf16.
        let expert = mxfp4(2 * inter * h) + mxfp4(h * inter) + BF16_BYTES * (2 * inter + h);
        let layer_bytes = attention + router + cfg.num_experts_per_tok as u64 * expert;

        let vocab = cfg.vocab_size as u64;
        Self {
            layer_bytes,
            first_stage_bytes: BF16_BYTES * h,
            last_stage_bytes: BF16_BYTES * (vocab * h + h),
        }
    }

    /// The cost of stage `stage` of `stages` holding `count` layers.
    pub fn stage_cost(&self, stage: usize, stages: usize, count: usize) -> u64 {
        let mut cost = self.layer_bytes * count as u64;
        if stage == 0 {
            cost += self.first_stage_bytes;
        }
        if stage + 1 == stages {
            cost += self.last_stage_bytes;
        }
        cost
    }

    /// The cost of each stage of `split`.
    #[cfg(test)]
    pub fn stage_costs(&self, split: &[Range<usize>]) -> Vec<u64> {
        split
            .iter()
            .enumerate()
            .map(|(s, r)| self.stage_cost(s, split.len(), r.len()))
            .collect()
    }
}

/// An explicit split that does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("names no stage")]
    Empty,
    #[error("stage {stage} has 0 layers; every stage needs at least one")]
    EmptyStage { stage: usize },
    #[error("the counts add up to {sum} layers, but the model has {layers}")]
    WrongTotal { sum: usize, layers: usize },
}

/// Splits `layers` layers into `stages` contiguous ranges, minimising the largest stage cost
/// (see the module docs for the tie-breaks).
///
/// # Panics
///
/// If `stages` is 0 or more than `layers`: the config is checked against the model's layer
/// count before any split ([`crate::config::ModelSettings::check_layers`]).
pub fn split_layers(layers: usize, stages: usize, cost: &CostModel) -> Vec<Range<usize>> {
    assert!(
        stages >= 1 && stages <= layers,
        "split_layers: {stages} stages for {layers} layers (need 1 ≤ stages ≤ layers)"
    );
    let counts = best_counts(layers, stages, cost);
    ranges_from_counts(&counts)
}

/// The operator's split: stage `i` holds `counts[i]` layers.
pub fn explicit_split(counts: &[usize], layers: usize) -> Result<Vec<Range<usize>>, SplitError> {
    if counts.is_empty() {
        return Err(SplitError::Empty);
    }
    if let Some(stage) = counts.iter().position(|&c| c == 0) {
        return Err(SplitError::EmptyStage { stage });
    }
    let sum = counts.iter().fold(0usize, |a, &c| a.saturating_add(c));
    if sum != layers {
        return Err(SplitError::WrongTotal { sum, layers });
    }
    Ok(ranges_from_counts(counts))
}

fn ranges_from_counts(counts: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    counts
        .iter()
        .map(|&c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

/// The layer count of each stage: first the least achievable maximum stage cost, then among
/// the splits within it the smallest sum of squared counts, then the lexicographically
/// smallest counts.
fn best_counts(layers: usize, stages: usize, cost: &CostModel) -> Vec<usize> {
    // Both tables are indexed [stage][first layer of that stage] and describe the best way to
    // place layers `first..layers` on stages `stage..stages`; `None` when impossible (fewer
    // layers than stages left).
    let cost_of = |s: usize, n: usize| cost.stage_cost(s, stages, n);

    // Phase 1: the least achievable maximum.
    let mut max_tab: Vec<Vec<Option<u64>>> = vec![vec![None; layers + 1]; stages + 1];
    max_tab[stages][layers] = Some(0);
    for s in (0..stages).rev() {
        for first in 0..layers {
            let left_stages = stages - s;
            let mut best: Option<u64> = None;
            // Leave at least one layer for each later stage.
            for n in 1..=(layers - first).saturating_sub(left_stages - 1) {
                if let Some(rest) = max_tab[s + 1][first + n] {
                    let m = rest.max(cost_of(s, n));
                    best = Some(best.map_or(m, |b| b.min(m)));
                }
            }
            max_tab[s][first] = best;
        }
    }
    let Some(limit) = max_tab[0][0] else {
        unreachable!("1 ≤ stages ≤ layers always has a split");
    };

    // Phase 2: the smallest sum of squared counts with every stage within `limit`.
    let mut sq_tab: Vec<Vec<Option<u64>>> = vec![vec![None; layers + 1]; stages + 1];
    sq_tab[stages][layers] = Some(0);
    for s in (0..stages).rev() {
        for first in 0..layers {
            let left_stages = stages - s;
            let mut best: Option<u64> = None;
            for n in 1..=(layers - first).saturating_sub(left_stages - 1) {
                if cost_of(s, n) > limit {
                    continue;
                }
                if let Some(rest) = sq_tab[s + 1][first + n] {
                    let q = rest + (n * n) as u64;
                    best = Some(best.map_or(q, |b| b.min(q)));
                }
            }
            sq_tab[s][first] = best;
        }
    }

    // Walk forward taking the smallest count that keeps both optima.
    let mut counts = Vec::with_capacity(stages);
    let mut first = 0;
    for s in 0..stages {
        let Some(target) = sq_tab[s][first] else {
            unreachable!("phase 1 found a split within the limit");
        };
        let left_stages = stages - s;
        let n = (1..=(layers - first).saturating_sub(left_stages - 1))
            .find(|&n| {
                cost_of(s, n) <= limit
                    && sq_tab[s + 1][first + n].is_some_and(|rest| rest + (n * n) as u64 == target)
            })
            .unwrap_or_else(|| unreachable!("the table's optimum is reachable"));
        counts.push(n);
        first += n;
    }
    counts
}

#[cfg(test)]
// A one-stage split is a one-element list of ranges, on purpose.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::path::Path;

    use gptossd_shared::testmodel::{config_json, Dims, Preset};

    use super::*;

    fn parse(dims: &Dims) -> ModelConfig {
        ModelConfig::parse(&config_json(dims).to_string(), Path::new("config.json"))
            .expect("the generator writes valid configs")
    }

    fn gpt_oss_20b() -> ModelConfig {
        parse(&Preset::Shape20b.dims())
    }

    fn gpt_oss_120b() -> ModelConfig {
        parse(&Dims {
            layers: 36,
            experts: 128,
            ..Preset::Shape20b.dims()
        })
    }

    /// The tiny test model: 4 layers, hidden 64, the full vocabulary (the LM head dominates).
    fn tiny() -> ModelConfig {
        parse(&Preset::Tiny.dims())
    }

    fn counts(split: &[Range<usize>]) -> Vec<usize> {
        split.iter().map(|r| r.len()).collect()
    }

    fn check_invariants(split: &[Range<usize>], layers: usize, stages: usize) {
        assert_eq!(split.len(), stages);
        let mut next = 0;
        for r in split {
            assert_eq!(r.start, next, "{split:?} is not contiguous");
            assert!(!r.is_empty(), "{split:?} has an empty stage");
            next = r.end;
        }
        assert_eq!(next, layers, "{split:?} does not cover 0..{layers}");
    }

    /// Every composition of `layers` into `stages` positive parts.
    fn all_counts(layers: usize, stages: usize) -> Vec<Vec<usize>> {
        if stages == 1 {
            return vec![vec![layers]];
        }
        let mut out = Vec::new();
        for n in 1..=layers - (stages - 1) {
            for mut rest in all_counts(layers - n, stages - 1) {
                rest.insert(0, n);
                out.push(rest);
            }
        }
        out
    }

    fn max_cost(cost: &CostModel, counts: &[usize]) -> u64 {
        (0..counts.len())
            .map(|s| cost.stage_cost(s, counts.len(), counts[s]))
            .max()
            .unwrap_or(0)
    }

    /// The brute-force answer under the documented objective.
    fn brute_force(layers: usize, stages: usize, cost: &CostModel) -> Vec<usize> {
        all_counts(layers, stages)
            .into_iter()
            .min_by_key(|c| {
                let sq: usize = c.iter().map(|n| n * n).sum();
                (max_cost(cost, c), sq, c.clone())
            })
            .expect("at least one split")
    }

    #[test]
    fn the_20b_cost_model_matches_the_reference_figures() {
        let c = CostModel::from_model_config(&gpt_oss_20b());
        assert_eq!(c.layer_bytes, 106_242_112);
        assert_eq!(c.first_stage_bytes, 5_760);
        assert_eq!(c.last_stage_bytes, 1_158_266_880 + 5_760);
        // Reference §6: 3,708,089,088 bytes per token for the whole 20b.
        assert_eq!(
            c.layer_bytes * 24 + c.first_stage_bytes + c.last_stage_bytes,
            3_708_089_088
        );
        let c = CostModel::from_model_config(&gpt_oss_120b());
        assert_eq!(c.layer_bytes, 106_795_264);
        assert_eq!(
            c.layer_bytes * 36 + c.first_stage_bytes + c.last_stage_bytes,
            5_002_907_904
        );
    }

    #[test]
    fn one_stage_holds_the_whole_model() {
        let c = CostModel::from_model_config(&gpt_oss_20b());
        assert_eq!(split_layers(24, 1, &c), vec![0..24]);
    }

    #[test]
    fn as_many_stages_as_layers_gives_one_layer_each() {
        let c = CostModel::from_model_config(&gpt_oss_20b());
        let split = split_layers(24, 24, &c);
        assert_eq!(split, (0..24).map(|i| i..i + 1).collect::<Vec<_>>());
    }

    #[test]
    fn the_20b_in_four_stages_unloads_the_lm_head_stage() {
        let c = CostModel::from_model_config(&gpt_oss_20b());
        let split = split_layers(24, 4, &c);
        check_invariants(&split, 24, 4);
        let n = counts(&split);
        assert!(n[3] < n[0] && n[3] < n[1] && n[3] < n[2], "{n:?}");
        // The LM head weighs ~10.9 layers: the last stage keeps a single layer and still sets
        // the pace; the other 23 spread as evenly as they can, fewer on earlier stages.
        assert_eq!(n, vec![7, 8, 8, 1]);
        let best = all_counts(24, 4)
            .iter()
            .map(|counts| max_cost(&c, counts))
            .min();
        assert_eq!(Some(max_cost(&c, &n)), best);
        // Strictly better than the even 6/6/6/6 and the reference's example 7/7/7/3.
        assert!(max_cost(&c, &n) < max_cost(&c, &[7, 7, 7, 3]));
        assert!(max_cost(&c, &[7, 7, 7, 3]) < max_cost(&c, &[6, 6, 6, 6]));
    }

    #[test]
    fn the_120b_in_four_stages() {
        let c = CostModel::from_model_config(&gpt_oss_120b());
        let n = counts(&split_layers(36, 4, &c));
        assert_eq!(n, brute_force(36, 4, &c));
        assert!(n[3] < n[0], "{n:?}");
    }

    #[test]
    fn the_tiny_model_gives_every_stage_a_layer() {
        let c = CostModel::from_model_config(&tiny());
        assert!(
            c.last_stage_bytes > 4 * c.layer_bytes,
            "the LM head dominates: {c:?}"
        );
        for stages in 1..=4 {
            let split = split_layers(4, stages, &c);
            check_invariants(&split, 4, stages);
            assert_eq!(
                counts(&split),
                brute_force(4, stages, &c),
                "stages {stages}"
            );
        }
        assert_eq!(counts(&split_layers(4, 2, &c)), vec![3, 1]);
        assert_eq!(counts(&split_layers(4, 3, &c)), vec![1, 2, 1]);
    }

    #[test]
    fn matches_brute_force_on_every_small_case_of_the_real_models() {
        for cfg in [gpt_oss_20b(), gpt_oss_120b()] {
            let c = CostModel::from_model_config(&cfg);
            for layers in 1..=12 {
                for stages in 1..=layers {
                    let split = split_layers(layers, stages, &c);
                    check_invariants(&split, layers, stages);
                    assert_eq!(
                        counts(&split),
                        brute_force(layers, stages, &c),
                        "{layers}/{stages}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_cost_models_match_brute_force() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for _ in 0..2_000 {
            let layers = 1 + next(11) as usize;
            let stages = 1 + next(layers as u64) as usize;
            let cost = CostModel {
                layer_bytes: next(100),
                first_stage_bytes: next(400),
                last_stage_bytes: next(1_200),
            };
            let split = split_layers(layers, stages, &cost);
            check_invariants(&split, layers, stages);
            let got = counts(&split);
            let want = brute_force(layers, stages, &cost);
            assert_eq!(
                max_cost(&cost, &got),
                max_cost(&cost, &want),
                "{cost:?} {layers}/{stages}"
            );
            assert_eq!(got, want, "{cost:?} {layers}/{stages}");
        }
    }

    #[test]
    fn stage_costs_add_the_extras_to_the_ends() {
        let c = CostModel {
            layer_bytes: 10,
            first_stage_bytes: 1,
            last_stage_bytes: 100,
        };
        assert_eq!(c.stage_costs(&[0..2, 2..3]), vec![21, 110]);
        assert_eq!(c.stage_costs(&[0..3]), vec![131]);
    }

    #[test]
    fn explicit_splits() {
        assert_eq!(
            explicit_split(&[7, 7, 7, 3], 24),
            Ok(vec![0..7, 7..14, 14..21, 21..24])
        );
        assert_eq!(explicit_split(&[24], 24), Ok(vec![0..24]));
        assert_eq!(explicit_split(&[], 24), Err(SplitError::Empty));
        assert_eq!(
            explicit_split(&[7, 0, 17], 24),
            Err(SplitError::EmptyStage { stage: 1 })
        );
        assert_eq!(
            explicit_split(&[7, 7, 7, 7], 24),
            Err(SplitError::WrongTotal {
                sum: 28,
                layers: 24
            })
        );
        assert_eq!(
            explicit_split(&[usize::MAX, 2], 24),
            Err(SplitError::WrongTotal {
                sum: usize::MAX,
                layers: 24
            })
        );
    }

    #[test]
    #[should_panic(expected = "5 stages for 4 layers")]
    fn more_stages_than_layers_is_a_caller_bug() {
        let c = CostModel::from_model_config(&tiny());
        split_layers(4, 5, &c);
    }
}
