//! `gptossd-stage bench` (what `gptossd bench` without `--stages` runs): prefill and decode
//! speed, read bandwidth and peak memory on a model, all measured in one process so ratios
//! between them are meaningful on a noisy machine.
//!
//! Figures (one JSON object per batch size): `prefill_tok_s` (one prompt of `--prompt-len`
//! tokens, after an untimed one with the checkpoint read in through its mapping), `decode_tok_s` (aggregate over `--batch` sequences decoding together, greedy),
//! `read_bandwidth_gbs` (the median of plain read passes over 64 MiB by `--threads` threads,
//! one right after each decode step), `read_bandwidth_best_gbs` (the best pass over 512 MiB of
//! 5 before loading the model and 5 after the decode runs), `bytes_per_decode_token` (weights
//! a batch-1 decode step reads: every layer's attention, router and top-k experts, the LM head
//! and one embedding row), `roofline_fraction` (batch 1: for each decode step, bytes/s ÷ the
//! bandwidth of the read pass right after it; the median: the machine's bandwidth swings by 2x
//! within minutes, so each step is compared with what the memory gave at that moment),
//! `roofline_fraction_vs_best` (median step against the best pass of the run: a floor),
//! `peak_rss_bytes` (VmHWM, including the bench's 64 MiB read buffer; the whole checkpoint is
//! read through its mapping before the timed runs, so every weight is resident). Read passes
//! use buffers advised to 2 MB pages, like the checkpoint mapping.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::measure::{peak_rss_bytes, round};
use gptossd_shared::weights::{StageSpan, StageWeights};

use crate::kv::KvConfig;
use crate::model::{Logits, SeqStep, StageInput, StepBatch};
use crate::stage::Stage;
use gptossd_shared::device::Device;

/// `gptossd-stage bench`: the flags `gptossd bench` passes (its defaults are the supervisor's).
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub threads: usize,
    #[arg(long)]
    pub prompt_len: usize,
    /// Decode steps timed per batch size.
    #[arg(long)]
    pub gen: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub batch: Vec<usize>,
    /// Where the model runs: `cpu`, `cpu:CORES` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

const BLOCK: usize = 16;

/// Runs the bench and prints one JSON line per batch size.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let bandwidth = read_bandwidth_gbs(args.threads)?;
    let cfg = ModelConfig::load(&args.model)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let weights = StageWeights::load(&ckpt, &cfg, &StageSpan::whole(&cfg))?;
    let bytes_per_token = decode_bytes_per_token(&weights, &cfg);
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let per_seq_blocks = (args.prompt_len + args.gen + 1).div_ceil(BLOCK);
    let kv = KvConfig {
        num_blocks: per_seq_blocks * (max_batch + 1),
        block_size: BLOCK,
    };
    let mut model = Stage::load(&args.device, args.threads, cfg.clone(), &weights, kv)?;
    drop(weights);
    // For the read passes between decode steps: larger than any cache here, small beside the
    // model (it is part of the peak RSS reported).
    let probe = ReadBuffer::new(PROBE_BYTES)?;
    let prompt: Vec<u32> = (0..args.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % 199_000)
        .collect();
    let mut logits = Vec::new();

    // Prefill of one prompt (sequence slot 0), timed.
    let table = |s: usize| -> Vec<u32> {
        ((s * per_seq_blocks) as u32..((s + 1) * per_seq_blocks) as u32).collect()
    };
    let batch = StepBatch {
        seqs: vec![SeqStep {
            start_pos: 0,
            tokens: prompt.len(),
            blocks: table(0),
            logits: Logits::Last,
        }],
    };
    // Steady state, not first use: the checkpoint in the page cache and mapped, and the
    // scratch buffers grown, by reading the files through their mappings and one untimed
    // prefill of the same prompt
    // (it rewrites the same KV slots).
    ckpt.populate();
    model
        .forward(&batch, StageInput::Tokens(&prompt), &mut logits)
        .context("warm-up prefill step")?;
    let t0 = Instant::now();
    model
        .forward(&batch, StageInput::Tokens(&prompt), &mut logits)
        .context("prefill step")?;
    let prefill_tok_s = prompt.len() as f64 / t0.elapsed().as_secs_f64();

    // (batch, median decode step seconds, peak RSS) per batch size.
    let mut rows = Vec::new();
    for &b in &args.batch {
        // Short prompts for the other sequences (untimed), then `gen` batched decode steps.
        let short: Vec<u32> = prompt[..prompt.len().min(8)].to_vec();
        let mut positions = vec![prompt.len(); b];
        for (s, p) in positions.iter_mut().enumerate().skip(1) {
            let batch = StepBatch {
                seqs: vec![SeqStep {
                    start_pos: 0,
                    tokens: short.len(),
                    blocks: table(s),
                    logits: Logits::Last,
                }],
            };
            model.forward(&batch, StageInput::Tokens(&short), &mut logits)?;
            *p = short.len();
        }
        let mut times = Vec::with_capacity(args.gen);
        let mut reads = Vec::with_capacity(args.gen);
        let mut next: Vec<u32> = vec![1000; b];
        for _ in 0..args.gen {
            let batch = StepBatch {
                seqs: (0..b)
                    .map(|s| SeqStep {
                        start_pos: positions[s],
                        tokens: 1,
                        blocks: table(s),
                        logits: Logits::Last,
                    })
                    .collect(),
            };
            let t = Instant::now();
            model.forward(&batch, StageInput::Tokens(&next), &mut logits)?;
            times.push(t.elapsed().as_secs_f64());
            // A read pass right after each step: the bandwidth the machine gives at that moment.
            reads.push(probe.pass(args.threads));
            for (s, row) in logits.chunks_exact(cfg.vocab_size).enumerate() {
                next[s] = argmax(row);
                positions[s] += 1;
            }
        }
        // Each step against the read pass beside it (paired: the bandwidth of this shared
        // machine swings by 2x within minutes), then the median.
        let mut fractions: Vec<f64> = times
            .iter()
            .zip(&reads)
            .map(|(&t, &gbs)| bytes_per_token as f64 / t / 1e9 / gbs)
            .collect();
        let paired = median(&mut fractions);
        rows.push((
            b,
            median(&mut times),
            median(&mut reads),
            paired,
            peak_rss_bytes(),
        ));
    }
    // Measured again once everything else is done and the model unmapped (peak RSS is read
    // before, and an outside measure of the peak does not see this buffer on top of the
    // model): the best figure the machine gave during the run.
    let isa = model.info().kernels;
    let checkpoint_bytes = ckpt.payload_bytes();
    drop((model, ckpt, probe));
    let best_bandwidth = bandwidth.max(read_bandwidth_gbs(args.threads)?);
    for (b, median, bandwidth, paired, peak_rss) in rows {
        let b1 = |v: f64| {
            if b == 1 {
                round(v)
            } else {
                serde_json::Value::Null
            }
        };
        let out = serde_json::json!({
            "batch": b,
            "stages": 0,
            "mode": "in-process",
            "isa": isa,
            "threads": args.threads,
            "prompt_len": args.prompt_len,
            "prefill_tok_s": round(prefill_tok_s),
            "decode_tok_s": round(b as f64 / median),
            "decode_step_median_ms": round(median * 1e3),
            "read_bandwidth_gbs": round(bandwidth),
            "read_bandwidth_best_gbs": round(best_bandwidth),
            "bytes_per_decode_token": bytes_per_token,
            "roofline_fraction": b1(paired),
            "roofline_fraction_vs_best": b1(bytes_per_token as f64 / median / 1e9 / best_bandwidth),
            "peak_rss_bytes": peak_rss,
            "checkpoint_bytes": checkpoint_bytes,
        });
        println!("{out}");
    }
    Ok(())
}

