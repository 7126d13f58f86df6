//! One step as a stage sees it — which sequences, which positions, which KV blocks, which rows
//! want logits — and the checks that make it safe to compute.
//!
//! Invariants: nothing here trusts the step. Token ids, input sizes, positions and block tables
//! are checked by [`check_input`] and [`check_step`] before any backend operation runs, and a
//! bad step gives a [`StepError`], never a panic; past these checks the backends may index
//! without re-checking. Rows of a step are the tokens of its sequences, concatenated in order.

use std::ops::Range;

use gptossd_shared::config::ModelConfig;

use crate::backend::BackendError;
use crate::kv::KvConfig;

/// A step that cannot run as given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    #[error("token id {id} is outside the vocabulary (< {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence {seq}: position {pos} is beyond the model's context ({max})")]
    PositionOutOfRange { seq: usize, pos: usize, max: usize },
    #[error("sequence {seq}: block table has {have} blocks, position {pos} needs block {need}")]
    BlockTableTooShort {
        seq: usize,
        have: usize,
        need: usize,
        pos: usize,
    },
    #[error("sequence {seq}: block id {block} is outside the pool ({num_blocks} blocks)")]
    BlockOutOfRange {
        seq: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error("step input has {got} values, expected {expected}")]
    InputSize { got: usize, expected: usize },
    #[error("{got} rows to sample, the step has {expected} rows of logits")]
    SampleRows { got: usize, expected: usize },
    #[error("this stage {what}")]
    WrongStage { what: &'static str },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Which positions of a sequence's chunk want logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The chunk's last token (the usual case: the next token is sampled from it).
    Last,
    /// Every token of the chunk (scoring, reference comparisons).
    All,
}

/// One sequence's part of a step: `tokens` consecutive positions from `start_pos`, either a
/// prefill chunk or a single decode token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    /// Absolute position of the chunk's first token.
    pub start_pos: usize,
    /// Number of tokens in the chunk (≥ 1).
    pub tokens: usize,
    /// KV block ids covering positions `0 .. start_pos + tokens`.
    pub blocks: Vec<u32>,
    pub logits: Logits,
}

impl SeqStep {
    /// The tokens of the chunk (0-based within the chunk) that want logits.
    pub fn logit_tokens(&self) -> Range<usize> {
        let first = match self.logits {
            Logits::None => self.tokens,
            Logits::Last => self.tokens.saturating_sub(1),
            Logits::All => 0,
        };
        first..self.tokens
    }
}

/// The sequences of one step, in order; their tokens are concatenated in the activations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub seqs: Vec<SeqStep>,
}

impl StepBatch {
    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens).sum()
    }

    /// Rows of logits the last stage returns for this step.
    pub fn logit_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.logit_tokens().len()).sum()
    }

    /// One past the last position of the step (0 for an empty step).
    pub fn end_position(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.start_pos + s.tokens)
            .max()
            .unwrap_or(0)
    }

    /// The rows of the step's activations that want logits, as ranges in step order; their
    /// lengths add up to [`StepBatch::logit_rows`].
    pub fn logit_row_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut offset = 0;
        self.seqs.iter().map(move |s| {
            let wanted = s.logit_tokens();
            let rows = offset + wanted.start..offset + wanted.end;
            offset += s.tokens;
            rows
        })
    }
}

/// What a stage receives.
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states `[tokens × hidden]` from the previous stage.
    Hidden(&'a [f32]),
}

/// Checks that `input` fits a stage with (`first`) or without the embedding for a step of
/// `tokens` tokens: the right kind, the right length, token ids inside the vocabulary.
pub fn check_input(
    cfg: &ModelConfig,
    first: bool,
    input: &StageInput<'_>,
    tokens: usize,
) -> Result<(), StepError> {
    let (got, expected) = match *input {
        StageInput::Tokens(_) if !first => {
            return Err(StepError::WrongStage {
                what: "has no embedding (it is not the first stage)",
            })
        }
        StageInput::Hidden(_) if first => {
            return Err(StepError::WrongStage {
                what: "is the first stage and takes token ids",
            })
        }
        StageInput::Tokens(ids) => (ids.len(), tokens),
        StageInput::Hidden(hs) => (hs.len(), tokens * cfg.hidden_size),
    };
    if got != expected {
        return Err(StepError::InputSize { got, expected });
    }
    if let StageInput::Tokens(ids) = *input {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(StepError::TokenOutOfRange {
                id,
                vocab: cfg.vocab_size,
            });
        }
    }
    Ok(())
}

/// Checks every sequence of `batch`: at least one token, inside the model's context, a block
/// table that covers its last position with block ids inside the pool.
pub fn check_step(cfg: &ModelConfig, kv: KvConfig, batch: &StepBatch) -> Result<(), StepError> {
    let bs = kv.block_size;
    for (i, s) in batch.seqs.iter().enumerate() {
        let end = s.start_pos + s.tokens;
        if s.tokens == 0 || end > cfg.max_position_embeddings {
            return Err(StepError::PositionOutOfRange {
                seq: i,
                pos: end,
                max: cfg.max_position_embeddings,
            });
        }
        let need = (end - 1) / bs;
        if s.blocks.len() <= need {
            return Err(StepError::BlockTableTooShort {
                seq: i,
                have: s.blocks.len(),
                need,
                pos: end - 1,
            });
        }
        if let Some(&block) = s.blocks[..=need]
            .iter()
            .find(|&&b| b as usize >= kv.num_blocks)
        {
            return Err(StepError::BlockOutOfRange {
                seq: i,
                block,
                num_blocks: kv.num_blocks,
            });
        }
    }
    Ok(())
}
