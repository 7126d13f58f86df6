//! A responder per endpoint: how one request's generated tokens become the chunks of its answer
//! (`chat.completion.chunk` for chat, `text_completion` for completions), and the [`Fold`]
//! that joins those chunks into the whole response.
//!
//! The server's one loop over a request's events feeds every responder the same way:
//! [`Responder::opening`]; [`Responder::token`] for each generated token, in order, until
//! generation ends or a stop string matches; [`Responder::end`] once; then
//! [`Responder::finish`] with gptossd's metadata and [`Responder::usage`]. A stream sends those
//! chunks as they come (the usage chunk only when `stream_options.include_usage` asks for it);
//! a whole response is their fold ([`Responder::fold`]), so the two cannot differ.
//!
//! A responder owns the decoding (the harmony reply parser for chat, plain UTF-8 text for
//! completions), the stop strings and the finish reason. Invariants:
//! - when logprobs or token ids were asked for, every generated token gets a chunk (one with
//!   nothing to show if need be: `"delta": {}` or `"text": ""`), so the fold has them all;
//! - nothing at or after a matched stop string is shown: [`TokenStep::stop`] tells the loop to
//!   end generation, and held-back text is dropped;
//! - the finish reason: `stop` after a stop string, `abort` for a cancelled request, else the
//!   endpoint's own (chat: what the reply's ending says; completions: `length` or `stop`);
//! - the prompt's ids (`return_token_ids`) go out once, in the first chunk with room for them.
//!
//! It knows nothing of pipelines, sockets, time or metrics.

use serde::Serialize;

use super::responses::{
    ChatChunk, ChatFold, ChatLogprobs, ChatTokenLogprob, ChunkBuilder, Completion, CompletionFold,
    CompletionLogprobsBuilder, FinishReason, Fold, GptossdMetadata, ResponseIdentity, Usage,
};
use super::stops::StopMatcher;
use crate::chat::{ChatEvent, ReplyParser, TokenId, Tokenizer, Utf8Stream};

#[cfg(test)]
mod tests;

/// One generated token as the pipeline reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// The token.
    pub id: TokenId,
    /// Its log-probability under the raw logits.
    pub logprob: f32,
    /// The top alternatives `(id, logprob)`, most likely first (empty unless asked for).
    pub top: Vec<(TokenId, f32)>,
}

/// How generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// A stop token (`<|return|>`, `<|call|>`, `<|endoftext|>`).
    StopToken,
    /// `max_tokens` (or the context) ran out.
    Length,
    /// The request was cancelled before it ended on its own.
    Cancel,
    /// A stop string matched: the answer itself ended generation.
    StopString,
}

impl EndedBy {
    /// The finish reason: `stop` after a stop string, `abort` after a cancel, else the
    /// endpoint's own reason, `natural(length_limited)`.
    pub fn finish_reason(self, natural: impl FnOnce(bool) -> FinishReason) -> FinishReason {
        match self {
            Self::StopString => FinishReason::Stop,
            Self::Cancel => FinishReason::Abort,
            Self::StopToken => natural(false),
            Self::Length => natural(true),
        }
    }
}

/// What a request asked of its answer besides the tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerOptions {
    /// Stop strings (0 to 4, none empty).
    pub stop: Vec<String>,
    /// Per-token logprobs (the number of alternatives is the sampler's business).
    pub logprobs: bool,
    /// With `return_token_ids`: the prompt's ids, given back once, and every generated id.
    pub prompt_token_ids: Option<Vec<TokenId>>,
}

/// What one token does to the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStep<C> {
    /// Its chunk, if it shows anything or carries something asked for.
    pub chunk: Option<C>,
    /// A stop string matched: the answer ends with this token.
    pub stop: bool,
}

