//! Turning one configured model into a [`PipelineConfig`]: the layer split, per-stage
//! devices and threads, KV pool sizes and worker timings.
//!
//! Workers get the fault-injection variable `GPTOSSD_FAULT` only when the supervisor's own
//! environment names their stage (`GPTOSSD_FAULT_STAGE<k>=<fault>`): a test-only hook.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gptossd_shared::config::{ConfigError, ModelConfig};

use crate::pipeline::{PipelineConfig, StageSpec};
use crate::scheduler::SchedulerConfig;

/// Environment variable overriding where the `gptossd-stage` binary is.
pub const STAGE_BIN_ENV: &str = "GPTOSSD_STAGE_BIN";

/// A launch that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The model's `config.json`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon's configuration against the model (stages, layer counts).
    #[error(transparent)]
    Settings(#[from] crate::config::ConfigError),
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

/// The pipeline of a command-line tool (`generate --stages`, `bench --stages`): the model in
/// `dir` with every configuration default, the command's flags as `overrides`, and the
/// default profile's batching unless `max_batch` is given.
pub fn tool_pipeline(
    dir: &Path,
    overrides: crate::config::Overrides,
    max_batch: Option<usize>,
) -> Result<PipelineConfig, LaunchError> {
    let config = crate::config::Config::resolve(
        None,
        &crate::config::Overrides {
            model: Some(dir.to_path_buf()),
            ..overrides
        },
    )?;
    let profile = config.profile(config.scheduler().default_profile);
    // A resolved configuration has at least one model (its invariant), here the one in `dir`.
    let model = &config.models()[0];
    let max_batch = max_batch.unwrap_or(profile.max_batch);
    let (pipeline, _) = pipeline_config(model, &config, max_batch, profile.prefill_window)?;
    Ok(pipeline)
}

/// Builds the pipeline of one configured model from the daemon's configuration: the one
/// builder for `serve`, `generate --stages` and `bench --stages` (the commands express their
/// flags as [`crate::config::Overrides`], so every default lives in the config module).
pub fn pipeline_config(
    model: &crate::config::ModelSettings,
    config: &crate::config::Config,
    max_batch_seqs: usize,
    prefill_window: Duration,
) -> Result<(PipelineConfig, ModelConfig), LaunchError> {
    use crate::config::Device;
    let cfg = ModelConfig::load(&model.path)?;
    let splits = model.layer_split(&cfg)?;
    let binary = stage_binary()?;
    let s = splits.len();
    let workers = config.workers();
    let stages = splits
        .iter()
        .enumerate()
        .map(|(k, range)| {
            // A resolved configuration has one device per stage; `cpu` is the safe reading of
            // a missing one.
            let device = model
                .devices
                .get(k)
                .cloned()
                .unwrap_or(Device::Cpu { cores: None });
            StageSpec {
                binary: binary.clone(),
                model: model.path.clone(),
                stage: k,
                layers: range.clone(),
                embedding: k == 0,
                head: k == s - 1,
                device,
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
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
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
