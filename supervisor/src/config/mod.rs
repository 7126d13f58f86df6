//! The daemon's configuration: one TOML file (`--config FILE` or `$GPTOSSD_CONFIG`), plus a
//! few command-line overrides, resolved once into a checked [`Config`].
//!
//! # What it owns
//!
//! The file's schema (the private `raw` structs: every key optional, unknown keys refused), the
//! defaults ([`defaults`], also written out in `packaging/gptossd.toml`, and the few that
//! depend on the machine: [`default_control_socket`], [`default_layout`]), the checks, and the
//! command-line overrides ([`Overrides`]). Parse, don't validate: only the checked [`Config`]
//! leaves this module, and it cannot be built any other way. Beside it, in `routing`, the rules
//! that read it to route requests: a request's profile ([`Config::choose_profile`]), a
//! profile's models ([`Config::profile_models`]) and the loaded model that serves it now
//! ([`Config::route`]).
//!
//! # Invariants of a [`Config`]
//!
//! - At least one model; model names are distinct, not empty, without spaces.
//! - Every model has `stages ≥ 1`, exactly one device per stage, and (when given) one explicit
//!   layer count ≥ 1 per stage. Whether `stages ≤ layers` and the explicit counts add up to the
//!   layer count is only known once the model's `config.json` is read:
//!   [`ModelSettings::check_layers`] and [`ModelSettings::layer_split`] do that part.
//! - Every profile's `model` and `fallback` name a configured model, and differ.
//! - Every count that sizes something (batch, queue, blocks, threads…) is ≥ 1;
//!   `heartbeat_timeout > heartbeat_interval`; `restart_backoff_max ≥ restart_backoff_initial`.
//!
//! # Errors
//!
//! A [`ConfigError`] names the file (with line and column where the value was written), the key
//! path (`models.gpt-oss-20b.stages`, `server.port`…) and the value, or the command-line flag
//! that set it. Syntax and type errors come from the TOML parser, with the key path worked out
//! from the text around the position it reports.
//!
//! It reads the config file and nothing else: no model files, no devices, no sockets. The facts
//! it takes from the machine and the environment (cores, NUMA nodes, GPUs, user id, runtime
//! directories) are read in one place, [`Host::detect`], and passed in as a [`Host`]
//! ([`Config::resolve_on`], [`Config::parse_on`]), so tests can describe any machine.

mod check;
mod host;
mod location;
mod overrides;
mod raw;
mod routing;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use gptossd_shared::config::ModelConfig;

pub use self::host::{ControlSocketSource, Host};
pub use self::routing::LoadedModel;
pub use crate::chat::ReasoningEffort;
use crate::split::{split_layers, CostModel};
pub use gptossd_shared::device::Device;

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "GPTOSSD_CONFIG";

/// The config file to read: the `--config` flag's value, else `$GPTOSSD_CONFIG` (when set and
/// not empty), else none (the daemon then needs `--model`).
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    config_path_from(flag, std::env::var_os(CONFIG_ENV).as_deref())
}

/// [`config_path`] with the environment variable's value passed in.
pub fn config_path_from(flag: Option<&Path>, env: Option<&OsStr>) -> Option<PathBuf> {
    match (flag, env) {
        (Some(path), _) => Some(path.to_path_buf()),
        (None, Some(v)) if !v.is_empty() => Some(PathBuf::from(v)),
        (None, _) => None,
    }
}

/// Every fixed default, in one place. `packaging/gptossd.toml` shows the same values (a test
/// checks that uncommenting its settings changes nothing). The defaults that depend on the
/// machine are rules instead: `server.control_socket` ([`default_control_socket`](super::default_control_socket)),
/// `models.stages` and `models.devices` ([`default_layout`](super::default_layout)).
pub mod defaults {
    use super::ProfileName;

    /// `server.host`: loopback only; never a public address by default.
    pub const HOST: &str = "127.0.0.1";
    /// `server.port`.
    pub const PORT: u16 = 8080;
    /// `server.max_body_bytes`: 4 MiB.
    pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    /// `server.request_timeout_secs`.
    pub const REQUEST_TIMEOUT_SECS: u64 = 10;

