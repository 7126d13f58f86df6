//! Bad checkpoints give an error that names the file and the tensor, never a panic.

use std::path::Path;

use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::testmodel::{write_dims, Dims, Preset};
use gptossd_shared::weights::{StageSpan, StageWeights};

fn small_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let dims = Dims {
        vocab: 512,
        shard_bytes: 60_000,
        ..Preset::Tiny.dims()
    };
    write_dims(&dims, 3, dir.path()).expect("write model");
    dir
}

/// Opens and loads the whole model; returns the error text.
fn load_error(dir: &Path) -> String {
    let result = ModelConfig::load(dir)
        .map_err(|e| e.to_string())
        .and_then(|cfg| {
            let ck = Checkpoint::open(dir).map_err(|e| e.to_string())?;
            StageWeights::load(&ck, &cfg, &StageSpan::whole(&cfg)).map_err(|e| e.to_string())
        });
    match result {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e,
    }
}

fn shard_holding(dir: &Path, tensor: &str) -> std::path::PathBuf {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    dir.join(
        index["weight_map"][tensor]
            .as_str()
            .expect("tensor in index"),
    )
}

#[test]
fn a_good_model_loads() {
    let dir = small_model();
    let cfg = ModelConfig::load(dir.path()).expect("config");
    let ck = Checkpoint::open(dir.path()).expect("open");
    StageWeights::load(&ck, &cfg, &StageSpan::whole(&cfg)).expect("weights");
}

#[test]
fn missing_directory() {
    let e = load_error(Path::new("/nonexistent/gptossd-model"));
    assert!(e.contains("/nonexistent/gptossd-model"), "{e}");
}

#[test]
fn truncated_safetensors_file() {
    let dir = small_model();
    let shard = shard_holding(dir.path(), "lm_head.weight");
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &bytes[..bytes.len() - 1000]).expect("truncate");
    let e = load_error(dir.path());
    assert!(e.contains(&shard.display().to_string()), "{e}");
    assert!(e.contains("truncated") || e.contains("valid"), "{e}");
}

#[test]
fn header_only_garbage() {
    let dir = small_model();
    let shard = shard_holding(dir.path(), "model.norm.weight");
    std::fs::write(&shard, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").expect("write");
    let e = load_error(dir.path());
    assert!(e.contains(&shard.display().to_string()), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = small_model();
    // Drop a tensor from the index and its shard by renaming it in the header: rewrite the
    // index entry to point at a shard that lacks it.
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).expect("index");
    let mut index: serde_json::Value = serde_json::from_str(&text).expect("json");
    let shard = shard_holding(dir.path(), "model.layers.2.self_attn.sinks");
    let bytes = std::fs::read(&shard).expect("read");
    let renamed = replace_once(
        &bytes,
        b"model.layers.2.self_attn.sinks",
        b"model.layers.2.self_attn.sinkz",
    );
    std::fs::write(&shard, renamed).expect("write");
    index["weight_map"]["model.layers.2.self_attn.sinkz"] =
        index["weight_map"]["model.layers.2.self_attn.sinks"].clone();
    std::fs::write(&index_path, index.to_string()).expect("write index");
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.2.self_attn.sinks") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = small_model();
    let shard = shard_holding(dir.path(), "model.layers.1.mlp.router.bias");
    let bytes = std::fs::read(&shard).expect("read");
    // Same byte size (F16 and BF16 are both 2 bytes): only the dtype is wrong.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).expect("utf8");
    let key = "\"model.layers.1.mlp.router.bias\":{\"dtype\":\"BF16\"";
    assert!(header.contains(key), "unexpected header layout: {header}");
    let patched = header.replacen(
        key,
        "\"model.layers.1.mlp.router.bias\":{\"dtype\":\"F16\" ",
        1,
    );
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&patched.as_bytes()[..header_len]);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&shard, out).expect("write");
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.1.mlp.router.bias") && e.contains("F16"),
        "{e}"
    );
    assert!(e.contains(&shard.display().to_string()), "{e}");
}

#[test]
fn wrong_shape_in_config() {
    let dir = small_model();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        text.replace("\"intermediate_size\": 64", "\"intermediate_size\": 96"),
    )
    .expect("write");
    let e = load_error(dir.path());
    assert!(e.contains("gate_up_proj") && e.contains("shape"), "{e}");
}

#[test]
fn garbled_config() {
    let dir = small_model();
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{\"model_type\": \"gpt_oss\", \"hidden_size\": [").expect("write");
    let e = load_error(dir.path());
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn unknown_quantization() {
    let dir = small_model();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        text.replace("\"quant_method\": \"mxfp4\"", "\"quant_method\": \"awq\""),
    )
    .expect("write");
    let e = load_error(dir.path());
    assert!(e.contains("quant_method") && e.contains("awq"), "{e}");
}

fn replace_once(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = haystack.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}

#[test]
fn a_single_model_safetensors_without_index_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dims = Dims {
        vocab: 512,
        shard_bytes: usize::MAX,
        ..Preset::Tiny.dims()
    };
    write_dims(&dims, 4, dir.path()).expect("write model");
    std::fs::rename(
        dir.path().join("model-00000-of-00000.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .expect("rename");
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).expect("rm index");
    let cfg = ModelConfig::load(dir.path()).expect("config");
    let ck = Checkpoint::open(dir.path()).expect("open");
    let w = StageWeights::load(&ck, &cfg, &StageSpan::whole(&cfg)).expect("weights");
    assert_eq!(w.layers.len(), 4);
}
