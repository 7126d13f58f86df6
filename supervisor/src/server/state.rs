//! What every request handler shares: the configuration, the loaded models and their
//! pipelines, the default profile (switchable at run time), metrics, the registry of
//! running requests (for the cancel endpoint), the response cache and each profile's pace (for
//! its requests' deadlines).
//!
//! Routing a request to a model is the configuration's rule ([`Config::route`]); this file only
//! describes the loaded models to it and resolves the answer into a [`Route`], or a typed
//! [`RouteError`] when nothing can serve the request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::api::{ApiError, ErrorCase};
use crate::chat::tokenizer::Tokenizer;
use crate::config::{Config, LoadedModel, ModelSize, ProfileName, ProfileSettings};
use crate::deadline::Paces;
use crate::metrics::Metrics;
use crate::pipeline::PipelineHandle;
use crate::response_cache::ResponseCache;
use crate::scheduler::SeqId;

/// The engine name in metrics and response metadata.
pub const ENGINE: &str = "gptossd-pipeline";

/// One loaded model.
pub struct ModelEntry {
    pub name: String,
    pub size: ModelSize,
    pub pipeline: PipelineHandle,
    /// Most tokens (prompt + generated) of one sequence.
    pub context: usize,
    pub vocab: usize,
    pub stages: usize,
    /// The tiny random test model made because none was configured.
    pub test_model: bool,
}

impl ModelEntry {
    /// `pipeline` with several stages, `single` with one.
    pub fn gpu_mode(&self) -> &'static str {
        if self.stages > 1 {
            "pipeline"
        } else {
            "single"
        }
    }

    /// `cpu`, `cuda` or `cuda+cpu`: what its stages compute on (as they reported when they
    /// loaded; before that, as configured).
    pub fn backend(&self) -> &'static str {
        self.pipeline.status().backend()
    }

    /// Loaded and not unhealthy (some stage may be restarting: requests wait for it).
    pub fn usable(&self) -> bool {
        let s = self.pipeline.status();
        s.started && s.unhealthy.is_none()
    }
}

/// Where a request goes.
pub struct Route<'a> {
    pub profile: ProfileName,
    /// The profile's settings when the request was routed (a reload does not change them
    /// under a running request).
    pub settings: ProfileSettings,
    pub model: &'a ModelEntry,
    /// The model's position in [`AppState::models`].
    pub index: usize,
    /// Not the model the profile wants: its primary was not usable and its fallback serves,
    /// or `quality_first` runs on something other than a 120b.
    pub fallback: bool,
}

/// Why a request has no model to run on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Neither the profile's model nor its fallback is loaded.
    #[error("no model can serve profile {0}")]
    NoModel(ProfileName),
    /// The request's `model` is not one of the loaded models.
    #[error("model {name:?} is not served (available: {})", available.join(", "))]
    ModelNotFound {
        name: String,
        available: Vec<String>,
    },
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NoModel(_) => ApiError::new(ErrorCase::Unavailable, e.to_string()),
            RouteError::ModelNotFound { name, available } => {
                let available: Vec<&str> = available.iter().map(String::as_str).collect();
                ApiError::model_not_found(&name, &available)
            }
        }
    }
}

/// The daemon's shared state.
pub struct AppState {
    /// The configuration in force; a reload swaps it ([`AppState::replace_config`]).
    config: RwLock<Arc<Config>>,
    pub models: Vec<ModelEntry>,
    pub default_profile: RwLock<ProfileName>,
    pub metrics: Metrics,
    pub tokenizer: Tokenizer,
    pub draining: AtomicBool,
    pub started: Instant,
    /// Where the configuration came from, for a reload.
    pub source: super::reload::ConfigSource,
    next_request: AtomicU64,
    /// Running requests by response id: which model, which sequence.
    active: Mutex<HashMap<String, (usize, SeqId)>>,
    /// Answers of fully determined requests, shared by every model and profile.
    pub response_cache: Mutex<ResponseCache>,
    /// Each profile's observed time per output token.
    pub paces: Paces,
}

