//! Response bodies in OpenAI's shapes: `chat.completion`, `chat.completion.chunk`,
//! `text_completion` (whole and streamed), usage, logprobs, tool-call ids, gptossd's own
//! metadata, and the folds that join a stream's chunks into the whole response.
//!
//! Every type here is `Serialize`; the server writes it with `serde_json` (as the body, or as
//! an SSE `data:` line). Field names are the ones the OpenAI Python client reads. Choices made
//! where clients disagree:
//! - reasoning text is sent twice, as `reasoning_content` (llama-server, many clients) and as
//!   `reasoning` (OpenAI's guidance, vLLM), in whole messages and in deltas;
//! - a message's `content` is `null` when the reply is only tool calls, otherwise a string;
//! - a logprob of −inf (an impossible token) is written as −9999.0, as vLLM does: JSON has no
//!   infinity and clients expect a number;
//! - gptossd's own per-request facts go in a top-level `gptossd` object ([`GptossdMetadata`],
//!   which also gives the `x-request-id` and `x-gptossd-*` headers), never in OpenAI's fields;
//! - with `return_token_ids`, ids go in `prompt_token_ids` and `token_ids` (vLLM's names).
//!
//! Streaming a chat reply: send [`ChunkBuilder::role`] first, then one chunk per generated
//! token from [`ChunkBuilder::on_events`] (the events the chat parser gave for that token,
//! merged into one delta, so per-token logprobs and ids attach to it), then
//! [`ChunkBuilder::finish`], then [`ChunkBuilder::usage`] when `include_usage` asked for it.
//! The responders (`super::responder`) do exactly that.
//!
//! Whole responses are folds ([`Fold`]: [`ChatFold`], [`CompletionFold`]) of those same chunks,
//! the usage chunk included, joined the way a client joins deltas; the fold's invariant is
//! that a whole answer says what the stream of the same request said.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::chat::{ChatEvent, Ending, Reply, Summary, TokenId, Tokenizer, ToolCall};
use crate::config::{ModelSize, ProfileName};

/// How a logprob of −inf is written (JSON has no infinity).
pub const NEG_INF_LOGPROB: f32 = -9999.0;

/// The identity every response object of one request shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseIdentity {
    /// `chatcmpl-…` or `cmpl-…`; also seeds the tool-call ids.
    pub id: String,
    /// Unix seconds when the request was received.
    pub created: u64,
    /// The served model name.
    pub model: String,
}

/// gptossd's own facts about one request: the top-level `gptossd` object of a whole response
/// and of a stream's finish chunk, and the `x-request-id` / `x-gptossd-*` response headers
/// ([`GptossdMetadata::headers`]), so the two cannot disagree. Fields serialize in this order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GptossdMetadata {
    /// The response id (`chatcmpl-…`, `cmpl-…`), also the id the cancel endpoint takes.
    pub request_id: String,
    /// The profile the request ran on.
    #[serde(serialize_with = "as_text")]
    pub profile: ProfileName,
    /// The served model name.
    pub model: String,
    /// `20b`, `120b` or `test`.
    #[serde(serialize_with = "as_text")]
    pub model_size: ModelSize,
    /// `single` (one stage) or `pipeline`.
    pub gpu_mode: &'static str,
    /// The engine name (as in the metrics).
    pub engine: &'static str,
    /// `cpu` or `cuda`.
    pub backend: String,
    /// Not the model the profile wants (its primary was down, or `quality_first` without a
    /// 120b).
    pub fallback: bool,
    /// From arrival to the first step, when the request got that far.
    pub queue_time_ms: Option<f64>,
    /// From arrival to the first generated token, when there was one.
    pub time_to_first_token_ms: Option<f64>,
    /// The request was cancelled before it ended on its own (finish reason `abort`).
    pub cancelled: bool,
    /// The answer came from the response cache: the tokens a run of the same request
    /// generated before (bit for bit what the model would generate again).
    pub cached: bool,
    /// The request's deadline, in milliseconds after its arrival: its profile's adaptive
    /// timeout (`crate::deadline`). Past it the request is cancelled with a 504.
    pub deadline_ms: u64,
}

