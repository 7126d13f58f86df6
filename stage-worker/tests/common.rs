//! Helpers shared by the stage-worker integration tests: the tiny model, made once per test
//! binary from its seed, and a one-stage model over it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::testmodel::{write_test_model, Preset};
use gptossd_shared::weights::{StageSpan, StageWeights};
use gptossd_stage::kv::KvConfig;
use gptossd_stage::model::{Logits, SeqStep, StageModel};

/// The `tiny` preset with seed 0, generated once into a temporary directory.
pub fn tiny_model_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        write_test_model(Preset::Tiny, 0, dir.path()).expect("write tiny model");
        dir
    })
    .path()
    .to_path_buf()
}

/// A model stage holding `span` (whole model when `None`).
pub fn stage(span: Option<StageSpan>, threads: usize) -> StageModel {
    let dir = tiny_model_dir();
    let cfg = ModelConfig::load(&dir).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let span = span.unwrap_or_else(|| StageSpan::whole(&cfg));
    let weights = StageWeights::load(&ckpt, &cfg, &span).expect("weights");
    StageModel::new(
        cfg,
        weights,
        KvConfig {
            num_blocks: 256,
            block_size: 16,
        },
        threads,
    )
}

/// Blocks `first .. first + count` as a table.
pub fn blocks(first: u32, count: u32) -> Vec<u32> {
    (first..first + count).collect()
}

pub fn chunk(start_pos: usize, tokens: usize, table: &[u32], logits: Logits) -> SeqStep {
    SeqStep {
        start_pos,
        tokens,
        blocks: table.to_vec(),
        logits,
    }
}