    /// `models.kv_cache_tokens`: positions of KV cache per stage pool.
    pub const KV_CACHE_TOKENS: usize = 65_536;
    /// `models.block_size`: positions per KV block.
    pub const BLOCK_SIZE: usize = 16;

    /// `scheduler.default_profile`.
    pub const DEFAULT_PROFILE: ProfileName = ProfileName::Balanced;
    /// `scheduler.auto_profile`.
    pub const AUTO_PROFILE: bool = false;
    /// `scheduler.max_waiting`.
    pub const MAX_WAITING: usize = 256;
    /// `scheduler.max_tokens_per_step`.
    pub const MAX_TOKENS_PER_STEP: usize = 512;

    /// `workers.heartbeat_interval_ms`.
    pub const HEARTBEAT_INTERVAL_MS: u64 = 200;
    /// `workers.heartbeat_timeout_ms`.
    pub const HEARTBEAT_TIMEOUT_MS: u64 = 2_000;
    /// `workers.step_deadline_ms`.
    pub const STEP_DEADLINE_MS: u64 = 30_000;
    /// `workers.restart_backoff_initial_ms`.
    pub const RESTART_BACKOFF_INITIAL_MS: u64 = 100;
    /// `workers.restart_backoff_max_ms`.
    pub const RESTART_BACKOFF_MAX_MS: u64 = 5_000;
    /// `workers.crash_loop_limit`.
    pub const CRASH_LOOP_LIMIT: u32 = 5;
    /// `workers.crash_loop_window_secs`.
    pub const CRASH_LOOP_WINDOW_SECS: u64 = 60;
    /// `workers.drain_grace_secs`.
    pub const DRAIN_GRACE_SECS: u64 = 30;
    /// `slo.window_secs`.
    pub const SLO_WINDOW_SECS: u64 = 300;
    /// `slo.min_requests`.
    pub const SLO_MIN_REQUESTS: usize = 5;
    /// `profiles.*.slo.e2e_p95_ms`: the old server's personal SLO, 10 s.
    pub const SLO_E2E_P95_MS: u64 = 10_000;
    /// `profiles.*.slo.error_rate`: 1 %.
    pub const SLO_ERROR_RATE: f64 = 0.01;
    /// `workers.stderr_tail_lines`.
    pub const STDERR_TAIL_LINES: usize = 50;
    /// `server.response_cache_bytes`: 64 MiB.
    pub const RESPONSE_CACHE_BYTES: usize = 64 * 1024 * 1024;
    /// `profiles.*.timeout_queue_budget_ms`: what a request may spend waiting for admission.
    pub const TIMEOUT_QUEUE_BUDGET_MS: u64 = 30_000;
    /// `profiles.*.timeout_ttft_budget_ms`: what its prefill may take (a long prompt on a CPU).
    pub const TIMEOUT_TTFT_BUDGET_MS: u64 = 30_000;
    /// `profiles.*.timeout_slack`: the margin on the observed p95 time per output token.
    pub const TIMEOUT_SLACK: f64 = 2.0;
}

/// Command-line flags that override the file, applied after it is read and before it is
/// checked (so an override is checked like a value in the file, and errors name the flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--port`: replaces `server.port`.
    pub port: Option<u16>,
    /// `--stages`: replaces every model's `stages` (a model with explicit `devices` or
    /// `layers` of another length is then an error).
    pub stages: Option<usize>,
    /// `--model DIR`: with no `[[models]]` in the file, adds one with every default; with one,
    /// replaces its `path` (its name, when derived from the path, follows, and profiles naming
    /// it follow too); with several, replaces the `path` of the one `--served-model-name`
    /// names.
    pub model: Option<PathBuf>,
    /// `--served-model-name`: the name the API serves the model under (with one model, renames
    /// it, and profiles naming it follow).
    pub served_model_name: Option<String>,
    /// `--threads` (of `generate` and `bench`): replaces every model's `threads_per_stage`.
    pub threads_per_stage: Option<usize>,
    /// `--kv-cache-tokens`: replaces every model's `kv_cache_tokens`.
    pub kv_cache_tokens: Option<usize>,
    /// `--max-waiting`: replaces `scheduler.max_waiting`.
    pub max_waiting: Option<usize>,
    /// `--devices` (of `generate` and `bench` with `--stages`): replaces every model's
    /// `devices`, checked like the file's (one per stage, each `cpu`, `cpu:CORES` or `cuda:N`).
    pub devices: Option<Vec<String>>,
}

