//! Profile routing, beside the configuration it reads: which profile a request runs on, which
//! configured models serve a profile, and which loaded model takes its requests right now.
//!
//! # The rules
//!
//! - **A request's profile** ([`Config::choose_profile`]): the one the request names (its body,
//!   else its `x-gptossd-profile` header: the server reads both); else, with
//!   `scheduler.auto_profile`, one chosen from the request's shape ([`profile_for_shape`]); else
//!   the run-time default profile (`scheduler.default_profile` until the control socket switches
//!   it).
//! - **A profile's models** ([`Config::profile_models`]): a primary and at most one fallback,
//!   from the configuration alone.
//! - **The model now** ([`Config::route`]): the primary when it is usable; else the fallback
//!   when it is usable (flagged as a fallback); else the primary as it is (its requests then
//!   wait for it, or are refused by its pipeline with the reason). `quality_first` asks for a
//!   120b: served by anything else it is flagged as a fallback too.
//!
//! # Invariants
//!
//! Routing never picks a model that is not loaded, and a flagged fallback is exactly a request
//! served by another model than the one its profile wants. Nothing here reads a clock, a socket
//! or a pipeline: the server describes each loaded model as a [`LoadedModel`] and gets back an
//! index into its own list, so these rules are plain functions with plain tests.

use super::{Config, ModelSettings, ModelSize, ProfileName};

/// `auto_profile`: a prompt longer than this (tokens) runs on `quality_first`.
pub const AUTO_LONG_PROMPT_TOKENS: usize = 2048;
/// `auto_profile`: an answer allowed more than this (`max_tokens`) runs on `quality_first`.
pub const AUTO_LONG_ANSWER_TOKENS: usize = 1024;
/// `auto_profile`: a prompt and an answer both at most this long run on `latency_first`.
pub const AUTO_SHORT_TOKENS: usize = 256;
/// `auto_profile`: the answer length assumed when a request gives no `max_tokens`.
pub const AUTO_ASSUMED_MAX_TOKENS: usize = 256;

/// The profile `auto_profile` gives a request of `prompt_tokens` tokens asking for at most
/// `max_tokens`: a long prompt (> [`AUTO_LONG_PROMPT_TOKENS`]) or a long answer
/// (> [`AUTO_LONG_ANSWER_TOKENS`]) → `quality_first`; both short (≤ [`AUTO_SHORT_TOKENS`]) →
/// `latency_first`; anything between → `balanced`.
pub fn profile_for_shape(prompt_tokens: usize, max_tokens: Option<usize>) -> ProfileName {
    let answer = max_tokens.unwrap_or(AUTO_ASSUMED_MAX_TOKENS);
    if prompt_tokens > AUTO_LONG_PROMPT_TOKENS || answer > AUTO_LONG_ANSWER_TOKENS {
        ProfileName::QualityFirst
    } else if prompt_tokens <= AUTO_SHORT_TOKENS && answer <= AUTO_SHORT_TOKENS {
        ProfileName::LatencyFirst
    } else {
        ProfileName::Balanced
    }
}

/// The models a profile runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileModels<'a> {
    pub primary: &'a ModelSettings,
    /// Used when the primary is not loaded or unhealthy.
    pub fallback: Option<&'a ModelSettings>,
}

/// A loaded model as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedModel<'a> {
    /// Its served name (a configured model's `name`).
    pub name: &'a str,
    /// Its size as loaded (what its `config.json` says for `size = "auto"`).
    pub size: ModelSize,
    /// It can take requests now or soon: loaded once and not unhealthy (a stage may be
    /// restarting; requests wait for it).
    pub usable: bool,
}

/// The loaded model a profile's requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelChoice {
    /// Its position in the list given to [`Config::route`].
    pub index: usize,
    /// It is not the model the profile wants: the primary was not usable, or `quality_first`
    /// runs on something other than a 120b.
    pub fallback: bool,
}

