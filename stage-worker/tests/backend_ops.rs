//! Every operation of the `Backend` trait, one by one, on random activations with the tiny
//! checkpoint's weights (layer 0 has a sliding window, layer 1 attends to everything), against
//! two references:
//!
//! 1. a straightforward f64 computation written out in this file from the formulas of
//!    `shared/reference/gpt-oss.md` §3 (within the backend's `OP_TOLERANCE`: relative L2 over
//!    the output, and no element off by more than ten times that of the largest value);
//! 2. the CPU backend on the portable instruction set with one thread, the reference every
//!    backend is held to: bit for bit for the CPU backend itself (so its instruction set and
//!    thread count change no bit of any single operation), within `OP_TOLERANCE` for a backend
//!    that computes differently (a GPU); and, for the products, within 1e-5 of the CPU when
//!    every input is bf16-representable (only the accumulation order may differ then).
//!
//! The step mixes a 5-token prefill from position 0, a decode at position 11 and a 4-token
//! chunk at positions 6..10, over non-contiguous blocks of 4 positions, after an earlier step
//! filled the decode's and the chunk's first positions: paging, windows and chunking all show.
//! Each test is instantiated once per backend compiled in (`backend_tests!`).

#[macro_use]
mod common;

use common::{tiny_weights, TestBackend};
use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::config::{AttentionKind, ModelConfig};
use gptossd_shared::sampling::{SampleAt, SamplingParams, SamplingSpec};
use gptossd_shared::weights::{LayerWeights, StageWeights};
use gptossd_stage::backend::cpu::{CpuBackend, Isa};
use gptossd_stage::backend::{
    AttentionArgs, Backend, DenseSource, ExpertsSource, Heads, KvSlot, QkvArgs,
};
use gptossd_stage::kv::KvConfig;
use gptossd_stage::model::{Logits, SeqStep, StepBatch};
use gptossd_stage::rope::Rope;
use gptossd_stage::sampler::{sample, SampleScratch};

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `len` values of `scale · [-1, 1)`.
    fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.unit() * scale).collect()
    }
}

fn bf16(bits: u16) -> f64 {
    f64::from(f32::from_bits((bits as u32) << 16))
}

/// The tiny model and the steps every test runs.
struct Fixture {
    cfg: ModelConfig,
    weights: StageWeights,
    kv: KvConfig,
    /// An earlier step: the first positions of sequences 1 and 2.
    history: StepBatch,
    /// The step under test.
    step: StepBatch,
}

impl Fixture {
    fn new() -> Self {
        let (cfg, weights) = tiny_weights(None);
        assert_eq!(cfg.layer_types[0], AttentionKind::Sliding);
        assert_eq!(cfg.layer_types[1], AttentionKind::Full);
        assert!(cfg.sliding_window < 11, "the decode must see the window");
        let seq = |start_pos, tokens, blocks: &[u32], logits| SeqStep {
            start_pos,
            tokens,
            blocks: blocks.to_vec(),
            logits,
        };
        let (b0, b1, b2): (&[u32], &[u32], &[u32]) = (&[9, 2], &[5, 17, 3], &[0, 30, 12]);
        Self {
            cfg,
            weights,
            kv: KvConfig {
                num_blocks: 32,
                block_size: 4,
            },
            history: StepBatch {
                seqs: vec![seq(0, 11, b1, Logits::None), seq(0, 6, b2, Logits::None)],
            },
            step: StepBatch {
                seqs: vec![
                    seq(0, 5, b0, Logits::All),
                    seq(11, 1, b1, Logits::Last),
                    seq(6, 4, b2, Logits::None),
                ],
            },
        }
    }

    fn heads(&self) -> Heads {
        Heads::of(&self.cfg)
    }

    fn layer(&self, i: usize) -> &LayerWeights {
        &self.weights.layers[i]
    }

    fn window(&self, layer: usize) -> Option<usize> {
        match self.cfg.layer_types[layer] {
            AttentionKind::Sliding => Some(self.cfg.sliding_window),
            AttentionKind::Full => None,
        }
    }

    /// (position, sequence) of every token of `step`, in row order.
    fn tokens(step: &StepBatch) -> Vec<(usize, usize)> {
        step.seqs
            .iter()
            .enumerate()
            .flat_map(|(s, q)| (q.start_pos..q.start_pos + q.tokens).map(move |p| (p, s)))
            .collect()
    }
}

