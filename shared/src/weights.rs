//! The weights one pipeline stage needs: a contiguous layer range, plus the embedding on the
//! first stage and the final norm and LM head on the last.
//!
//! Tensor names mirror the Hugging Face checkpoint keys; shapes and dtypes are declared here
//! (reference §2.1) and checked on load, so the forward pass can index without re-checking.
//! Only the tensors of the requested range are touched: the rest of the file stays unmapped
//! from the page cache's point of view.

use std::ops::Range;

use crate::checkpoint::{Checkpoint, CheckpointError, Mapped, Tensor};
use crate::config::ModelConfig;
use crate::mxfp4::Mxfp4Experts;

/// Which part of the model a stage holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpan {
    pub layers: Range<usize>,
    /// Holds `model.embed_tokens.weight` (the first stage).
    pub embedding: bool,
    /// Holds `model.norm.weight` and `lm_head.weight` (the last stage).
    pub head: bool,
}

impl StageSpan {
    /// The whole model in one stage.
    pub fn whole(cfg: &ModelConfig) -> Self {
        Self {
            layers: 0..cfg.num_hidden_layers,
            embedding: true,
            head: true,
        }
    }
}

/// Attention weights of one layer (bf16 as raw bits).
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    pub q_w: Mapped<u16>,
    pub q_b: Mapped<u16>,
    pub k_w: Mapped<u16>,
    pub k_b: Mapped<u16>,
    pub v_w: Mapped<u16>,
    pub v_b: Mapped<u16>,
    pub o_w: Mapped<u16>,
    pub o_b: Mapped<u16>,
    pub sinks: Mapped<u16>,
}

/// Mixture-of-experts weights of one layer.
#[derive(Clone, Debug)]
pub struct MoeWeights {
    pub router_w: Mapped<u16>,
    pub router_b: Mapped<u16>,
    /// Logical `[experts, 2·intermediate, hidden]`, gate/up rows interleaved (even = gate).
    pub gate_up: Mxfp4Experts,
    /// `[experts, 2·intermediate]`, interleaved like the rows.
    pub gate_up_b: Mapped<u16>,
    /// Logical `[experts, hidden, intermediate]`.
    pub down: Mxfp4Experts,
    /// `[experts, hidden]`
    pub down_b: Mapped<u16>,
}

/// Everything of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub index: usize,
    pub input_norm: Mapped<u16>,
    pub attn: AttentionWeights,
    pub post_attn_norm: Mapped<u16>,
    pub moe: MoeWeights,
}

/// The final norm and the (untied) LM head.
#[derive(Clone, Debug)]
pub struct HeadWeights {
    pub norm: Mapped<u16>,
    /// `[vocab, hidden]`
    pub lm_head: Mapped<u16>,
}

/// The weights of one stage.
#[derive(Clone, Debug)]
pub struct StageWeights {
    pub span: StageSpan,
    /// `[vocab, hidden]`, first stage only.
    pub embedding: Option<Mapped<u16>>,
    pub layers: Vec<LayerWeights>,
    pub head: Option<HeadWeights>,
}

