//! `POST /v1/chat/completions` and `POST /v1/completions`: read and parse the request
//! (`crate::api`), choose its profile and its model (the configuration's routing rules,
//! [`Config::choose_profile`](crate::config::Config::choose_profile) and
//! [`AppState::route_request`]), render the prompt once, check the length limits, submit, and
//! answer through the endpoint's responder ([`ChatResponder`], [`TextResponder`]), streamed or
//! whole ([`answer`]: one loop for both).
//!
//! A request refused before it runs is answered, counted and access-logged once ([`reject`]):
//! a 4xx as a rejection, a 5xx as a failure, labelled with its model and profile when it got
//! that far. Every answer, a refusal included, carries the request's `x-request-id`.
//!
//! A request whose profile has `response_cache` on and whose output is fully determined gets a
//! [`CacheKey`]; [`Run::start`] answers it from the cache when it can.

mod answer;

use std::sync::Arc;

use bytes::Bytes;
use gptossd_shared::sampling::{SamplingParams, SamplingSpec};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request};

use crate::api::common::sampling_error;
use crate::api::{
    parse_chat, parse_completion, AnswerOptions, ApiError, ChatResponder, ErrorCase, Limits,
    Responder, ResponseIdentity, StreamOptions, TextResponder,
};
use crate::config::ProfileName;
use crate::metrics::{Labels, Rejection, UNKNOWN};
use crate::pipeline::GenRequest;
use crate::response_cache::CacheKey;

use crate::chat::STOP_TOKENS;

use super::generation::{AccessRecord, RequestInfo, Run, Submission};
use super::http::{error, read_body, require_json, HttpResponse};
use super::state::{AppState, Route, RouteError, ENGINE};

/// The request header that names a profile (the body's `profile` field wins).
pub const PROFILE_HEADER: &str = "x-gptossd-profile";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request refused before it ran, with what its metrics labels know of it.
struct Refused<'a> {
    error: ApiError,
    /// The served model it was routed to, when it got that far.
    model: Option<&'a str>,
    /// Its profile, once chosen.
    profile: Option<ProfileName>,
}

impl From<ApiError> for Refused<'_> {
    /// Refused before its profile was chosen.
    fn from(error: ApiError) -> Self {
        Self {
            error,
            model: None,
            profile: None,
        }
    }
}

impl<'a> Refused<'a> {
    /// Refused because nothing can serve `profile`.
    fn unrouted(profile: ProfileName, e: RouteError) -> Self {
        Self {
            error: e.into(),
            model: None,
            profile: Some(profile),
        }
    }

    /// Refused once routed.
    fn routed(route: &Route<'a>, error: ApiError) -> Self {
        Self {
            error,
            model: Some(&route.model.name),
            profile: Some(route.profile),
        }
    }
}

/// Counts a request refused before it ran, logs its access record and answers it: a 4xx as a
/// rejection, a 5xx as a failure ([`ErrorCase::is_rejection`]); an unknown model or profile
/// counts as unknown.
fn reject(state: &AppState, info: &RequestInfo, refused: &Refused<'_>) -> HttpResponse {
    let e = &refused.error;
    let model = refused.model.unwrap_or(UNKNOWN);
    let profile = refused.profile.map_or(UNKNOWN, ProfileName::as_str);
    if e.case.is_rejection() {
        state.metrics.rejected(&Rejection {
            engine: ENGINE.to_string(),
            model: model.to_string(),
            code: e.case.code().to_string(),
        });
    } else {
        let labels = Labels {
            engine: ENGINE.to_string(),
            model: model.to_string(),
            profile: profile.to_string(),
        };
        state.metrics.failed(&labels, e.case.code());
    }
    AccessRecord {
        request_id: &info.id,
        method: "POST",
        route: info.route,
        status: e.status,
        model,
        profile,
        prompt_tokens: None,
        completion_tokens: None,
        ttft: None,
        duration: info.arrival.elapsed(),
        finish_reason: None,
        error: Some(e.case.code()),
        cancelled: false,
        cached: false,
    }
    .log();
    let mut response = error(e);
    if let Ok(id) = HeaderValue::from_str(&info.id) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

/// The headers and body of an API request, or why it is refused (draining, a body that is not
/// JSON, too large or too slow).
async fn read_request(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<(HeaderMap, Bytes), Refused<'static>> {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            ErrorCase::Unavailable,
            "the server is draining and takes no new requests",
        )
        .into());
    }
    require_json(req.headers())?;
    let headers = req.headers().clone();
    let config = state.config();
    let server = config.server();
    let body = read_body(req, server.max_body_bytes, server.request_timeout).await?;
    Ok((headers, body))
}