/// Layers 0 and 1 of the tiny model, the embedding and the head, on a backend.
struct Loaded<B: Backend> {
    b: B,
    embedding: B::Dense,
    layers: Vec<LayerOn<B>>,
    head_norm: B::Vector,
    lm_head: B::Dense,
    kv: B::Kv,
}

struct LayerOn<B: Backend> {
    norm: B::Vector,
    qkv: B::Dense,
    sinks: B::Vector,
    o_proj: B::Dense,
    router: B::Dense,
    experts: B::Experts,
}

fn dense<'a>(w: &'a Mapped<u16>, b: Option<&'a Mapped<u16>>, rows: usize) -> DenseSource<'a> {
    DenseSource {
        weight: w,
        bias: b,
        rows,
        cols: w.len() / rows,
    }
}

impl<B: Backend> Loaded<B> {
    fn new(mut b: B, fx: &Fixture) -> Self {
        let cfg = &fx.cfg;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let layers = (0..2)
            .map(|i| {
                let lw = fx.layer(i);
                let (at, moe) = (&lw.attn, &lw.moe);
                LayerOn {
                    norm: b.load_vector(&lw.input_norm).expect("norm"),
                    qkv: b
                        .load_dense(&[
                            dense(&at.q_w, Some(&at.q_b), qd),
                            dense(&at.k_w, Some(&at.k_b), kvd),
                            dense(&at.v_w, Some(&at.v_b), kvd),
                        ])
                        .expect("qkv"),
                    sinks: b.load_vector(&at.sinks).expect("sinks"),
                    o_proj: b
                        .load_dense(&[dense(&at.o_w, Some(&at.o_b), h)])
                        .expect("o"),
                    router: b
                        .load_dense(&[dense(
                            &moe.router_w,
                            Some(&moe.router_b),
                            cfg.num_local_experts,
                        )])
                        .expect("router"),
                    experts: b
                        .load_experts(ExpertsSource {
                            gate_up: &moe.gate_up,
                            gate_up_bias: &moe.gate_up_b,
                            down: &moe.down,
                            down_bias: &moe.down_b,
                        })
                        .expect("experts"),
                }
            })
            .collect();
        let emb = fx.weights.embedding.as_ref().expect("embedding");
        let head = fx.weights.head.as_ref().expect("head");
        Self {
            embedding: b
                .load_dense(&[dense(emb, None, cfg.vocab_size)])
                .expect("embedding"),
            head_norm: b.load_vector(&head.norm).expect("head norm"),
            lm_head: b
                .load_dense(&[dense(&head.lm_head, None, cfg.vocab_size)])
                .expect("lm head"),
            kv: b.new_kv(fx.kv, 2, kvd).expect("kv"),
            layers,
            b,
        }
    }

    fn upload(&mut self, host: &[f32], width: usize) -> B::Act {
        let mut x = B::Act::default();
        self.b.upload(host, width, &mut x).expect("upload");
        x
    }

    fn download(&mut self, x: &B::Act, len: usize) -> Vec<f32> {
        let mut host = vec![f32::NAN; len];
        self.b.download(x, &mut host).expect("download");
        host
    }

    /// Runs `qkv_rope_store` of `layer` over `step` with inputs `x`; returns the queries.
    fn qkv(&mut self, fx: &Fixture, layer: usize, step: &StepBatch, x: &[f32]) -> Vec<f32> {
        let x = self.upload(x, fx.cfg.hidden_size);
        let mut q = B::Act::default();
        let rope = rope_for(fx, step);
        self.b
            .qkv_rope_store(QkvArgs {
                x: &x,
                qkv: &self.layers[layer].qkv,
                heads: fx.heads(),
                rope: &rope,
                step,
                kv: &mut self.kv,
                layer,
                q: &mut q,
            })
            .expect("qkv");
        self.download(&q, step.total_tokens() * fx.cfg.q_dim())
    }

    /// The history and the step through `qkv_rope_store` of both layers, with inputs drawn
    /// from `seed`: fills the KV pool as a real stage would.
    fn fill_kv(&mut self, fx: &Fixture, seed: u64) {
        let mut rng = Rng(seed);
        for step in [&fx.history, &fx.step] {
            for layer in 0..2 {
                let x = rng.values(step.total_tokens() * fx.cfg.hidden_size, 1.0);
                self.qkv(fx, layer, step, &x);
            }
        }
    }

