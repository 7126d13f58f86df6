//! Turning "this model, S stages" into a [`PipelineConfig`]: the layer split, per-stage
//! devices and threads, KV pool sizes and worker timings.
//!
//! Workers get the fault-injection variable `GPTOSSD_FAULT` only when the supervisor's own
//! environment names their stage (`GPTOSSD_FAULT_STAGE<k>=<fault>`): a test-only hook.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gptossd_shared::config::{ConfigError, ModelConfig};

use crate::pipeline::{PipelineConfig, StageSpec};
use crate::scheduler::SchedulerConfig;
use crate::split::{split_layers, CostModel};

/// Environment variable overriding where the `gptossd-stage` binary is.
pub const STAGE_BIN_ENV: &str = "GPTOSSD_STAGE_BIN";

/// Knobs of a pipeline launch; the rest has defaults.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub model: PathBuf,
    pub stages: usize,
    /// Kernel threads per stage (default: all cores; see the config's `threads_per_stage`).
    pub threads_per_stage: Option<usize>,
    /// Positions the KV pool holds, all sequences together.
    pub kv_cache_tokens: usize,
    pub block_size: usize,
    pub max_batch_seqs: usize,
    pub max_tokens_per_step: usize,
    pub prefill_window: Duration,
    pub max_waiting: usize,
    pub max_context: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub step_deadline: Duration,
}

impl LaunchOptions {
    /// Defaults for `model` with `stages` stages.
    pub fn new(model: &Path, stages: usize) -> Self {
        Self {
            model: model.to_path_buf(),
            stages,
            threads_per_stage: None,
            kv_cache_tokens: 65_536,
            block_size: 16,
            max_batch_seqs: 48,
            max_tokens_per_step: 512,
            prefill_window: Duration::from_millis(6),
            max_waiting: 256,
            max_context: 131_072,
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(2000),
            step_deadline: Duration::from_secs(30),
        }
    }
}

/// A launch that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--stages {stages}: must be between 1 and the model's {layers} layers")]
    Stages { stages: usize, layers: usize },
    #[error("cannot find the stage worker binary: {0}")]
    StageBinary(String),
}

/// The stage worker binary: `$GPTOSSD_STAGE_BIN`, else `gptossd-stage` beside this executable.
pub fn stage_binary() -> Result<PathBuf, LaunchError> {
    if let Some(p) = std::env::var_os(STAGE_BIN_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| LaunchError::StageBinary(e.to_string()))?;
    let bin = exe.with_file_name("gptossd-stage");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(LaunchError::StageBinary(format!(
            "{} does not exist. Build both binaries with `cargo build --release` at the \
             repository's root (`cargo run --bin gptossd` builds only the supervisor), install \
             the gptossd package, or set {STAGE_BIN_ENV} to the worker's path",
            bin.display()
        )))
    }
}

