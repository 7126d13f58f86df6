//! Generation in one process: the whole model as a single stage, one sequence at a time
//! (`gptossd-stage generate`, which `gptossd generate` without `--stages` starts and reads).
//!
//! This is the reference path that the pipeline must reproduce token for token: prefill in
//! chunks, then decode, sampling each token from the last position's logits with the
//! sequence's seed and the token's index (so the same seed gives the same tokens on any path).
//!
//! The command prints one JSON line per generated token as it is sampled, then one with the
//! finish reason (`gptossd_shared::generation::GenerateLine`); on an error it prints no finish
//! line and exits non-zero with the error on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use gptossd_shared::checkpoint::{Checkpoint, CheckpointError};
use gptossd_shared::config::{ConfigError, ModelConfig};
use gptossd_shared::generation::{Finish, GenerateLine};
use gptossd_shared::sampling::{SamplingParams, SamplingSpec};
use gptossd_shared::weights::{StageSpan, StageWeights};
use gptossd_shared::VOCAB_EDGE;

use crate::backend::BackendError;
use crate::kv::KvConfig;
use crate::model::{Logits, SeqStep, StageInput, StepBatch, StepError};
use crate::sampler::{sample, LogitsError, SampleScratch, Sampled};
use crate::stage::Stage;
use gptossd_shared::device::Device;

/// Positions per KV block for the generator.
const BLOCK_SIZE: usize = 16;
/// Largest prefill chunk of `gptossd-stage generate`.
const PREFILL_CHUNK: usize = 512;

/// `gptossd-stage generate`: the flags `gptossd generate` passes (the prompt already rendered
/// and tokenized, the seed already resolved).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Vec<u32>,
    #[arg(long)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    /// The sequence's seed (without it, one is drawn).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampling one of these ends the generation, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub stop_tokens: Vec<u32>,
    /// CPU threads for the kernels (a GPU's host threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Where the model runs: `cpu`, `cpu:CORES` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Runs `gptossd-stage generate`: loads the model, generates, prints the lines.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        logprobs: None,
    };
    let sampling = params.spec().context("bad sampling flag")?;
    let context = args.prompt_tokens.len() + args.max_tokens;
    let mut generator = Generator::load(
        &args.model,
        &args.device,
        args.threads.max(1),
        context.max(1),
    )
    .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling,
        prefill_chunk: PREFILL_CHUNK,
        stop_tokens: args.stop_tokens.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut written = Ok(());
    let generation = generator
        .generate(&args.prompt_tokens, &opts, |s| {
            if written.is_ok() {
                written = write_line(&mut stdout, GenerateLine::Token { token: s.token });
            }
        })
        .context("generation failed")?;
    written.context("writing a token to stdout")?;
    write_line(
        &mut stdout,
        GenerateLine::End {
            finish_reason: generation.finish,
        },
    )
    .context("writing the finish reason to stdout")
}

/// One JSON line, flushed (the reader streams the tokens).
fn write_line(out: &mut impl Write, line: GenerateLine) -> std::io::Result<()> {
    let json = serde_json::to_string(&line).map_err(std::io::Error::other)?;
    writeln!(out, "{json}")?;
    out.flush()
}

/// Why a generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
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
    /// The caller names what it was loading; this says why the device refused.
    #[error(transparent)]
    Load(#[from] BackendError),
    #[error("model step failed")]
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
    /// Sampling one of these ends the generation (the chat format's, given by the supervisor).
    pub stop_tokens: Vec<u32>,
}

/// The whole model in this process.
pub struct Generator {
    model: Stage,
    scratch: SampleScratch,
}

impl Generator {
    /// Loads the model in `dir` on `device` with a KV pool for `max_context` positions.
    pub fn load(
        dir: &Path,
        device: &Device,
        threads: usize,
        max_context: usize,
    ) -> Result<Self, GenerateError> {
        let cfg = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let weights = StageWeights::load(&ckpt, &cfg, &StageSpan::whole(&cfg))?;
        let context = max_context.min(cfg.max_position_embeddings);
        let kv = KvConfig {
            num_blocks: context.div_ceil(BLOCK_SIZE),
            block_size: BLOCK_SIZE,
        };
        Ok(Self {
            model: Stage::load(device, threads, cfg, &weights, kv)?,
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
    ) -> Result<Generation, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if let Some((index, &id)) = prompt.iter().enumerate().find(|(_, &id)| id >= VOCAB_EDGE) {
            return Err(GenerateError::TokenOutOfRange { id, index });
        }
        let context = self.context();
        if prompt.len() + opts.max_new_tokens > context {
            return Err(GenerateError::TooLong {
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