    fn read_kv(&mut self, fx: &Fixture, layer: usize, seq: usize, pos: usize) -> KvRows {
        let s = fx.step.seqs.get(seq).expect("sequence of the step");
        let (block, slot) = fx.kv.locate(&s.blocks, pos).expect("position in the table");
        let kvd = fx.cfg.kv_dim();
        let (mut k, mut v) = (vec![f32::NAN; kvd], vec![f32::NAN; kvd]);
        self.b
            .read_kv(&self.kv, KvSlot { layer, block, slot }, &mut k, &mut v)
            .expect("read kv");
        KvRows { k, v }
    }
}

struct KvRows {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The RoPE table up to the end of `step`.
fn rope_for(fx: &Fixture, step: &StepBatch) -> Rope {
    let mut rope = Rope::new(&fx.cfg);
    rope.extend_to(step.end_position());
    rope
}

/// The backend under test and the reference, with the same tensors.
fn pair<B: TestBackend>(fx: &Fixture) -> (Loaded<B>, Loaded<CpuBackend>) {
    let reference = CpuBackend::with_isa(1, Isa::Portable).expect("reference backend");
    (Loaded::new(B::for_tests(2), fx), Loaded::new(reference, fx))
}

/// `‖a − b‖₂ / ‖b‖₂`.
fn rel_l2(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Checks `got` (the backend under test) against `cpu` (the reference backend) and `exact`
/// (the f64 reference).
fn check<B: TestBackend>(what: &str, got: &[f32], cpu: &[f32], exact: &[f64]) {
    assert_eq!(got.len(), exact.len(), "{what}: length");
    assert_eq!(got.len(), cpu.len(), "{what}: length against the CPU");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: not finite");
    if B::CPU_BITS {
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != cpu[i].to_bits()) {
            panic!(
                "{what}: element {i} is {} on this backend, {} on the CPU reference",
                got[i], cpu[i]
            );
        }
    } else {
        let err = rel_l2(
            got.iter().map(|&v| f64::from(v)),
            cpu.iter().map(|&v| f64::from(v)),
        );
        assert!(
            err <= B::OP_TOLERANCE,
            "{what}: relative error {err:.3e} against the CPU backend"
        );
    }
    let err = rel_l2(got.iter().map(|&v| f64::from(v)), exact.iter().copied());
    assert!(
        err <= B::OP_TOLERANCE,
        "{what}: relative error {err:.3e} against the f64 reference"
    );
    let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (i, worst) = got
        .iter()
        .zip(exact)
        .map(|(&g, &e)| (f64::from(g) - e).abs())
        .enumerate()
        .fold(
            (0, 0f64),
            |best, (i, d)| if d > best.1 { (i, d) } else { best },
        );
    assert!(
        worst <= 10.0 * B::OP_TOLERANCE * scale,
        "{what}: element {i} is {} against {} (largest value {scale:.3e})",
        got[i],
        exact[i]
    );
}

/// `y = W x + b` for one row `x`, W `[rows × cols]` bf16.
fn matvec(w: &[u16], b: Option<&[u16]>, x: &[f64]) -> Vec<f64> {
    let cols = x.len();
    w.chunks_exact(cols)
        .enumerate()
        .map(|(r, row)| {
            let dot: f64 = row.iter().zip(x).map(|(&wv, &xv)| bf16(wv) * xv).sum();
            dot + b.map_or(0.0, |b| bf16(b[r]))
        })
        .collect()
}

fn rms_norm_ref(x: &[f64], w: &[u16], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
    x.iter().zip(w).map(|(&v, &g)| bf16(g) * v * inv).collect()
}

fn rope_ref(x: &mut [f64], rope: &Rope, pos: usize) {
    let half = rope.half();
    let (cos, sin) = (rope.cos(pos), rope.sin(pos));
    for head in x.chunks_exact_mut(2 * half) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            let (c, s) = (f64::from(cos[i]), f64::from(sin[i]));
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn upload_then_download_is_exact<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, _) = pair::<B>(&fx);
    let host = Rng(1).values(7 * 96, 3.0);
    let x = on.upload(&host, 96);
    let back = on.download(&x, host.len());
    assert!(
        back.iter()
            .zip(&host)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "activations changed crossing the host boundary"
    );
}

