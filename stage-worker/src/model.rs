//! The GPT-OSS forward pass for one pipeline stage, written once for every backend and read top
//! to bottom like OpenAI's `gpt_oss/torch/model.py`: the tensors (named after the checkpoint
//! keys, shapes declared), then a block — an attention half and an MoE half — then a stage:
//! tokens or hidden states in, its layers, hidden states or logits (and sampled tokens) out.
//! Formulas: `shared/reference/gpt-oss.md` §3; each step is one [`Backend`] operation, whose
//! doc says what it computes and the numeric contract it keeps.
//!
//! Invariants:
//! - Batch invariance is the backends' contract (see [`Backend`]); this file adds no
//!   arithmetic of its own, so a token's results depend only on its own inputs and its own
//!   sequence's KV. Crash replay relies on it.
//! - A stage runs any contiguous layer range: hidden states in, hidden states (or logits) out.
//! - Nothing here trusts the step: token ids, input sizes, positions and block tables are
//!   checked (`step.rs`) before the first operation and give a [`StepError`], never a panic.
//! - What this file must not know: how a backend computes, where its memory lives, threads.

use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::config::{AttentionKind, ModelConfig};
use gptossd_shared::sampling::SampleAt;
use gptossd_shared::weights::{LayerWeights, StageWeights};

use crate::backend::{
    AttentionArgs, Backend, BackendError, BackendInfo, DenseSource, ExpertsSource, Heads, QkvArgs,
};
use crate::kv::KvConfig;
use crate::rope::Rope;
use crate::sampler::{LogitsError, Sampled};
use crate::step::{check_input, check_step};
pub use crate::step::{Logits, SeqStep, StageInput, StepBatch, StepError};

/// `model.layers.{i}.*`: one transformer block's tensors on the backend.
struct Block<B: Backend> {
    /// `input_layernorm.weight` `[hidden]`.
    input_norm: B::Vector,
    /// `self_attn.{q,k,v}_proj.{weight,bias}` stacked by rows: `[q_dim + 2·kv_dim, hidden]`.
    qkv: B::Dense,
    /// `self_attn.sinks` `[heads]`.
    sinks: B::Vector,
    /// `self_attn.o_proj.{weight,bias}` `[hidden, q_dim]`.
    o_proj: B::Dense,
    /// `post_attention_layernorm.weight` `[hidden]`.
    post_attention_norm: B::Vector,
    /// `mlp.router.{weight,bias}` `[experts, hidden]`.
    router: B::Dense,
    /// `mlp.experts.{gate_up_proj,down_proj}{_blocks,_scales,_bias}`, MXFP4.
    experts: B::Experts,
    /// Sliding-window layers attend to the last `sliding_window` positions, full ones to all.
    window: Option<usize>,
}

/// `model.norm.weight` `[hidden]` and `lm_head.weight` `[vocab, hidden]` (the last stage).
struct Head<B: Backend> {
    norm: B::Vector,
    lm_head: B::Dense,
}

/// The named activations of a step, one row per token (the sequences' tokens concatenated).
struct Activations<B: Backend> {
    /// The residual stream `[tokens × hidden]`.
    x: B::Act,
    /// `rms_norm(x)`, the input of each half `[tokens × hidden]`.
    normed: B::Act,
    /// Queries after RoPE `[tokens × q_dim]`.
    q: B::Act,
    /// Attention output, heads concatenated `[tokens × q_dim]`.
    attn: B::Act,
    /// Each token's top-k experts and their weights.
    routes: B::Routes,
    /// Last stage: `[logit rows × vocab]`.
    logits: B::Act,
}

impl<B: Backend> Default for Activations<B> {
    fn default() -> Self {
        Self {
            x: B::Act::default(),
            normed: B::Act::default(),
            q: B::Act::default(),
            attn: B::Act::default(),
            routes: B::Routes::default(),
            logits: B::Act::default(),
        }
    }
}

/// One pipeline stage of the model on backend `B`: its tensors, its KV memory, the RoPE table
/// and the step's activations.
pub struct StageModel<B: Backend> {
    cfg: ModelConfig,
    backend: B,
    /// `model.embed_tokens.weight` `[vocab, hidden]` (the first stage).
    embedding: Option<B::Dense>,
    blocks: Vec<Block<B>>,
    head: Option<Head<B>>,
    kv: B::Kv,
    kv_config: KvConfig,
    rope: Rope,
    acts: Activations<B>,
    weight_bytes: usize,
}

