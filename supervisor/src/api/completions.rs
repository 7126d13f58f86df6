//! `POST /v1/completions` (the legacy text API): request body → [`ValidCompletionRequest`],
//! whose prompt is already token ids.
//!
//! Only [`parse_completion`] builds a [`ValidCompletionRequest`]. Choices:
//! - `prompt` is a string, an array of one string, an array of token ids, or an array of one
//!   token-id array. Several prompts (batching through one request) are refused: send one
//!   request per prompt. Token ids must be below 201088 (the model's vocabulary, reference §8
//!   item 7); the error names the index and the value.
//! - A text prompt is encoded with harmony's special tokens recognised where their exact
//!   spelling appears (`<|start|>user<|message|>…`), as Hugging Face tokenizers and vLLM do,
//!   so a hand-rendered harmony prompt works; all other text is ordinary text. (The chat
//!   endpoint never does this: there, user text stays text.)
//! - `max_tokens` defaults to 16, as OpenAI's does (capped by what fits the context).
//! - `logprobs` is the legacy integer (0..=20; OpenAI allows 5, the sampler 20).
//! - `echo: true`, `best_of` > 1 and a non-empty `suffix` are refused as unsupported.
//! - Besides the fields read here and in `common`, the common `IGNORED_FIELDS` are accepted
//!   and ignored; any other top-level field is a 400.

use std::collections::HashMap;
use std::sync::OnceLock;

use gptossd_shared::sampling::SamplingParams;
use gptossd_shared::VOCAB_EDGE;
use serde_json::Value;

use super::common::{
    parse_common, parse_logprob_count, parse_max_tokens, Common, StreamOptions, COMMON_FIELDS,
    IGNORED_FIELDS,
};
use super::error::ApiError;
use super::json::{as_integer, missing, parse_object, wrong_type, Fields};
use super::limits::{check_limits, Limits};
use crate::chat::{TokenId, Tokenizer};
use crate::config::ProfileName;

/// Top-level fields only the completions endpoint reads.
const COMPLETION_FIELDS: &[&str] = &[
    "prompt",
    "max_tokens",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
];

/// `max_tokens` when a completion request gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// A checked completion request. Built only by [`parse_completion`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCompletionRequest {
    model: Option<String>,
    prompt_ids: Vec<TokenId>,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: Option<StreamOptions>,
    profile: Option<ProfileName>,
    priority: i32,
    return_token_ids: bool,
    ignore_eos: bool,
}

impl ValidCompletionRequest {
    /// `model`, if given.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The prompt as token ids: at least one, each below 201088.
    pub fn prompt_ids(&self) -> &[TokenId] {
        &self.prompt_ids
    }

    /// `max_tokens` as given (≥ 1); see [`Self::check_limits`] for the effective value.
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    /// Sampling parameters, already range-checked; `logprobs` is the legacy count.
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// Stop strings (0 to 4, none empty).
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    /// `Some` when the response is to be streamed.
    pub fn stream(&self) -> Option<StreamOptions> {
        self.stream
    }

    /// The `profile` extension, if given.
    pub fn profile(&self) -> Option<ProfileName> {
        self.profile
    }

    /// The `priority` extension (0 by default).
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// The `return_token_ids` extension.
    pub fn return_token_ids(&self) -> bool {
        self.return_token_ids
    }

    /// The `ignore_eos` extension: generate up to `max_tokens`, past the stop tokens.
    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }

    /// The effective `max_tokens` under `limits` ([`check_limits`]); absent, it is
    /// [`DEFAULT_COMPLETION_MAX_TOKENS`] or what fits the context, whichever is smaller. A
    /// prompt beyond the context is reported against `prompt`.
    pub fn check_limits(&self, limits: &Limits) -> Result<usize, ApiError> {
        let effective =
            check_limits(self.max_tokens, self.prompt_ids.len(), limits).map_err(|e| {
                if e.param.is_none() {
                    e.with_param("prompt")
                } else {
                    e
                }
            })?;
        Ok(match self.max_tokens {
            Some(_) => effective,
            None => effective.min(DEFAULT_COMPLETION_MAX_TOKENS),
        })
    }
}