fn embed_gathers_bf16_rows<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let h = fx.cfg.hidden_size;
    let ids = [0u32, 7, 5, 201_087, 1000, 5];
    fn run<B: Backend>(l: &mut Loaded<B>, ids: &[u32], h: usize) -> Vec<f32> {
        let mut x = B::Act::default();
        l.b.embed(&l.embedding, ids, &mut x).expect("embed");
        l.download(&x, ids.len() * h)
    }
    let got = run(&mut on, &ids, h);
    let table = fx.weights.embedding.as_ref().expect("embedding");
    let exact: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            table[id as usize * h..(id as usize + 1) * h]
                .iter()
                .map(|&b| bf16(b))
        })
        .collect();
    check::<B>("embed", &got, &run(&mut cpu, &ids, h), &exact);
    assert!(
        got.iter().zip(&exact).all(|(&g, &e)| f64::from(g) == e),
        "bf16 rows are exact in f32"
    );
}

fn rms_norm_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, eps) = (fx.cfg.hidden_size, fx.cfg.rms_norm_eps);
    let mut rng = Rng(2);
    // Rows of very different sizes, as along the residual stream.
    let host: Vec<f32> = (0..7)
        .flat_map(|r| rng.values(h, 0.01 * 10f32.powi(r % 5)))
        .collect();
    fn run<B: Backend>(l: &mut Loaded<B>, host: &[f32], h: usize, eps: f32) -> Vec<f32> {
        let x = l.upload(host, h);
        let mut out = B::Act::default();
        l.b.rms_norm(&x, &l.layers[0].norm, eps, &mut out)
            .expect("rms_norm");
        l.download(&out, host.len())
    }
    let w = &fx.layer(0).input_norm;
    let exact: Vec<f64> = host
        .chunks_exact(h)
        .flat_map(|row| rms_norm_ref(&wide(row), w, eps))
        .collect();
    check::<B>(
        "rms_norm",
        &run(&mut on, &host, h, eps),
        &run(&mut cpu, &host, h, eps),
        &exact,
    );
}

fn qkv_rope_store_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, qd, kvd) = (fx.cfg.hidden_size, fx.cfg.q_dim(), fx.cfg.kv_dim());
    on.fill_kv(&fx, 3);
    cpu.fill_kv(&fx, 3);
    // The step again, on layer 0, with inputs of its own: q out, k and v into the pool.
    let x = Rng(4).values(fx.step.total_tokens() * h, 1.0);
    let got = on.qkv(&fx, 0, &fx.step, &x);
    let want = cpu.qkv(&fx, 0, &fx.step, &x);
    let rope = rope_for(&fx, &fx.step);
    let at = &fx.layer(0).attn;
    let (mut exact_q, mut got_kv, mut cpu_kv, mut exact_kv) = (vec![], vec![], vec![], vec![]);
    for (t, (pos, seq)) in Fixture::tokens(&fx.step).into_iter().enumerate() {
        let xr = wide(&x[t * h..(t + 1) * h]);
        let mut q = matvec(&at.q_w, Some(&at.q_b), &xr);
        let mut k = matvec(&at.k_w, Some(&at.k_b), &xr);
        let v = matvec(&at.v_w, Some(&at.v_b), &xr);
        rope_ref(&mut q, &rope, pos);
        rope_ref(&mut k, &rope, pos);
        exact_q.extend(q);
        exact_kv.extend(k.into_iter().chain(v));
        let (mine, theirs) = (on.read_kv(&fx, 0, seq, pos), cpu.read_kv(&fx, 0, seq, pos));
        got_kv.extend(mine.k.into_iter().chain(mine.v));
        cpu_kv.extend(theirs.k.into_iter().chain(theirs.v));
    }
    assert_eq!(got.len(), fx.step.total_tokens() * qd);
    assert_eq!(got_kv.len(), fx.step.total_tokens() * 2 * kvd);
    check::<B>("qkv_rope_store: q", &got, &want, &exact_q);
    check::<B>("qkv_rope_store: stored k, v", &got_kv, &cpu_kv, &exact_kv);
}

