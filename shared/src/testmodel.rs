//! Random GPT-OSS checkpoints in exactly the Hugging Face on-disk format of openai/gpt-oss-20b,
//! for tests and benchmarks (no real weights can be downloaded here).
//!
//! Same config keys, tensor names, dtypes (bf16 everywhere, MXFP4 experts as u8 blocks and
//! scales) and sharding through `model.safetensors.index.json`. Deterministic for a seed on any
//! machine: each tensor draws from its own ChaCha8 stream keyed by (seed, FNV-1a of its name),
//! and values are built with exact arithmetic only (no libm), so no platform rounding enters.
//!
//! Shards are laid out first (safetensors serialises each header), then every core generates
//! chunks of tensor data and writes them at their offsets: memory stays at one chunk per core,
//! and since a chunk seeks its tensor's stream to its first element the bytes are the same as
//! one sequential pass would write, whatever the number of cores.
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

/// A tensor to write, generated chunk by chunk while the shards are written.
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

    /// Bytes per element: 2 for bf16, 1 for the u8 blocks and scales.
    fn element_bytes(&self) -> usize {
        if self.dtype == Dtype::BF16 {
            2
        } else {
            1
        }
    }

    fn data_len_bytes(&self) -> usize {
        self.elements() * self.element_bytes()
    }

    /// The tensor's own ChaCha8 stream, keyed by (seed, FNV-1a of its name).
    fn rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(self.name.as_bytes()))
    }

    /// Writes the bytes of elements `first..` into `out` (whole elements: `out.len()` is a
    /// multiple of [`Self::element_bytes`]).
    ///
    /// A pure function of (seed, name, element index), whatever the chunking: element `i` of a
    /// uniform or scale fill draws 32-bit word `i` of the tensor's stream, and byte `j` of a
    /// nibble fill is byte `j % 4` (little-endian) of word `j / 4`, which is exactly what one
    /// sequential pass over the whole tensor draws.
    fn fill(&self, first: usize, out: &mut [u8]) {
        let mut rng = self.rng();
        match self.fill {
            Fill::Uniform { center, half_width } => {
                rng.set_word_pos(first as u128);
                for pair in out.chunks_exact_mut(2) {
                    // 24 random bits → [0, 1) exactly, then to [-1, 1).
                    let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
                    let x = center + half_width * (2.0 * u - 1.0);
                    pair.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
                }
            }
            Fill::Nibbles => {
                rng.set_word_pos((first / 4) as u128);
                let skip = first % 4;
                let mut rest = out;
                if skip != 0 {
                    let word = rng.next_u32().to_le_bytes();
                    let take = (4 - skip).min(rest.len());
                    let (head, tail) = rest.split_at_mut(take);
                    head.copy_from_slice(&word[skip..skip + take]);
                    rest = tail;
                }
                rng.fill_bytes(rest);
            }
            Fill::Scales { base } => {
                rng.set_word_pos(first as u128);
                for b in out.iter_mut() {
                    let r = rng.next_u32() % 3;
                    *b = base - 1 + r as u8;
                }
            }
        }
    }
}

/// A tensor's dtype, shape and size without its data: all safetensors needs to lay out a
/// shard's header. Its `data` is empty, so it is only ever serialised for the header.
struct Layout<'a>(&'a LazyTensor);

impl View for Layout<'_> {
    fn dtype(&self) -> Dtype {
        self.0.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.0.data_len_bytes()
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
    let mut plans = Vec::with_capacity(n);
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{k:05}-of-{:05}.safetensors", n - 1);
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
            total += t.data_len_bytes() as u64;
        }
        plans.push(plan_shard(out.join(&file), shard)?);
    }
    write_shards(&plans)?;
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

/// Output bytes one worker generates and writes at a time: large enough to amortise a seek
/// into the stream and a write call, small enough that every core holding one stays a few
/// tens of MiB. A multiple of 4, so nibble chunks start on a word of their stream.
const CHUNK_BYTES: usize = 4 << 20;

/// One shard file, laid out before any data is generated.
struct ShardPlan<'a> {
    path: PathBuf,
    /// The length prefix and JSON header, exactly as safetensors serialises them.
    header: Vec<u8>,
    /// Each tensor with the file offset of its first data byte.
    tensors: Vec<(&'a LazyTensor, u64)>,
    /// The whole file's length.
    len: u64,
}

/// Lays out one shard: safetensors itself serialises the header (its tensor order, offsets and
/// padding), and the data offsets are read back from that header.
fn plan_shard<'a>(path: PathBuf, shard: &[&'a LazyTensor]) -> Result<ShardPlan<'a>, GenerateError> {
    let fail = |reason: String| GenerateError::Serialize {
        path: path.clone(),
        reason,
    };
    let items: Vec<(&str, Layout<'_>)> =
        shard.iter().map(|t| (t.name.as_str(), Layout(t))).collect();
    let header = safetensors::serialize(items, None).map_err(|e| fail(e.to_string()))?;
    let json = header
        .get(8..)
        .ok_or_else(|| fail("safetensors header shorter than its length prefix".into()))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(json).map_err(|e| fail(format!("own header unreadable: {e}")))?;
    let start = header.len() as u64;
    let mut tensors = Vec::with_capacity(shard.len());
    for t in shard {
        let info = meta
            .info(&t.name)
            .ok_or_else(|| fail(format!("{} missing from its own header", t.name)))?;
        let (begin, end) = info.data_offsets;
        if end - begin != t.data_len_bytes() {
            return Err(fail(format!(
                "{}: header says {} bytes, tensor has {}",
                t.name,
                end - begin,
                t.data_len_bytes()
            )));
        }
        tensors.push((*t, start + begin as u64));
    }
    Ok(ShardPlan {
        path,
        header,
        tensors,
        len: start + meta.data_len() as u64,
    })
}