/// Size of the read pass run after every decode step.
const PROBE_BYTES: usize = 64 << 20;

/// The median (upper middle) of a non-empty list; 0 when empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Weights one batch-1 decode token reads: every layer's dense part and top-k experts, the
/// LM head and one embedding row.
fn decode_bytes_per_token(w: &StageWeights, cfg: &ModelConfig) -> u64 {
    let row = cfg.hidden_size * 2;
    let head = w.head.as_ref().map_or(0, |h| h.bytes());
    let layers: usize = w
        .layers
        .iter()
        .map(|l| l.dense_bytes() + l.expert_bytes() * cfg.num_experts_per_tok)
        .sum();
    (row + head + layers) as u64
}

/// GB/s of `threads` threads summing 512 MiB together, each its own contiguous part (the best
/// of 5 passes): the most the machine gave to a plain read with the same threads.
fn read_bandwidth_gbs(threads: usize) -> anyhow::Result<f64> {
    let buf = ReadBuffer::new(512 << 20)?;
    Ok((0..5).map(|_| buf.pass(threads)).fold(0.0, f64::max))
}

/// A buffer for plain read passes (contents irrelevant, every page touched), in the page size
/// the weights get: anonymous memory advised to use 2 MB pages, as the checkpoint mapping is
/// (a 4 KB-paged buffer reads slower here and would flatter the roofline).
struct ReadBuffer(memmap2::MmapMut);

impl ReadBuffer {
    fn new(bytes: usize) -> anyhow::Result<ReadBuffer> {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(8))
            .with_context(|| format!("mapping a {bytes}-byte read buffer"))?;
        let _ = map.advise(memmap2::Advice::HugePage);
        for (i, b) in map.iter_mut().enumerate() {
            *b = i as u8;
        }
        Ok(ReadBuffer(map))
    }

    fn words(&self) -> &[u64] {
        // SAFETY: any bytes are a valid u64; the mapping is page-aligned, so the prefix is empty.
        let (_, words, _) = unsafe { self.0.align_to::<u64>() };
        words
    }

    /// GB/s of `threads` threads summing the buffer together, each its own contiguous part.
    fn pass(&self, threads: usize) -> f64 {
        let all = self.words();
        let words = all.len();
        let part = words.div_ceil(threads.max(1)).max(1);
        let t = Instant::now();
        std::thread::scope(|scope| {
            for chunk in all.chunks(part) {
                scope.spawn(move || {
                    let mut acc = [0u64; 8];
                    for c in chunk.chunks_exact(8) {
                        for (a, &v) in acc.iter_mut().zip(c) {
                            *a = a.wrapping_add(v);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    }
}