fn attention_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let heads = fx.heads();
    let (d, qd) = (heads.head_dim, heads.q_dim());
    let group = heads.q_heads / heads.kv_heads;
    on.fill_kv(&fx, 5);
    cpu.fill_kv(&fx, 5);
    let n = fx.step.total_tokens();
    let q = Rng(6).values(n * qd, 2.0);
    fn run<B: Backend>(l: &mut Loaded<B>, fx: &Fixture, layer: usize, q: &[f32]) -> Vec<f32> {
        let q = l.upload(q, fx.cfg.q_dim());
        let mut out = B::Act::default();
        l.b.attention(AttentionArgs {
            q: &q,
            sinks: &l.layers[layer].sinks,
            heads: fx.heads(),
            window: fx.window(layer),
            step: &fx.step,
            kv: &l.kv,
            layer,
            out: &mut out,
        })
        .expect("attention");
        l.download(&out, fx.step.total_tokens() * fx.cfg.q_dim())
    }
    for layer in 0..2 {
        let got = run(&mut on, &fx, layer, &q);
        let want = run(&mut cpu, &fx, layer, &q);
        let sinks = &fx.layer(layer).attn.sinks;
        let mut exact = Vec::with_capacity(n * qd);
        for (t, (pos, seq)) in Fixture::tokens(&fx.step).into_iter().enumerate() {
            let lo = fx.window(layer).map_or(0, |w| (pos + 1).saturating_sub(w));
            // This backend's own keys and values: the test is of attention alone.
            let kv: Vec<KvRows> = (lo..=pos).map(|j| on.read_kv(&fx, layer, seq, j)).collect();
            for head in 0..heads.q_heads {
                let kvh = head / group;
                let qh = wide(&q[t * qd + head * d..t * qd + (head + 1) * d]);
                let scores: Vec<f64> = kv
                    .iter()
                    .map(|r| {
                        let k = &r.k[kvh * d..(kvh + 1) * d];
                        qh.iter()
                            .zip(k)
                            .map(|(a, &b)| a * f64::from(b))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let sink = bf16(sinks[head]);
                let max = scores.iter().fold(sink, |m, &s| m.max(s));
                let denom =
                    scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (sink - max).exp();
                let mut o = vec![0f64; d];
                for (s, r) in scores.iter().zip(&kv) {
                    let p = (s - max).exp() / denom;
                    for (oi, &vi) in o.iter_mut().zip(&r.v[kvh * d..(kvh + 1) * d]) {
                        *oi += p * f64::from(vi);
                    }
                }
                exact.extend(o);
            }
        }
        let what = format!("attention, layer {layer} (window {:?})", fx.window(layer));
        check::<B>(&what, &got, &want, &exact);
    }
}

fn out_proj_residual_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, qd, n) = (fx.cfg.hidden_size, fx.cfg.q_dim(), 9);
    let mut rng = Rng(7);
    let attn = rng.values(n * qd, 1.0);
    let x = rng.values(n * h, 4.0);
    fn run<B: Backend>(
        l: &mut Loaded<B>,
        attn: &[f32],
        x: &[f32],
        qd: usize,
        h: usize,
    ) -> Vec<f32> {
        let attn = l.upload(attn, qd);
        let mut x_on = l.upload(x, h);
        l.b.out_proj_residual(&attn, &l.layers[1].o_proj, &mut x_on)
            .expect("out_proj_residual");
        l.download(&x_on, x.len())
    }
    let at = &fx.layer(1).attn;
    let exact: Vec<f64> = (0..n)
        .flat_map(|t| {
            let y = matvec(&at.o_w, Some(&at.o_b), &wide(&attn[t * qd..(t + 1) * qd]));
            let xr = &x[t * h..(t + 1) * h];
            y.into_iter()
                .zip(xr)
                .map(|(yv, &xv)| f64::from(xv) + yv)
                .collect::<Vec<_>>()
        })
        .collect();
    check::<B>(
        "out_proj_residual",
        &run(&mut on, &attn, &x, qd, h),
        &run(&mut cpu, &attn, &x, qd, h),
        &exact,
    );
}

/// Relative L2 error allowed against the CPU backend when every input of a product is
/// bf16-representable: rounding the activations to bf16 then changes nothing, and only the
/// order of the f32 accumulation differs (the CPU's 8 lanes against a GPU's lanes and tree), so
/// an indexing or decoding bug shows sharply.
const BF16_INPUT_TOLERANCE: f64 = 1e-5;

/// `len` values of `scale · [-1, 1)`, each truncated to a bf16 value.
fn bf16_values(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    rng.values(len, scale)
        .into_iter()
        .map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000))
        .collect()
}