impl AppState {
    pub fn new(
        config: Config,
        source: super::reload::ConfigSource,
        models: Vec<ModelEntry>,
    ) -> Self {
        let default_profile = config.scheduler().default_profile;
        let metrics = Metrics::new();
        metrics.set_slo(&config);
        crate::logging::set_level(config.server().log_level.as_deref());
        let response_cache = Mutex::new(ResponseCache::new(config.server().response_cache_bytes));
        Self {
            config: RwLock::new(Arc::new(config)),
            models,
            default_profile: RwLock::new(default_profile),
            metrics,
            tokenizer: Tokenizer::get(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            source,
            next_request: AtomicU64::new(1),
            active: Mutex::new(HashMap::new()),
            response_cache,
            paces: Paces::default(),
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a reloaded configuration in force; returns the one it replaces.
    pub fn replace_config(&self, new: Config) -> Arc<Config> {
        let new = Arc::new(new);
        match self.config.write() {
            Ok(mut c) => std::mem::replace(&mut *c, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    pub fn default_profile(&self) -> ProfileName {
        self.default_profile
            .read()
            .map(|p| *p)
            .unwrap_or(ProfileName::Balanced)
    }

    /// Switches the default profile; the batching limits of the new profile apply to every
    /// model's scheduler from its next step.
    pub fn set_default_profile(&self, profile: ProfileName) {
        if let Ok(mut p) = self.default_profile.write() {
            *p = profile;
        }
        let config = self.config();
        let s = config.profile(profile);
        for m in &self.models {
            m.pipeline.set_batching(s.max_batch, s.prefill_window);
        }
    }

    /// A fresh response id with `prefix` (`chatcmpl`, `cmpl`).
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self.next_request.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{:08x}", std::process::id(), n)
    }

    /// The model for `profile` now: its primary when usable, else its fallback (flagged); see
    /// [`Config::route`].
    pub fn route(&self, profile: ProfileName) -> Option<Route<'_>> {
        let loaded: Vec<LoadedModel<'_>> = self
            .models
            .iter()
            .map(|m| LoadedModel {
                name: &m.name,
                size: m.size,
                usable: m.usable(),
            })
            .collect();
        let config = self.config();
        let choice = config.route(profile, &loaded)?;
        let model = self.models.get(choice.index)?;
        Some(Route {
            profile,
            settings: config.profile(profile).clone(),
            model,
            index: choice.index,
            fallback: choice.fallback,
        })
    }

    /// The route of a request on `profile` that may name a `model`: the profile's route, or the
    /// named model (with the profile's settings, never flagged as a fallback).
    pub fn route_request(
        &self,
        profile: ProfileName,
        model: Option<&str>,
    ) -> Result<Route<'_>, RouteError> {
        let route = self.route(profile).ok_or(RouteError::NoModel(profile))?;
        let Some(name) = model.filter(|&name| name != route.model.name) else {
            return Ok(route);
        };
        match self.models.iter().position(|m| m.name == name) {
            Some(index) => Ok(Route {
                model: &self.models[index],
                index,
                fallback: false,
                ..route
            }),
            None => Err(RouteError::ModelNotFound {
                name: name.to_owned(),
                available: self.models.iter().map(|m| m.name.clone()).collect(),
            }),
        }
    }

    pub fn register(&self, id: &str, model: usize, seq: SeqId) {
        if let Ok(mut a) = self.active.lock() {
            a.insert(id.to_string(), (model, seq));
        }
    }

    pub fn unregister(&self, id: &str) {
        if let Ok(mut a) = self.active.lock() {
            a.remove(id);
        }
    }

    /// Cancels a running request by id; false if no such request runs.
    pub fn cancel(&self, id: &str) -> bool {
        let found = self.active.lock().ok().and_then(|a| a.get(id).copied());
        match found {
            Some((model, seq)) => {
                if let Some(m) = self.models.get(model) {
                    m.pipeline.cancel(seq);
                }
                true
            }
            None => false,
        }
    }

    pub fn running_requests(&self) -> usize {
        self.active.lock().map(|a| a.len()).unwrap_or(0)
    }
}
