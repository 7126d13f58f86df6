//! Random GPT-OSS checkpoints in exactly the Hugging Face on-disk format of openai/gpt-oss-20b,
//! for tests and benchmarks (no real weights can be downloaded here).
//!
//! Same config keys, tensor names, dtypes (bf16 everywhere, MXFP4 experts as u8 blocks and
//! scales) and sharding through `model.safetensors.index.json`. Deterministic for a seed on any
//! machine: each tensor draws from its own ChaCha8 stream keyed by (seed, FNV-1a of its name),
//! and values are built with exact arithmetic only (no libm), so no platform rounding enters.
//!
//! Weights are scaled so that activations stay O(1) through all layers and routing is not
//! degenerate: projections have row norms near 1, router logits spread about one unit.
//!
//! Every file written is mode 0644 and every directory created 0755, whatever the umask or the
//! temporary-file mode the safetensors writer uses, so a service user can read the model.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, View};

/// The shapes a generated model can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Real vocabulary, toy sizes: hidden 64, 4 layers, 8 experts, window 8.
    Tiny,
    /// gpt-oss-20b's per-layer shapes with 4 layers (~4.2 GB).
    Bench,
    /// All 24 layers of gpt-oss-20b (~13 GB): GPU and memory work only.
    Shape20b,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "bench" => Ok(Preset::Bench),
            "20b-shape" => Ok(Preset::Shape20b),
            other => Err(format!(
                "unknown preset {other:?} (expected tiny, bench or 20b-shape)"
            )),
        }
    }
}

/// The model dimensions a preset writes.
#[derive(Debug, Clone)]
pub struct Dims {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub window: usize,
    pub vocab: usize,
    /// Shard size budget in bytes.
    pub shard_bytes: usize,
}

impl Preset {
    pub fn dims(self) -> Dims {
        let real = Dims {
            layers: 24,
            hidden: 2880,
            heads: 64,
            kv_heads: 8,
            head_dim: 64,
            experts: 32,
            top_k: 4,
            intermediate: 2880,
            window: 128,
            vocab: 201_088,
            shard_bytes: 4_500_000_000,
        };
        match self {
            Preset::Tiny => Dims {
                layers: 4,
                hidden: 64,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                experts: 8,
                top_k: 2,
                intermediate: 64,
                window: 8,
                vocab: 201_088,
                // Small enough that the tiny model is split over several shards, like the hub's.
                shard_bytes: 20_000_000,
            },
            Preset::Bench => Dims {
                layers: 4,
                shard_bytes: 2_500_000_000,
                ..real
            },
            Preset::Shape20b => real,
        }
    }
}

/// How one tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// bf16 uniform in `center ± half_width`.
    Uniform { center: f32, half_width: f32 },
    /// u8 nibbles, uniformly random (MXFP4 blocks).
    Nibbles,
    /// u8 E8M0 scales: `base` plus a random step in {−1, 0, +1}.
    Scales { base: u8 },
}

/// A tensor to write, generated lazily when the serializer asks for its bytes.
struct LazyTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
}

impl LazyTensor {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn generate(&self) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(self.name.as_bytes()));
        let n = self.elements();
        match self.fill {
            Fill::Uniform { center, half_width } => {
                let mut out = Vec::with_capacity(n * 2);
                for _ in 0..n {
                    // 24 random bits → [0, 1) exactly, then to [-1, 1).
                    let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
                    let x = center + half_width * (2.0 * u - 1.0);
                    out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
                }
                out
            }
            Fill::Nibbles => {
                let mut out = vec![0u8; n];
                rng.fill_bytes(&mut out);
                out
            }
            Fill::Scales { base } => (0..n)
                .map(|_| {
                    let r = rng.next_u32() % 3;
                    base - 1 + r as u8
                })
                .collect(),
        }
    }
}