/// Where a value that failed a check came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in the config file, at a 1-based line and column.
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// Given on the command line.
    Flag(&'static str),
    /// Not written anywhere: the documented default, or derived from other settings.
    Default { file: Option<PathBuf> },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => write!(f, "{}:{line}:{column}", path.display()),
            Origin::Flag(flag) => write!(f, "command line {flag}"),
            Origin::Default { file: Some(path) } => write!(f, "{} (default value)", path.display()),
            Origin::Default { file: None } => f.write_str("default value"),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (or is not a regular file: a FIFO would block start-up).
    /// The cause is printed here and not chained, so it appears once.
    #[error("{}: cannot read the config file: {error}", path.display())]
    Read {
        path: PathBuf,
        error: gptossd_shared::files::FileError,
    },
    /// Not TOML, a value of the wrong type, or an unknown key (from the TOML parser).
    #[error("{}", syntax_message(path, *line_column, key.as_deref(), message))]
    Syntax {
        path: PathBuf,
        /// 1-based, where the parser says.
        line_column: Option<(usize, usize)>,
        /// The key path around that position (`server.port`, `models[0].stages`), best effort.
        key: Option<String>,
        message: String,
    },
    /// A value of the right type that does not make sense.
    #[error("{origin}: `{key}` = {value}: {problem}")]
    Invalid {
        origin: Origin,
        /// The key path, e.g. `models.gpt-oss-20b.stages`.
        key: String,
        /// The value as written (TOML-like).
        value: String,
        problem: String,
    },
    /// A required setting that is not there.
    #[error("{origin}: `{key}` is missing: {problem}")]
    Missing {
        origin: Origin,
        key: String,
        problem: String,
    },
}

fn syntax_message(
    path: &Path,
    line_column: Option<(usize, usize)>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut s = path.display().to_string();
    if let Some((line, column)) = line_column {
        s += &format!(":{line}:{column}");
    }
    if let Some(key) = key {
        s += &format!(": `{key}`");
    }
    format!("{s}: {message}")
}

/// The checked configuration. Built only by [`Config::resolve`] and its shorthands.
///
/// Equality compares the settings, not where they came from.
#[derive(Debug, Clone)]
pub struct Config {
    server: ServerSettings,
    models: Vec<ModelSettings>,
    profiles: Profiles,
    scheduler: SchedulerSettings,
    workers: WorkerSettings,
    slo: SloWindow,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.server == other.server
            && self.models == other.models
            && self.profiles == other.profiles
            && self.scheduler == other.scheduler
            && self.workers == other.workers
            && self.slo == other.slo
    }
}

impl Config {
    /// Reads the config file (when there is one), applies the overrides and checks the result,
    /// with the defaults of this machine ([`Host::detect`]).
    pub fn resolve(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::resolve_on(file, overrides, &Host::detect())
    }

    /// [`Config::resolve`] with the defaults of `host`.
    pub fn resolve_on(
        file: Option<&Path>,
        overrides: &Overrides,
        host: &Host,
    ) -> Result<Self, ConfigError> {
        match file {
            None => check::resolve(None, "", overrides, host),
            Some(path) => {
                let text =
                    gptossd_shared::files::read_regular_to_string(path).map_err(|error| {
                        ConfigError::Read {
                            path: path.to_path_buf(),
                            error,
                        }
                    })?;
                check::resolve(Some(path), &text, overrides, host)
            }
        }
    }

