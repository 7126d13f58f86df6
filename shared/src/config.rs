//! The model's `config.json`, parsed into a checked [`ModelConfig`].
//!
//! Accepts the Hugging Face spelling of the hub files (`rope_scaling`) and the newer one that
//! re-saved configs use (`rope_parameters`, with `rope_theta` folded in). Every value the forward
//! pass relies on is checked here, once, so later code can index without re-checking.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The SwiGLU slope transformers hard-codes (not in the hub config).
pub const SWIGLU_ALPHA: f32 = 1.702;

/// A config that cannot be used, with the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for a GPT-OSS config: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
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
    swiglu_limit: Option<f32>,
    rms_norm_eps: Option<f32>,
    quantization_config: Option<RawQuantization>,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |key: &'static str, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        let required = |key: &'static str, v: Option<usize>| -> Result<usize, ConfigError> {
            match v {
                None => Err(invalid(key, "missing".into())),
                Some(0) => Err(invalid(key, "must be positive, got 0".into())),
                Some(n) => Ok(n),
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
        let num_hidden_layers = required("num_hidden_layers", raw.num_hidden_layers)?;
        let hidden_size = required("hidden_size", raw.hidden_size)?;
        let num_attention_heads = required("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = required("num_key_value_heads", raw.num_key_value_heads)?;
        let head_dim = required("head_dim", raw.head_dim)?;
        let num_local_experts = required("num_local_experts", raw.num_local_experts)?;
        let num_experts_per_tok = required(
            "num_experts_per_tok",
            raw.num_experts_per_tok.or(raw.experts_per_token),
        )?;
        let intermediate_size = required("intermediate_size", raw.intermediate_size)?;
        let vocab_size = required("vocab_size", raw.vocab_size)?;
        let sliding_window = required("sliding_window", raw.sliding_window)?;

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
        if num_experts_per_tok > num_local_experts {
            return Err(invalid(
                "num_experts_per_tok",
                format!("{num_experts_per_tok} exceeds num_local_experts {num_local_experts}"),
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
        let rope_type = raw_rope.rope_type.or(raw_rope.kind);
        if rope_type.as_deref() != Some("yarn") {
            return Err(invalid(
                rope_key,
                format!("rope_type must be \"yarn\", got {rope_type:?}"),
            ));
        }
        let theta = raw_rope
            .rope_theta
            .or(raw.rope_theta)
            .ok_or_else(|| invalid("rope_theta", "missing".into()))?;
        let factor = raw_rope
            .factor
            .ok_or_else(|| invalid(rope_key, "missing `factor`".into()))?;
        let original = raw_rope
            .original_max_position_embeddings
            .or(raw.initial_context_length)
            .ok_or_else(|| {
                invalid(
                    rope_key,
                    "missing `original_max_position_embeddings`".into(),
                )
            })?;
        let rope = Rope {
            theta,
            factor,
            beta_fast: raw_rope.beta_fast.unwrap_or(32.0),
            beta_slow: raw_rope.beta_slow.unwrap_or(1.0),
            original_max_position_embeddings: original,
            truncate: raw_rope.truncate.unwrap_or(true),
        };
        for (key, v) in [
            ("rope_theta", rope.theta),
            ("factor", rope.factor),
            (
                "original_max_position_embeddings",
                rope.original_max_position_embeddings,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(
                    if key == "rope_theta" {
                        "rope_theta"
                    } else {
                        rope_key
                    },
                    format!("{key} must be a positive number, got {v}"),
                ));
            }
        }
        let max_position_embeddings = raw
            .max_position_embeddings
            .unwrap_or((rope.original_max_position_embeddings * rope.factor) as usize);
        let swiglu_limit = raw.swiglu_limit.unwrap_or(7.0);
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be positive, got {rms_norm_eps}"),
            ));
        }
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
}