/// A piece of one tensor to generate and write at `offset` of shard `shard`.
struct Chunk<'a> {
    shard: usize,
    tensor: &'a LazyTensor,
    first: usize,
    elements: usize,
    offset: u64,
}

/// The temporary name a shard is written under before it is renamed into place (with the
/// process id, so two generators writing into one directory do not share temporary files).
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// Writes every shard: each is created under a temporary name at its full size with its
/// header, then all cores generate chunks of tensor data and write them at their offsets
/// (memory stays at one chunk per core), and finally each shard is made 0644 and renamed
/// into place, so an existing shard of the same name (perhaps mapped by a reader) is replaced
/// whole, never truncated. On failure the temporary files are removed.
fn write_shards(plans: &[ShardPlan<'_>]) -> Result<(), GenerateError> {
    let partials: Vec<PathBuf> = plans.iter().map(|p| partial_path(&p.path)).collect();
    let result = write_partials(plans, &partials).and_then(|()| {
        for (plan, partial) in plans.iter().zip(&partials) {
            set_mode(partial, FILE_MODE)?;
            std::fs::rename(partial, &plan.path).map_err(io_error(&plan.path))?;
        }
        Ok(())
    });
    if result.is_err() {
        for partial in &partials {
            // Best effort: the error being returned is the one that matters.
            let _ = std::fs::remove_file(partial);
        }
    }
    result
}

fn write_partials(plans: &[ShardPlan<'_>], partials: &[PathBuf]) -> Result<(), GenerateError> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let mut files = Vec::with_capacity(plans.len());
    for (plan, partial) in plans.iter().zip(partials) {
        let file = std::fs::File::create(partial).map_err(io_error(partial))?;
        file.set_len(plan.len).map_err(io_error(partial))?;
        file.write_all_at(&plan.header, 0)
            .map_err(io_error(partial))?;
        files.push((file, partial.as_path()));
    }
    let mut chunks = Vec::new();
    for (shard, plan) in plans.iter().enumerate() {
        for &(tensor, offset) in &plan.tensors {
            let per_chunk = CHUNK_BYTES / tensor.element_bytes();
            let total = tensor.elements();
            let mut first = 0;
            while first < total {
                let elements = per_chunk.min(total - first);
                chunks.push(Chunk {
                    shard,
                    tensor,
                    first,
                    elements,
                    offset: offset + (first * tensor.element_bytes()) as u64,
                });
                first += elements;
            }
        }
    }

    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, chunks.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || -> Result<(), GenerateError> {
        let mut buf = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            buf.resize(chunk.elements * chunk.tensor.element_bytes(), 0);
            chunk.tensor.fill(chunk.first, &mut buf);
            // `chunk.shard` indexes `plans`, which `files` follows one for one.
            let (file, path) = &files[chunk.shard];
            if let Err(e) = file.write_all_at(&buf, chunk.offset) {
                failed.store(true, Ordering::Relaxed);
                return Err(io_error(path)(e));
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
        let mut result = Ok(());
        for handle in handles {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        result
    })
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

    /// One sequential pass over the whole tensor, as the generator drew it before it wrote in
    /// parallel: the definition the chunked fill must reproduce byte for byte.
    fn sequential(t: &LazyTensor) -> Vec<u8> {
        let mut rng = t.rng();
        let n = t.elements();
        match t.fill {
            Fill::Uniform { center, half_width } => {
                let mut out = Vec::with_capacity(n * 2);
                for _ in 0..n {
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
                .map(|_| base - 1 + (rng.next_u32() % 3) as u8)
                .collect(),
        }
    }

    #[test]
    fn chunked_fill_matches_one_sequential_pass_at_any_split() {
        let tensor = |fill, dtype| LazyTensor {
            name: "model.layers.0.mlp.experts.gate_up_proj_blocks".into(),
            dtype,
            shape: vec![3, 1001],
            fill,
            seed: 11,
        };
        let all = [
            tensor(
                Fill::Uniform {
                    center: 0.5,
                    half_width: 2.0,
                },
                Dtype::BF16,
            ),
            tensor(Fill::Nibbles, Dtype::U8),
            tensor(Fill::Scales { base: 120 }, Dtype::U8),
        ];
        for t in &all {
            let whole = sequential(t);
            assert_eq!(whole.len(), t.data_len_bytes());
            let eb = t.element_bytes();
            // Splits on and off 16-word ChaCha blocks, on and off 4-byte words (nibbles).
            for step in [1, 3, 4, 7, 16, 17, 64, 1000, 3003] {
                let mut chunked = vec![0u8; whole.len()];
                for (k, piece) in chunked.chunks_mut(step * eb).enumerate() {
                    t.fill(k * step, piece);
                }
                assert!(chunked == whole, "{:?} split every {step}", t.fill);
            }
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