    /// Checks config text; `path` names the file in errors. Defaults of this machine.
    #[cfg(test)]
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::parse_on(text, path, overrides, &Host::detect())
    }

    /// [`Config::parse`] with the defaults of `host`.
    #[cfg(test)]
    pub fn parse_on(
        text: &str,
        path: &Path,
        overrides: &Overrides,
        host: &Host,
    ) -> Result<Self, ConfigError> {
        check::resolve(Some(path), text, overrides, host)
    }

    /// Every default, serving the model in `path` (the daemon started with `--model DIR` and
    /// no config file). `name`: the served model name, by default the directory's name.
    #[cfg(test)]
    pub fn default_for_model(path: &Path, name: Option<&str>) -> Result<Self, ConfigError> {
        let overrides = Overrides {
            model: Some(path.to_path_buf()),
            served_model_name: name.map(str::to_string),
            ..Overrides::default()
        };
        Self::resolve(None, &overrides)
    }

    /// `[server]`.
    pub fn server(&self) -> &ServerSettings {
        &self.server
    }

    /// `[[models]]`, in file order (at least one).
    pub fn models(&self) -> &[ModelSettings] {
        &self.models
    }

    /// The model served under `name`.
    pub fn model(&self, name: &str) -> Option<&ModelSettings> {
        self.models.iter().find(|m| m.name == name)
    }

    /// One profile's settings.
    pub fn profile(&self, name: ProfileName) -> &ProfileSettings {
        self.profiles.get(name)
    }

    /// `[scheduler]`.
    pub fn scheduler(&self) -> &SchedulerSettings {
        &self.scheduler
    }

    /// `[workers]`.
    pub fn workers(&self) -> &WorkerSettings {
        &self.workers
    }

    /// `[slo]`: the window the per-profile SLOs are judged over.
    pub fn slo(&self) -> &SloWindow {
        &self.slo
    }
}

/// `[server]`: the HTTP listener and the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `host`: the address the HTTP API listens on; an IP address or `"localhost"` (taken as
    /// 127.0.0.1). Default `"127.0.0.1"` ([`defaults::HOST`]): never a public address unless
    /// the operator writes one.
    pub host: IpAddr,
    /// `port`: 0–65535 (0: the OS picks a free port, which the log reports). Default 8080.
    pub port: u16,
    /// `control_socket`: the Unix socket for administration (mode 0660). Default: by
    /// [`default_control_socket`]: `$RUNTIME_DIRECTORY/control.sock` under systemd, else
    /// `$XDG_RUNTIME_DIR/gptossd/control.sock`, else `/run/gptossd/control.sock` for root, else
    /// `/tmp/gptossd-<uid>/control.sock`.
    pub control_socket: PathBuf,
    /// Which rule chose `control_socket`: for the start-up log
    /// ([`ControlSocketSource::describe`]) and whether the server must make its directory
    /// private ([`ControlSocketSource::needs_private_dir`]).
    pub control_socket_source: ControlSocketSource,
    /// `max_body_bytes`: the largest request body accepted (413 beyond). Default 4 MiB
    /// (4,194,304).
    pub max_body_bytes: usize,
    /// `request_timeout_secs`: how long a client may take to send a request head (also how
    /// long an idle keep-alive connection stays open) and, separately, its body. Default 10 s.
    pub request_timeout: Duration,
    /// `max_connections`: HTTP connections open at once; more wait in the listen backlog.
    /// Default (`None`): from the file-descriptor limit at start-up (see
    /// `server::accept::connection_cap`).
    pub max_connections: Option<usize>,
    /// `log_level`: which records are logged, in tracing's filter syntax (`"info"`,
    /// `"debug"`, `"gptossd=debug,warn"`). Default (`None`): `info`. `$GPTOSSD_LOG`, when set,
    /// takes precedence. A reload applies it.
    pub log_level: Option<String>,
    /// `response_cache_bytes`: the bound of the response cache (the answers of fully
    /// determined requests, shared by every model and profile; see
    /// [`crate::response_cache`]), in bytes; 0 turns it off. Default 64 MiB (67,108,864).
    pub response_cache_bytes: usize,
}

impl ServerSettings {
    /// The address to bind the HTTP listener to.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

/// A model family size: which of the two GPT-OSS models, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelSize {
    /// gpt-oss-20b (24 layers, 32 experts, hidden size 2880).
    B20,
    /// gpt-oss-120b (36 layers, 128 experts, hidden size 2880).
    B120,
    /// Neither shape: the small test models (random weights), or any other shape. Profiles
    /// use it as a stand-in for the 20b ([`ModelSize::serves_as`]).
    Test,
}