/// One endpoint's way of answering (see the module doc for the order of calls).
pub trait Responder: Send + 'static {
    /// A streamed chunk.
    type Chunk: Serialize + Send;
    /// The fold of the chunks into the whole response.
    type Fold: Fold<Chunk = Self::Chunk>;

    /// A responder for the request `identity`.
    fn new(identity: ResponseIdentity, tokenizer: Tokenizer, options: AnswerOptions) -> Self;
    /// An empty whole answer, to fold this responder's chunks into.
    fn fold(&self) -> Self::Fold;
    /// The chunk before any token (chat's role chunk), if the endpoint has one.
    fn opening(&mut self) -> Option<Self::Chunk>;
    /// One generated token.
    fn token(&mut self, token: &GeneratedToken) -> TokenStep<Self::Chunk>;
    /// Generation ended: the chunk of what was held back (unless a stop string ended it) and
    /// the finish reason.
    fn end(&mut self, ended: EndedBy) -> (Option<Self::Chunk>, FinishReason);
    /// The finish chunk, carrying gptossd's metadata.
    fn finish(&mut self, reason: FinishReason, metadata: GptossdMetadata) -> Self::Chunk;
    /// The usage chunk (empty `choices`).
    fn usage(&self, usage: Usage) -> Self::Chunk;
}

// ---------------------------------------------------------------------------------------------
// Chat

/// `POST /v1/chat/completions`: the harmony reply parser's events as deltas (content,
/// reasoning, tool-call pieces), one chunk per token.
#[derive(Debug)]
pub struct ChatResponder {
    identity: ResponseIdentity,
    builder: ChunkBuilder,
    tokenizer: Tokenizer,
    parser: ReplyParser,
    stops: StopMatcher,
    logprobs: bool,
    token_ids: bool,
    /// The prompt's ids until the role chunk takes them.
    prompt_token_ids: Option<Vec<TokenId>>,
}

/// Passes content text through the stop matcher; returns the events to show and whether a
/// stop string ended the reply (then the events after it are dropped).
fn filter_stops(events: Vec<ChatEvent>, stops: &mut StopMatcher) -> (Vec<ChatEvent>, bool) {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match e {
            ChatEvent::Content(text) => {
                let (emit, hit) = stops.push(&text);
                if !emit.is_empty() {
                    out.push(ChatEvent::Content(emit));
                }
                if hit {
                    return (out, true);
                }
            }
            other => out.push(other),
        }
    }
    (out, false)
}

impl Responder for ChatResponder {
    type Chunk = ChatChunk;
    type Fold = ChatFold;

    fn new(identity: ResponseIdentity, tokenizer: Tokenizer, options: AnswerOptions) -> Self {
        Self {
            builder: ChunkBuilder::new(identity.clone()),
            identity,
            tokenizer,
            parser: ReplyParser::new(tokenizer),
            stops: StopMatcher::new(options.stop),
            logprobs: options.logprobs,
            token_ids: options.prompt_token_ids.is_some(),
            prompt_token_ids: options.prompt_token_ids,
        }
    }

    fn fold(&self) -> ChatFold {
        ChatFold::new(self.identity.clone(), self.logprobs, self.token_ids)
    }

    fn opening(&mut self) -> Option<ChatChunk> {
        let role = self.builder.role();
        Some(match self.prompt_token_ids.take() {
            Some(ids) => role.with_prompt_token_ids(ids),
            None => role,
        })
    }

    fn token(&mut self, token: &GeneratedToken) -> TokenStep<ChatChunk> {
        let (events, stop) = filter_stops(self.parser.feed(token.id), &mut self.stops);
        let carries = self.logprobs || self.token_ids;
        let chunk = match self.builder.on_events(&events) {
            Some(chunk) => Some(chunk),
            None if carries => Some(self.builder.empty()),
            None => None,
        };
        let chunk = chunk.map(|mut chunk| {
            if self.logprobs {
                let entry =
                    ChatTokenLogprob::new(&self.tokenizer, token.id, token.logprob, &token.top);
                chunk = chunk.with_logprobs(ChatLogprobs {
                    content: vec![entry],
                });
            }
            if self.token_ids {
                chunk = chunk.with_token_ids(vec![token.id]);
            }
            chunk
        });
        TokenStep { chunk, stop }
    }

    fn end(&mut self, ended: EndedBy) -> (Option<ChatChunk>, FinishReason) {
        let parser = std::mem::replace(&mut self.parser, ReplyParser::new(self.tokenizer));
        let (events, summary) = parser.finish();
        let tail = if ended == EndedBy::StopString {
            None
        } else {
            let (mut events, _) = filter_stops(events, &mut self.stops);
            let held = self.stops.finish();
            if !held.is_empty() {
                events.push(ChatEvent::Content(held));
            }
            self.builder.on_events(&events)
        };
        let reason = ended.finish_reason(|length| FinishReason::for_chat(&summary, length));
        (tail, reason)
    }