impl<B: Backend> StageModel<B> {
    /// Loads the stage's tensors onto `backend` and makes its KV memory.
    pub fn new(
        mut backend: B,
        cfg: ModelConfig,
        weights: &StageWeights,
        kv: KvConfig,
    ) -> Result<Self, BackendError> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embedding = match &weights.embedding {
            Some(table) => Some(backend.load_dense(&[dense(table, None, v, h)])?),
            None => None,
        };
        let blocks = weights
            .layers
            .iter()
            .map(|lw| load_block(&mut backend, &cfg, lw))
            .collect::<Result<Vec<_>, _>>()?;
        let head = match &weights.head {
            Some(hw) => Some(Head {
                norm: backend.load_vector(&hw.norm)?,
                lm_head: backend.load_dense(&[dense(&hw.lm_head, None, v, h)])?,
            }),
            None => None,
        };
        let kv_memory = backend.new_kv(kv, blocks.len(), cfg.kv_dim())?;
        // Steps are checked against the blocks the backend holds, which may be fewer than asked.
        let kv = KvConfig {
            num_blocks: backend.kv_blocks(&kv_memory),
            ..kv
        };
        let rope = Rope::new(&cfg);
        Ok(Self {
            cfg,
            backend,
            embedding,
            blocks,
            head,
            kv: kv_memory,
            kv_config: kv,
            rope,
            acts: Activations::default(),
            weight_bytes: weights.bytes(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn kv_config(&self) -> KvConfig {
        self.kv_config
    }

    /// Whether this stage starts with the embedding (takes token ids).
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this stage ends with the LM head (returns logits).
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Bytes of checkpoint weights the stage holds.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of KV memory the stage holds.
    pub fn kv_bytes(&self) -> usize {
        self.backend.kv_bytes(&self.kv)
    }

    pub fn info(&self) -> BackendInfo {
        self.backend.info()
    }

    /// Drops the step buffers (they grow to the largest step seen, e.g. a burst of long
    /// prompts) so that an idle stage does not keep its high-water mark; the next step grows
    /// them again.
    pub fn release_scratch(&mut self) {
        self.acts = Activations::default();
        self.backend.release_scratch();
    }

    /// Runs one step into host memory: hidden states `[tokens × hidden]` into `out`, or, on
    /// the last stage, logits `[batch.logit_rows() × vocab]`.
    pub fn forward(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        self.layers(batch, input)?;
        let (result, len) = if self.is_last() {
            self.head(batch)?;
            (&self.acts.logits, batch.logit_rows() * self.cfg.vocab_size)
        } else {
            (&self.acts.x, batch.total_tokens() * self.cfg.hidden_size)
        };
        out.resize(len, 0.0);
        self.backend.download(result, out)?;
        Ok(())
    }

    /// A stage other than the last: runs one step and writes its hidden states
    /// `[tokens × hidden]` into `out` (the next hop's ring slot).
    pub fn forward_hidden(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        out: &mut [f32],
    ) -> Result<(), StepError> {
        if self.is_last() {
            return Err(StepError::WrongStage {
                what: "is the last stage and returns logits",
            });
        }
        let expected = batch.total_tokens() * self.cfg.hidden_size;
        if out.len() != expected {
            return Err(StepError::InputSize {
                got: out.len(),
                expected,
            });
        }
        self.layers(batch, input)?;
        self.backend.download(&self.acts.x, out)?;
        Ok(())
    }

    /// The last stage: runs one step and samples one token from each row of logits with
    /// `rows` (one per [`StepBatch::logit_rows`], in step order).
    pub fn forward_sample(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        rows: &[SampleAt],
    ) -> Result<Vec<Result<Sampled, LogitsError>>, StepError> {
        if rows.len() != batch.logit_rows() {
            return Err(StepError::SampleRows {
                got: rows.len(),
                expected: batch.logit_rows(),
            });
        }
        self.layers(batch, input)?;
        self.head(batch)?;
        Ok(self.backend.sample(&self.acts.logits, rows)?)
    }

    /// The step's input into the residual stream (embedding rows, or the previous stage's
    /// hidden states), then this stage's blocks.
    fn layers(&mut self, batch: &StepBatch, input: StageInput<'_>) -> Result<(), StepError> {
        check_input(&self.cfg, self.is_first(), &input, batch.total_tokens())?;
        check_step(&self.cfg, self.kv_config, batch)?;
        let x = &mut self.acts.x;
        match input {
            StageInput::Tokens(ids) => {
                let table = self.embedding.as_ref().ok_or(StepError::WrongStage {
                    what: "has no embedding (it is not the first stage)",
                })?;
                self.backend.embed(table, ids, x)?;
            }
            StageInput::Hidden(hs) => self.backend.upload(hs, self.cfg.hidden_size, x)?,
        }
        self.rope.extend_to(batch.end_position());
        for layer in 0..self.blocks.len() {
            self.block(layer, batch)?;
        }
        Ok(())
    }

    /// One transformer block, in place on the residual stream `x`.
    fn block(&mut self, layer: usize, step: &StepBatch) -> Result<(), BackendError> {
        let Self {
            cfg,
            backend: b,
            blocks,
            kv,
            rope,
            acts: a,
            ..
        } = self;
        let w = &blocks[layer];
        let heads = Heads::of(cfg);
        let eps = cfg.rms_norm_eps;

        // Attention half: x += o_proj(attention(rope(qkv(norm(x))))); the keys and values of
        // the step's tokens go to the KV pool on the way.
        b.rms_norm(&a.x, &w.input_norm, eps, &mut a.normed)?;
        b.qkv_rope_store(QkvArgs {
            x: &a.normed,
            qkv: &w.qkv,
            heads,
            rope,
            step,
            kv,
            layer,
            q: &mut a.q,
        })?;
        b.attention(AttentionArgs {
            q: &a.q,
            sinks: &w.sinks,
            heads,
            window: w.window,
            step,
            kv,
            layer,
            out: &mut a.attn,
        })?;
        b.out_proj_residual(&a.attn, &w.o_proj, &mut a.x)?;

        // MoE half: x += Σ over the token's top-k experts of weight · expert(norm(x)).
        b.rms_norm(&a.x, &w.post_attention_norm, eps, &mut a.normed)?;
        b.router_top_k(&a.normed, &w.router, cfg.num_experts_per_tok, &mut a.routes)?;
        b.moe(&a.normed, &a.routes, &w.experts, cfg.swiglu_limit, &mut a.x)?;
        Ok(())
    }

    /// The last stage's head: final norm and LM head for the rows that want logits.
    fn head(&mut self, step: &StepBatch) -> Result<(), StepError> {
        let head = self.head.as_ref().ok_or(StepError::WrongStage {
            what: "has no LM head (it is not the last stage)",
        })?;
        let a = &mut self.acts;
        self.backend.lm_head(
            &a.x,
            step,
            &head.norm,
            self.cfg.rms_norm_eps,
            &head.lm_head,
            &mut a.logits,
        )?;
        Ok(())
    }
}

/// A checkpoint matrix `[rows × cols]` with its optional bias, for loading.
fn dense<'a>(
    weight: &'a Mapped<u16>,
    bias: Option<&'a Mapped<u16>>,
    rows: usize,
    cols: usize,
) -> DenseSource<'a> {
    DenseSource {
        weight,
        bias,
        rows,
        cols,
    }
}

/// One block's tensors onto the backend (shapes were checked when the checkpoint was read).
fn load_block<B: Backend>(
    b: &mut B,
    cfg: &ModelConfig,
    lw: &LayerWeights,
) -> Result<Block<B>, BackendError> {
    let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
    let at = &lw.attn;
    let moe = &lw.moe;
    Ok(Block {
        input_norm: b.load_vector(&lw.input_norm)?,
        qkv: b.load_dense(&[
            dense(&at.q_w, Some(&at.q_b), qd, h),
            dense(&at.k_w, Some(&at.k_b), kvd, h),
            dense(&at.v_w, Some(&at.v_b), kvd, h),
        ])?,
        sinks: b.load_vector(&at.sinks)?,
        o_proj: b.load_dense(&[dense(&at.o_w, Some(&at.o_b), h, qd)])?,
        post_attention_norm: b.load_vector(&lw.post_attn_norm)?,
        router: b.load_dense(&[dense(
            &moe.router_w,
            Some(&moe.router_b),
            cfg.num_local_experts,
            h,
        )])?,
        experts: b.load_experts(ExpertsSource {
            gate_up: &moe.gate_up,
            gate_up_bias: &moe.gate_up_b,
            down: &moe.down,
            down_bias: &moe.down_b,
        })?,
        window: match cfg.layer_types[lw.index] {
            AttentionKind::Sliding => Some(cfg.sliding_window),
            AttentionKind::Full => None,
        },
    })
}