impl Config {
    /// The profile of a request: `named` (from its body or header), else with
    /// `scheduler.auto_profile` the one for its shape ([`profile_for_shape`]; `prompt_tokens` is
    /// only called then), else `default`, the run-time default profile.
    pub fn choose_profile(
        &self,
        named: Option<ProfileName>,
        default: ProfileName,
        max_tokens: Option<usize>,
        prompt_tokens: impl FnOnce() -> usize,
    ) -> ProfileName {
        match named {
            Some(profile) => profile,
            None if self.scheduler.auto_profile => profile_for_shape(prompt_tokens(), max_tokens),
            None => default,
        }
    }

    /// Which models serve `profile`. `size_of` gives each model's size: its `size` setting, or
    /// for `auto` what its `config.json` says ([`ModelSettings::resolve_size`]).
    ///
    /// The primary model is the profile's `model`, else the first model of the profile's
    /// preferred size ([`ProfileName::preferred_size`]), else the first model standing in for
    /// that size ([`ModelSize::serves_as`]: a test model for the 20b), else the first model.
    /// The fallback is the profile's `fallback`, else for `quality_first` the first 20b model
    /// (or stand-in) other than the primary; never the primary itself.
    pub fn profile_models(
        &self,
        profile: ProfileName,
        size_of: impl Fn(&ModelSettings) -> ModelSize,
    ) -> ProfileModels<'_> {
        let settings = self.profiles.get(profile);
        let of_size = |size: ModelSize, except: Option<&str>| {
            let others = || {
                self.models
                    .iter()
                    .filter(move |m| Some(m.name.as_str()) != except)
            };
            others()
                .find(|m| size_of(m) == size)
                .or_else(|| others().find(|m| size_of(m).serves_as() == size))
        };
        let primary = settings
            .model
            .as_deref()
            .and_then(|n| self.model(n))
            .or_else(|| of_size(profile.preferred_size(), None))
            .unwrap_or(&self.models[0]);
        let fallback = match settings.fallback.as_deref() {
            Some(n) => self.model(n),
            None if profile == ProfileName::QualityFirst => {
                of_size(ModelSize::B20, Some(&primary.name))
            }
            None => None,
        }
        .filter(|f| f.name != primary.name);
        ProfileModels { primary, fallback }
    }

    /// The loaded model that takes `profile`'s requests now (see the module doc), or `None`
    /// when neither its primary nor its fallback is loaded. `loaded` lists the server's models;
    /// a configured model missing from it counts by its `size` setting.
    pub fn route(&self, profile: ProfileName, loaded: &[LoadedModel<'_>]) -> Option<ModelChoice> {
        let find = |name: &str| loaded.iter().position(|m| m.name == name);
        let models = self.profile_models(profile, |m| {
            find(&m.name).map_or(ModelSize::B20, |i| loaded[i].size)
        });
        let primary = find(&models.primary.name);
        let usable = |i: &usize| loaded[*i].usable;
        // quality_first wants 120b: a smaller primary (no 120b configured) counts as a fallback.
        let wants_120 = profile == ProfileName::QualityFirst;
        if let Some(p) = primary.filter(usable) {
            return Some(ModelChoice {
                index: p,
                fallback: wants_120 && loaded[p].size != ModelSize::B120,
            });
        }
        let fallback = models.fallback.and_then(|f| find(&f.name)).filter(usable);
        match (fallback, primary) {
            (Some(f), _) => Some(ModelChoice {
                index: f,
                fallback: true,
            }),
            (None, Some(p)) => Some(ModelChoice {
                index: p,
                fallback: false,
            }),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Overrides;

    fn config(text: &str) -> Config {
        Config::parse(
            text,
            Path::new("/etc/gptossd/gptossd.toml"),
            &Overrides::default(),
        )
        .expect("valid config")
    }

    const BIG_AND_SMALL: &str = "[[models]]\nname = \"big\"\npath = \"/m/b\"\nsize = \"120b\"\n\
        [[models]]\nname = \"small\"\npath = \"/m/s\"\nsize = \"20b\"\n";

    fn loaded(usable: [bool; 2]) -> [LoadedModel<'static>; 2] {
        [
            LoadedModel {
                name: "big",
                size: ModelSize::B120,
                usable: usable[0],
            },
            LoadedModel {
                name: "small",
                size: ModelSize::B20,
                usable: usable[1],
            },
        ]
    }

    fn choice(index: usize, fallback: bool) -> Option<ModelChoice> {
        Some(ModelChoice { index, fallback })
    }

    #[test]
    fn the_shape_rule_has_three_bands() {
        use ProfileName::*;
        assert_eq!(profile_for_shape(3, Some(4)), LatencyFirst);
        assert_eq!(profile_for_shape(256, None), LatencyFirst);
        assert_eq!(profile_for_shape(257, None), Balanced);
        assert_eq!(profile_for_shape(3, Some(257)), Balanced);
        assert_eq!(profile_for_shape(2048, Some(1024)), Balanced);
        assert_eq!(profile_for_shape(2049, Some(4)), QualityFirst);
        assert_eq!(profile_for_shape(3, Some(1025)), QualityFirst);
    }

    #[test]
    fn a_named_profile_wins_and_the_shape_only_counts_with_auto_profile() {
        let fixed = config(BIG_AND_SMALL);
        let never = || -> usize { panic!("the prompt length is not needed without auto_profile") };
        let choose = |c: &Config, named, max_tokens, prompt: usize| {
            c.choose_profile(named, ProfileName::Balanced, max_tokens, || prompt)
        };
        assert_eq!(
            fixed.choose_profile(None, ProfileName::QualityFirst, Some(4), never),
            ProfileName::QualityFirst
        );
        assert_eq!(choose(&fixed, None, Some(4), 3), ProfileName::Balanced);
        let auto = config(&format!(
            "{BIG_AND_SMALL}[scheduler]\nauto_profile = true\n"
        ));
        assert_eq!(choose(&auto, None, Some(4), 3), ProfileName::LatencyFirst);
        assert_eq!(
            choose(&auto, None, Some(1500), 3),
            ProfileName::QualityFirst
        );
        assert_eq!(
            auto.choose_profile(
                Some(ProfileName::Balanced),
                ProfileName::Balanced,
                Some(4),
                never
            ),
            ProfileName::Balanced
        );
    }

    #[test]
    fn a_usable_primary_serves_and_quality_first_falls_back_to_the_20b() {
        let c = config(BIG_AND_SMALL);
        let both = loaded([true, true]);
        assert_eq!(c.route(ProfileName::QualityFirst, &both), choice(0, false));
        assert_eq!(c.route(ProfileName::Balanced, &both), choice(1, false));
        // The 120b is down: quality_first runs on the 20b and says so.
        let small_only = loaded([false, true]);
        assert_eq!(
            c.route(ProfileName::QualityFirst, &small_only),
            choice(1, true)
        );
        // Nothing usable: the primary as it is, not flagged (its pipeline gives the reason).
        let none = loaded([false, false]);
        assert_eq!(c.route(ProfileName::QualityFirst, &none), choice(0, false));
        assert_eq!(c.route(ProfileName::LatencyFirst, &none), choice(1, false));
        // Neither the primary nor the fallback is loaded.
        assert_eq!(c.route(ProfileName::Balanced, &[]), None);
    }

    #[test]
    fn quality_first_on_a_lone_smaller_model_is_a_fallback() {
        let c = config("[[models]]\nname = \"tiny\"\npath = \"/m/t\"\n");
        let tiny = [LoadedModel {
            name: "tiny",
            size: ModelSize::Test,
            usable: true,
        }];
        assert_eq!(c.route(ProfileName::QualityFirst, &tiny), choice(0, true));
        assert_eq!(c.route(ProfileName::Balanced, &tiny), choice(0, false));
    }
}