    fn finish(&mut self, reason: FinishReason, metadata: GptossdMetadata) -> ChatChunk {
        self.builder.finish(reason).with_metadata(metadata)
    }

    fn usage(&self, usage: Usage) -> ChatChunk {
        self.builder.usage(usage)
    }
}

// ---------------------------------------------------------------------------------------------
// Completions

/// `POST /v1/completions`: the tokens' text (special tokens show nothing), whole characters
/// at a time.
#[derive(Debug)]
pub struct TextResponder {
    identity: ResponseIdentity,
    tokenizer: Tokenizer,
    utf8: Utf8Stream,
    stops: StopMatcher,
    /// Present when logprobs were asked for; keeps the text offset running across chunks.
    logprobs: Option<CompletionLogprobsBuilder>,
    token_ids: bool,
    /// The prompt's ids until the first chunk with a choice takes them.
    prompt_token_ids: Option<Vec<TokenId>>,
}

impl TextResponder {
    /// The text `token` adds (special tokens add none).
    fn text(&mut self, token: TokenId) -> String {
        if Tokenizer::is_special(token) {
            return String::new();
        }
        self.tokenizer
            .token_bytes(token)
            .map(|bytes| self.utf8.push(&bytes))
            .unwrap_or_default()
    }

    /// `chunk` with the prompt's ids, when they were asked for and have not gone out yet.
    fn with_pending_prompt_ids(&mut self, chunk: Completion) -> Completion {
        match self.prompt_token_ids.take() {
            Some(ids) => chunk.with_token_ids(Some(ids), None),
            None => chunk,
        }
    }
}

impl Responder for TextResponder {
    type Chunk = Completion;
    type Fold = CompletionFold;

    fn new(identity: ResponseIdentity, tokenizer: Tokenizer, options: AnswerOptions) -> Self {
        Self {
            identity,
            tokenizer,
            utf8: Utf8Stream::new(),
            stops: StopMatcher::new(options.stop),
            logprobs: options.logprobs.then(CompletionLogprobsBuilder::new),
            token_ids: options.prompt_token_ids.is_some(),
            prompt_token_ids: options.prompt_token_ids,
        }
    }

    fn fold(&self) -> CompletionFold {
        CompletionFold::new(
            self.identity.clone(),
            self.logprobs.is_some(),
            self.token_ids,
        )
    }

    fn opening(&mut self) -> Option<Completion> {
        None
    }

    fn token(&mut self, token: &GeneratedToken) -> TokenStep<Completion> {
        let text = self.text(token.id);
        let (text, stop) = self.stops.push(&text);
        if text.is_empty() && self.logprobs.is_none() && !self.token_ids {
            return TokenStep { chunk: None, stop };
        }
        let mut chunk = Completion::text_chunk(&self.identity, text);
        if let Some(builder) = &mut self.logprobs {
            let logprobs = builder.token(&self.tokenizer, token.id, token.logprob, &token.top);
            chunk = chunk.with_logprobs(logprobs);
        }
        if self.token_ids {
            chunk = chunk.with_token_ids(self.prompt_token_ids.take(), Some(vec![token.id]));
        }
        TokenStep {
            chunk: Some(chunk),
            stop,
        }
    }

    fn end(&mut self, ended: EndedBy) -> (Option<Completion>, FinishReason) {
        let tail = if ended == EndedBy::StopString {
            None
        } else {
            let (text, _) = self.stops.push(&self.utf8.finish());
            let rest = text + &self.stops.finish();
            (!rest.is_empty()).then(|| {
                let chunk = Completion::text_chunk(&self.identity, rest);
                self.with_pending_prompt_ids(chunk)
            })
        };
        let reason = ended.finish_reason(|length| {
            if length {
                FinishReason::Length
            } else {
                FinishReason::Stop
            }
        });
        (tail, reason)
    }

    fn finish(&mut self, reason: FinishReason, metadata: GptossdMetadata) -> Completion {
        let chunk = Completion::finish_chunk(&self.identity, reason).with_metadata(metadata);
        self.with_pending_prompt_ids(chunk)
    }

    fn usage(&self, usage: Usage) -> Completion {
        Completion::usage_chunk(&self.identity, usage)
    }
}