impl View for &LazyTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.generate())
    }
    fn data_len(&self) -> usize {
        self.elements() * if self.dtype == Dtype::BF16 { 2 } else { 1 }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The uniform half-width giving standard deviation `std`.
fn half_width(std: f32) -> f32 {
    std * 3f32.sqrt()
}

/// The E8M0 byte whose scale makes a random-nibble row of `cols` elements have a dot product
/// of about unit size with a unit-RMS input (nibble values have RMS ≈ 2.93).
fn expert_scale_byte(cols: usize) -> u8 {
    let target = 1.0 / (2.93 * (cols as f64).sqrt());
    (127.0 + target.log2().round()) as u8
}

fn tensors(d: &Dims, seed: u64) -> Vec<LazyTensor> {
    let bf16_t = |name: String, shape: Vec<usize>, center: f32, std: f32| LazyTensor {
        name,
        dtype: Dtype::BF16,
        shape,
        fill: Fill::Uniform {
            center,
            half_width: half_width(std),
        },
        seed,
    };
    let (h, q, kv, e, i2) = (
        d.hidden,
        d.heads * d.head_dim,
        d.kv_heads * d.head_dim,
        d.experts,
        2 * d.intermediate,
    );
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let mut t = vec![bf16_t(
        "model.embed_tokens.weight".into(),
        vec![d.vocab, h],
        0.0,
        1.0,
    )];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        t.push(bf16_t(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            1.0,
            0.1,
        ));
        t.push(bf16_t(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            0.1,
        ));
        for (name, rows, cols) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            t.push(bf16_t(
                format!("{p}.self_attn.{name}.weight"),
                vec![rows, cols],
                0.0,
                inv(cols),
            ));
            t.push(bf16_t(
                format!("{p}.self_attn.{name}.bias"),
                vec![rows],
                0.0,
                0.1,
            ));
        }
        t.push(bf16_t(
            format!("{p}.self_attn.sinks"),
            vec![d.heads],
            0.0,
            1.0,
        ));
        t.push(bf16_t(
            format!("{p}.mlp.router.weight"),
            vec![e, h],
            0.0,
            inv(h),
        ));
        t.push(bf16_t(format!("{p}.mlp.router.bias"), vec![e], 0.0, 0.1));
        for (name, rows, cols) in [("gate_up_proj", i2, h), ("down_proj", h, d.intermediate)] {
            t.push(LazyTensor {
                name: format!("{p}.mlp.experts.{name}_blocks"),
                dtype: Dtype::U8,
                shape: vec![e, rows, cols / 32, 16],
                fill: Fill::Nibbles,
                seed,
            });
            t.push(LazyTensor {
                name: format!("{p}.mlp.experts.{name}_scales"),
                dtype: Dtype::U8,
                shape: vec![e, rows, cols / 32],
                fill: Fill::Scales {
                    base: expert_scale_byte(cols),
                },
                seed,
            });
            t.push(bf16_t(
                format!("{p}.mlp.experts.{name}_bias"),
                vec![e, rows],
                0.0,
                0.1,
            ));
        }
    }
    t.push(bf16_t("model.norm.weight".into(), vec![h], 1.0, 0.1));
    // Logits with a spread of a few units: greedy choices are not near-ties.
    t.push(bf16_t(
        "lm_head.weight".into(),
        vec![d.vocab, h],
        0.0,
        4.0 * inv(h),
    ));
    t
}

/// The config.json of a generated model: the hub's keys, with the preset's sizes.
pub fn config_json(d: &Dims) -> serde_json::Value {
    let layer_types: Vec<&str> = (0..d.layers)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    serde_json::json!({
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": true,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": d.top_k,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "layer_types": layer_types,
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": d.heads,
        "num_experts_per_tok": d.top_k,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "num_local_experts": d.experts,
        "output_router_logits": false,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head"
            ],
            "quant_method": "mxfp4"
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": false
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": d.window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": false,
        "transformers_version": "4.55.0.dev0",
        "use_cache": true,
        "vocab_size": d.vocab
    })
}

/// A generator failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Serialize { path: PathBuf, reason: String },
}

/// Writes a random checkpoint of `preset` into `out` (created if needed). Returns the payload
/// bytes written.
pub fn write_test_model(preset: Preset, seed: u64, out: &Path) -> Result<u64, GenerateError> {
    write_dims(&preset.dims(), seed, out)
}