impl ModelSize {
    /// `"20b"`, `"120b"` or `"test"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelSize::B20 => "20b",
            ModelSize::B120 => "120b",
            ModelSize::Test => "test",
        }
    }

    /// The size a `config.json` describes: 20b or 120b when its layer count, expert count and
    /// hidden size are those of the real model, else [`ModelSize::Test`].
    pub fn detect(cfg: &ModelConfig) -> Self {
        match (
            cfg.num_hidden_layers,
            cfg.num_local_experts,
            cfg.hidden_size,
        ) {
            (24, 32, 2880) => ModelSize::B20,
            (36, 128, 2880) => ModelSize::B120,
            _ => ModelSize::Test,
        }
    }

    /// The size a profile treats a model of this size as: its own, and 20b for a test model,
    /// so that a single test model serves every profile (`quality_first` then says it fell
    /// back, as on a real 20b).
    pub fn serves_as(self) -> ModelSize {
        match self {
            ModelSize::Test => ModelSize::B20,
            size => size,
        }
    }
}

impl fmt::Display for ModelSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `size` setting of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSetting {
    /// `"auto"`: from the model's `config.json` ([`ModelSize::detect`]).
    Auto,
    /// `"20b"` or `"120b"`, as the operator says (not checked against `config.json`; e.g. for
    /// a model of another shape that should serve as one of them).
    Fixed(ModelSize),
}

/// One `[[models]]` entry: a model and how its pipeline is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// `name`: the served model name (`model` in API requests). Default: the last component of
    /// `path`.
    pub name: String,
    /// `path`: the model directory (Hugging Face layout). Required.
    pub path: PathBuf,
    /// `size`: `"20b"`, `"120b"` or `"auto"` (from `config.json`'s shape: 20b, 120b, or
    /// `test` for any other shape). Default `"auto"`. Profiles pick models by size.
    pub size: SizeSetting,
    /// `stages`: pipeline stages (worker processes), ≥ 1 and ≤ the model's layers. Default:
    /// the length of `devices` or `layers` when given, else [`default_layout`]'s: one per GPU,
    /// or with no GPU one per NUMA node (1 on an ordinary workstation). Which rule applied:
    /// [`ModelSettings::stages_reason`].
    pub stages: usize,
    /// `devices`: one per stage: `"cpu"`, `"cpu:0-3"` (a core set: ranges and commas, e.g.
    /// `"cpu:0,2,4-7"`) or `"cuda:N"`. Default: with `stages` (or `layers`) given, `"cpu"` for
    /// every stage; else [`default_layout`]'s: `"cuda:N"` per GPU, or `"cpu:LIST"` per NUMA
    /// node (its cores) when there are several, else `"cpu"`.
    pub devices: Vec<Device>,
    /// `layers`: explicit layer counts per stage (e.g. `[7, 7, 7, 3]`), adding up to the
    /// model's layers; overrides the cost model. Default: none, the split minimising the
    /// slowest stage's decode traffic ([`crate::split`]).
    pub layers: Option<Vec<usize>>,
    /// `threads_per_stage`: CPU threads per stage worker. Default: when stages are pinned to
    /// core sets, the size of the smallest set (no more threads than cores to run them); else
    /// all the cores available to the daemon (a step visits the stages one after another; idle
    /// stage threads sleep).
    pub threads_per_stage: usize,
    /// `kv_blocks` (or `kv_cache_tokens`, in positions, rounded up to whole blocks; not both):
    /// the KV pool of every stage, in blocks. Default: 65,536 tokens, i.e. 4,096 blocks of 16.
    pub kv_blocks: usize,
    /// `block_size`: positions per KV block. Default 16.
    pub block_size: usize,
    provenance: check::ModelProvenance,
}

impl ModelSettings {
    /// Which rule set `stages` and why, for the start-up log: e.g. "1 stage: one per NUMA node
    /// (1 node, no GPU devices configured)", "4 stages: from --stages".
    pub fn stages_reason(&self) -> &str {
        self.provenance.stages_reason()
    }

    /// Positions the KV pool of a stage holds.
    pub fn kv_cache_tokens(&self) -> usize {
        self.kv_blocks * self.block_size
    }

    /// The model's size: the `size` setting, or what `cfg` says for `"auto"`.
    pub fn resolve_size(&self, cfg: &ModelConfig) -> ModelSize {
        match self.size {
            SizeSetting::Fixed(size) => size,
            SizeSetting::Auto => ModelSize::detect(cfg),
        }
    }

