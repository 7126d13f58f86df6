//! Code shared by the gptossd supervisor and its stage workers.
//!
//! This crate knows the GPT-OSS checkpoint on disk (config, safetensors, MXFP4) and how to make
//! a random one for tests, and the shared-memory ring that carries activations between processes.
//! It also owns what both sides of the process boundary parse or speak: the device grammar
//! (`device.rs`), the wire protocol (`protocol.rs`) and the validated sampling spec both sides
//! keep with a sequence (`sampling.rs`). It depends on neither tokio nor CUDA:
//! both processes link it.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod files;
pub mod generation;
pub mod measure;
pub mod mxfp4;
pub mod preflight;
pub mod protocol;
pub mod ring;
pub mod sampling;
pub mod testmodel;
pub mod weights;
pub mod wire;

/// First id past the model's vocabulary: ids at or above it must never reach the embedding
/// (harmony names reserved tokens up to 201088 inclusive, the model's rows end at 201087).
pub const VOCAB_EDGE: u32 = 201_088;