/// The profile a request names: its body's `profile`, else the [`PROFILE_HEADER`] header.
fn named_profile(
    body: Option<ProfileName>,
    headers: &HeaderMap,
) -> Result<Option<ProfileName>, ApiError> {
    if body.is_some() {
        return Ok(body);
    }
    let Some(value) = headers.get(PROFILE_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    text.parse::<ProfileName>().map(Some).map_err(|_| {
        ApiError::invalid_value(
            PROFILE_HEADER,
            format!("unknown profile {text:?} in the {PROFILE_HEADER} header (expected latency_first, balanced, quality_first)"),
        )
    })
}

fn limits_of(route: &Route<'_>) -> Limits {
    Limits {
        profile_max_new_tokens: route.settings.max_new_tokens,
        context_tokens: route.model.context,
    }
}

/// The request's sampling spec, its seed bound: once, at submission.
fn sampling_spec(params: &SamplingParams) -> Result<SamplingSpec, ApiError> {
    params.spec().map_err(sampling_error)
}

/// The tokens that end generation: harmony's stop tokens, or none with `ignore_eos`.
fn stop_tokens(ignore_eos: bool) -> Vec<u32> {
    if ignore_eos {
        Vec::new()
    } else {
        STOP_TOKENS.to_vec()
    }
}

/// A checked request, ready to submit: what both endpoints have once parsing, routing and the
/// length limits are done.
struct Launch<'a> {
    route: Route<'a>,
    request: GenRequest,
    stream: Option<StreamOptions>,
    options: AnswerOptions,
}