    /// Checks the settings that depend on the model's layer count: `stages ≤ layers`, and that
    /// explicit `layers` counts add up to it.
    #[cfg(test)]
    pub fn check_layers(&self, layers: usize) -> Result<(), ConfigError> {
        check::check_layers(self, layers).map(|_| ())
    }

    /// The layers of each stage: the explicit `layers` counts, or the split minimising the
    /// largest stage's decode traffic for `cfg` ([`split_layers`]).
    pub fn layer_split(&self, cfg: &ModelConfig) -> Result<Vec<Range<usize>>, ConfigError> {
        let layers = cfg.num_hidden_layers;
        match check::check_layers(self, layers)? {
            Some(split) => Ok(split),
            None => Ok(split_layers(
                layers,
                self.stages,
                &CostModel::from_model_config(cfg),
            )),
        }
    }
}

/// The three serving profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileName {
    LatencyFirst,
    Balanced,
    QualityFirst,
}

impl ProfileName {
    /// All profiles, in table order.
    pub const ALL: [ProfileName; 3] = [Self::LatencyFirst, Self::Balanced, Self::QualityFirst];

    /// The name used in the config file and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LatencyFirst => "latency_first",
            Self::Balanced => "balanced",
            Self::QualityFirst => "quality_first",
        }
    }

    /// The model size a profile runs on unless its `model` says otherwise: 120b for
    /// `quality_first`, 20b for the others.
    pub fn preferred_size(self) -> ModelSize {
        match self {
            Self::QualityFirst => ModelSize::B120,
            Self::LatencyFirst | Self::Balanced => ModelSize::B20,
        }
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown profile {0:?} (expected latency_first, balanced or quality_first)")]
pub struct UnknownProfile(pub String);

impl FromStr for ProfileName {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProfile(s.to_string()))
    }
}

/// `[profiles.latency_first]`, `[profiles.balanced]`, `[profiles.quality_first]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profiles {
    pub latency_first: ProfileSettings,
    pub balanced: ProfileSettings,
    pub quality_first: ProfileSettings,
}

impl Profiles {
    /// One profile's settings.
    pub fn get(&self, name: ProfileName) -> &ProfileSettings {
        match name {
            ProfileName::LatencyFirst => &self.latency_first,
            ProfileName::Balanced => &self.balanced,
            ProfileName::QualityFirst => &self.quality_first,
        }
    }
}

/// One profile. Defaults (DESIGN.md's table, with the response cache and the timeout ceiling):
///
/// | profile | max_batch | prefill_window_ms | max_new_tokens | reasoning_effort | response_cache | timeout_ceiling_secs |
/// |---|---|---|---|---|---|---|
/// | latency_first | 32 | 4 | 512 | low | true | 600 |
/// | balanced | 48 | 6 | 1024 | medium | false | 600 |
/// | quality_first | 8 | 12 | 2048 | high | false | 1800 |
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSettings {
    /// `model`: the served name of the model this profile runs on. Default: none, chosen by
    /// size ([`Config::profile_models`]: a 120b model for `quality_first`, a 20b one otherwise).
    pub model: Option<String>,
    /// `fallback`: the model used when `model` is not loaded or unhealthy. Default: none,
    /// except that `quality_first` falls back to a 20b model.
    pub fallback: Option<String>,
    /// `max_batch`: most sequences in one step, ≥ 1.
    pub max_batch: usize,
    /// `prefill_window_ms`: how long a new request may wait for companions before its prefill.
    pub prefill_window: Duration,
    /// `max_new_tokens`: the generation limit when a request names none, ≥ 1.
    pub max_new_tokens: usize,
    /// `reasoning_effort`: `"low"`, `"medium"` or `"high"` when a request names none.
    pub reasoning_effort: ReasoningEffort,
    /// `response_cache`: answer a fully determined request (temperature 0, `top_k` 1 or an
    /// explicit seed) from the response cache when the same one was answered before. Default
    /// true for `latency_first`, false for the others (whose users expect fresh samples).
    pub response_cache: bool,
    /// `timeout_*`: how long a request may take before it is cancelled with a 504.
    pub timeout: TimeoutSettings,
    /// `[profiles.<name>.slo]`: what the owner expects of this profile.
    pub slo: SloThresholds,
}

