//! `gptossd bench`: prefill and decode speed, read bandwidth and peak memory on a model, all
//! measured in one process so ratios between them are meaningful on a noisy machine.
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

use anyhow::{bail, Context};
use clap::Args;
use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::weights::{StageSpan, StageWeights};
use gptossd_stage::kv::KvConfig;
use gptossd_stage::model::{Logits, SeqStep, StageInput, StepBatch};
use gptossd_stage::stage::{Device, Stage};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 16)]
    pub gen: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Run through S stage worker processes (the pipeline) instead of in this process. Each
    /// stage gets `--threads` threads (the daemon's default: stages take turns on a sequence).
    #[arg(long)]
    pub stages: Option<usize>,
    /// With --stages: kill -9 this stage once decoding runs, and report the time from the kill
    /// to the next token (recovery included).
    #[arg(long)]
    pub kill_stage: Option<usize>,
    /// Print JSON lines only.
    #[arg(long)]
    pub json: bool,
}

const BLOCK: usize = 16;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(stages) = args.stages {
        return run_pipeline(args, stages);
    }
    if args.kill_stage.is_some() {
        bail!("--kill-stage needs --stages");
    }
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
    let mut model = Stage::load(Device::Cpu, args.threads, cfg.clone(), &weights, kv)?;
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

fn round(x: f64) -> serde_json::Value {
    serde_json::json!((x * 1000.0).round() / 1000.0)
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

/// Peak resident memory of this process (VmHWM), in bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The pipeline bench: real stage workers, requests through the scheduler. For each batch
/// size B, B greedy requests of `--prompt-len` tokens generate `--gen` tokens each; the
/// figures are the prefill speed (B = first size: prompt tokens ÷ time to first token) and the
/// aggregate decode speed once every sequence has its first token.
fn run_pipeline(args: &BenchArgs, stages: usize) -> anyhow::Result<()> {
    use crate::launch::tool_pipeline;
    use crate::pipeline::{self, GenEvent, GenRequest};
    use gptossd_shared::sampling::{SamplingParams, SamplingSpec};

    let max_batch = args.batch.iter().copied().max().unwrap_or(1).max(1);
    let overrides = crate::config::Overrides {
        stages: Some(stages),
        // Every stage gets all the threads: one sequence visits the stages in turn.
        threads_per_stage: Some(args.threads.max(1)),
        kv_cache_tokens: Some((args.prompt_len + args.gen + 16) * (max_batch + 1)),
        ..crate::config::Overrides::default()
    };
    let cfg = tool_pipeline(&args.model, overrides, Some(max_batch))?;
    let handle = pipeline::start(cfg).context("starting the pipeline")?;
    handle
        .wait_started(std::time::Duration::from_secs(600))
        .map_err(|e| anyhow::anyhow!("pipeline: {e}"))?;
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut killed = false;
    for &b in &args.batch {
        let t0 = Instant::now();
        let mut rxs = Vec::with_capacity(b);
        for i in 0..b {
            let prompt: Vec<u32> = (0..args.prompt_len as u32)
                .map(|j| (j * 7919 + 13 + i as u32 * 104_729) % 199_000)
                .collect();
            let req = GenRequest {
                prompt,
                max_new_tokens: args.gen,
                sampling: SamplingSpec::new(greedy, 0)?,
                priority: 0,
                stop_tokens: Vec::new(),
            };
            rxs.push(handle.submit_blocking(req)?.1);
        }
        // Gather every event with its time, all sequences interleaved, on this thread.
        let mut first_token: Vec<Option<Instant>> = vec![None; b];
        let mut counts = vec![0usize; b];
        let mut done = vec![false; b];
        let mut last = t0;
        let mut kill_at: Option<Instant> = None;
        let mut recovery: Option<f64> = None;
        while done.iter().any(|d| !d) {
            let mut progressed = false;
            for i in 0..b {
                if done[i] {
                    continue;
                }
                while let Ok(ev) = rxs[i].try_recv() {
                    progressed = true;
                    match ev {
                        GenEvent::Token { .. } => {
                            let now = Instant::now();
                            counts[i] += 1;
                            first_token[i].get_or_insert(now);
                            last = now;
                            if let (Some(k), None) = (kill_at, recovery) {
                                recovery = Some(now.duration_since(k).as_secs_f64());
                            }
                        }
                        GenEvent::Finished(_) => done[i] = true,
                        GenEvent::Failed(m) => bail!("request failed: {m}"),
                        GenEvent::Scheduled => {}
                    }
                }
            }
            if let (Some(k), false) = (args.kill_stage, killed) {
                if counts.iter().all(|&c| c >= 2) {
                    let pid = handle.status().stages.get(k).and_then(|s| s.pid);
                    if let Some(pid) = pid {
                        // SAFETY: a plain kill(2) of our own worker process.
                        unsafe {
                            libc::kill(pid as i32, libc::SIGKILL);
                        }
                        kill_at = Some(Instant::now());
                        killed = true;
                    }
                }
            }
            if !progressed {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        let all_first = first_token.iter().flatten().max().copied().unwrap_or(t0);
        let first_min = first_token.iter().flatten().min().copied().unwrap_or(t0);
        let decode_tokens: usize = counts.iter().map(|c| c.saturating_sub(1)).sum();
        let decode_secs = last.duration_since(all_first).as_secs_f64();
        let out = serde_json::json!({
            "batch": b,
            "stages": stages,
            "mode": "pipeline",
            "isa": format!("{:?}", gptossd_stage::backend::cpu::Isa::detect()),
            "threads": args.threads,
            "prompt_len": args.prompt_len,
            "prefill_tok_s": round((args.prompt_len * b) as f64 / all_first.duration_since(t0).as_secs_f64()),
            "ttft_first_ms": round(first_min.duration_since(t0).as_secs_f64() * 1e3),
            "decode_tok_s": round(decode_tokens as f64 / decode_secs.max(1e-9)),
            "generated": counts.iter().sum::<usize>(),
            "kill_to_next_token_ms": recovery.map(|r| round(r * 1e3)),
            "peak_rss_bytes_supervisor": peak_rss_bytes(),
        });
        println!("{out}");
    }
    handle.shutdown(std::time::Duration::from_secs(5));
    Ok(())
}