fn products_of_bf16_inputs_differ_only_by_accumulation_order<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, qd, n) = (fx.cfg.hidden_size, fx.cfg.q_dim(), 9);
    let mut rng = Rng(13);
    // The output projection onto a zero residual: the product alone.
    let attn = bf16_values(&mut rng, n * qd, 1.0);
    fn out_proj<B: Backend>(l: &mut Loaded<B>, attn: &[f32], n: usize, h: usize) -> Vec<f32> {
        let attn = l.upload(attn, attn.len() / n);
        let mut x = l.upload(&vec![0.0; n * h], h);
        l.b.out_proj_residual(&attn, &l.layers[0].o_proj, &mut x)
            .expect("out_proj_residual");
        l.download(&x, n * h)
    }
    let got = out_proj(&mut on, &attn, n, h);
    let want = out_proj(&mut cpu, &attn, n, h);
    let err = rel_l2(wide(&got).into_iter(), wide(&want).into_iter());
    assert!(
        err <= BF16_INPUT_TOLERANCE,
        "out_proj of bf16 inputs: relative error {err:.3e} against the CPU"
    );
    // The queries of the q/k/v projection (RoPE rotates both alike).
    let x = bf16_values(&mut rng, fx.step.total_tokens() * h, 1.0);
    let got = on.qkv(&fx, 1, &fx.step, &x);
    let want = cpu.qkv(&fx, 1, &fx.step, &x);
    assert_eq!(got.len(), fx.step.total_tokens() * qd);
    let err = rel_l2(wide(&got).into_iter(), wide(&want).into_iter());
    assert!(
        err <= BF16_INPUT_TOLERANCE,
        "q of bf16 inputs: relative error {err:.3e} against the CPU"
    );
}

/// The router's choice for `x` on a backend: `top_k` (expert, weight) per token.
fn routes_of<B: Backend>(
    l: &mut Loaded<B>,
    fx: &Fixture,
    layer: usize,
    x: &B::Act,
) -> (B::Routes, Vec<(u32, f32)>) {
    let mut routes = B::Routes::default();
    l.b.router_top_k(
        x,
        &l.layers[layer].router,
        fx.cfg.num_experts_per_tok,
        &mut routes,
    )
    .expect("router");
    let mut host = Vec::new();
    l.b.read_routes(&routes, &mut host).expect("read routes");
    (routes, host)
}

fn router_top_k_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, k, n) = (fx.cfg.hidden_size, fx.cfg.num_experts_per_tok, 11);
    let host = Rng(8).values(n * h, 2.0);
    let x = on.upload(&host, h);
    let (_, got) = routes_of(&mut on, &fx, 0, &x);
    let x = cpu.upload(&host, h);
    let (_, want) = routes_of(&mut cpu, &fx, 0, &x);
    assert_eq!(got.len(), n * k);
    let moe = &fx.layer(0).moe;
    let mut exact = Vec::with_capacity(n * k);
    for t in 0..n {
        let logits = matvec(
            &moe.router_w,
            Some(&moe.router_b),
            &wide(&host[t * h..(t + 1) * h]),
        );
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Largest first, ties to the lower id.
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut top: Vec<usize> = order[..k].to_vec();
        top.sort_unstable();
        let max = top.iter().map(|&e| logits[e]).fold(f64::MIN, f64::max);
        let sum: f64 = top.iter().map(|&e| (logits[e] - max).exp()).sum();
        exact.extend(
            top.iter()
                .map(|&e| (e as u32, (logits[e] - max).exp() / sum)),
        );
    }
    let ids = |r: &[(u32, f32)]| r.iter().map(|p| p.0).collect::<Vec<_>>();
    let exact_ids: Vec<u32> = exact.iter().map(|p| p.0).collect();
    assert_eq!(ids(&got), exact_ids, "router: experts chosen");
    assert_eq!(
        ids(&want),
        exact_ids,
        "router: experts chosen by the CPU reference"
    );
    let weights = |r: &[(u32, f32)]| r.iter().map(|p| p.1).collect::<Vec<_>>();
    let exact_w: Vec<f64> = exact.iter().map(|p| p.1).collect();
    check::<B>("router weights", &weights(&got), &weights(&want), &exact_w);
}