impl GptossdMetadata {
    /// The response headers: `x-request-id` and the `x-gptossd-*` family, values as in the body
    /// (`x-gptossd-fallback` is `true` or `false`).
    pub fn headers(&self) -> [(&'static str, String); 8] {
        [
            ("x-request-id", self.request_id.clone()),
            ("x-gptossd-profile", self.profile.as_str().to_owned()),
            ("x-gptossd-model", self.model.clone()),
            ("x-gptossd-model-size", self.model_size.as_str().to_owned()),
            ("x-gptossd-gpu-mode", self.gpu_mode.to_owned()),
            ("x-gptossd-engine", self.engine.to_owned()),
            ("x-gptossd-backend", self.backend.clone()),
            ("x-gptossd-fallback", self.fallback.to_string()),
        ]
    }
}

/// Serializes a value by its `Display` text (profile and size names).
fn as_text<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// `max_tokens` (or the context) ran out first.
    Length,
    /// The reply ends with tool calls (`<|call|>`).
    ToolCalls,
    /// The request was cancelled (`POST /v1/requests/{id}/cancel`) before it ended on its own;
    /// vLLM's name, so clients can tell it from a natural `stop`.
    Abort,
}

impl FinishReason {
    /// The name on the wire (and the `finished_reason` label of the metrics).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::Abort => "abort",
        }
    }

    /// The chat finish reason from the parser's summary. `length_limited`: generation stopped
    /// because `max_tokens` was reached (not because of a stop string).
    pub fn for_chat(summary: &Summary, length_limited: bool) -> Self {
        match summary.ending {
            Ending::Call if summary.tool_calls > 0 => Self::ToolCalls,
            Ending::Unterminated if length_limited => Self::Length,
            _ => Self::Stop,
        }
    }
}

/// Token counts. `total_tokens` is always the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
    /// Generated tokens, the stop token included.
    pub completion_tokens: usize,
    /// The sum of the two.
    pub total_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Generated tokens spent on reasoning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CompletionTokensDetails {
    /// Generated tokens of the analysis channel.
    pub reasoning_tokens: usize,
}

impl Usage {
    /// Counts without details.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    /// Adds `prompt_tokens_details.cached_tokens`.
    #[cfg(test)]
    pub fn with_cached_tokens(mut self, cached_tokens: usize) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }

    /// Adds `completion_tokens_details.reasoning_tokens`.
    #[cfg(test)]
    pub fn with_reasoning_tokens(mut self, reasoning_tokens: usize) -> Self {
        self.completion_tokens_details = Some(CompletionTokensDetails { reasoning_tokens });
        self
    }
}

/// A tool call id, `call_` + 24 hex digits, deterministic in (request id, call index) so a
/// replayed request names its calls the same way.
pub fn tool_call_id(request_id: &str, index: usize) -> String {
    // FNV-1a over the request id, then splitmix64 rounds with the index mixed in.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let a = splitmix64(h ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let b = splitmix64(a);
    format!("call_{a:016x}{:08x}", b >> 32)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        NEG_INF_LOGPROB
    }
}

// ---------------------------------------------------------------------------------------------
// Logprobs

/// Chat logprobs: `{"content": [...]}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per reported token.
    pub content: Vec<ChatTokenLogprob>,
}

/// One token of chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text (lossy UTF-8 for a token that is part of a character).
    pub token: String,
    /// Its log-probability under the raw logits.
    pub logprob: f32,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// The top alternatives, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative in `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The alternative's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

fn token_text(tokenizer: &Tokenizer, id: TokenId) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

impl ChatTokenLogprob {
    /// The entry for sampled `token` with `logprob` and the alternatives `top`
    /// (`(id, logprob)`, as the sampler reports them).
    pub fn new(
        tokenizer: &Tokenizer,
        token: TokenId,
        logprob: f32,
        top: &[(TokenId, f32)],
    ) -> Self {
        let (text, bytes) = token_text(tokenizer, token);
        Self {
            token: text,
            logprob: finite(logprob),
            bytes,
            top_logprobs: top
                .iter()
                .map(|&(id, lp)| {
                    let (token, bytes) = token_text(tokenizer, id);
                    TopLogprob {
                        token,
                        logprob: finite(lp),
                        bytes,
                    }
                })
                .collect(),
        }
    }
}

