//! What every request handler shares: the configuration, the loaded models and their
//! pipelines, the default profile (switchable at run time), metrics, and the registry of
//! running requests (for the cancel endpoint).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use crate::chat::tokenizer::Tokenizer;
use crate::config::{Config, ModelSize, ProfileName, ProfileSettings};
use crate::metrics::Metrics;
use crate::pipeline::PipelineHandle;
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
    pub backend: String,
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

    /// Ready to serve (loaded, not unhealthy, not draining).
    pub fn serving(&self) -> bool {
        let s = self.pipeline.status();
        s.ready && s.unhealthy.is_none()
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
    pub settings: &'a ProfileSettings,
    pub model: &'a ModelEntry,
    /// The profile's primary model was not usable and its fallback serves.
    pub fallback: bool,
}

/// The daemon's shared state.
pub struct AppState {
    pub config: Config,
    pub models: Vec<ModelEntry>,
    pub default_profile: RwLock<ProfileName>,
    pub metrics: Metrics,
    pub tokenizer: Tokenizer,
    pub draining: AtomicBool,
    pub started: Instant,
    next_request: AtomicU64,
    /// Running requests by response id: which model, which sequence.
    active: Mutex<HashMap<String, (usize, SeqId)>>,
}

impl AppState {
    pub fn new(config: Config, models: Vec<ModelEntry>) -> Self {
        let default_profile = config.scheduler().default_profile;
        Self {
            config,
            models,
            default_profile: RwLock::new(default_profile),
            metrics: Metrics::new(),
            tokenizer: Tokenizer::get(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            next_request: AtomicU64::new(1),
            active: Mutex::new(HashMap::new()),
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
        let s = self.config.profile(profile);
        for m in &self.models {
            m.pipeline.set_batching(s.max_batch, s.prefill_window);
        }
    }

    /// A fresh response id with `prefix` (`chatcmpl`, `cmpl`).
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self.next_request.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{:08x}", std::process::id(), n)
    }

    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.name == name)
    }

    fn entry(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The model for `profile`: its primary when usable, else its fallback (flagged).
    pub fn route(&self, profile: ProfileName) -> Option<Route<'_>> {
        let models = self.config.profile_models(profile, |m| {
            self.entry(&m.name).map_or(ModelSize::B20, |e| e.size)
        });
        let settings = self.config.profile(profile);
        let primary = self.entry(&models.primary.name);
        // quality_first wants 120b: a 20b primary (no 120b configured) counts as a fallback.
        let wants_120 = profile == ProfileName::QualityFirst;
        match primary {
            Some(p) if p.usable() => Some(Route {
                profile,
                settings,
                model: p,
                fallback: wants_120 && p.size != ModelSize::B120,
            }),
            _ => {
                let fb = models
                    .fallback
                    .and_then(|f| self.entry(&f.name))
                    .filter(|f| f.usable());
                match (fb, primary) {
                    (Some(f), _) => Some(Route {
                        profile,
                        settings,
                        model: f,
                        fallback: true,
                    }),
                    (None, Some(p)) => Some(Route {
                        profile,
                        settings,
                        model: p,
                        fallback: false,
                    }),
                    (None, None) => None,
                }
            }
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
