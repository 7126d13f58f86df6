//! `gptossd`'s commands: the daemon and its command-line tools (the binary's `main` calls
//! [`main`]).
//!
//! Reads like a runbook: parse the arguments into a checked command, run it, and turn any
//! error into one line on stderr naming the file or flag at fault, with exit status 1
//! (2 for bad usage, from clap).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::chat::parser::parse_reply;
use crate::chat::render::{Conversation, Message, SystemOptions};
use crate::chat::tokenizer::Tokenizer;
use crate::launch::tool_pipeline;
use crate::pipeline::{self, GenEvent, GenRequest};
use crate::{bench, civil_date, single_process};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use gptossd_shared::device::Device;
use gptossd_shared::sampling::SamplingParams;
use gptossd_shared::testmodel::{write_test_model, Preset};

#[derive(Parser)]
#[command(
    name = "gptossd",
    version,
    about = "Local inference daemon for OpenAI's GPT-OSS models"
)]
struct Cli {
    /// Where log records go: auto (the journal under systemd, else text on stderr), text,
    /// json, or journald.
    #[arg(long, global = true, value_enum, default_value_t)]
    log: crate::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the OpenAI-compatible HTTP API on localhost and the control socket.
    Serve(ServeArgs),
    /// Generate text with a model, in one process (or through the pipeline with --stages).
    Generate(GenerateArgs),
    /// Write a random checkpoint in the Hugging Face format of openai/gpt-oss-20b.
    MakeTestModel {
        /// tiny, bench or 20b-shape
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure prefill and decode speed and memory on a model.
    Bench(bench::BenchArgs),
    /// Load a running daemon with streaming chat requests and print throughput and latencies.
    Loadgen(crate::loadgen::LoadgenArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The config file (default: $GPTOSSD_CONFIG; without either, built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve this model directory (overrides the file's model path). Without a model anywhere,
    /// the tiny test model is made in ./models/tiny-seed0 and served.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The name clients use for --model (default: the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    stages: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Model directory (Hugging Face layout). Without it, the tiny test model is made (once)
    /// in ./models/tiny-seed0 and used.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw text to continue (no chat format).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A user message, rendered in the harmony chat format.
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, group = "input", value_delimiter = ',')]
    prompt_tokens: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
    /// CPU threads for the kernels (default: all cores; with --stages, per stage).
    #[arg(long)]
    threads: Option<usize>,
    /// Run through S stage worker processes (the pipeline) instead of in one process.
    #[arg(long)]
    stages: Option<usize>,
    /// Many requests at once: a file of JSON lines `{"prompt_tokens": [...], "max_tokens": N,
    /// "temperature": T, "seed": S}`; prints one JSON line per request, in file order.
    /// Requires --stages (they run concurrently through the scheduler).
    #[arg(long, group = "input")]
    requests: Option<PathBuf>,
    /// With --stages: KV cache size in tokens (all sequences together).
    #[arg(long, default_value_t = 65_536)]
    kv_cache_tokens: usize,
    /// With --stages: most requests waiting for admission; more are rejected.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Where the model runs in one process: `cpu` (the default), `cpu:CORES` or `cuda:N`.
    #[arg(long, conflicts_with = "stages")]
    device: Option<Device>,
    /// With --stages: one device per stage, comma-separated (`cuda:0,cuda:1` or `cpu,cuda:0`).
    #[arg(long, value_delimiter = ',', requires = "stages")]
    devices: Option<Vec<String>>,
    /// With --stages: on SIGTERM/SIGINT, how long running requests may take to finish.
    #[arg(long, default_value_t = 30)]
    drain_grace_secs: u64,
}

/// Parses the command line and runs the command; the process's exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init(cli.log);
    if let Command::Serve(args) = cli.command {
        return serve(args);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gptossd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::MakeTestModel { preset, seed, out } => {
            let bytes = write_test_model(preset, seed, &out)
                .with_context(|| format!("writing the test model to {}", out.display()))?;
            eprintln!("wrote {bytes} bytes of weights to {}", out.display());
            Ok(())
        }
        Command::Bench(args) => bench::run(&args),
        Command::Loadgen(args) => crate::loadgen::run(&args),
        Command::Serve(_) => Ok(()),
    }
}

/// Exit status for a configuration that cannot be used (EX_CONFIG-like; sysexits' 64 family).
const EXIT_CONFIG: u8 = 64;

fn serve(args: ServeArgs) -> ExitCode {
    let file = crate::config::config_path(args.config.as_deref());
    let mut overrides = crate::config::Overrides {
        port: args.port,
        stages: args.stages,
        model: args.model.clone(),
        served_model_name: args.served_model_name.clone(),
        ..crate::config::Overrides::default()
    };
    let mut test_model = false;
    if file.is_none() && args.model.is_none() {
        match resolve_model(None) {
            Ok(dir) => {
                tracing::warn!(path = %dir.display(), "no model configured: serving the tiny test model (random weights)");
                overrides.model = Some(dir);
                test_model = true;
            }
            Err(e) => {
                tracing::error!("{e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let config = match crate::config::Config::resolve(file.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = crate::server::reload::ConfigSource { file, overrides };
    match runtime.block_on(crate::server::run(config, source, test_model)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The model to use: the given one, or the tiny test model (made on first use).
fn resolve_model(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir);
    }
    let dir = Path::new("models").join("tiny-seed0");
    if dir.join("config.json").is_file() {
        tracing::info!(path = %dir.display(), "no model given: using the tiny test model");
    } else {
        tracing::info!(
            path = %dir.display(),
            "no model given: making the tiny test model (random weights, seed 0)"
        );
        write_test_model(Preset::Tiny, 0, &dir)
            .with_context(|| format!("writing the tiny test model to {}", dir.display()))?;
    }
    Ok(dir)
}

/// The prompt's token ids from `--prompt` (raw text), `--chat` (one user message in the
/// harmony format, dated today) or `--prompt-tokens`.
fn prompt_of(args: &GenerateArgs, tokenizer: &Tokenizer) -> anyhow::Result<Vec<u32>> {
    Ok(match (&args.prompt, &args.chat, &args.prompt_tokens) {
        (Some(text), _, _) => tokenizer.encode(text),
        (_, Some(text), _) => Conversation {
            system: SystemOptions {
                current_date: Some(civil_date(std::time::SystemTime::now())),
                ..SystemOptions::default()
            },
            messages: vec![Message::User(text.clone())],
            ..Conversation::default()
        }
        .render_for_completion(tokenizer),
        (_, _, Some(ids)) => ids.clone(),
        _ => bail!(
            "give one of --prompt TEXT, --chat TEXT, --prompt-tokens 1,2,3 or --requests FILE"
        ),
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.stages.is_some() || args.requests.is_some() {
        return generate_pipeline(args);
    }
    let tokenizer = Tokenizer::get();
    let is_chat = args.chat.is_some();
    let prompt = prompt_of(&args, &tokenizer)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        logprobs: None,
    };
    let sampling = params.spec().context("bad sampling flag")?;
    let dir = resolve_model(args.model)?;
    let request = single_process::Generate {
        model: &dir,
        prompt: &prompt,
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens: &crate::chat::STOP_TOKENS,
        threads: args.threads.unwrap_or_else(default_threads),
        device: &args.device.clone().unwrap_or(Device::Cpu { cores: None }),
    };
    let stream_text = !args.json && !is_chat;
    let mut utf8 = crate::chat::tokenizer::Utf8Stream::new();
    let mut stdout = std::io::stdout().lock();
    let (ids, finish) = single_process::generate(&request, |token| {
        if stream_text && !Tokenizer::is_special(token) {
            if let Ok(bytes) = tokenizer.token_bytes(token) {
                let _ = write!(stdout, "{}", utf8.push(&bytes));
                let _ = stdout.flush();
            }
        }
    })?;
    let finish = finish.as_str();
    if is_chat {
        let (reply, _) = parse_reply(tokenizer, &ids);
        if args.json {
            let out = serde_json::json!({
                "prompt_tokens": prompt, "tokens": ids, "text": reply.content,
                "reasoning": reply.reasoning, "finish_reason": finish,
            });
            writeln!(stdout, "{out}")?;
        } else {
            if !reply.reasoning.is_empty() {
                eprintln!("[reasoning] {}", reply.reasoning);
            }
            writeln!(stdout, "{}", reply.content)?;
        }
    } else if args.json {
        let text_ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&t| !Tokenizer::is_special(t))
            .collect();
        let text = tokenizer.decode(&text_ids).unwrap_or_default();
        let out = serde_json::json!({
            "prompt_tokens": prompt, "tokens": ids, "text": text, "finish_reason": finish,
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout, "{}", utf8.finish())?;
    }
    Ok(())
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One line of a `--requests` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    #[serde(default = "one")]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    priority: i32,
}

fn one() -> f32 {
    1.0
}

/// `generate` through the pipeline: real stage worker processes.
fn generate_pipeline(args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::get();
    let lines: Vec<RequestLine> = match &args.requests {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .with_context(|| format!("{}: line {}", file.display(), i + 1))
                })
                .collect::<Result<_, _>>()?
        }
        None => {
            let prompt = prompt_of(&args, &tokenizer)?;
            vec![RequestLine {
                prompt_tokens: prompt,
                max_tokens: args.max_tokens,
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                seed: args.seed,
                priority: 0,
            }]
        }
    };
    let dir = resolve_model(args.model.clone())?;
    let overrides = crate::config::Overrides {
        stages: Some(args.stages.unwrap_or(1)),
        threads_per_stage: args.threads,
        kv_cache_tokens: Some(args.kv_cache_tokens),
        max_waiting: Some(args.max_waiting),
        devices: args.devices.clone(),
        ..crate::config::Overrides::default()
    };
    let cfg = tool_pipeline(&dir, overrides, None)
        .with_context(|| format!("setting up the pipeline for {}", dir.display()))?;
    let handle = pipeline::start(cfg).context("starting the pipeline")?;
    handle
        .wait_started(std::time::Duration::from_secs(600))
        .map_err(|e| anyhow::anyhow!("the pipeline did not start: {e}"))?;
    // SIGTERM/SIGINT: drain (running requests finish within the grace period), then exit 0.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    {
        let handle = handle.clone();
        let grace = std::time::Duration::from_secs(args.drain_grace_secs);
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, ?grace, "draining");
                handle.shutdown(grace);
            }
        });
    }
    let mut receivers = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let params = SamplingParams {
            temperature: line.temperature,
            top_p: line.top_p,
            top_k: line.top_k,
            seed: line.seed,
            logprobs: None,
        };
        let sampling = params
            .spec()
            .with_context(|| format!("request {}", i + 1))?;
        let req = GenRequest {
            prompt: line.prompt_tokens.clone(),
            max_new_tokens: line.max_tokens,
            sampling,
            priority: line.priority,
            stop_tokens: crate::chat::STOP_TOKENS.to_vec(),
        };
        let (_, rx) = handle
            .submit_blocking(req)
            .with_context(|| format!("request {}", i + 1))?;
        receivers.push(rx);
    }
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    for (line, mut rx) in lines.iter().zip(receivers) {
        let mut ids = Vec::new();
        // A request whose events end without a verdict was dropped by a pipeline that stopped.
        let mut finish = "error";
        let mut error = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenEvent::Scheduled => {}
                GenEvent::Token { token, .. } => ids.push(token),
                GenEvent::Finished(f) => {
                    finish = f.as_str();
                    break;
                }
                GenEvent::Failed(message) => {
                    error = Some(message.to_string());
                    failed = Some(message);
                    break;
                }
            }
        }
        let text_ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&t| !Tokenizer::is_special(t))
            .collect();
        let text = tokenizer.decode(&text_ids).unwrap_or_default();
        if args.json || args.requests.is_some() {
            let mut out = serde_json::json!({
                "prompt_tokens": line.prompt_tokens, "tokens": ids, "text": text, "finish_reason": finish,
            });
            if let Some(error) = error {
                out["error"] = error.into();
            }
            writeln!(stdout, "{out}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
    }
    let status = handle.status();
    handle.shutdown(std::time::Duration::from_secs(5));
    for s in &status.stages {
        if s.restarts > 0 {
            eprintln!(
                "gptossd: stage {} restarted {} times (last error: {})",
                s.index,
                s.restarts,
                s.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    if let Some(message) = failed {
        bail!("generation failed: {message}");
    }
    Ok(())
}