/// Legacy completions logprobs: parallel arrays.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's logprob.
    pub token_logprobs: Vec<f32>,
    /// Per token, its alternatives as `{text: logprob}`.
    pub top_logprobs: Vec<Map<String, Value>>,
    /// Per token, the character offset of its text in the completion.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends all of `other`'s tokens.
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// Builds legacy logprobs token by token, keeping the running text offset (so streamed
/// chunks carry offsets that continue from the previous chunk).
#[derive(Debug, Clone, Default)]
pub struct CompletionLogprobsBuilder {
    offset: usize,
}

impl CompletionLogprobsBuilder {
    /// Offsets counted from the start of the completion text.
    pub fn new() -> Self {
        Self::default()
    }

    /// The one-token logprobs of `token`.
    pub fn token(
        &mut self,
        tokenizer: &Tokenizer,
        token: TokenId,
        logprob: f32,
        top: &[(TokenId, f32)],
    ) -> CompletionLogprobs {
        let (text, _) = token_text(tokenizer, token);
        let offset = self.offset;
        self.offset += text.chars().count();
        let alternatives = top
            .iter()
            .map(|&(id, lp)| {
                let value = serde_json::Number::from_f64(f64::from(finite(lp)))
                    .map_or(Value::Null, Value::Number);
                (token_text(tokenizer, id).0, value)
            })
            .collect();
        CompletionLogprobs {
            tokens: vec![text],
            token_logprobs: vec![finite(logprob)],
            top_logprobs: vec![alternatives],
            text_offset: vec![offset],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// chat.completion

/// A tool call in a whole message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCallOut {
    /// `call_…` ([`tool_call_id`]).
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Name and arguments.
    pub function: FunctionCallOut,
}

/// `tool_calls[].function`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionCallOut {
    /// The function name.
    pub name: String,
    /// The arguments as generated (JSON text).
    pub arguments: String,
}

/// `choices[].message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessageOut {
    /// Always `"assistant"`.
    pub role: &'static str,
    /// The answer; `null` when the reply is only tool calls.
    pub content: Option<String>,
    /// Always `null` (OpenAI sends it).
    pub refusal: Option<String>,
    /// The chain of thought (llama-server's name); absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The same text under OpenAI's / vLLM's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The calls; absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// `choices[]` of a `chat.completion`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Always 0 (`n` is 1).
    pub index: u32,
    /// The assistant's message.
    pub message: ChatMessageOut,
    /// Present when requested.
    pub logprobs: Option<ChatLogprobs>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Generated ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
}

/// A whole `chat.completion` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    /// The request's id.
    pub id: String,
    /// `"chat.completion"`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// Prompt ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// gptossd's per-request facts (profile, timings, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptossd: Option<GptossdMetadata>,
}

