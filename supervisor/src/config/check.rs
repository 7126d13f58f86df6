//! Raw file + overrides (+ the machine's facts, a [`Host`]) → checked [`Config`]: the defaults,
//! every check, and error messages that name the key, the value and where it came from.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use super::host::{default_control_socket, default_layout, stages_phrase, Host};
use super::location::{key_path_near, line_column};
use super::overrides::{apply_overrides, derived_name};
use super::raw::{
    At, RawFile, RawModel, RawProfile, RawScheduler, RawServer, RawSlo, RawWorkers, Val,
};
use super::{
    defaults, Config, ConfigError, ControlSocketSource, Device, ModelSettings, ModelSize, Origin,
    Overrides, ProfileName, ProfileSettings, Profiles, ReasoningEffort, SchedulerSettings,
    ServerSettings, SizeSetting, SloThresholds, SloWindow, TimeoutSettings, WorkerSettings,
};
use crate::split::explicit_split;

/// Where a model's layer-dependent settings came from, for the checks that can only run once
/// the model's `config.json` is known, and the sentence saying why it has its stage count. Not
/// part of the settings: all provenances are equal.
#[derive(Debug, Clone)]
pub(super) struct ModelProvenance {
    stages: Origin,
    layers: Option<Origin>,
    stages_reason: String,
}

impl ModelProvenance {
    pub(super) fn stages_reason(&self) -> &str {
        &self.stages_reason
    }
}

impl PartialEq for ModelProvenance {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The file being checked: names it in errors and turns spans into lines and columns.
struct Ctx<'a> {
    file: Option<&'a Path>,
    text: &'a str,
}

impl Ctx<'_> {
    fn origin(&self, at: &At) -> Origin {
        match at {
            At::Span(span) => {
                let (line, column) = line_column(self.text, span.start);
                Origin::File {
                    path: self.file.map(Path::to_path_buf).unwrap_or_default(),
                    line,
                    column,
                }
            }
            At::Flag(flag) => Origin::Flag(flag),
        }
    }

    fn default_origin(&self) -> Origin {
        Origin::Default {
            file: self.file.map(Path::to_path_buf),
        }
    }

    fn origin_of<T>(&self, v: &Option<Val<T>>) -> Origin {
        v.as_ref()
            .map_or_else(|| self.default_origin(), |v| self.origin(&v.at))
    }

    /// The value (or the default) and an error for it.
    fn invalid(
        &self,
        origin: Origin,
        key: impl Into<String>,
        value: impl Debug,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin,
            key: key.into(),
            value: format!("{value:?}"),
            problem: problem.into(),
        }
    }

    /// A count: the value or the default, at least `min`.
    /// `at_least`, and at most `max` (`why` says where the ceiling comes from).
    fn within<T>(
        &self,
        v: &Option<Val<T>>,
        default: T,
        [min, max]: [T; 2],
        key: &str,
        why: &str,
    ) -> Result<T, ConfigError>
    where
        T: Copy + Ord + Debug,
    {
        let value = self.at_least(v, default, min, key)?;
        if value > max {
            return Err(self.invalid(
                self.origin_of(v),
                key,
                value,
                format!("must be at most {max:?} ({why})"),
            ));
        }
        Ok(value)
    }

    fn at_least<T>(
        &self,
        v: &Option<Val<T>>,
        default: T,
        min: T,
        key: &str,
    ) -> Result<T, ConfigError>
    where
        T: Copy + Ord + Debug,
    {
        let value = v.as_ref().map_or(default, |v| v.value);
        if value < min {
            return Err(self.invalid(
                self.origin_of(v),
                key,
                value,
                format!("must be at least {min:?}"),
            ));
        }
        Ok(value)
    }
}

/// The most tokens one step may carry: a CUDA stage's MoE kernels launch one block row per
/// (token, routed expert) pair, and a grid has at most 65535 rows (4 experts per token).
const MAX_TOKENS_PER_STEP_CEILING: usize = 8192;

