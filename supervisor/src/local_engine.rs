//! Generation in one process: the whole model as a single stage, one sequence at a time.
//!
//! This is the reference path that the pipeline must reproduce token for token: prefill in
//! chunks, then decode, sampling each token from the last position's logits with the
//! sequence's seed and the token's index (so the same seed gives the same tokens on any path).

use std::path::Path;

use gptossd_shared::checkpoint::{Checkpoint, CheckpointError};
use gptossd_shared::config::{ConfigError, ModelConfig};
use gptossd_shared::sampling::SamplingSpec;
use gptossd_shared::weights::{StageSpan, StageWeights};
use gptossd_shared::VOCAB_EDGE;
use gptossd_stage::backend::BackendError;
use gptossd_stage::kv::KvConfig;
use gptossd_stage::model::{Logits, SeqStep, StageInput, StepBatch, StepError};
use gptossd_stage::sampler::{sample, LogitsError, SampleScratch, Sampled};
use gptossd_stage::stage::{Device, Stage};

use crate::scheduler::Finish;

/// Positions per KV block for the local engine.
const BLOCK_SIZE: usize = 16;

/// Why a generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt token {id} at index {index} is outside the vocabulary (ids < {VOCAB_EDGE})")]
    TokenOutOfRange { id: u32, index: usize },
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_new}) exceeds the context ({context})"
    )]
    TooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("loading the model: {0}")]
    Load(#[from] BackendError),
    #[error("model step failed: {0}")]
    Step(#[from] StepError),
    #[error("sampling failed: {0}")]
    Sampling(#[from] LogitsError),
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens with their logprobs, the stop token included when there is one.
    pub tokens: Vec<Sampled>,
    pub finish: Finish,
}

/// Options of one generation.
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingSpec,
    /// Largest prefill chunk.
    pub prefill_chunk: usize,
    /// Sampling one of these ends the generation (the chat format's: `chat::STOP_TOKENS`).
    pub stop_tokens: Vec<u32>,
}

/// The whole model in this process.
pub struct LocalEngine {
    model: Stage,
    scratch: SampleScratch,
}

impl LocalEngine {
    /// Loads the model in `dir` with a KV pool for `max_context` positions.
    pub fn load(dir: &Path, threads: usize, max_context: usize) -> Result<Self, EngineError> {
        let cfg = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let weights = StageWeights::load(&ckpt, &cfg, &StageSpan::whole(&cfg))?;
        let context = max_context.min(cfg.max_position_embeddings);
        let kv = KvConfig {
            num_blocks: context.div_ceil(BLOCK_SIZE),
            block_size: BLOCK_SIZE,
        };
        Ok(Self {
            model: Stage::load(Device::Cpu, threads, cfg, &weights, kv)?,
            scratch: SampleScratch::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Positions the KV pool can hold.
    pub fn context(&self) -> usize {
        let kv = self.model.kv_config();
        kv.num_blocks * kv.block_size
    }

    /// Generates up to `opts.max_new_tokens` tokens after `prompt`; `on_token` sees each one as
    /// it is sampled.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(&Sampled),
    ) -> Result<Generation, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some((index, &id)) = prompt.iter().enumerate().find(|(_, &id)| id >= VOCAB_EDGE) {
            return Err(EngineError::TokenOutOfRange { id, index });
        }
        let context = self.context();
        if prompt.len() + opts.max_new_tokens > context {
            return Err(EngineError::TooLong {
                prompt: prompt.len(),
                max_new: opts.max_new_tokens,
                context,
            });
        }
        let blocks: Vec<u32> = (0..self.model.kv_config().num_blocks as u32).collect();
        let mut logits = Vec::new();
        let chunk = opts.prefill_chunk.max(1);
        let mut pos = 0;
        while pos < prompt.len() {
            let n = chunk.min(prompt.len() - pos);
            let last = pos + n == prompt.len();
            let batch = StepBatch {
                seqs: vec![SeqStep {
                    start_pos: pos,
                    tokens: n,
                    blocks: blocks.clone(),
                    logits: if last { Logits::Last } else { Logits::None },
                }],
            };
            self.model.forward(
                &batch,
                StageInput::Tokens(&prompt[pos..pos + n]),
                &mut logits,
            )?;
            pos += n;
        }
        let mut tokens = Vec::with_capacity(opts.max_new_tokens);
        let mut finish = Finish::Length;
        while tokens.len() < opts.max_new_tokens {
            let sampled = sample(
                &opts.sampling,
                &logits,
                tokens.len() as u64,
                &mut self.scratch,
            )?;
            on_token(&sampled);
            let token = sampled.token;
            tokens.push(sampled);
            if opts.stop_tokens.contains(&token) {
                finish = Finish::Stop;
                break;
            }
            if tokens.len() == opts.max_new_tokens {
                break;
            }
            let batch = StepBatch {
                seqs: vec![SeqStep {
                    start_pos: pos,
                    tokens: 1,
                    blocks: blocks.clone(),
                    logits: Logits::Last,
                }],
            };
            self.model
                .forward(&batch, StageInput::Tokens(&[token]), &mut logits)?;
            pos += 1;
        }
        Ok(Generation { tokens, finish })
    }
}