impl ChatCompletion {
    /// The response for a whole `reply` (the parser's events gathered).
    pub fn new(
        identity: &ResponseIdentity,
        reply: Reply,
        finish_reason: FinishReason,
        usage: Usage,
    ) -> Self {
        let tool_calls: Vec<ToolCallOut> = reply
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(index, call)| ToolCallOut {
                id: tool_call_id(&identity.id, index),
                kind: "function",
                function: FunctionCallOut {
                    name: call.name,
                    arguments: call.arguments,
                },
            })
            .collect();
        let content = if reply.content.is_empty() && !tool_calls.is_empty() {
            None
        } else {
            Some(reply.content)
        };
        let reasoning = (!reply.reasoning.is_empty()).then_some(reply.reasoning);
        Self {
            id: identity.id.clone(),
            object: "chat.completion",
            created: identity.created,
            model: identity.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content,
                    refusal: None,
                    reasoning_content: reasoning.clone(),
                    reasoning,
                    tool_calls,
                },
                logprobs: None,
                finish_reason,
                token_ids: None,
            }],
            usage,
            prompt_token_ids: None,
            gptossd: None,
        }
    }

    /// Adds the logprobs.
    #[cfg(test)]
    pub fn with_logprobs(mut self, logprobs: ChatLogprobs) -> Self {
        for choice in &mut self.choices {
            choice.logprobs = Some(logprobs.clone());
        }
        self
    }

    /// Adds `prompt_token_ids` and the choice's `token_ids`.
    #[cfg(test)]
    pub fn with_token_ids(mut self, prompt: Vec<TokenId>, completion: Vec<TokenId>) -> Self {
        self.prompt_token_ids = Some(prompt);
        for choice in &mut self.choices {
            choice.token_ids = Some(completion.clone());
        }
        self
    }

    /// Adds the `gptossd` metadata object.
    #[cfg(test)]
    pub fn with_metadata(mut self, metadata: GptossdMetadata) -> Self {
        self.gptossd = Some(metadata);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// chat.completion.chunk

/// `choices[].delta`: only the fields that changed (an empty delta is `{}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Delta {
    /// `"assistant"` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Answer text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Reasoning text (llama-server's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The same reasoning text (OpenAI's / vLLM's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Tool call pieces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A piece of a tool call: the first carries `id`, `type` and the name; later ones only
/// argument text. Clients join pieces by `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCallDelta {
    /// Which call (0-based within the reply).
    pub index: usize,
    /// `call_…`, in the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `"function"`, in the first piece.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name (first piece) and argument text.
    pub function: FunctionDelta,
}

/// `tool_calls[].function` in a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionDelta {
    /// The function name, in the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument text (`""` in the first piece).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// `choices[]` of a chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What changed.
    pub delta: Delta,
    /// This chunk's tokens' logprobs, when requested; otherwise `null`.
    pub logprobs: Option<ChatLogprobs>,
    /// `null` until the finish chunk.
    pub finish_reason: Option<FinishReason>,
    /// This chunk's generated ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
}