fn get<T: Clone>(v: &Option<Val<T>>, default: T) -> T {
    v.as_ref().map_or(default, |v| v.value.clone())
}

/// Reads, overrides and checks, with the defaults of `host`. `file` is `None` only with empty
/// `text` (no config file).
pub(super) fn resolve(
    file: Option<&Path>,
    text: &str,
    overrides: &Overrides,
    host: &Host,
) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let mut raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| s.start);
        ConfigError::Syntax {
            path: file.map(Path::to_path_buf).unwrap_or_default(),
            line_column: at.map(|o| line_column(text, o)),
            key: at.and_then(|o| key_path_near(text, o)),
            message: e.message().trim().to_string(),
        }
    })?;
    apply_overrides(&mut raw, overrides)?;
    check(raw, &ctx, host)
}

fn check(raw: RawFile, ctx: &Ctx, host: &Host) -> Result<Config, ConfigError> {
    let server = check_server(&raw.server, ctx, host)?;
    if raw.models.is_empty() {
        return Err(ConfigError::Missing {
            origin: ctx.default_origin(),
            key: "models".into(),
            problem:
                "no model configured: add a [[models]] section with a `path`, or pass --model DIR"
                    .into(),
        });
    }
    let mut models: Vec<ModelSettings> = Vec::with_capacity(raw.models.len());
    for (i, m) in raw.models.iter().enumerate() {
        let checked = check_model(i, m, host, ctx)?;
        if models.iter().any(|o| o.name == checked.name) {
            let origin = m
                .value
                .name
                .as_ref()
                .map_or_else(|| ctx.origin(&m.at), |n| ctx.origin(&n.at));
            return Err(ctx.invalid(
                origin,
                format!("models[{i}].name"),
                &checked.name,
                "another model is already served under this name; names must be distinct",
            ));
        }
        models.push(checked);
    }
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    let profiles = Profiles {
        latency_first: check_profile(
            ProfileName::LatencyFirst,
            &raw.profiles.latency_first,
            &names,
            ctx,
        )?,
        balanced: check_profile(ProfileName::Balanced, &raw.profiles.balanced, &names, ctx)?,
        quality_first: check_profile(
            ProfileName::QualityFirst,
            &raw.profiles.quality_first,
            &names,
            ctx,
        )?,
    };
    let scheduler = check_scheduler(&raw.scheduler, ctx)?;
    let workers = check_workers(&raw.workers, ctx)?;
    let slo = SloWindow {
        window: Duration::from_secs(ctx.at_least(
            &raw.slo.window_secs,
            defaults::SLO_WINDOW_SECS,
            1,
            "slo.window_secs",
        )?),
        min_requests: ctx.at_least(
            &raw.slo.min_requests,
            defaults::SLO_MIN_REQUESTS,
            1,
            "slo.min_requests",
        )?,
    };
    Ok(Config {
        server,
        models,
        profiles,
        scheduler,
        workers,
        slo,
    })
}

