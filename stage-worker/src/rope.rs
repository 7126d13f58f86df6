//! YaRN rotary position embedding (reference §3.4): the per-frequency inverse frequencies, the
//! concentration factor, and the cos/sin table every backend rotates with.
//!
//! The table is built on the host, in f32, once per position (grown on demand as positions
//! come), exactly as transformers' `_compute_yarn_parameters` does; a GPU backend uploads the
//! same rows, so every backend rotates by the same numbers. Rotation itself (pairs `i` and
//! `i + head_dim/2` of each head, "half-split") is a backend operation.

use gptossd_shared::config::ModelConfig;

/// The RoPE table: `cos` and `sin` rows `[position][head_dim / 2]`, already multiplied by the
/// concentration factor.
pub struct Rope {
    inv_freq: Vec<f32>,
    concentration: f32,
    /// `[position][half]` each, grown on demand.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let r = &cfg.rope;
        let d = cfg.head_dim;
        let half = d / 2;
        // As transformers' `_compute_yarn_parameters`: f32 frequencies, f64 correction range.
        let correction = |rotations: f64| {
            d as f64
                * (r.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * r.theta.ln())
        };
        let mut low = correction(r.beta_fast);
        let mut high = correction(r.beta_slow);
        if r.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(d as f64 - 1.0);
        let span = if low == high {
            high + 0.001 - low
        } else {
            high - low
        };
        let inv_freq = (0..half)
            .map(|i| {
                let pos_freq = (r.theta as f32).powf((2 * i) as f32 / d as f32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (r.factor as f32 * pos_freq);
                let ramp = ((i as f32 - low as f32) / span as f32).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect();
        let concentration = if r.factor <= 1.0 {
            1.0
        } else {
            (0.1 * r.factor.ln() + 1.0) as f32
        };
        Self {
            inv_freq,
            concentration,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    /// Half the head dimension: the length of a cos or sin row.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Positions the table holds (rows `0..positions()`).
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half().max(1)
    }

    /// Makes sure rows `0..positions` exist.
    pub fn extend_to(&mut self, positions: usize) {
        for p in self.positions()..positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                self.cos
                    .push((angle as f64).cos() as f32 * self.concentration);
                self.sin
                    .push((angle as f64).sin() as f32 * self.concentration);
            }
        }
    }

    /// The cos row of position `pos` (panics if the table does not reach it).
    pub fn cos(&self, pos: usize) -> &[f32] {
        let half = self.half();
        &self.cos[pos * half..(pos + 1) * half]
    }

    /// The sin row of position `pos` (panics if the table does not reach it).
    pub fn sin(&self, pos: usize) -> &[f32] {
        let half = self.half();
        &self.sin[pos * half..(pos + 1) * half]
    }
}