/// A `chat.completion.chunk`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChunk {
    /// The request's id (the same in every chunk).
    pub id: String,
    /// `"chat.completion.chunk"`.
    pub object: &'static str,
    /// Unix seconds (the same in every chunk).
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Token counts, in the usage chunk (and wherever the server adds them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Prompt ids, with `return_token_ids` (the role chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// gptossd's per-request facts (the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptossd: Option<GptossdMetadata>,
}

impl ChatChunk {
    /// Adds this chunk's logprobs.
    pub fn with_logprobs(mut self, logprobs: ChatLogprobs) -> Self {
        for choice in &mut self.choices {
            choice.logprobs = Some(logprobs.clone());
        }
        self
    }

    /// Adds this chunk's generated ids.
    pub fn with_token_ids(mut self, ids: Vec<TokenId>) -> Self {
        for choice in &mut self.choices {
            choice.token_ids = Some(ids.clone());
        }
        self
    }

    /// Adds the prompt ids (for the role chunk).
    pub fn with_prompt_token_ids(mut self, ids: Vec<TokenId>) -> Self {
        self.prompt_token_ids = Some(ids);
        self
    }

    /// Adds usage (for example to the finish chunk, for clients that want usage by default).
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Adds the `gptossd` metadata object.
    pub fn with_metadata(mut self, metadata: GptossdMetadata) -> Self {
        self.gptossd = Some(metadata);
        self
    }
}

/// Turns a chat reply's events into `chat.completion.chunk`s for one request.
#[derive(Debug, Clone)]
pub struct ChunkBuilder {
    identity: ResponseIdentity,
}

impl ChunkBuilder {
    /// Chunks for the request `identity` (tool-call ids derive from `identity.id`).
    pub fn new(identity: ResponseIdentity) -> Self {
        Self { identity }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatChunk {
        ChatChunk {
            id: self.identity.id.clone(),
            object: "chat.completion.chunk",
            created: self.identity.created,
            model: self.identity.model.clone(),
            choices,
            usage: None,
            prompt_token_ids: None,
            gptossd: None,
        }
    }

    fn choice(delta: Delta, finish_reason: Option<FinishReason>) -> ChunkChoice {
        ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
            token_ids: None,
        }
    }

    /// The first chunk: `{"role": "assistant", "content": ""}`.
    pub fn role(&self) -> ChatChunk {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            ..Delta::default()
        };
        self.chunk(vec![Self::choice(delta, None)])
    }

    /// One event as a chunk; `None` when it changes nothing a client sees (a call's end,
    /// empty text).
    #[cfg(test)]
    pub fn on_event(&self, event: ChatEvent) -> Option<ChatChunk> {
        self.on_events(std::slice::from_ref(&event))
    }

    /// The events of one token merged into one delta (text of a kind concatenated, a call's
    /// start and first arguments in one piece); `None` when there is nothing to send.
    pub fn on_events(&self, events: &[ChatEvent]) -> Option<ChatChunk> {
        let mut delta = Delta::default();
        let append = |slot: &mut Option<String>, text: &str| {
            slot.get_or_insert_with(String::new).push_str(text)
        };
        for event in events {
            match event {
                ChatEvent::Content(text) if !text.is_empty() => append(&mut delta.content, text),
                ChatEvent::Reasoning(text) if !text.is_empty() => {
                    append(&mut delta.reasoning_content, text);
                    append(&mut delta.reasoning, text);
                }
                ChatEvent::ToolCallStart { index, name } => delta.tool_calls.push(ToolCallDelta {
                    index: *index,
                    id: Some(tool_call_id(&self.identity.id, *index)),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name.clone()),
                        arguments: Some(String::new()),
                    },
                }),
                ChatEvent::ToolCallArguments { index, delta: text } if !text.is_empty() => {
                    match delta.tool_calls.iter_mut().find(|c| c.index == *index) {
                        Some(call) => append(&mut call.function.arguments, text),
                        None => delta.tool_calls.push(ToolCallDelta {
                            index: *index,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: Some(text.clone()),
                            },
                        }),
                    }
                }
                _ => {}
            }
        }
        (delta != Delta::default()).then(|| self.chunk(vec![Self::choice(delta, None)]))
    }

    /// A chunk that shows nothing (`"delta": {}`): what a token that changes nothing a client
    /// sees (a header token) travels in when its logprobs or id were asked for.
    pub fn empty(&self) -> ChatChunk {
        self.chunk(vec![Self::choice(Delta::default(), None)])
    }

    /// The finish chunk: an empty delta and the finish reason.
    pub fn finish(&self, reason: FinishReason) -> ChatChunk {
        self.chunk(vec![Self::choice(Delta::default(), Some(reason))])
    }

    /// The usage chunk (`stream_options.include_usage`): empty `choices` and `usage`.
    pub fn usage(&self, usage: Usage) -> ChatChunk {
        self.chunk(Vec::new()).with_usage(usage)
    }
}

// ---------------------------------------------------------------------------------------------
// text_completion

/// `choices[]` of a `text_completion` (whole or chunk).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    /// Generated text (a whole reply, or this chunk's piece).
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Legacy logprobs when requested; otherwise `null`.
    pub logprobs: Option<CompletionLogprobs>,
    /// Set in a whole response and in the last chunk; `null` before.
    pub finish_reason: Option<FinishReason>,
    /// Prompt ids, with `return_token_ids` (whole response and first chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// Generated ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
}

/// A `text_completion` object; streamed chunks use the same shape with `usage` absent
/// (or, in the usage chunk, `choices` empty).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// The request's id.
    pub id: String,
    /// `"text_completion"` (OpenAI uses it for chunks too).
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Token counts: always in a whole response, in the usage chunk of a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// gptossd's per-request facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptossd: Option<GptossdMetadata>,
}

impl Completion {
    fn with_choices(identity: &ResponseIdentity, choices: Vec<CompletionChoice>) -> Self {
        Self {
            id: identity.id.clone(),
            object: "text_completion",
            created: identity.created,
            model: identity.model.clone(),
            choices,
            usage: None,
            gptossd: None,
        }
    }

