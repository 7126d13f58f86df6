//! The model's `config.json`, parsed into a checked [`ModelConfig`].
//!
//! Accepts the Hugging Face spelling of the hub files (`rope_scaling`) and the newer one that
//! re-saved configs use (`rope_parameters`, with `rope_theta` folded in). Every value the forward
//! pass relies on is checked here, once, so later code can index without re-checking: each
//! number must fall in the range declared below (wide around gpt-oss-20b and gpt-oss-120b, so
//! only absurd values are refused), and an error names the key, the value and the range.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::files::{read_regular_to_string, FileError};

/// The SwiGLU slope transformers hard-codes (not in the hub config).
pub const SWIGLU_ALPHA: f32 = 1.702;

// The ranges a config's numbers must fall in. gpt-oss-20b / -120b values in brackets; the test
// presets are smaller but inside. Counts beyond these would only come from a broken file, and
// would overflow buffer sizes or turn activations into infinities far from the cause.

/// `num_hidden_layers` [24 / 36].
const LAYERS: RangeInclusive<usize> = 1..=1024;
/// `hidden_size` [2880], also a multiple of the MXFP4 block (32).
const HIDDEN: RangeInclusive<usize> = 32..=65_536;
/// `num_attention_heads` [64] and `num_key_value_heads` [8].
const HEADS: RangeInclusive<usize> = 1..=1024;
/// `head_dim` [64], also even (RoPE rotates pairs).
const HEAD_DIM: RangeInclusive<usize> = 2..=1024;
/// `num_local_experts` [32 / 128]; `num_experts_per_tok` [4] is at most this many.
const EXPERTS: RangeInclusive<usize> = 1..=4096;
/// `intermediate_size` [2880], also a multiple of 32.
const INTERMEDIATE: RangeInclusive<usize> = 32..=262_144;
/// `vocab_size` [201088].
const VOCAB: RangeInclusive<usize> = 1..=1 << 24;
/// `max_position_embeddings` [131072] and `sliding_window` [128].
const POSITIONS: RangeInclusive<usize> = 1..=1 << 24;
/// `rope_theta` [150000]: above 1, or YaRN's correction range divides by ln(theta) = 0.
const ROPE_THETA: Interval = Interval(Bound::Open(1.0), Bound::Closed(1e12));
/// The YaRN `factor` [32].
const ROPE_FACTOR: Interval = Interval(Bound::Open(0.0), Bound::Closed(1e4));
/// `beta_fast` [32] and `beta_slow` [1]; `beta_slow` must also be below `beta_fast`.
const ROPE_BETA: Interval = Interval(Bound::Open(0.0), Bound::Closed(1e4));
/// `original_max_position_embeddings` [4096].
const ROPE_ORIGINAL: Interval = Interval(Bound::Closed(1.0), Bound::Closed(16_777_216.0));
/// `swiglu_limit` [7.0].
const SWIGLU_LIMIT: Interval = Interval(Bound::Open(0.0), Bound::Closed(1e4));
/// `rms_norm_eps` [1e-5]: its lower end stays a normal f32.
const RMS_NORM_EPS: Interval = Interval(Bound::Closed(1e-30), Bound::Open(1.0));

/// One end of an [`Interval`].
#[derive(Debug, Clone, Copy)]
enum Bound {
    Open(f64),
    Closed(f64),
}

/// A range of finite real numbers, shown in errors as `(0, 1]` and the like.
#[derive(Debug, Clone, Copy)]
struct Interval(Bound, Bound);

impl Interval {
    fn contains(self, v: f64) -> bool {
        let above = match self.0 {
            Bound::Open(lo) => v > lo,
            Bound::Closed(lo) => v >= lo,
        };
        let below = match self.1 {
            Bound::Open(hi) => v < hi,
            Bound::Closed(hi) => v <= hi,
        };
        v.is_finite() && above && below
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (open, lo) = match self.0 {
            Bound::Open(v) => ('(', v),
            Bound::Closed(v) => ('[', v),
        };
        let (close, hi) = match self.1 {
            Bound::Open(v) => (')', v),
            Bound::Closed(v) => (']', v),
        };
        write!(f, "{open}{}, {}{close}", show(lo), show(hi))
    }
}

/// A number as a person would write it: exponent notation only for very large or small ones.
fn show(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e16 || v.abs() < 1e-4) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A config that cannot be used, with the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable, or not a regular file.
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: FileError },
    #[error("{path}: not valid JSON for a GPT-OSS config: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A value is missing, out of its range, or inconsistent with another.
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// Whether a layer attends over a sliding window or the whole causal prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Sliding,
    Full,
}