impl StageWeights {
    /// Loads (maps and checks) the tensors of `span` from `ckpt`.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        span: &StageSpan,
    ) -> Result<Self, CheckpointError> {
        let h = cfg.hidden_size;
        let v = cfg.vocab_size;
        let embedding = if span.embedding {
            Some(ckpt.bf16("model.embed_tokens.weight", &[v, h])?.data)
        } else {
            None
        };
        let layers = span
            .layers
            .clone()
            .map(|i| load_layer(ckpt, cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        let head = if span.head {
            Some(HeadWeights {
                norm: ckpt.bf16("model.norm.weight", &[h])?.data,
                lm_head: ckpt.bf16("lm_head.weight", &[v, h])?.data,
            })
        } else {
            None
        };
        Ok(Self {
            span: span.clone(),
            embedding,
            layers,
            head,
        })
    }

    /// Bytes of weights this stage holds (for memory figures).
    pub fn bytes(&self) -> usize {
        let mut n = self.embedding.as_ref().map_or(0, |e| e.len() * 2);
        if let Some(head) = &self.head {
            n += head.bytes();
        }
        for l in &self.layers {
            n += l.dense_bytes() + l.expert_bytes() * l.moe.gate_up.experts;
        }
        n
    }
}

impl HeadWeights {
    /// Final norm and LM head bytes.
    pub fn bytes(&self) -> usize {
        (self.norm.len() + self.lm_head.len()) * 2
    }
}

impl LayerWeights {
    /// Bytes of everything but the experts: norms, attention, router.
    pub fn dense_bytes(&self) -> usize {
        let a = &self.attn;
        2 * (self.input_norm.len()
            + self.post_attn_norm.len()
            + a.q_w.len()
            + a.q_b.len()
            + a.k_w.len()
            + a.k_b.len()
            + a.v_w.len()
            + a.v_b.len()
            + a.o_w.len()
            + a.o_b.len()
            + a.sinks.len()
            + self.moe.router_w.len()
            + self.moe.router_b.len())
    }

    /// Bytes of one expert: its packed MXFP4 blocks and scales and its biases.
    pub fn expert_bytes(&self) -> usize {
        let m = &self.moe;
        let all = m.gate_up.blocks.len()
            + m.gate_up.scales.len()
            + m.down.blocks.len()
            + m.down.scales.len()
            + 2 * (m.gate_up_b.len() + m.down_b.len());
        all / m.gate_up.experts.max(1)
    }
}

fn load_layer(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    i: usize,
) -> Result<LayerWeights, CheckpointError> {
    let h = cfg.hidden_size;
    let q = cfg.q_dim();
    let kv = cfg.kv_dim();
    let e = cfg.num_local_experts;
    let inter = cfg.intermediate_size;
    let p = format!("model.layers.{i}");
    let bf16 = |name: &str, shape: &[usize]| -> Result<Mapped<u16>, CheckpointError> {
        Ok(ckpt.bf16(&format!("{p}.{name}"), shape)?.data)
    };
    let experts = |name: &str, rows: usize, cols: usize| -> Result<Mxfp4Experts, CheckpointError> {
        let blocks: Tensor<u8> = ckpt.u8(
            &format!("{p}.mlp.experts.{name}_blocks"),
            &[e, rows, cols / 32, 16],
        )?;
        let scales: Tensor<u8> = ckpt.u8(
            &format!("{p}.mlp.experts.{name}_scales"),
            &[e, rows, cols / 32],
        )?;
        Ok(Mxfp4Experts {
            experts: e,
            rows,
            cols,
            blocks: blocks.data,
            scales: scales.data,
        })
    };
    Ok(LayerWeights {
        index: i,
        input_norm: bf16("input_layernorm.weight", &[h])?,
        attn: AttentionWeights {
            q_w: bf16("self_attn.q_proj.weight", &[q, h])?,
            q_b: bf16("self_attn.q_proj.bias", &[q])?,
            k_w: bf16("self_attn.k_proj.weight", &[kv, h])?,
            k_b: bf16("self_attn.k_proj.bias", &[kv])?,
            v_w: bf16("self_attn.v_proj.weight", &[kv, h])?,
            v_b: bf16("self_attn.v_proj.bias", &[kv])?,
            o_w: bf16("self_attn.o_proj.weight", &[h, q])?,
            o_b: bf16("self_attn.o_proj.bias", &[h])?,
            sinks: bf16("self_attn.sinks", &[cfg.num_attention_heads])?,
        },
        post_attn_norm: bf16("post_attention_layernorm.weight", &[h])?,
        moe: MoeWeights {
            router_w: bf16("mlp.router.weight", &[e, h])?,
            router_b: bf16("mlp.router.bias", &[e])?,
            gate_up: experts("gate_up_proj", 2 * inter, h)?,
            gate_up_b: bf16("mlp.experts.gate_up_proj_bias", &[e, 2 * inter])?,
            down: experts("down_proj", h, inter)?,
            down_b: bf16("mlp.experts.down_proj_bias", &[e, h])?,
        },
    })
}