/// A profile's request timeout: `queue_budget + ttft_budget + max_tokens × p95 time per output
/// token × slack`, at most `ceiling`; the ceiling alone while the profile has too few finished
/// requests to know its pace ([`crate::deadline`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TimeoutSettings {
    /// `timeout_ceiling_secs`: the longest any request of the profile may take, ≥ 1 s. Default
    /// 600 s (10 minutes) for `latency_first` and `balanced`, 1800 s for `quality_first`.
    pub ceiling: Duration,
    /// `timeout_queue_budget_ms`: the allowance for waiting to be admitted. Default 30 s.
    pub queue_budget: Duration,
    /// `timeout_ttft_budget_ms`: the allowance for the prefill, up to the first token.
    /// Default 30 s.
    pub ttft_budget: Duration,
    /// `timeout_slack`: the factor on the decode estimate, ≥ 1. Default 2.
    pub slack: f64,
}

/// A profile's personal SLO: p95 time to first token, p95 end-to-end latency and error rate,
/// each over the `[slo]` window. Defaults: TTFT 1 s / 2 s / 5 s for latency_first / balanced /
/// quality_first, 10 s end to end (the old server's personal SLO), 1 % errors.
#[derive(Debug, Clone, PartialEq)]
pub struct SloThresholds {
    /// `ttft_p95_ms`.
    pub ttft_p95: Duration,
    /// `e2e_p95_ms`.
    pub e2e_p95: Duration,
    /// `error_rate`: the share of requests that fail (5xx), in (0, 1].
    pub error_rate: f64,
}

/// `[slo]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SloWindow {
    /// `window_secs`: the sliding window the SLOs are judged over. Default 300 (5 minutes).
    pub window: Duration,
    /// `min_requests`: fewer requests than this in the window judge nothing (one slow request
    /// is not a trend). Default 5.
    pub min_requests: usize,
}

/// `[scheduler]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerSettings {
    /// `default_profile`: the profile of a request that names none. Default `"balanced"`.
    pub default_profile: ProfileName,
    /// `auto_profile`: choose a profile from the prompt length and max tokens when a request
    /// names none (instead of `default_profile`). Default false.
    pub auto_profile: bool,
    /// `max_waiting`: the bounded queue; past it requests are rejected (429/503 with
    /// Retry-After). Default 256.
    pub max_waiting: usize,
    /// `max_tokens_per_step`: prefill chunk plus decode tokens in one step. Default 512.
    pub max_tokens_per_step: usize,
    /// `max_in_flight`: micro-batches in the pipeline at once. Default: none, meaning the
    /// model's stage count ([`SchedulerSettings::max_in_flight_for`]).
    pub max_in_flight: Option<usize>,
}

impl SchedulerSettings {
    /// The micro-batches in flight for `model`: `max_in_flight`, or its stage count.
    pub fn max_in_flight_for(&self, model: &ModelSettings) -> usize {
        self.max_in_flight.unwrap_or(model.stages)
    }
}

/// `[workers]`: stage worker supervision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    /// `heartbeat_interval_ms`: how often a worker is pinged. Default 200 ms.
    pub heartbeat_interval: Duration,
    /// `heartbeat_timeout_ms`: silence after which a worker is killed and restarted; more than
    /// the interval. Default 2000 ms.
    pub heartbeat_timeout: Duration,
    /// `step_deadline_ms`: the longest one step may take on a stage. Default 30000 ms.
    pub step_deadline: Duration,
    /// `restart_backoff_initial_ms`: the first restart delay, doubled on each crash. Default
    /// 100 ms.
    pub restart_backoff_initial: Duration,
    /// `restart_backoff_max_ms`: the longest restart delay, ≥ the initial one. Default 5000 ms.
    pub restart_backoff_max: Duration,
    /// `crash_loop_limit`: this many crashes within `crash_loop_window_secs` mark the model
    /// unhealthy. Default 5.
    pub crash_loop_limit: u32,
    /// `crash_loop_window_secs`. Default 60 s.
    pub crash_loop_window: Duration,
    /// `drain_grace_secs`: how long requests in progress may finish on SIGTERM (0: none).
    /// Default 30 s.
    pub drain_grace: Duration,
    /// `stderr_tail_lines`: lines of a worker's stderr kept to log when it crashes. Default 50.
    pub stderr_tail_lines: usize,
}