/// The name a model directory is known by: its last component.
fn model_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Builds the pipeline configuration.
pub fn pipeline_config(opts: &LaunchOptions) -> Result<PipelineConfig, LaunchError> {
    let cfg = ModelConfig::load(&opts.model)?;
    let layers = cfg.num_hidden_layers;
    if opts.stages == 0 || opts.stages > layers {
        return Err(LaunchError::Stages {
            stages: opts.stages,
            layers,
        });
    }
    let splits = split_layers(layers, opts.stages, &CostModel::from_model_config(&cfg));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads_per_stage.unwrap_or(cores.max(1));
    let num_blocks = opts.kv_cache_tokens.div_ceil(opts.block_size);
    let binary = stage_binary()?;
    let s = opts.stages;
    let stages = splits
        .iter()
        .enumerate()
        .map(|(k, range)| StageSpec {
            binary: binary.clone(),
            model: opts.model.clone(),
            stage: k,
            layers: range.clone(),
            embedding: k == 0,
            head: k == s - 1,
            device: "cpu".into(),
            cpus: Vec::new(),
            threads,
            kv_blocks: num_blocks,
            block_size: opts.block_size,
            heartbeat_ms: opts.heartbeat_interval.as_millis() as u64,
            extra_env: std::env::var(format!("GPTOSSD_FAULT_STAGE{k}"))
                .ok()
                .map(|f| vec![("GPTOSSD_FAULT".to_string(), f)])
                .unwrap_or_default(),
        })
        .collect();
    Ok(PipelineConfig {
        name: model_name(&opts.model),
        model: opts.model.clone(),
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        stage_binary: binary,
        stages,
        scheduler: SchedulerConfig {
            max_batch_seqs: opts.max_batch_seqs,
            max_tokens_per_step: opts.max_tokens_per_step,
            prefill_window: opts.prefill_window,
            max_waiting: opts.max_waiting,
            max_in_flight: s,
            block_size: opts.block_size,
            num_blocks,
            max_context: opts.max_context.min(cfg.max_position_embeddings),
        },
        heartbeat_timeout: opts.heartbeat_timeout,
        load_timeout: Duration::from_secs(600),
        step_deadline: opts.step_deadline,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        crash_loop_limit: 5,
        crash_loop_window: Duration::from_secs(60),
        stderr_tail_lines: 50,
    })
}

/// Builds the pipeline of one configured model from the daemon's configuration.
pub fn pipeline_config_for_model(
    model: &crate::config::ModelSettings,
    config: &crate::config::Config,
    max_batch_seqs: usize,
    prefill_window: Duration,
) -> Result<(PipelineConfig, ModelConfig), LaunchError> {
    use crate::config::Device;
    let cfg = ModelConfig::load(&model.path)?;
    let splits = model
        .layer_split(&cfg)
        .map_err(|e| LaunchError::StageBinary(e.to_string()))?;
    let binary = stage_binary()?;
    let s = splits.len();
    let workers = config.workers();
    let stages = splits
        .iter()
        .enumerate()
        .map(|(k, range)| {
            let (device, cpus) = match model.devices.get(k) {
                Some(Device::Cpu { cores }) => {
                    ("cpu".to_string(), cores.clone().unwrap_or_default())
                }
                Some(Device::Cuda { ordinal }) => (format!("cuda:{ordinal}"), Vec::new()),
                None => ("cpu".to_string(), Vec::new()),
            };
            StageSpec {
                binary: binary.clone(),
                model: model.path.clone(),
                stage: k,
                layers: range.clone(),
                embedding: k == 0,
                head: k == s - 1,
                device,
                cpus,
                threads: model.threads_per_stage,
                kv_blocks: model.kv_blocks,
                block_size: model.block_size,
                heartbeat_ms: workers.heartbeat_interval.as_millis() as u64,
                extra_env: std::env::var(format!("GPTOSSD_FAULT_STAGE{k}"))
                    .ok()
                    .map(|f| vec![("GPTOSSD_FAULT".to_string(), f)])
                    .unwrap_or_default(),
            }
        })
        .collect();
    let sched = config.scheduler();
    let pipeline = PipelineConfig {
        name: model.name.clone(),
        model: model.path.clone(),
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        stage_binary: binary,
        stages,
        scheduler: SchedulerConfig {
            max_batch_seqs,
            max_tokens_per_step: sched.max_tokens_per_step,
            prefill_window,
            max_waiting: sched.max_waiting,
            max_in_flight: sched.max_in_flight_for(model),
            block_size: model.block_size,
            num_blocks: model.kv_blocks,
            max_context: cfg.max_position_embeddings.min(model.kv_cache_tokens()),
        },
        heartbeat_timeout: workers.heartbeat_timeout,
        load_timeout: Duration::from_secs(600),
        step_deadline: workers.step_deadline,
        backoff_initial: workers.restart_backoff_initial,
        backoff_max: workers.restart_backoff_max,
        crash_loop_limit: workers.crash_loop_limit as usize,
        crash_loop_window: workers.crash_loop_window,
        stderr_tail_lines: workers.stderr_tail_lines,
    };
    Ok((pipeline, cfg))
}