fn check_server(s: &RawServer, ctx: &Ctx, host: &Host) -> Result<ServerSettings, ConfigError> {
    let host_text = get(&s.host, defaults::HOST.to_string());
    let ip = if host_text == "localhost" {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host_text.parse::<IpAddr>().map_err(|_| {
            ctx.invalid(
                ctx.origin_of(&s.host),
                "server.host",
                &host_text,
                "not an IP address (or \"localhost\"); the API listens on an address, not a name",
            )
        })?
    };
    // 0 asks the OS for a free port (the bound one is logged): for tests and ad-hoc runs.
    let port = ctx.at_least(&s.port, defaults::PORT, 0, "server.port")?;
    let (control_socket, control_socket_source) = match &s.control_socket {
        Some(v) => (v.value.clone(), ControlSocketSource::Configured),
        None => default_control_socket(
            host.runtime_directory.as_deref(),
            host.xdg_runtime_dir.as_deref(),
            host.uid,
        ),
    };
    if control_socket.as_os_str().is_empty() {
        return Err(ctx.invalid(
            ctx.origin_of(&s.control_socket),
            "server.control_socket",
            &control_socket,
            "must not be empty",
        ));
    }
    Ok(ServerSettings {
        host: ip,
        port,
        control_socket,
        control_socket_source,
        max_body_bytes: ctx.at_least(
            &s.max_body_bytes,
            defaults::MAX_BODY_BYTES,
            1,
            "server.max_body_bytes",
        )?,
        request_timeout: Duration::from_secs(ctx.at_least(
            &s.request_timeout_secs,
            defaults::REQUEST_TIMEOUT_SECS,
            1,
            "server.request_timeout_secs",
        )?),
        log_level: match &s.log_level {
            None => None,
            Some(v) => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(&v.value) {
                    return Err(ctx.invalid(
                        ctx.origin(&v.at),
                        "server.log_level",
                        &v.value,
                        format!("not a log filter ({e}); e.g. \"info\", \"debug\", \"gptossd=debug,warn\""),
                    ));
                }
                Some(v.value.clone())
            }
        },
        max_connections: match s.max_connections {
            None => None,
            Some(_) => Some(ctx.at_least(&s.max_connections, 1, 1, "server.max_connections")?),
        },
        response_cache_bytes: get(&s.response_cache_bytes, defaults::RESPONSE_CACHE_BYTES),
    })
}

/// A served model name: not empty, no white space or control characters.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain spaces or control characters")
    } else {
        None
    }
}