impl Launch<'_> {
    /// Starts the generation (from the response cache when it can) and answers through the
    /// responder `R`: streamed, whole, or an error body if the pipeline refuses it.
    async fn respond<R: Responder>(self, state: &Arc<AppState>, info: RequestInfo) -> HttpResponse {
        let cache_key = if self.route.settings.response_cache {
            CacheKey::new(&self.route.model.name, &self.request, &self.options.stop)
        } else {
            None
        };
        let submission = Submission {
            info: info.clone(),
            request: self.request,
            streamed: self.stream.is_some(),
            cache_key,
        };
        let run = match Run::start(state.clone(), &self.route, submission).await {
            Ok(run) => run,
            Err(e) => return reject(state, &info, &Refused::routed(&self.route, e.into())),
        };
        let identity = ResponseIdentity {
            id: info.id,
            created: unix_now(),
            model: self.route.model.name.clone(),
        };
        let responder = R::new(identity, state.tokenizer, self.options);
        match self.stream {
            Some(options) => answer::stream(run, responder, options.include_usage),
            None => answer::whole(run, responder).await,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Chat

pub async fn chat(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let info = RequestInfo::arriving(&state, "chatcmpl", "/v1/chat/completions");
    let launch = match read_request(&state, req).await {
        Ok((headers, body)) => prepare_chat(&state, &headers, &body),
        Err(refused) => Err(refused),
    };
    match launch {
        Ok(launch) => launch.respond::<ChatResponder>(&state, info).await,
        Err(refused) => reject(&state, &info, &refused),
    }
}

/// Parses, routes and renders a chat request.
///
/// The prompt is rendered once: before routing only when the profile depends on its length
/// (`auto_profile` and no profile named), then kept unless the chosen profile's reasoning
/// effort changes the system message.
fn prepare_chat<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Launch<'a>, Refused<'a>> {
    let today = crate::civil_date(std::time::SystemTime::now());
    let mut parsed = parse_chat(body, &today)?;
    let named = named_profile(parsed.profile(), headers)?;
    let render = |parsed: &crate::api::ValidChatRequest| {
        parsed
            .conversation()
            .render_for_completion(&state.tokenizer)
    };
    let mut rendered = None;
    let profile =
        state
            .config()
            .choose_profile(named, state.default_profile(), parsed.max_tokens(), || {
                rendered.insert(render(&parsed)).len()
            });
    let route = state
        .route_request(profile, parsed.model())
        .map_err(|e| Refused::unrouted(profile, e))?;
    if parsed.set_default_effort(route.settings.reasoning_effort) {
        rendered = None;
    }
    let prompt = rendered.unwrap_or_else(|| render(&parsed));
    let max_tokens = parsed
        .check_limits(prompt.len(), &limits_of(&route))
        .map_err(|e| Refused::routed(&route, e))?;
    let options = AnswerOptions {
        stop: parsed.stop().to_vec(),
        logprobs: parsed.sampling().logprobs.is_some(),
        prompt_token_ids: parsed.return_token_ids().then(|| prompt.clone()),
    };
    let request = GenRequest {
        prompt,
        max_new_tokens: max_tokens,
        sampling: sampling_spec(parsed.sampling()).map_err(|e| Refused::routed(&route, e))?,
        priority: parsed.priority(),
        stop_tokens: stop_tokens(parsed.ignore_eos()),
    };
    Ok(Launch {
        route,
        request,
        stream: parsed.stream(),
        options,
    })
}

// ------------------------------------------------------------------------------------------
// Completions

pub async fn completions(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let info = RequestInfo::arriving(&state, "cmpl", "/v1/completions");
    let launch = match read_request(&state, req).await {
        Ok((headers, body)) => prepare_completion(&state, &headers, &body),
        Err(refused) => Err(refused),
    };
    match launch {
        Ok(launch) => launch.respond::<TextResponder>(&state, info).await,
        Err(refused) => reject(&state, &info, &refused),
    }
}

/// Every prompt id below `vocab`, or a 400 naming the first that is not.
fn check_vocabulary(prompt: &[u32], vocab: usize) -> Result<(), ApiError> {
    match prompt
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        None => Ok(()),
        Some((i, t)) => Err(ApiError::invalid_value(
            format!("prompt[{i}]"),
            format!("token id {t} at index {i} is outside the vocabulary (ids < {vocab})"),
        )),
    }
}

/// Parses and routes a completion request.
fn prepare_completion<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Launch<'a>, Refused<'a>> {
    let parsed = parse_completion(body, &state.tokenizer)?;
    let prompt = parsed.prompt_ids().to_vec();
    let named = named_profile(parsed.profile(), headers)?;
    let profile =
        state
            .config()
            .choose_profile(named, state.default_profile(), parsed.max_tokens(), || {
                prompt.len()
            });
    let route = state
        .route_request(profile, parsed.model())
        .map_err(|e| Refused::unrouted(profile, e))?;
    check_vocabulary(&prompt, route.model.vocab).map_err(|e| Refused::routed(&route, e))?;
    let max_tokens = parsed
        .check_limits(&limits_of(&route))
        .map_err(|e| Refused::routed(&route, e))?;
    let options = AnswerOptions {
        stop: parsed.stop().to_vec(),
        logprobs: parsed.sampling().logprobs.is_some(),
        prompt_token_ids: parsed.return_token_ids().then(|| prompt.clone()),
    };
    let request = GenRequest {
        prompt,
        max_new_tokens: max_tokens,
        sampling: sampling_spec(parsed.sampling()).map_err(|e| Refused::routed(&route, e))?,
        priority: parsed.priority(),
        stop_tokens: stop_tokens(parsed.ignore_eos()),
    };
    Ok(Launch {
        route,
        request,
        stream: parsed.stream(),
        options,
    })
}
