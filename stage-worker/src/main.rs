//! `gptossd-stage`: the binary that computes the model, started by the supervisor (`gptossd`),
//! which links no kernels. Three commands:
//!
//! - `worker`: one pipeline stage. It connects to the control socket it is given, says hello,
//!   loads its layers, reports, then computes steps from its input ring into its output ring
//!   until told to stop. Exit status: 0 after a shutdown, 3 when loading failed (already
//!   reported as `LoadFailed`), 1 on any other error (logged on stderr, which the supervisor
//!   keeps a tail of).
//! - `generate`: the whole model in this process, one sequence (`gptossd generate` without
//!   `--stages`; `gptossd_stage::generate`).
//! - `bench`: the single-process bench (`gptossd bench` without `--stages`;
//!   `gptossd_stage::bench`).
//!
//! Any error ends the process with status 1 and one line on stderr, `gptossd-stage: error: …`,
//! naming the file or flag at fault.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gptossd_shared::checkpoint::Checkpoint;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::device::Device;
use gptossd_shared::protocol::{WorkerMsg, PROTOCOL_VERSION};
use gptossd_shared::weights::{StageSpan, StageWeights};
use gptossd_stage::kv::KvConfig;
use gptossd_stage::stage::Stage;
use gptossd_stage::worker::{self, Hops, WorkerState};
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericNamespaced, ToNsName};
use interprocess::os::unix::uds_local_socket::Stream;

/// Test-only fault injection: `crash-after-load` aborts right after reporting `Loaded`;
/// `fail-steps` fails every step (the failure travels to the client with its reason).
const FAULT_ENV: &str = "GPTOSSD_FAULT";

#[derive(Parser, Debug)]
#[command(
    name = "gptossd-stage",
    about = "gptossd's model computation: a pipeline stage worker, or the whole model in one process (started by gptossd)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One pipeline stage worker.
    Worker(Args),
    /// Generate from prompt token ids with the whole model in this process, printing one JSON
    /// line per token and one with the finish reason.
    Generate(gptossd_stage::generate::GenerateArgs),
    /// Measure prefill and decode speed and memory with the whole model in this process.
    Bench(gptossd_stage::bench::BenchArgs),
}

/// `gptossd-stage worker`: the flags the supervisor starts a stage with.
#[derive(clap::Args, Debug)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    stage: u32,
    /// First layer (inclusive).
    #[arg(long)]
    first_layer: usize,
    /// Last layer (exclusive).
    #[arg(long)]
    end_layer: usize,
    /// This stage holds the embedding.
    #[arg(long)]
    embedding: bool,
    /// This stage holds the final norm and LM head (and samples).
    #[arg(long)]
    head: bool,
    /// `cpu`, `cpu:CORES` (pinned to those cores, e.g. `cpu:0-3`) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Name of the supervisor's control socket (abstract namespace).
    #[arg(long)]
    control: String,
    /// Inherited descriptor of the input ring.
    #[arg(long)]
    ring_in: RawFd,
    /// Inherited descriptor of the output ring.
    #[arg(long)]
    ring_out: RawFd,
    #[arg(long)]
    kv_blocks: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    #[arg(long, default_value_t = 200)]
    heartbeat_ms: u64,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Worker(args) => run(args),
        Command::Generate(args) => gptossd_stage::generate::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => gptossd_stage::bench::run(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gptossd-stage: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stream = Stream::connect(args.control.as_str().to_ns_name::<GenericNamespaced>()?)
        .with_context(|| format!("connecting to the control socket {}", args.control))?;
    let stream = Arc::new(stream);
    worker::send(
        &stream,
        &WorkerMsg::Hello {
            version: PROTOCOL_VERSION,
            stage: args.stage,
            pid: std::process::id(),
        },
    );
    let model = match load(&args) {
        Ok(m) => m,
        Err(e) => {
            let reason = format!("stage {}: {e:#}", args.stage);
            eprintln!("gptossd-stage: {reason}");
            worker::send(&stream, &WorkerMsg::LoadFailed { reason });
            return Ok(ExitCode::from(3));
        }
    };
    let (mut stage, hops) = model;
    worker::send(&stream, &WorkerMsg::Loaded(stage.report()));
    if std::env::var(FAULT_ENV).as_deref() == Ok("crash-after-load") {
        eprintln!("gptossd-stage: {FAULT_ENV}=crash-after-load: aborting (test fault injection)");
        std::process::abort();
    }
    let state = WorkerState::new(args.epoch);
    {
        let (s, sh) = (stream.clone(), state.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || worker::control_reader(s, sh))?;
        let (s, sh) = (stream.clone(), state.clone());
        let interval = Duration::from_millis(args.heartbeat_ms.max(10));
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || worker::heartbeat(s, sh, interval))?;
    }
    let who = worker::StageRole {
        index: args.stage,
        fail_steps: std::env::var(FAULT_ENV).as_deref() == Ok("fail-steps"),
    };
    worker::run(&mut stage, who, hops, &state).context("compute loop")?;
    Ok(ExitCode::SUCCESS)
}

fn load(args: &Args) -> anyhow::Result<(Stage, Hops)> {
    if let Device::Cpu { cores: Some(cores) } = &args.device {
        let mut set = nix::sched::CpuSet::new();
        for &c in cores {
            set.set(c)
                .with_context(|| format!("cpu {c} is not a valid core index"))?;
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("pinning to {}", args.device))?;
    }
    // SAFETY: the supervisor passes these descriptors open (not close-on-exec) for this process
    // alone, and nothing else in this process owns them.
    let (fd_in, fd_out) = unsafe {
        (
            OwnedFd::from_raw_fd(args.ring_in),
            OwnedFd::from_raw_fd(args.ring_out),
        )
    };
    let hops = Hops {
        input: worker::ring_from_inherited(fd_in).context("input ring")?,
        output: worker::ring_from_inherited(fd_out).context("output ring")?,
    };
    let cfg = ModelConfig::load(&args.model)?;
    if args.first_layer >= args.end_layer || args.end_layer > cfg.num_hidden_layers {
        bail!(
            "layers {}..{} are not a range of the model's {} layers",
            args.first_layer,
            args.end_layer,
            cfg.num_hidden_layers
        );
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let span = StageSpan {
        layers: args.first_layer..args.end_layer,
        embedding: args.embedding,
        head: args.head,
    };
    let weights = StageWeights::load(&ckpt, &cfg, &span)?;
    let kv = KvConfig {
        num_blocks: args.kv_blocks,
        block_size: args.block_size,
    };
    let stage = Stage::load(&args.device, args.threads, cfg, &weights, kv)
        .with_context(|| format!("loading the stage on {}", args.device))?;
    Ok((stage, hops))
}