fn check_model(
    i: usize,
    raw: &Val<RawModel>,
    host: &Host,
    ctx: &Ctx,
) -> Result<ModelSettings, ConfigError> {
    let m = &raw.value;
    let Some(path_val) = &m.path else {
        return Err(ConfigError::Missing {
            origin: ctx.origin(&raw.at),
            key: format!("models[{i}].path"),
            problem: "every [[models]] entry needs the model directory".into(),
        });
    };
    let path = path_val.value.clone();
    if path.as_os_str().is_empty() {
        return Err(ctx.invalid(
            ctx.origin(&path_val.at),
            format!("models[{i}].path"),
            &path,
            "must not be empty",
        ));
    }
    let name = match &m.name {
        Some(n) => {
            if let Some(problem) = name_problem(&n.value) {
                return Err(ctx.invalid(
                    ctx.origin(&n.at),
                    format!("models[{i}].name"),
                    &n.value,
                    problem,
                ));
            }
            n.value.clone()
        }
        None => match derived_name(&path).filter(|n| name_problem(n).is_none()) {
            Some(n) => n,
            None => {
                return Err(ctx.invalid(
                    ctx.origin(&path_val.at),
                    format!("models[{i}].path"),
                    &path,
                    "no served name can be derived from this path: set `name`",
                ))
            }
        },
    };
    let key = |k: &str| format!("models.{name}.{k}");

    let size = match m.size.as_ref().map(|v| v.value.as_str()) {
        None | Some("auto") => SizeSetting::Auto,
        Some("20b") => SizeSetting::Fixed(ModelSize::B20),
        Some("120b") => SizeSetting::Fixed(ModelSize::B120),
        Some(other) => {
            return Err(ctx.invalid(
                ctx.origin_of(&m.size),
                key("size"),
                other,
                "expected \"20b\", \"120b\" or \"auto\"",
            ))
        }
    };

    for (k, list_len, origin) in [
        (
            "devices",
            m.devices.as_ref().map(|d| d.value.len()),
            ctx.origin_of(&m.devices),
        ),
        (
            "layers",
            m.layers.as_ref().map(|l| l.value.len()),
            ctx.origin_of(&m.layers),
        ),
    ] {
        if list_len == Some(0) {
            return Err(ctx.invalid(
                origin,
                key(k),
                Vec::<String>::new(),
                "is empty: give one entry per stage",
            ));
        }
    }
    let StageCount {
        stages,
        origin: stages_origin,
        reason: stages_reason,
        default_devices,
    } = stage_count(m, host, ctx);
    if stages == 0 {
        return Err(ctx.invalid(stages_origin, key("stages"), 0, "must be at least 1"));
    }
    let per_stage = |k: &str,
                     len: usize,
                     origin: Origin,
                     value: &dyn Debug|
     -> Result<(), ConfigError> {
        if len == stages {
            return Ok(());
        }
        Err(ctx.invalid(
            origin,
            key(k),
            value,
            format!("has {len} entries for {stages} stages (`stages` from {stages_origin}); give one per stage"),
        ))
    };

    let devices = match &m.devices {
        None => default_devices.unwrap_or_else(|| vec![Device::Cpu { cores: None }; stages]),
        Some(list) => {
            let texts: Vec<&str> = list.value.iter().map(|d| d.value.as_str()).collect();
            per_stage("devices", list.value.len(), ctx.origin(&list.at), &texts)?;
            list.value
                .iter()
                .enumerate()
                .map(|(j, d)| {
                    d.value.parse::<Device>().map_err(|e| {
                        ctx.invalid(
                            ctx.origin(&d.at),
                            format!("models.{name}.devices[{j}]"),
                            &d.value,
                            e.to_string(),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };

    let layers = match &m.layers {
        None => None,
        Some(l) => {
            per_stage("layers", l.value.len(), ctx.origin(&l.at), &l.value)?;
            if let Some(stage) = l.value.iter().position(|&n| n == 0) {
                return Err(ctx.invalid(
                    ctx.origin(&l.at),
                    key("layers"),
                    &l.value,
                    format!("stage {stage} has 0 layers; every stage needs at least one"),
                ));
            }
            Some(l.value.clone())
        }
    };

    // Every core per stage: one sequence's step visits the stages one after another, and idle
    // stage threads sleep; measured on the bench preset with 4 stages on 2 cores, batch-1
    // decode ran at 14.9 tok/s with 2 threads per stage against 8.7 with 1. A stage pinned to
    // a core set gets no more threads than it has cores.
    let pinned = devices
        .iter()
        .filter_map(|d| match d {
            Device::Cpu { cores: Some(set) } => Some(set.len()),
            _ => None,
        })
        .min();
    let threads_per_stage = ctx.at_least(
        &m.threads_per_stage,
        pinned.unwrap_or(host.cores).max(1),
        1,
        &key("threads_per_stage"),
    )?;
    let block_size = ctx.at_least(&m.block_size, defaults::BLOCK_SIZE, 1, &key("block_size"))?;
    let kv_blocks = match (&m.kv_blocks, &m.kv_cache_tokens) {
        (Some(b), Some(_)) => {
            return Err(ctx.invalid(
                ctx.origin(&b.at),
                key("kv_blocks"),
                b.value,
                "set either kv_blocks or kv_cache_tokens, not both",
            ))
        }
        (Some(_), None) => ctx.at_least(&m.kv_blocks, 1, 1, &key("kv_blocks"))?,
        (None, _) => ctx
            .at_least(
                &m.kv_cache_tokens,
                defaults::KV_CACHE_TOKENS,
                1,
                &key("kv_cache_tokens"),
            )?
            .div_ceil(block_size),
    };

    Ok(ModelSettings {
        name,
        path,
        size,
        stages,
        devices,
        layers,
        threads_per_stage,
        kv_blocks,
        block_size,
        provenance: ModelProvenance {
            stages: stages_origin,
            layers: m.layers.as_ref().map(|l| ctx.origin(&l.at)),
            stages_reason,
        },
    })
}

/// A model's stage count, where it came from, the sentence saying so for the start-up log, and
/// the devices when the machine's default layout chose them.
struct StageCount {
    stages: usize,
    origin: Origin,
    reason: String,
    default_devices: Option<Vec<Device>>,
}

/// `stages` (from the file or `--stages`), else the length of `devices`, else of `layers`, else
/// the machine's default layout ([`default_layout`]).
fn stage_count(m: &RawModel, host: &Host, ctx: &Ctx) -> StageCount {
    let given = |stages: usize, at: &At, reason: String| StageCount {
        stages,
        origin: ctx.origin(at),
        reason,
        default_devices: None,
    };
    let one_per_entry = |n: usize, list: &str, at: &At| {
        let reason = format!(
            "{}: one per entry of `{list}` ({})",
            stages_phrase(n),
            ctx.origin(at)
        );
        given(n, at, reason)
    };
    match (&m.stages, &m.devices, &m.layers) {
        (Some(s), _, _) => {
            let from = match &s.at {
                At::Flag(flag) => flag.to_string(),
                At::Span(_) => format!("`stages` ({})", ctx.origin(&s.at)),
            };
            given(
                s.value,
                &s.at,
                format!("{}: from {from}", stages_phrase(s.value)),
            )
        }
        (None, Some(d), _) => one_per_entry(d.value.len(), "devices", &d.at),
        (None, None, Some(l)) => one_per_entry(l.value.len(), "layers", &l.at),
        (None, None, None) => {
            let layout = default_layout(host);
            StageCount {
                stages: layout.devices.len(),
                origin: ctx.default_origin(),
                reason: layout.reason,
                default_devices: Some(layout.devices),
            }
        }
    }
}

/// The layer-count checks of [`ModelSettings::check_layers`]; the explicit split when the
/// model has `layers`.
pub(super) fn check_layers(
    m: &ModelSettings,
    layers: usize,
) -> Result<Option<Vec<Range<usize>>>, ConfigError> {
    if m.stages > layers {
        return Err(ConfigError::Invalid {
            origin: m.provenance.stages.clone(),
            key: format!("models.{}.stages", m.name),
            value: m.stages.to_string(),
            problem: format!(
                "more stages than the model's {layers} layers (every stage needs a layer)"
            ),
        });
    }
    let Some(counts) = &m.layers else {
        return Ok(None);
    };
    explicit_split(counts, layers)
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            origin: m
                .provenance
                .layers
                .clone()
                .unwrap_or(Origin::Default { file: None }),
            key: format!("models.{}.layers", m.name),
            value: format!("{counts:?}"),
            problem: e.to_string(),
        })
}

fn check_profile(
    p: ProfileName,
    raw: &RawProfile,
    models: &[&str],
    ctx: &Ctx,
) -> Result<ProfileSettings, ConfigError> {
    let (max_batch, window_ms, max_new_tokens, effort, ttft_p95_ms, cache, ceiling_secs) = match p {
        ProfileName::LatencyFirst => (32, 4, 512, ReasoningEffort::Low, 1_000, true, 600),
        ProfileName::Balanced => (48, 6, 1024, ReasoningEffort::Medium, 2_000, false, 600),
        ProfileName::QualityFirst => (8, 12, 2048, ReasoningEffort::High, 5_000, false, 1_800),
    };
    let key = |k: &str| format!("profiles.{p}.{k}");
    let model_ref = |v: &Option<Val<String>>, k: &str| -> Result<Option<String>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        if !models.contains(&v.value.as_str()) {
            return Err(ctx.invalid(
                ctx.origin(&v.at),
                key(k),
                &v.value,
                format!(
                    "no [[models]] entry is served under this name (configured: {})",
                    models.join(", ")
                ),
            ));
        }
        Ok(Some(v.value.clone()))
    };
    let model = model_ref(&raw.model, "model")?;
    let fallback = model_ref(&raw.fallback, "fallback")?;
    if fallback.is_some() && fallback == model {
        return Err(ctx.invalid(
            ctx.origin_of(&raw.fallback),
            key("fallback"),
            fallback.unwrap_or_default(),
            "is the profile's own `model`; a fallback must be another model",
        ));
    }
    let reasoning_effort = match raw.reasoning_effort.as_ref().map(|v| v.value.as_str()) {
        None => effort,
        Some("low") => ReasoningEffort::Low,
        Some("medium") => ReasoningEffort::Medium,
        Some("high") => ReasoningEffort::High,
        Some(other) => {
            return Err(ctx.invalid(
                ctx.origin_of(&raw.reasoning_effort),
                key("reasoning_effort"),
                other,
                "expected \"low\", \"medium\" or \"high\"",
            ))
        }
    };
    Ok(ProfileSettings {
        model,
        fallback,
        max_batch: ctx.at_least(&raw.max_batch, max_batch, 1, &key("max_batch"))?,
        prefill_window: Duration::from_millis(get(&raw.prefill_window_ms, window_ms)),
        max_new_tokens: ctx.at_least(
            &raw.max_new_tokens,
            max_new_tokens,
            1,
            &key("max_new_tokens"),
        )?,
        reasoning_effort,
        response_cache: get(&raw.response_cache, cache),
        timeout: check_timeout(raw, ceiling_secs, &key, ctx)?,
        slo: check_slo(&raw.slo, ttft_p95_ms, &key, ctx)?,
    })
}

/// One profile's timeout: a ceiling ≥ 1 s, a finite slack ≥ 1 (less would cut requests that
/// merely run at the profile's usual pace).
fn check_timeout(
    raw: &RawProfile,
    ceiling_secs: u64,
    key: &dyn Fn(&str) -> String,
    ctx: &Ctx,
) -> Result<TimeoutSettings, ConfigError> {
    let ceiling = ctx.at_least(
        &raw.timeout_ceiling_secs,
        ceiling_secs,
        1,
        &key("timeout_ceiling_secs"),
    )?;
    let slack = get(&raw.timeout_slack, defaults::TIMEOUT_SLACK);
    if !(slack.is_finite() && slack >= 1.0) {
        return Err(ctx.invalid(
            ctx.origin_of(&raw.timeout_slack),
            key("timeout_slack"),
            slack,
            "must be a finite number at least 1 (the margin on the observed time per token)",
        ));
    }
    let ms = |v: &Option<Val<u64>>, default: u64| Duration::from_millis(get(v, default));
    Ok(TimeoutSettings {
        ceiling: Duration::from_secs(ceiling),
        queue_budget: ms(
            &raw.timeout_queue_budget_ms,
            defaults::TIMEOUT_QUEUE_BUDGET_MS,
        ),
        ttft_budget: ms(
            &raw.timeout_ttft_budget_ms,
            defaults::TIMEOUT_TTFT_BUDGET_MS,
        ),
        slack,
    })
}

/// One profile's SLO thresholds: latencies ≥ 1 ms, an error rate in (0, 1].
fn check_slo(
    raw: &RawSlo,
    ttft_p95_ms: u64,
    key: &dyn Fn(&str) -> String,
    ctx: &Ctx,
) -> Result<SloThresholds, ConfigError> {
    let ttft = ctx.at_least(&raw.ttft_p95_ms, ttft_p95_ms, 1, &key("slo.ttft_p95_ms"))?;
    let e2e = ctx.at_least(
        &raw.e2e_p95_ms,
        defaults::SLO_E2E_P95_MS,
        1,
        &key("slo.e2e_p95_ms"),
    )?;
    let error_rate = get(&raw.error_rate, defaults::SLO_ERROR_RATE);
    if !(error_rate > 0.0 && error_rate <= 1.0) {
        return Err(ctx.invalid(
            ctx.origin_of(&raw.error_rate),
            key("slo.error_rate"),
            error_rate,
            "must be a fraction in (0, 1], e.g. 0.01 for 1 %",
        ));
    }
    Ok(SloThresholds {
        ttft_p95: Duration::from_millis(ttft),
        e2e_p95: Duration::from_millis(e2e),
        error_rate,
    })
}

fn check_scheduler(s: &RawScheduler, ctx: &Ctx) -> Result<SchedulerSettings, ConfigError> {
    let default_profile = match &s.default_profile {
        None => defaults::DEFAULT_PROFILE,
        Some(v) => v.value.parse().map_err(|_| {
            ctx.invalid(
                ctx.origin(&v.at),
                "scheduler.default_profile",
                &v.value,
                "not a profile (expected latency_first, balanced or quality_first)",
            )
        })?,
    };
    let max_in_flight = match &s.max_in_flight {
        None => None,
        Some(_) => Some(ctx.at_least(&s.max_in_flight, 1, 1, "scheduler.max_in_flight")?),
    };
    Ok(SchedulerSettings {
        default_profile,
        auto_profile: get(&s.auto_profile, defaults::AUTO_PROFILE),
        max_waiting: ctx.at_least(
            &s.max_waiting,
            defaults::MAX_WAITING,
            1,
            "scheduler.max_waiting",
        )?,
        max_tokens_per_step: ctx.within(
            &s.max_tokens_per_step,
            defaults::MAX_TOKENS_PER_STEP,
            [1, MAX_TOKENS_PER_STEP_CEILING],
            "scheduler.max_tokens_per_step",
            "a CUDA stage launches its expert kernels over token x expert pairs, at most 65535",
        )?,
        max_in_flight,
    })
}

fn check_workers(w: &RawWorkers, ctx: &Ctx) -> Result<WorkerSettings, ConfigError> {
    let ms = |v: &Option<Val<u64>>, default: u64, k: &str| -> Result<u64, ConfigError> {
        ctx.at_least(v, default, 1, &format!("workers.{k}"))
    };
    let interval = ms(
        &w.heartbeat_interval_ms,
        defaults::HEARTBEAT_INTERVAL_MS,
        "heartbeat_interval_ms",
    )?;
    let timeout = ms(
        &w.heartbeat_timeout_ms,
        defaults::HEARTBEAT_TIMEOUT_MS,
        "heartbeat_timeout_ms",
    )?;
    if timeout <= interval {
        return Err(ctx.invalid(
            ctx.origin_of(&w.heartbeat_timeout_ms),
            "workers.heartbeat_timeout_ms",
            timeout,
            format!("must be more than workers.heartbeat_interval_ms ({interval})"),
        ));
    }
    let backoff_initial = ms(
        &w.restart_backoff_initial_ms,
        defaults::RESTART_BACKOFF_INITIAL_MS,
        "restart_backoff_initial_ms",
    )?;
    let backoff_max = ms(
        &w.restart_backoff_max_ms,
        defaults::RESTART_BACKOFF_MAX_MS,
        "restart_backoff_max_ms",
    )?;
    if backoff_max < backoff_initial {
        return Err(ctx.invalid(
            ctx.origin_of(&w.restart_backoff_max_ms),
            "workers.restart_backoff_max_ms",
            backoff_max,
            format!("must be at least workers.restart_backoff_initial_ms ({backoff_initial})"),
        ));
    }
    Ok(WorkerSettings {
        heartbeat_interval: Duration::from_millis(interval),
        heartbeat_timeout: Duration::from_millis(timeout),
        step_deadline: Duration::from_millis(ms(
            &w.step_deadline_ms,
            defaults::STEP_DEADLINE_MS,
            "step_deadline_ms",
        )?),
        restart_backoff_initial: Duration::from_millis(backoff_initial),
        restart_backoff_max: Duration::from_millis(backoff_max),
        crash_loop_limit: ctx.at_least(
            &w.crash_loop_limit,
            defaults::CRASH_LOOP_LIMIT,
            1,
            "workers.crash_loop_limit",
        )?,
        crash_loop_window: Duration::from_secs(ctx.at_least(
            &w.crash_loop_window_secs,
            defaults::CRASH_LOOP_WINDOW_SECS,
            1,
            "workers.crash_loop_window_secs",
        )?),
        drain_grace: Duration::from_secs(get(&w.drain_grace_secs, defaults::DRAIN_GRACE_SECS)),
        stderr_tail_lines: get(&w.stderr_tail_lines, defaults::STDERR_TAIL_LINES),
    })
}