/// Ties among the router's logits go to the lower expert id, as the CPU's `route` breaks them
/// (`router.cu` keeps only its previous pick, so the order must be strict and total): with
/// logits [1, 2, 2, 0.5, 2, -1, 0, 3] the top 3 are experts 7, 1, 2 — not 4, tied with 1 and 2
/// but later. The logits are exact (x is a unit row, the weights bf16, no bias).
fn router_ties_go_to_the_lower_expert_id<B: TestBackend>() {
    let (experts, width, top_k) = (8, 4, 3);
    let logits = [1.0f32, 2.0, 2.0, 0.5, 2.0, -1.0, 0.0, 3.0];
    let mut bits = vec![0u16; experts * width];
    for (e, &l) in logits.iter().enumerate() {
        bits[e * width] = (l.to_bits() >> 16) as u16; // each value is exact in bf16
    }
    let weight = Mapped::from_vec(bits);
    let source = DenseSource {
        weight: &weight,
        bias: None,
        rows: experts,
        cols: width,
    };
    let x = [1.0f32, 0.0, 0.0, 0.0];
    let mut on = B::for_tests(1);
    let mut cpu = CpuBackend::with_isa(1, Isa::Portable).expect("reference backend");
    fn route<C: Backend>(b: &mut C, w: &DenseSource<'_>, x: &[f32], k: usize) -> Vec<(u32, f32)> {
        let dense = b.load_dense(&[*w]).expect("router weights");
        let mut act = C::Act::default();
        b.upload(x, x.len(), &mut act).expect("upload");
        let mut routes = C::Routes::default();
        b.router_top_k(&act, &dense, k, &mut routes)
            .expect("router");
        let mut out = Vec::new();
        b.read_routes(&routes, &mut out).expect("read routes");
        out
    }
    let got = route(&mut on, &source, &x, top_k);
    let want = route(&mut cpu, &source, &x, top_k);
    let ids = |r: &[(u32, f32)]| r.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(ids(&got), [1, 2, 7], "router: ties to the lower id");
    assert_eq!(ids(&want), [1, 2, 7], "router: the CPU reference");
    // Softmax over (2, 2, 3): e⁻¹ / (2e⁻¹ + 1) for experts 1 and 2, 1 / (2e⁻¹ + 1) for 7.
    let (a, b) = ((-1f64).exp(), 1.0);
    let exact = [a / (2.0 * a + b), a / (2.0 * a + b), b / (2.0 * a + b)];
    let weights = |r: &[(u32, f32)]| r.iter().map(|p| p.1).collect::<Vec<_>>();
    check::<B>(
        "router weights on ties",
        &weights(&got),
        &weights(&want),
        &exact,
    );
}

fn moe_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, n, limit) = (fx.cfg.hidden_size, 13, fx.cfg.swiglu_limit);
    let mut rng = Rng(9);
    let normed = rng.values(n * h, 2.0);
    let residual = rng.values(n * h, 4.0);
    fn run<B: Backend>(
        l: &mut Loaded<B>,
        fx: &Fixture,
        normed: &[f32],
        residual: &[f32],
    ) -> (Vec<f32>, Vec<(u32, f32)>) {
        let h = fx.cfg.hidden_size;
        let x = l.upload(normed, h);
        let (routes, host_routes) = routes_of(l, fx, 1, &x);
        let mut res = l.upload(residual, h);
        l.b.moe(
            &x,
            &routes,
            &l.layers[1].experts,
            fx.cfg.swiglu_limit,
            &mut res,
        )
        .expect("moe");
        (l.download(&res, residual.len()), host_routes)
    }
    let (got, routes) = run(&mut on, &fx, &normed, &residual);
    let (want, _) = run(&mut cpu, &fx, &normed, &residual);
    // The reference mixes the experts this backend's router chose: the test is of the MoE.
    let moe = &fx.layer(1).moe;
    let (gu, dn) = (&moe.gate_up, &moe.down);
    let inter = dn.cols;
    let k = fx.cfg.num_experts_per_tok;
    let mut row = vec![0f32; gu.cols.max(dn.cols)];
    let mut exact = Vec::with_capacity(n * h);
    for t in 0..n {
        let x = wide(&normed[t * h..(t + 1) * h]);
        let mut acc = vec![0f64; h];
        for &(e, w) in &routes[t * k..(t + 1) * k] {
            let e = e as usize;
            let act: Vec<f64> = (0..inter)
                .map(|j| {
                    let mut lin = |r: usize| {
                        gu.decode_row(e, r, &mut row[..gu.cols]);
                        let dot: f64 = row[..gu.cols]
                            .iter()
                            .zip(&x)
                            .map(|(&a, b)| f64::from(a) * b)
                            .sum();
                        dot + bf16(moe.gate_up_b[e * 2 * inter + r])
                    };
                    let (gate, up) = (lin(2 * j), lin(2 * j + 1));
                    let limit = f64::from(limit);
                    let gate = gate.min(limit);
                    let up = up.clamp(-limit, limit);
                    let glu = gate / (1.0 + (-gate * 1.702).exp());
                    (up + 1.0) * glu
                })
                .collect();
            for (d, a) in acc.iter_mut().enumerate() {
                dn.decode_row(e, d, &mut row[..dn.cols]);
                let dot: f64 = row[..dn.cols]
                    .iter()
                    .zip(&act)
                    .map(|(&wv, v)| f64::from(wv) * v)
                    .sum();
                *a += f64::from(w) * (dot + bf16(moe.down_b[e * h + d]));
            }
        }
        exact.extend(
            acc.iter()
                .zip(&residual[t * h..(t + 1) * h])
                .map(|(a, &r)| f64::from(r) + a),
        );
    }
    check::<B>("moe", &got, &want, &exact);
}