/// YaRN RoPE parameters (see the reference, §3.4).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub original_max_position_embeddings: f64,
    /// Whether the YaRN correction range is rounded to integers (gpt-oss: false).
    pub truncate: bool,
}

/// A checked GPT-OSS model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub sliding_window: usize,
    pub layer_types: Vec<AttentionKind>,
    pub rope: Rope,
    pub max_position_embeddings: usize,
    pub swiglu_limit: f32,
    pub rms_norm_eps: f32,
}

#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    truncate: Option<bool>,
}

#[derive(Deserialize)]
struct RawQuantization {
    quant_method: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    num_hidden_layers: Option<usize>,
    hidden_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    experts_per_token: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    initial_context_length: Option<f64>,
    max_position_embeddings: Option<usize>,
    swiglu_limit: Option<f64>,
    rms_norm_eps: Option<f64>,
    quantization_config: Option<RawQuantization>,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = read_regular_to_string(&path).map_err(|problem| ConfigError::File {
            path: path.clone(),
            problem,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        let count = |key: &str, v: Option<usize>, range: RangeInclusive<usize>| {
            let n = v.ok_or_else(|| invalid(key, "missing".into()))?;
            if range.contains(&n) {
                Ok(n)
            } else {
                Err(invalid(
                    key,
                    format!(
                        "must be between {} and {}, got {n}",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        };
        let real = |key: &str, v: f64, range: Interval| {
            if range.contains(v) {
                Ok(v)
            } else {
                Err(invalid(
                    key,
                    format!("must be a number in {range}, got {}", show(v)),
                ))
            }
        };
        if let Some(t) = &raw.model_type {
            if t != "gpt_oss" {
                return Err(invalid(
                    "model_type",
                    format!("expected \"gpt_oss\", got {t:?}"),
                ));
            }
        }
        if let Some(q) = &raw.quantization_config {
            match q.quant_method.as_deref() {
                Some("mxfp4") => {}
                other => {
                    return Err(invalid(
                        "quantization_config.quant_method",
                        format!("only \"mxfp4\" experts are supported, got {other:?}"),
                    ))
                }
            }
        }
        let num_hidden_layers = count("num_hidden_layers", raw.num_hidden_layers, LAYERS)?;
        let hidden_size = count("hidden_size", raw.hidden_size, HIDDEN)?;
        let num_attention_heads = count("num_attention_heads", raw.num_attention_heads, HEADS)?;
        let num_key_value_heads = count("num_key_value_heads", raw.num_key_value_heads, HEADS)?;
        let head_dim = count("head_dim", raw.head_dim, HEAD_DIM)?;
        let num_local_experts = count("num_local_experts", raw.num_local_experts, EXPERTS)?;
        let num_experts_per_tok = count(
            "num_experts_per_tok",
            raw.num_experts_per_tok.or(raw.experts_per_token),
            1..=num_local_experts,
        )?;
        let intermediate_size = count("intermediate_size", raw.intermediate_size, INTERMEDIATE)?;
        let vocab_size = count("vocab_size", raw.vocab_size, VOCAB)?;
        let sliding_window = count("sliding_window", raw.sliding_window, POSITIONS)?;

        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("must be even for RoPE, got {head_dim}"),
            ));
        }
        if hidden_size % 32 != 0 || intermediate_size % 32 != 0 {
            return Err(invalid(
                "hidden_size",
                format!("hidden_size {hidden_size} and intermediate_size {intermediate_size} must be multiples of the MXFP4 block (32)"),
            ));
        }
        let layer_types = match raw.layer_types {
            None => (0..num_hidden_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        AttentionKind::Sliding
                    } else {
                        AttentionKind::Full
                    }
                })
                .collect(),
            Some(types) => {
                if types.len() != num_hidden_layers {
                    return Err(invalid(
                        "layer_types",
                        format!("has {} entries for {num_hidden_layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(AttentionKind::Sliding),
                        "full_attention" => Ok(AttentionKind::Full),
                        other => Err(invalid(
                            "layer_types",
                            format!("unknown layer type {other:?}"),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let (rope_key, raw_rope) = match (raw.rope_scaling, raw.rope_parameters) {
            (Some(r), _) => ("rope_scaling", r),
            (None, Some(r)) => ("rope_parameters", r),
            (None, None) => {
                return Err(invalid(
                    "rope_scaling",
                    "missing (neither rope_scaling nor rope_parameters)".into(),
                ))
            }
        };
        let rope_field = |field: &str| format!("{rope_key}.{field}");
        let rope_type = raw_rope.rope_type.or(raw_rope.kind);
        if rope_type.as_deref() != Some("yarn") {
            return Err(invalid(
                rope_key,
                format!("rope_type must be \"yarn\", got {rope_type:?}"),
            ));
        }
        let (theta_key, theta) = match (raw_rope.rope_theta, raw.rope_theta) {
            (Some(t), _) => (rope_field("rope_theta"), t),
            (None, Some(t)) => ("rope_theta".to_string(), t),
            (None, None) => return Err(invalid("rope_theta", "missing".into())),
        };
        let factor = raw_rope
            .factor
            .ok_or_else(|| invalid(&rope_field("factor"), "missing".into()))?;
        let (original_key, original) = match (
            raw_rope.original_max_position_embeddings,
            raw.initial_context_length,
        ) {
            (Some(v), _) => (rope_field("original_max_position_embeddings"), v),
            (None, Some(v)) => ("initial_context_length".to_string(), v),
            (None, None) => {
                return Err(invalid(
                    &rope_field("original_max_position_embeddings"),
                    "missing".into(),
                ))
            }
        };
        let beta_fast = raw_rope.beta_fast.unwrap_or(32.0);
        let beta_slow = raw_rope.beta_slow.unwrap_or(1.0);
        let rope = Rope {
            theta: real(&theta_key, theta, ROPE_THETA)?,
            factor: real(&rope_field("factor"), factor, ROPE_FACTOR)?,
            beta_fast: real(&rope_field("beta_fast"), beta_fast, ROPE_BETA)?,
            beta_slow: real(&rope_field("beta_slow"), beta_slow, ROPE_BETA)?,
            original_max_position_embeddings: real(&original_key, original, ROPE_ORIGINAL)?,
            truncate: raw_rope.truncate.unwrap_or(true),
        };
        if rope.beta_slow >= rope.beta_fast {
            return Err(invalid(
                &rope_field("beta_slow"),
                format!(
                    "must be below beta_fast ({}), got {}",
                    show(rope.beta_fast),
                    show(rope.beta_slow)
                ),
            ));
        }
        let max_position_embeddings = match raw.max_position_embeddings {
            Some(n) => count("max_position_embeddings", Some(n), POSITIONS)?,
            None => {
                // Both factors are bounded above, so the product fits a usize.
                let n = (rope.original_max_position_embeddings * rope.factor) as usize;
                if !POSITIONS.contains(&n) {
                    return Err(invalid(
                        "max_position_embeddings",
                        format!(
                            "not set, and {original_key} × factor = {n} is not between {} and {}",
                            POSITIONS.start(),
                            POSITIONS.end()
                        ),
                    ));
                }
                n
            }
        };
        let swiglu_limit = real(
            "swiglu_limit",
            raw.swiglu_limit.unwrap_or(7.0),
            SWIGLU_LIMIT,
        )? as f32;
        let rms_norm_eps = real(
            "rms_norm_eps",
            raw.rms_norm_eps.unwrap_or(1e-5),
            RMS_NORM_EPS,
        )? as f32;
        Ok(Self {
            num_hidden_layers,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_local_experts,
            num_experts_per_tok,
            intermediate_size,
            vocab_size,
            sliding_window,
            layer_types,
            rope,
            max_position_embeddings,
            swiglu_limit,
            rms_norm_eps,
        })
    }

    /// Width of all query heads together (`num_attention_heads × head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_20B: &str = r#"{
      "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
      "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
      "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
      "intermediate_size": 2880,
      "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention"],
      "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
      "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
      "num_local_experts": 32, "output_router_logits": false, "pad_token_id": 199999,
      "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
        "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
      "rms_norm_eps": 1e-05,
      "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
      "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
      "swiglu_limit": 7.0, "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0",
      "use_cache": true, "vocab_size": 201088 }"#;

    #[test]
    fn parses_the_hub_20b_config() {
        let c = ModelConfig::parse(HUB_20B, Path::new("config.json")).expect("valid");
        assert_eq!(c.num_hidden_layers, 24);
        assert_eq!(c.q_dim(), 4096);
        assert_eq!(c.kv_dim(), 512);
        assert_eq!(c.layer_types[0], AttentionKind::Sliding);
        assert_eq!(c.layer_types[1], AttentionKind::Full);
        assert!(!c.rope.truncate);
        assert_eq!(c.rope.theta, 150000.0);
    }

    #[test]
    fn accepts_rope_parameters_spelling() {
        let text = HUB_20B
            .replace("\"rope_scaling\"", "\"rope_parameters\"")
            .replace(
                "\"rope_type\": \"yarn\"",
                "\"rope_type\": \"yarn\", \"rope_theta\": 150000",
            )
            .replace("\"rope_theta\": 150000, \"router", "\"router");
        let c = ModelConfig::parse(&text, Path::new("config.json")).expect("valid");
        assert_eq!(c.rope.theta, 150000.0);
        assert_eq!(c.rope.factor, 32.0);
    }

    #[test]
    fn names_the_key_of_a_bad_value() {
        let text = HUB_20B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 7");
        let e = ModelConfig::parse(&text, Path::new("/m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/m/config.json") && e.contains("num_key_value_heads"),
            "{e}"
        );
        let text = HUB_20B.replace("\"quant_method\": \"mxfp4\"", "\"quant_method\": \"gptq\"");
        let e = ModelConfig::parse(&text, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("quant_method") && e.contains("gptq"), "{e}");
    }

    #[test]
    fn garbled_json_is_an_error_naming_the_file() {
        let e = ModelConfig::parse("{\"hidden_size\": ", Path::new("/x/config.json")).unwrap_err();
        assert!(e.to_string().contains("/x/config.json"));
    }

    #[test]
    fn an_absurd_value_is_refused_naming_the_key_the_value_and_the_range() {
        let e = ModelConfig::parse(
            &HUB_20B.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 4294967296"),
            Path::new("/m/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "/m/config.json: key `rms_norm_eps`: must be a number in [1e-30, 1), got 4294967296"
        );
    }

    #[test]
    fn absurd_values_are_refused() {
        // (text in the hub config, replacement, key named, value shown, range shown)
        let cases = [
            (
                "\"swiglu_limit\": 7.0",
                "\"swiglu_limit\": 1e308",
                "swiglu_limit",
                "1e308",
                "(0, 10000]",
            ),
            (
                "\"swiglu_limit\": 7.0",
                "\"swiglu_limit\": 0",
                "swiglu_limit",
                "got 0",
                "(0, 10000]",
            ),
            (
                "\"rms_norm_eps\": 1e-05",
                "\"rms_norm_eps\": 0",
                "rms_norm_eps",
                "got 0",
                "[1e-30, 1)",
            ),
            (
                "\"max_position_embeddings\": 131072",
                "\"max_position_embeddings\": 18446744073709551615",
                "max_position_embeddings",
                "18446744073709551615",
                "between 1 and 16777216",
            ),
            (
                "\"rope_theta\": 150000",
                "\"rope_theta\": 1",
                "rope_theta",
                "got 1",
                "(1, 1000000000000]",
            ),
            (
                "\"factor\": 32.0",
                "\"factor\": -2",
                "rope_scaling.factor",
                "-2",
                "(0, 10000]",
            ),
            (
                "\"beta_slow\": 1.0",
                "\"beta_slow\": 64",
                "rope_scaling.beta_slow",
                "64",
                "below beta_fast (32)",
            ),
            (
                "\"original_max_position_embeddings\": 4096",
                "\"original_max_position_embeddings\": 0.5",
                "rope_scaling.original_max_position_embeddings",
                "0.5",
                "[1, 16777216]",
            ),
            (
                "\"hidden_size\": 2880",
                "\"hidden_size\": 1099511627776",
                "hidden_size",
                "1099511627776",
                "between 32 and 65536",
            ),
            (
                "\"vocab_size\": 201088",
                "\"vocab_size\": 0",
                "vocab_size",
                "got 0",
                "between 1 and 16777216",
            ),
            (
                "\"sliding_window\": 128",
                "\"sliding_window\": 0",
                "sliding_window",
                "got 0",
                "between 1",
            ),
            (
                "\"num_experts_per_tok\": 4",
                "\"num_experts_per_tok\": 33",
                "num_experts_per_tok",
                "33",
                "between 1 and 32",
            ),
        ];
        for (from, to, key, value, range) in cases {
            let text = HUB_20B.replace(from, to);
            assert_ne!(text, HUB_20B, "{from} not found in the hub config");
            let e = match ModelConfig::parse(&text, Path::new("config.json")) {
                Ok(_) => panic!("{to} was accepted"),
                Err(e) => e.to_string(),
            };
            for needle in [&format!("key `{key}`"), value, range] {
                assert!(e.contains(needle), "{to}: {needle:?} not in: {e}");
            }
        }
    }

    #[test]
    fn the_real_configs_and_every_test_preset_are_in_range() {
        use crate::testmodel::{config_json, Dims, Preset};
        let gpt_oss_120b = Dims {
            layers: 36,
            experts: 128,
            ..Preset::Shape20b.dims()
        };
        let small_vocab = Dims {
            vocab: 512,
            ..Preset::Tiny.dims()
        };
        for dims in [
            Preset::Tiny.dims(),
            Preset::Bench.dims(),
            Preset::Shape20b.dims(),
            gpt_oss_120b,
            small_vocab,
        ] {
            let text = config_json(&dims).to_string();
            if let Err(e) = ModelConfig::parse(&text, Path::new("config.json")) {
                panic!("{dims:?}: {e}");
            }
        }
    }
}
