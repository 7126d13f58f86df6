//! Command-line overrides applied to the raw file before it is checked, so that an override is
//! checked like a value in the file and its errors name the flag.

use std::path::Path;

use super::raw::{RawFile, RawModel, Val};
use super::{ConfigError, Origin, Overrides};

/// The name a raw model is served under: `name`, else the last component of `path`.
fn effective_name(m: &RawModel) -> Option<String> {
    match (&m.name, &m.path) {
        (Some(n), _) => Some(n.value.clone()),
        (None, Some(p)) => derived_name(&p.value),
        (None, None) => None,
    }
}

pub(super) fn derived_name(path: &Path) -> Option<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
}

pub(super) fn apply_overrides(raw: &mut RawFile, ov: &Overrides) -> Result<(), ConfigError> {
    if let Some(port) = ov.port {
        raw.server.port = Some(Val::flag(port, "--port"));
    }
    let target = match (&ov.model, &ov.served_model_name, raw.models.len()) {
        (None, None, _) => None,
        (Some(path), name, 0) => {
            raw.models.push(Val::flag(
                RawModel {
                    path: Some(Val::flag(path.clone(), "--model")),
                    name: name.clone().map(|n| Val::flag(n, "--served-model-name")),
                    ..RawModel::default()
                },
                "--model",
            ));
            None
        }
        // Only a name and no model: the "no model configured" check says what to do.
        (None, Some(_), 0) => None,
        (_, _, 1) => Some(0),
        (model, name, n) => {
            let names: Vec<String> = raw
                .models
                .iter()
                .filter_map(|m| effective_name(&m.value))
                .collect();
            let flag = if model.is_some() {
                "--model"
            } else {
                "--served-model-name"
            };
            let found = match (model, name) {
                (Some(_), Some(name)) => raw
                    .models
                    .iter()
                    .position(|m| effective_name(&m.value).as_ref() == Some(name)),
                _ => None,
            };
            match found {
                Some(i) => Some(i),
                None => {
                    return Err(ConfigError::Invalid {
                        origin: Origin::Flag(flag),
                        key: "models".into(),
                        value: format!("{names:?}"),
                        problem: format!(
                            "{n} models are configured: with --model, name the one to replace \
                             with --served-model-name (one of them)"
                        ),
                    })
                }
            }
        }
    };
    if let Some(i) = target {
        let model = &mut raw.models[i].value;
        let old = effective_name(model);
        if let Some(path) = &ov.model {
            model.path = Some(Val::flag(path.clone(), "--model"));
        }
        if let Some(name) = &ov.served_model_name {
            model.name = Some(Val::flag(name.clone(), "--served-model-name"));
        }
        let new = effective_name(model);
        if let (Some(old), Some(new)) = (old, new) {
            if old != new {
                for p in [
                    &mut raw.profiles.latency_first,
                    &mut raw.profiles.balanced,
                    &mut raw.profiles.quality_first,
                ] {
                    for v in [&mut p.model, &mut p.fallback].into_iter().flatten() {
                        if v.value == old {
                            v.value = new.clone();
                        }
                    }
                }
            }
        }
    }
    for m in &mut raw.models {
        if let Some(stages) = ov.stages {
            m.value.stages = Some(Val::flag(stages, "--stages"));
        }
        if let Some(threads) = ov.threads_per_stage {
            m.value.threads_per_stage = Some(Val::flag(threads, "--threads"));
        }
        if let Some(tokens) = ov.kv_cache_tokens {
            m.value.kv_cache_tokens = Some(Val::flag(tokens, "--kv-cache-tokens"));
        }
        if let Some(devices) = &ov.devices {
            let list = devices
                .iter()
                .map(|d| Val::flag(d.clone(), "--devices"))
                .collect();
            m.value.devices = Some(Val::flag(list, "--devices"));
        }
    }
    if let Some(n) = ov.max_waiting {
        raw.scheduler.max_waiting = Some(Val::flag(n, "--max-waiting"));
    }
    Ok(())
}