/// Writes a random checkpoint with explicit dimensions.
pub fn write_dims(d: &Dims, seed: u64, out: &Path) -> Result<u64, GenerateError> {
    create_model_dir(out)?;
    let all = tensors(d, seed);

    // Greedy sharding in name order, like the hub's index (one shard when it all fits).
    let mut shards: Vec<Vec<&LazyTensor>> = vec![Vec::new()];
    let mut used = 0usize;
    for t in &all {
        let bytes = t.data_len_bytes();
        if used > 0 && used + bytes > d.shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        used += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{k:05}-of-{:05}.safetensors", n - 1);
        let path = out.join(&file);
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
            total += t.data_len_bytes() as u64;
        }
        let items: Vec<(&str, &LazyTensor)> = shard.iter().map(|t| (t.name.as_str(), *t)).collect();
        safetensors::tensor::serialize_to_file(items, None, &path).map_err(|e| {
            GenerateError::Serialize {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        set_mode(&path, FILE_MODE)?;
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    write_json(&out.join("config.json"), &config_json(d))?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({
            "bos_token_id": 199998,
            "do_sample": true,
            "eos_token_id": [200002, 199999, 200012],
            "pad_token_id": 199999,
            "transformers_version": "4.55.0.dev0"
        }),
    )?;
    Ok(total)
}

impl LazyTensor {
    fn data_len_bytes(&self) -> usize {
        (&self).data_len()
    }
}

/// The mode of every file of a generated model: readable by a service user.
const FILE_MODE: u32 = 0o644;
/// The mode of every directory the generator creates.
const DIR_MODE: u32 = 0o755;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError {
    let path = path.to_path_buf();
    move |error| GenerateError::Io { path, error }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), GenerateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

/// Creates `out` and any missing parents, each 0755. Directories that already exist keep
/// their mode (the caller may have passed `/tmp`).
fn create_model_dir(out: &Path) -> Result<(), GenerateError> {
    let missing: Vec<&Path> = out
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && d.symlink_metadata().is_err())
        .collect();
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    for dir in missing {
        set_mode(dir, DIR_MODE)?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), GenerateError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| GenerateError::Serialize {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(io_error(path))?;
    set_mode(path, FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::config::ModelConfig;
    use crate::weights::{StageSpan, StageWeights};

    fn small_dims() -> Dims {
        Dims {
            vocab: 512,
            shard_bytes: 40_000,
            ..Preset::Tiny.dims()
        }
    }

    #[test]
    fn generated_model_loads_and_is_deterministic() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        write_dims(&small_dims(), 7, a.path()).expect("write a");
        write_dims(&small_dims(), 7, b.path()).expect("write b");
        let cfg = ModelConfig::load(a.path()).expect("config");
        assert_eq!(cfg.num_hidden_layers, 4);
        let ck = Checkpoint::open(a.path()).expect("open");
        let w = StageWeights::load(&ck, &cfg, &StageSpan::whole(&cfg)).expect("weights");
        assert_eq!(w.layers.len(), 4);
        let index =
            std::fs::read_to_string(a.path().join("model.safetensors.index.json")).expect("index");
        assert!(index.contains("model-00001-of-"), "several shards expected");
        for entry in std::fs::read_dir(a.path()).expect("dir") {
            let name = entry.expect("entry").file_name();
            let x = std::fs::read(a.path().join(&name)).expect("read a");
            let y = std::fs::read(b.path().join(&name)).expect("read b");
            assert!(
                x == y,
                "{name:?} differs between two runs with the same seed"
            );
        }
    }

    #[test]
    fn other_seed_other_weights() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        write_dims(&small_dims(), 1, a.path()).expect("write a");
        write_dims(&small_dims(), 2, b.path()).expect("write b");
        let first = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .expect("dir")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            names.sort();
            std::fs::read(&names[0]).expect("read shard")
        };
        assert!(first(a.path()) != first(b.path()));
    }
}
