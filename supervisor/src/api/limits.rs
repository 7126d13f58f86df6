//! Length limits, checked once the profile (its `max_new_tokens`) and the prompt length are
//! known: the effective `max_tokens` of a request, or a 400 that names both numbers.
//!
//! No silent truncation: a prompt longer than the context is refused, never cut; an explicit
//! `max_tokens` that does not fit beside the prompt is refused too (as OpenAI does), while an
//! absent one defaults to what fits.

use super::error::{ApiError, ErrorCase};

/// The limits that apply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The profile's `max_new_tokens`: the most tokens a request may generate.
    pub profile_max_new_tokens: usize,
    /// The model's context: prompt plus generated tokens.
    pub context_tokens: usize,
}

/// The effective `max_tokens` for a prompt of `prompt_tokens` tokens.
///
/// - `max_tokens` above the profile's limit → 400 naming both numbers (param `max_tokens`);
/// - a prompt longer than the context → 400 `prompt of N tokens exceeds the context of M
///   tokens` (code `context_length_exceeded`, no param: the caller knows whether it was
///   `messages` or `prompt`); a prompt that fills the context leaves no room and is refused too;
/// - prompt + `max_tokens` beyond the context → 400 naming the three numbers;
/// - absent `max_tokens` → min(profile limit, context − prompt).
pub fn check_limits(
    max_tokens: Option<usize>,
    prompt_tokens: usize,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let context = limits.context_tokens;
    if prompt_tokens > context {
        return Err(ApiError::new(
            ErrorCase::ContextLength,
            format!("prompt of {prompt_tokens} tokens exceeds the context of {context} tokens"),
        ));
    }
    let room = context - prompt_tokens;
    if room == 0 {
        return Err(ApiError::new(
            ErrorCase::ContextLength,
            format!(
                "prompt of {prompt_tokens} tokens fills the context of {context} tokens, leaving no room to generate"
            ),
        ));
    }
    let Some(requested) = max_tokens else {
        return Ok(limits.profile_max_new_tokens.min(room).max(1));
    };
    if requested == 0 {
        return Err(ApiError::invalid_value(
            "max_tokens",
            "max_tokens must be at least 1, got 0",
        ));
    }
    if requested > limits.profile_max_new_tokens {
        return Err(ApiError::invalid_value(
            "max_tokens",
            format!(
                "max_tokens must be at most {} (the profile's max_new_tokens), got {requested}",
                limits.profile_max_new_tokens
            ),
        ));
    }
    if requested > room {
        return Err(ApiError::new(
            ErrorCase::ContextLength,
            format!(
                "prompt of {prompt_tokens} tokens plus max_tokens of {requested} exceeds the context of {context} tokens (at most {room} tokens can be generated)"
            ),
        )
        .with_param("max_tokens"));
    }
    Ok(requested)
}