    fn choice(text: String, finish_reason: Option<FinishReason>) -> CompletionChoice {
        CompletionChoice {
            text,
            index: 0,
            logprobs: None,
            finish_reason,
            prompt_token_ids: None,
            token_ids: None,
        }
    }

    /// A whole response.
    pub fn new(
        identity: &ResponseIdentity,
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    ) -> Self {
        let mut completion =
            Self::with_choices(identity, vec![Self::choice(text, Some(finish_reason))]);
        completion.usage = Some(usage);
        completion
    }

    /// A streamed chunk carrying `text` (may be empty, e.g. for a token that completes no
    /// character yet but whose logprobs are sent).
    pub fn text_chunk(identity: &ResponseIdentity, text: String) -> Self {
        Self::with_choices(identity, vec![Self::choice(text, None)])
    }

    /// The last streamed chunk with a choice: empty text and the finish reason.
    pub fn finish_chunk(identity: &ResponseIdentity, finish_reason: FinishReason) -> Self {
        Self::with_choices(
            identity,
            vec![Self::choice(String::new(), Some(finish_reason))],
        )
    }

    /// The usage chunk: empty `choices` and `usage`.
    pub fn usage_chunk(identity: &ResponseIdentity, usage: Usage) -> Self {
        let mut chunk = Self::with_choices(identity, Vec::new());
        chunk.usage = Some(usage);
        chunk
    }

    /// Adds logprobs to the choice.
    pub fn with_logprobs(mut self, logprobs: CompletionLogprobs) -> Self {
        for choice in &mut self.choices {
            choice.logprobs = Some(logprobs.clone());
        }
        self
    }

    /// Adds ids to the choice: `prompt` (whole response, first chunk) and/or `completion`.
    pub fn with_token_ids(
        mut self,
        prompt: Option<Vec<TokenId>>,
        completion: Option<Vec<TokenId>>,
    ) -> Self {
        for choice in &mut self.choices {
            choice.prompt_token_ids.clone_from(&prompt);
            choice.token_ids.clone_from(&completion);
        }
        self
    }