fn lm_head_matches<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let (h, vocab, eps) = (fx.cfg.hidden_size, fx.cfg.vocab_size, fx.cfg.rms_norm_eps);
    let n = fx.step.total_tokens();
    let x = Rng(10).values(n * h, 3.0);
    fn run<B: Backend>(l: &mut Loaded<B>, fx: &Fixture, x: &[f32]) -> Vec<f32> {
        let x = l.upload(x, fx.cfg.hidden_size);
        let mut logits = B::Act::default();
        l.b.lm_head(
            &x,
            &fx.step,
            &l.head_norm,
            fx.cfg.rms_norm_eps,
            &l.lm_head,
            &mut logits,
        )
        .expect("lm_head");
        l.download(&logits, fx.step.logit_rows() * fx.cfg.vocab_size)
    }
    let head = fx.weights.head.as_ref().expect("head");
    // Rows 0..5 (the prefill wants all) and 5 (the decode); the chunk wants none.
    let rows: Vec<usize> = fx.step.logit_row_ranges().flatten().collect();
    assert_eq!(rows, vec![0, 1, 2, 3, 4, 5]);
    let exact: Vec<f64> = rows
        .iter()
        .flat_map(|&t| {
            let normed = rms_norm_ref(&wide(&x[t * h..(t + 1) * h]), &head.norm, eps);
            matvec(&head.lm_head, None, &normed)
        })
        .collect();
    assert_eq!(exact.len(), rows.len() * vocab);
    check::<B>(
        "lm_head",
        &run(&mut on, &fx, &x),
        &run(&mut cpu, &fx, &x),
        &exact,
    );
}

fn sample_matches_the_host_sampler<B: TestBackend>() {
    let fx = Fixture::new();
    let (mut on, mut cpu) = pair::<B>(&fx);
    let vocab = fx.cfg.vocab_size;
    let params = |temperature, top_p, top_k, logprobs| SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: None,
        logprobs,
    };
    let row = |p: SamplingParams, seed, index| SampleAt {
        spec: SamplingSpec::new(p, seed).expect("valid parameters"),
        index,
    };
    let rows = [
        row(params(0.0, 1.0, None, None), 1, 0),
        row(params(1.0, 1.0, None, Some(5)), 7, 0),
        row(params(0.7, 0.9, None, None), 3, 5),
        row(params(1.3, 1.0, Some(40), Some(20)), 11, 2),
        row(params(1.0, 0.5, Some(8), None), 11, 3),
    ];
    let logits = Rng(12).values(rows.len() * vocab, 6.0);
    fn run<B: Backend>(
        l: &mut Loaded<B>,
        logits: &[f32],
        vocab: usize,
        rows: &[SampleAt],
    ) -> Vec<gptossd_stage::sampler::Sampled> {
        let x = l.upload(logits, vocab);
        l.b.sample(&x, rows)
            .expect("sample")
            .into_iter()
            .map(|r| r.expect("a token"))
            .collect()
    }
    let got = run(&mut on, &logits, vocab, &rows);
    let want = run(&mut cpu, &logits, vocab, &rows);
    let host: Vec<_> = rows
        .iter()
        .zip(logits.chunks_exact(vocab))
        .map(|(r, l)| {
            sample(&r.spec, l, r.index, &mut SampleScratch::default()).expect("host sample")
        })
        .collect();
    assert_eq!(
        got, host,
        "the backend's draws differ from the host sampler's"
    );
    assert_eq!(
        want, host,
        "the CPU reference's draws differ from the host sampler's"
    );
    let tokens: Vec<u32> = got.iter().map(|s| s.token).collect();
    assert!(
        tokens.windows(2).any(|w| w[0] != w[1]),
        "rows drew different tokens: {tokens:?}"
    );
}

backend_tests!(
    upload_then_download_is_exact,
    embed_gathers_bf16_rows,
    rms_norm_matches,
    qkv_rope_store_matches,
    attention_matches,
    out_proj_residual_matches,
    products_of_bf16_inputs_differ_only_by_accumulation_order,
    router_top_k_matches,
    router_ties_go_to_the_lower_expert_id,
    moe_matches,
    lm_head_matches,
    sample_matches_the_host_sampler,
);
