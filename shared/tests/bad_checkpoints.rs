//! Bad checkpoints give an error that names the file and the tensor, never a panic or a hang.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::preflight::preflight;
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

/// Runs `f` on its own thread and returns its result, failing the test if it takes longer than
/// a few seconds (a thread stuck in `open` on a pipe is left behind; the test process exits).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("loading blocked instead of failing at once")
}

fn replace_with_fifo(path: &Path) {
    std::fs::remove_file(path).expect("remove");
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
}

#[test]
fn a_named_pipe_in_place_of_any_file_is_refused_at_once() {
    for victim in ["config.json", "model.safetensors.index.json", "a shard"] {
        let dir = small_model();
        let path = if victim == "a shard" {
            shard_holding(dir.path(), "model.layers.1.mlp.router.bias")
        } else {
            dir.path().join(victim)
        };
        replace_with_fifo(&path);
        let model = dir.path().to_path_buf();
        let e = within_seconds(move || load_error(&model));
        assert!(
            e.contains(&format!(
                "{}: is not a regular file (it is a named pipe)",
                path.display()
            )),
            "{victim}: {e}"
        );
        let model = dir.path().to_path_buf();
        let e = within_seconds(move || preflight(&model).map(|_| ()))
            .expect_err("preflight of a pipe")
            .to_string();
        assert!(e.contains("is not a regular file"), "{victim}: {e}");
    }
}

#[test]
fn a_directory_in_place_of_a_shard_is_refused() {
    let dir = small_model();
    let shard = shard_holding(dir.path(), "lm_head.weight");
    std::fs::remove_file(&shard).expect("remove");
    std::fs::create_dir(&shard).expect("mkdir");
    let e = load_error(dir.path());
    assert!(
        e.contains(&format!(
            "{}: is not a regular file (it is a directory)",
            shard.display()
        )),
        "{e}"
    );
}

/// A safetensors file whose header names tensor `a` twice, first as 4 f32, then as 16 u8 over
/// the same bytes, with `b` in between: valid in every other respect.
fn header_with_a_duplicate() -> Vec<u8> {
    let header = concat!(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"#,
        r#""b":{"dtype":"U8","shape":[4],"data_offsets":[16,20]},"#,
        r#""a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[7u8; 20]);
    bytes
}

#[test]
fn a_header_naming_a_tensor_twice_is_refused() {
    let bytes = header_with_a_duplicate();
    // Not the point of the test, but what makes it meaningful: a plain parser takes this file
    // (keeping the second `a`), so only the duplicate check stands between it and the model.
    safetensors::SafeTensors::deserialize(&bytes).expect("otherwise valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes).expect("write");
    let e = Checkpoint::open(dir.path())
        .err()
        .expect("duplicate accepted")
        .to_string();
    assert_eq!(
        e,
        format!("{}: the header names tensor `a` twice", path.display())
    );
}

#[test]
fn a_tensor_in_two_shards_is_refused() {
    let dir = small_model();
    let first = shard_holding(dir.path(), "lm_head.weight");
    let second = dir.path().join("model-extra.safetensors");
    std::fs::copy(&first, &second).expect("copy");
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).expect("index")).expect("json");
    index["weight_map"]["extra"] = "model-extra.safetensors".into();
    std::fs::write(&index_path, index.to_string()).expect("write index");
    let e = load_error(dir.path());
    assert!(
        e.contains(&first.display().to_string()) && e.contains(&second.display().to_string()),
        "{e}"
    );
}

/// The whole error chain as `anyhow`'s `{:#}` prints it: each cause after a colon.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

#[test]
fn a_missing_file_shows_the_os_error_once() {
    let dir = small_model();
    let shard = shard_holding(dir.path(), "model.norm.weight");
    std::fs::remove_file(&shard).expect("remove");
    std::fs::remove_file(dir.path().join("config.json")).expect("remove");
    let checkpoint = Checkpoint::open(dir.path()).err().expect("missing shard");
    let config = ModelConfig::load(dir.path()).expect_err("missing config");
    let checked = preflight(dir.path()).expect_err("missing config");
    for text in [chain(&checkpoint), chain(&config), chain(&checked)] {
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    }
    assert!(chain(&checkpoint).contains(&shard.display().to_string()));
}

#[test]
fn an_absurd_config_value_is_refused_on_load() {
    let dir = small_model();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    let absurd = text.replace("\"rms_norm_eps\": 0.00001", "\"rms_norm_eps\": 4294967296");
    assert_ne!(absurd, text);
    std::fs::write(&path, absurd).expect("write");
    let e = load_error(dir.path());
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("rms_norm_eps")
            && e.contains("4294967296"),
        "{e}"
    );
}
