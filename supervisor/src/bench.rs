//! `gptossd bench`: prefill and decode speed on a model. Without `--stages` the whole model runs
//! in one process, the stage worker binary's (`gptossd-stage bench`, `stage-worker/src/bench.rs`,
//! where the figures are described), whose output is this command's. With `--stages` the bench
//! runs here, through the pipeline: real stage workers, requests through the scheduler.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use gptossd_shared::device::Device;
use gptossd_shared::measure::{peak_rss_bytes, round};

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
    /// Run through S stage worker processes (the pipeline) instead of in one process. Each
    /// stage gets `--threads` threads (the daemon's default: stages take turns on a sequence).
    #[arg(long)]
    pub stages: Option<usize>,
    /// With --stages: kill -9 this stage once decoding runs, and report the time from the kill
    /// to the next token (recovery included).
    #[arg(long)]
    pub kill_stage: Option<usize>,
    /// Where the model runs in one process: `cpu` (the default), `cpu:CORES` or `cuda:N`.
    #[arg(long, conflicts_with = "stages")]
    pub device: Option<Device>,
    /// With --stages: one device per stage, comma-separated (`cuda:0,cuda:0,cuda:0,cuda:0`).
    #[arg(long, value_delimiter = ',', requires = "stages")]
    pub devices: Option<Vec<String>>,
    /// Print JSON lines only.
    #[arg(long)]
    pub json: bool,
}

/// Runs the bench: through the pipeline with `--stages`, else in the stage worker binary (which
/// this process becomes: its output, errors and exit status are the command's).
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(stages) = args.stages {
        return run_pipeline(args, stages);
    }
    if args.kill_stage.is_some() {
        bail!("--kill-stage needs --stages");
    }
    let batch: Vec<String> = args.batch.iter().map(usize::to_string).collect();
    let mut cmd = crate::single_process::stage_command("bench")?;
    cmd.arg("--model")
        .arg(&args.model)
        .args(["--threads", &args.threads.to_string()])
        .args(["--prompt-len", &args.prompt_len.to_string()])
        .args(["--gen", &args.gen.to_string()])
        .args(["--batch", &batch.join(",")]);
    if let Some(device) = &args.device {
        cmd.args(["--device", &device.to_string()]);
    }
    Err(crate::single_process::exec(cmd))
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
        devices: args.devices.clone(),
        ..crate::config::Overrides::default()
    };
    let cfg = tool_pipeline(&args.model, overrides, Some(max_batch))?;
    let handle = pipeline::start(cfg).context("starting the pipeline")?;
    handle
        .wait_started(std::time::Duration::from_secs(600))
        .map_err(|e| anyhow::anyhow!("pipeline: {e}"))?;
    // The kernels the stages run (they detect them, as the in-process bench does).
    let isa = handle
        .status()
        .stages
        .first()
        .and_then(|s| s.loaded.as_ref())
        .map(|r| r.kernels.clone());
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
            "isa": isa,
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