/// Parses and checks a completion request, tokenizing a text prompt with `tokenizer`.
pub fn parse_completion(
    body: &[u8],
    tokenizer: &Tokenizer,
) -> Result<ValidCompletionRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields::new(&map, "");
    f.only(&[COMMON_FIELDS, IGNORED_FIELDS, COMPLETION_FIELDS])?;
    let Common {
        model,
        mut sampling,
        stop,
        stream,
        profile,
        priority,
        return_token_ids,
        ignore_eos,
    } = parse_common(&f)?;

    let prompt_ids = parse_prompt(&f, tokenizer)?;
    let max_tokens = parse_max_tokens(&f, &["max_tokens"])?;
    sampling.logprobs = parse_logprob_count(&f, "logprobs")?;

    if f.bool("echo")? == Some(true) {
        return Err(ApiError::unsupported(
            "echo",
            "echo is not supported, got true",
        ));
    }
    if let Some(best_of) = f.integer("best_of")? {
        if best_of != 1 {
            return Err(ApiError::unsupported(
                "best_of",
                format!("best_of other than 1 is not supported, got {best_of}"),
            ));
        }
    }
    if let Some(suffix) = f.str("suffix")? {
        if !suffix.is_empty() {
            return Err(ApiError::unsupported(
                "suffix",
                format!("suffix is not supported, got {suffix:?}"),
            ));
        }
    }
    Ok(ValidCompletionRequest {
        model,
        prompt_ids,
        max_tokens,
        sampling,
        stop,
        stream,
        profile,
        priority,
        return_token_ids,
        ignore_eos,
    })
}

/// `prompt` → token ids (one prompt, at least one token).
fn parse_prompt(f: &Fields<'_>, tokenizer: &Tokenizer) -> Result<Vec<TokenId>, ApiError> {
    const EXPECTED: &str = "a string, an array of one string, or an array of token ids";
    let ids = match f.get("prompt").ok_or_else(|| missing("prompt"))? {
        Value::String(text) => encode_prompt(tokenizer, text),
        Value::Array(items) => match items.first() {
            None => {
                return Err(ApiError::invalid_value(
                    "prompt",
                    "prompt must not be empty, got []",
                ))
            }
            Some(Value::String(_)) | Some(Value::Array(_)) if items.len() > 1 => {
                return Err(ApiError::unsupported(
                    "prompt",
                    format!(
                        "multiple prompts are not supported, got {}; send one request per prompt",
                        items.len()
                    ),
                ))
            }
            Some(Value::String(text)) => encode_prompt(tokenizer, text),
            Some(Value::Array(inner)) => token_ids(inner, "prompt[0]")?,
            Some(Value::Number(_)) => token_ids(items, "prompt")?,
            Some(other) => return Err(wrong_type("prompt[0]", EXPECTED, other)),
        },
        other => return Err(wrong_type("prompt", EXPECTED, other)),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid_value(
            "prompt",
            "prompt must contain at least one token, got an empty prompt",
        ));
    }
    Ok(ids)
}

/// An array of token ids at `path`, each in 0..201088.
fn token_ids(items: &[Value], path: &str) -> Result<Vec<TokenId>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{path}[{i}]");
            let id = as_integer(item, &at)?;
            if !(0..i128::from(VOCAB_EDGE)).contains(&id) {
                return Err(ApiError::invalid_value(
                    at.clone(),
                    format!(
                        "{at} is token id {id}, outside the vocabulary (ids must be 0 to {})",
                        VOCAB_EDGE - 1
                    ),
                ));
            }
            // In range, so it fits.
            Ok(id as TokenId)
        })
        .collect()
}

/// Special-token spellings (`<|start|>`) → ids, built once from the tokenizer.
fn special_tokens(tokenizer: &Tokenizer) -> &'static HashMap<String, TokenId> {
    static SPECIALS: OnceLock<HashMap<String, TokenId>> = OnceLock::new();
    SPECIALS.get_or_init(|| {
        (0..VOCAB_EDGE)
            .filter(|&id| Tokenizer::is_special(id))
            .filter_map(|id| {
                let bytes = tokenizer.token_bytes(id).ok()?;
                let spelling = String::from_utf8(bytes).ok()?;
                (spelling.starts_with("<|") && spelling.ends_with("|>")).then_some((spelling, id))
            })
            .collect()
    })
}

/// Encodes a text prompt: exact special-token spellings become their ids, the text between
/// them is encoded as ordinary text.
fn encode_prompt(tokenizer: &Tokenizer, text: &str) -> Vec<TokenId> {
    let specials = special_tokens(tokenizer);
    let mut ids = Vec::new();
    let mut plain_from = 0;
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find("<|") {
        let start = search_from + found;
        let special = text[start + 2..]
            .find("|>")
            .map(|len| &text[start..start + 2 + len + 2])
            .and_then(|spelling| specials.get(spelling).map(|&id| (id, spelling.len())));
        match special {
            Some((id, len)) => {
                ids.extend(tokenizer.encode(&text[plain_from..start]));
                ids.push(id);
                plain_from = start + len;
                search_from = plain_from;
            }
            None => search_from = start + 2,
        }
    }
    ids.extend(tokenizer.encode(&text[plain_from..]));
    ids
}
