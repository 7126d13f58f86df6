//! The OpenAI-compatible API, minus the HTTP server: request bodies → checked requests,
//! errors → OpenAI error bodies, and the response bodies.
//!
//! Owns "parse, don't validate" for the HTTP surface. [`parse_chat`] and [`parse_completion`]
//! turn a raw body into a [`ValidChatRequest`] (carrying the harmony [`Conversation`]) or a
//! [`ValidCompletionRequest`] (carrying prompt token ids); nothing else can build those types,
//! so the scheduler only ever sees checked requests. Once the profile is known,
//! [`check_limits`] (or the requests' `check_limits` methods) gives the effective `max_tokens`
//! or refuses the request; nothing is silently truncated. Every failure is an [`ApiError`] whose
//! status, OpenAI `type` and `code` come from one table ([`ErrorCase`]).
//!
//! Invariants: a 4xx message names the field and the value received, and `param` is the
//! field's path in the request (`messages[1].content`); parsing never panics on request data;
//! a top-level field an endpoint does not list is refused (OpenAI's `Unrecognized request
//! argument supplied`), known fields must have the right type.
//!
//! The answer side: a [`responder`] per endpoint turns generated tokens into the chunks of a
//! stream (decoding, stop strings, finish reason), and the [`responses`] folds join those very
//! chunks into the whole response, so a whole answer is the fold of its stream.
//!
//! It knows nothing of sockets, SSE framing, scheduling or metrics: the server (hyper) calls
//! these functions, drives the responders and writes the [`responses`] types with serde.
//!
//! [`Conversation`]: crate::chat::Conversation

pub mod chat;
pub mod common;
pub mod completions;
pub mod error;
mod json;
pub mod limits;
pub mod responder;
pub mod responses;
pub mod stops;

#[cfg(test)]
mod tests;

pub use chat::{parse_chat, ValidChatRequest};
pub use common::StreamOptions;
pub use completions::parse_completion;
pub use error::{ApiError, ErrorCase};
pub use limits::Limits;
pub use responder::{
    AnswerOptions, ChatResponder, EndedBy, GeneratedToken, Responder, TextResponder,
};
pub use responses::{FinishReason, Fold, GptossdMetadata, ResponseIdentity, Usage};
