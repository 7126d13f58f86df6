//! The chat format of GPT-OSS: the o200k_harmony tokenizer, harmony prompt rendering, and the
//! incremental parsing of the assistant's reply.
//!
//! Owns the boundary between text and token ids. The HTTP API and the `generate` command build
//! a [`Conversation`], render it with [`Conversation::render_for_completion`], feed each
//! generated id to a [`ReplyParser`] (stopping when [`ReplyParser::is_done`]) and present the
//! [`ChatEvent`]s. Invariants: rendering matches openai-harmony token for token (see
//! `supervisor/tests/harmony_golden.rs`); user text never turns into special tokens; parsing
//! never fails on model output. This module knows nothing of HTTP, sampling or the model.

pub(crate) mod parser;
pub(crate) mod render;
pub(crate) mod tokenizer;

pub use parser::{parse_reply, ChatEvent, Ending, Reply, ReplyParser, Summary, ToolCall};
pub use render::{Conversation, FunctionTool, Message, ReasoningEffort, SystemOptions};
pub use tokenizer::{TokenId, Tokenizer, TokenizerError, Utf8Stream, STOP_TOKENS};