    /// Adds the `gptossd` metadata object.
    pub fn with_metadata(mut self, metadata: GptossdMetadata) -> Self {
        self.gptossd = Some(metadata);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The whole answer: the fold of its stream

/// Joins the chunks of a stream into the whole response, the way a client joins deltas. The
/// server builds every whole response this way, from the very chunks a stream of the same
/// request sends (the usage chunk included), so a whole answer and a streamed one cannot drift.
pub trait Fold {
    /// A streamed chunk.
    type Chunk;
    /// The whole response.
    type Whole: Serialize;
    /// Adds the next chunk.
    fn add(&mut self, chunk: Self::Chunk);
    /// The whole response; `None` when the stream did not end (no finish reason or no usage
    /// came).
    fn finish(self) -> Option<Self::Whole>;
}

/// The fold of a `chat.completion.chunk` stream into a `chat.completion`.
#[derive(Debug, Clone)]
pub struct ChatFold {
    identity: ResponseIdentity,
    reply: Reply,
    prompt_token_ids: Option<Vec<TokenId>>,
    logprobs: Option<ChatLogprobs>,
    token_ids: Option<Vec<TokenId>>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
    metadata: Option<GptossdMetadata>,
}

impl ChatFold {
    /// Nothing yet of the answer to `identity`. `logprobs` and `token_ids`: whether the request
    /// asked for them (the whole answer then has them, empty if no token came).
    pub fn new(identity: ResponseIdentity, logprobs: bool, token_ids: bool) -> Self {
        Self {
            identity,
            reply: Reply::default(),
            prompt_token_ids: None,
            logprobs: logprobs.then(ChatLogprobs::default),
            token_ids: token_ids.then(Vec::new),
            finish_reason: None,
            usage: None,
            metadata: None,
        }
    }
}

/// Adds a tool-call piece to the call at its index: the first piece names it, every piece
/// may add argument text.
fn add_tool_call_piece(calls: &mut Vec<ToolCall>, piece: ToolCallDelta) {
    if calls.len() <= piece.index {
        calls.resize_with(piece.index + 1, ToolCall::default);
    }
    let call = &mut calls[piece.index];
    call.name
        .push_str(piece.function.name.as_deref().unwrap_or_default());
    call.arguments
        .push_str(piece.function.arguments.as_deref().unwrap_or_default());
}

impl Fold for ChatFold {
    type Chunk = ChatChunk;
    type Whole = ChatCompletion;

    fn add(&mut self, chunk: ChatChunk) {
        if chunk.prompt_token_ids.is_some() {
            self.prompt_token_ids = chunk.prompt_token_ids;
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        if chunk.gptossd.is_some() {
            self.metadata = chunk.gptossd;
        }
        for choice in chunk.choices {
            let delta = choice.delta;
            self.reply
                .content
                .push_str(delta.content.as_deref().unwrap_or_default());
            self.reply
                .reasoning
                .push_str(delta.reasoning_content.as_deref().unwrap_or_default());
            for piece in delta.tool_calls {
                add_tool_call_piece(&mut self.reply.tool_calls, piece);
            }
            if let Some(logprobs) = choice.logprobs {
                let all = self.logprobs.get_or_insert_with(ChatLogprobs::default);
                all.content.extend(logprobs.content);
            }
            if let Some(ids) = choice.token_ids {
                self.token_ids.get_or_insert_with(Vec::new).extend(ids);
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
    }

    fn finish(self) -> Option<ChatCompletion> {
        let mut whole =
            ChatCompletion::new(&self.identity, self.reply, self.finish_reason?, self.usage?);
        whole.prompt_token_ids = self.prompt_token_ids;
        whole.gptossd = self.metadata;
        if let Some(choice) = whole.choices.first_mut() {
            choice.logprobs = self.logprobs;
            choice.token_ids = self.token_ids;
        }
        Some(whole)
    }
}

/// The fold of a streamed `text_completion` into the whole one.
#[derive(Debug, Clone)]
pub struct CompletionFold {
    identity: ResponseIdentity,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    prompt_token_ids: Option<Vec<TokenId>>,
    token_ids: Option<Vec<TokenId>>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
    metadata: Option<GptossdMetadata>,
}

impl CompletionFold {
    /// Nothing yet of the completion `identity`. `logprobs` and `token_ids`: whether the
    /// request asked for them (the whole answer then has them, empty if no token came).
    pub fn new(identity: ResponseIdentity, logprobs: bool, token_ids: bool) -> Self {
        Self {
            identity,
            text: String::new(),
            logprobs: logprobs.then(CompletionLogprobs::default),
            prompt_token_ids: None,
            token_ids: token_ids.then(Vec::new),
            finish_reason: None,
            usage: None,
            metadata: None,
        }
    }
}

impl Fold for CompletionFold {
    type Chunk = Completion;
    type Whole = Completion;

    fn add(&mut self, chunk: Completion) {
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        if chunk.gptossd.is_some() {
            self.metadata = chunk.gptossd;
        }
        for choice in chunk.choices {
            self.text.push_str(&choice.text);
            if let Some(logprobs) = choice.logprobs {
                self.logprobs
                    .get_or_insert_with(CompletionLogprobs::default)
                    .extend(logprobs);
            }
            if choice.prompt_token_ids.is_some() {
                self.prompt_token_ids = choice.prompt_token_ids;
            }
            if let Some(ids) = choice.token_ids {
                self.token_ids.get_or_insert_with(Vec::new).extend(ids);
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
    }

    fn finish(self) -> Option<Completion> {
        let mut whole =
            Completion::new(&self.identity, self.text, self.finish_reason?, self.usage?);
        whole.gptossd = self.metadata;
        if let Some(choice) = whole.choices.first_mut() {
            choice.logprobs = self.logprobs;
            choice.prompt_token_ids = self.prompt_token_ids;
            choice.token_ids = self.token_ids;
        }
        Some(whole)
    }
}
