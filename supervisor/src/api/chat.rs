//! `POST /v1/chat/completions`: request body → [`ValidChatRequest`], whose [`Conversation`]
//! is the harmony prompt to render.
//!
//! Only [`parse_chat`] builds a [`ValidChatRequest`]; its fields are private, so everything
//! the server and the scheduler read has been checked. The mapping onto harmony follows the
//! chat-completions convention of gpt-oss.md §5.4, with these choices where OpenAI's API and
//! harmony do not line up:
//!
//! - **System and developer messages.** The server always writes harmony's system message
//!   (date, reasoning effort). Every `system` or `developer` message of the request — the
//!   first, and any later one — becomes developer `# Instructions`, in order, joined by a
//!   blank line; empty ones are skipped. Harmony has no place for a system message in the
//!   middle of a conversation, so a later one is moved up rather than dropped or refused.
//! - **Assistant messages.** `reasoning_content` (or else `reasoning`, or else `thinking`) →
//!   an analysis message; then non-empty `content` → a final-channel message; then each of
//!   `tool_calls` → a tool call (`arguments` given as a JSON object is serialised). Harmony
//!   would put a preamble that accompanies tool calls on the commentary channel, which the
//!   renderer's [`Message`] cannot express; the final channel is the nearest user-visible
//!   one. The renderer drops old analysis exactly as harmony does.
//! - **Tool results.** `tool_call_id` is mapped to the function name of the earlier assistant
//!   tool call with that id (the latest, if clients reuse ids); an unknown id is a 400.
//! - **Content parts.** `text` (also `input_text`, `output_text`, `refusal`) parts are joined
//!   with a newline; image, audio, video and file parts are refused (text-only model).
//! - **tool_choice.** `"none"` renders no tools. `"auto"` and `"required"` render all of them;
//!   harmony has no way to force a call (there is no constrained decoding), so `"required"` is
//!   accepted but not enforced. A named function renders only that tool, which leaves the model
//!   one function to call but still does not force the call. Both are reported by
//!   [`ValidChatRequest::tool_choice`] for the server to record.
//! - **Reasoning effort.** `reasoning_effort` or `reasoning.effort` (both given and different
//!   → 400); absent, the profile's effort applies ([`ValidChatRequest::set_default_effort`]).
//! - **Fields.** Besides the ones read here and in `common` (`COMMON_FIELDS`),
//!   `IGNORED_FIELDS` and `CHAT_IGNORED_FIELDS` (`parallel_tool_calls`: harmony cannot
//!   hold the model to one call; `chat_template_kwargs`: there is no template to pass them
//!   to) are accepted and ignored; `include_reasoning` is accepted as `true` only (reasoning
//!   is always returned). Any other top-level field is a 400.

use std::collections::HashMap;

use gptossd_shared::sampling::SamplingParams;
use serde_json::Value;

use super::common::{
    check_neutral_bool, not_one_of, parse_common, parse_logprob_count, parse_max_tokens, Common,
    StreamOptions, COMMON_FIELDS, IGNORED_FIELDS,
};
use super::error::{ApiError, ErrorCase};
use super::json::{as_object, missing, parse_object, wrong_type, Fields};
use super::limits::{check_limits, Limits};
use crate::chat::{Conversation, FunctionTool, Message, ReasoningEffort, SystemOptions};
use crate::config::ProfileName;

/// Top-level fields only the chat endpoint reads.
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "reasoning",
    "include_reasoning",
];

/// Top-level fields the chat endpoint accepts and ignores (see the module doc).
pub(crate) const CHAT_IGNORED_FIELDS: &[&str] = &["parallel_tool_calls", "chat_template_kwargs"];

/// Longest function name (OpenAI's limit).
pub const MAX_TOOL_NAME_LEN: usize = 64;

/// Which tools the client allows the model to call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// `"none"`: no tools are rendered, so the model cannot call one.
    None,
    /// `"auto"` (the default): the model decides.
    #[default]
    Auto,
    /// `"required"`: accepted; harmony cannot force a call, so the model still decides.
    Required,
    /// `{"type": "function", "function": {"name": …}}`: only this tool is rendered; the call
    /// is likely but not forced.
    Function(String),
}

/// A checked chat completion request. Built only by [`parse_chat`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChatRequest {
    model: Option<String>,
    conversation: Conversation,
    reasoning_effort: Option<ReasoningEffort>,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    tool_choice: ToolChoice,
    stream: Option<StreamOptions>,
    profile: Option<ProfileName>,
    priority: i32,
    return_token_ids: bool,
    ignore_eos: bool,
}

impl ValidChatRequest {
    /// `model`, if given (OpenAI requires it; gptossd then uses the profile's model).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The conversation to render with [`Conversation::render_for_completion`]. Its reasoning
    /// effort is the request's, or medium until [`Self::set_default_effort`] is called.
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// The effort the request asked for (`reasoning_effort` or `reasoning.effort`).
    #[cfg(test)]
    pub fn reasoning_effort(&self) -> Option<ReasoningEffort> {
        self.reasoning_effort
    }

    /// Applies the profile's effort unless the request named one. True when that changed the
    /// conversation: a prompt rendered before no longer matches it.
    pub fn set_default_effort(&mut self, effort: ReasoningEffort) -> bool {
        let effort = self.reasoning_effort.unwrap_or(effort);
        let changed = self.conversation.system.reasoning_effort != effort;
        self.conversation.system.reasoning_effort = effort;
        changed
    }

    /// `max_completion_tokens` or `max_tokens` (≥ 1), if given; see [`Self::check_limits`].
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    /// Sampling parameters, already range-checked; `logprobs` is the number of top
    /// alternatives when `logprobs: true` (0 when `top_logprobs` is absent).
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// Stop strings (0 to 4, none empty).
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    /// The client's tool choice (see the module doc for what is enforced).
    #[cfg(test)]
    pub fn tool_choice(&self) -> &ToolChoice {
        &self.tool_choice
    }

    /// `Some` when the response is to be streamed.
    pub fn stream(&self) -> Option<StreamOptions> {
        self.stream
    }

    /// The `profile` extension, if given.
    pub fn profile(&self) -> Option<ProfileName> {
        self.profile
    }

    /// The `priority` extension (0 by default; larger is more urgent, as in vLLM).
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

    /// [`check_limits`] for this request's rendered prompt of `prompt_tokens` tokens; a prompt
    /// beyond the context is reported against `messages`.
    pub fn check_limits(&self, prompt_tokens: usize, limits: &Limits) -> Result<usize, ApiError> {
        check_limits(self.max_tokens, prompt_tokens, limits).map_err(|e| {
            if e.param.is_none() {
                e.with_param("messages")
            } else {
                e
            }
        })
    }
}

/// Parses and checks a chat completion request. `today` (`YYYY-MM-DD`) becomes the system
/// message's `Current date:` line.
pub fn parse_chat(body: &[u8], today: &str) -> Result<ValidChatRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields::new(&map, "");
    f.only(&[
        COMMON_FIELDS,
        IGNORED_FIELDS,
        CHAT_FIELDS,
        CHAT_IGNORED_FIELDS,
    ])?;
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
    check_neutral_bool(&f, "include_reasoning", true)?;

    let messages = f.array("messages")?.ok_or_else(|| missing("messages"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid_value(
            "messages",
            "messages must not be empty, got []",
        ));
    }
    let (instructions, history) = parse_messages(messages)?;

    let reasoning_effort = parse_effort(&f)?;
    let max_tokens = parse_max_tokens(&f, &["max_completion_tokens", "max_tokens"])?;

    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top_logprobs = parse_logprob_count(&f, "top_logprobs")?;
    if top_logprobs.is_some() && !logprobs {
        return Err(ApiError::invalid_value(
            "top_logprobs",
            format!(
                "top_logprobs requires logprobs to be true, got top_logprobs {} without it",
                top_logprobs.unwrap_or_default()
            ),
        ));
    }
    sampling.logprobs = logprobs.then(|| top_logprobs.unwrap_or(0));

    let tools = parse_tools(&f)?;
    let tool_choice = parse_tool_choice(&f, &tools)?;
    let rendered_tools = match &tool_choice {
        ToolChoice::None => Vec::new(),
        ToolChoice::Auto | ToolChoice::Required => tools,
        ToolChoice::Function(name) => tools.into_iter().filter(|t| &t.name == name).collect(),
    };

    let conversation = Conversation {
        system: SystemOptions {
            reasoning_effort: reasoning_effort.unwrap_or_default(),
            current_date: Some(today.to_owned()),
            ..SystemOptions::default()
        },
        developer_instructions: instructions,
        tools: rendered_tools,
        messages: history,
    };
    Ok(ValidChatRequest {
        model,
        conversation,
        reasoning_effort,
        max_tokens,
        sampling,
        stop,
        tool_choice,
        stream,
        profile,
        priority,
        return_token_ids,
        ignore_eos,
    })
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
const EFFORTS: [&str; 3] = ["low", "medium", "high"];

/// `reasoning_effort` and `reasoning.effort`.
fn parse_effort(f: &Fields<'_>) -> Result<Option<ReasoningEffort>, ApiError> {
    let read = |value: Option<&str>, path: &str| {
        value
            .map(|s| match s {
                "low" => Ok(ReasoningEffort::Low),
                "medium" => Ok(ReasoningEffort::Medium),
                "high" => Ok(ReasoningEffort::High),
                other => Err(not_one_of(path, other, &EFFORTS)),
            })
            .transpose()
    };
    let top = read(f.str("reasoning_effort")?, "reasoning_effort")?;
    let nested = match f.object("reasoning")? {
        Some(reasoning) => read(reasoning.str("effort")?, "reasoning.effort")?,
        None => None,
    };
    match (top, nested) {
        (Some(a), Some(b)) if a != b => Err(ApiError::invalid_value(
            "reasoning.effort",
            format!(
                "reasoning_effort ({}) and reasoning.effort ({}) disagree; send one of them",
                a.as_str(),
                b.as_str()
            ),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// The messages → developer instructions and the harmony history.
fn parse_messages(messages: &[Value]) -> Result<(Option<String>, Vec<Message>), ApiError> {
    let mut instructions: Vec<String> = Vec::new();
    let mut history = Vec::new();
    // tool_call_id → function name, from the assistant messages seen so far.
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, value) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let m = as_object(value, &path)?;
        let role = m.required_str("role")?;
        match role {
            "system" | "developer" => {
                let text = required_content(&m)?;
                if !text.is_empty() {
                    instructions.push(text);
                }
            }
            "user" => history.push(Message::User(required_content(&m)?)),
            "assistant" => parse_assistant(&m, &mut history, &mut call_names)?,
            "tool" => {
                let id = m.required_str("tool_call_id")?;
                let name = call_names.get(id).cloned().ok_or_else(|| {
                    ApiError::invalid_value(
                        m.path("tool_call_id"),
                        format!(
                            "{} {id:?} matches no tool call of an earlier assistant message",
                            m.path("tool_call_id")
                        ),
                    )
                })?;
                let output = required_content(&m)?;
                history.push(Message::ToolResult { name, output });
            }
            "function" => {
                return Err(ApiError::unsupported(
                    m.path("role"),
                    format!(
                        "{} \"function\" (deprecated) is not supported; use \"tool\" messages",
                        m.path("role")
                    ),
                ))
            }
            other => return Err(not_one_of(&m.path("role"), other, &ROLES)),
        }
    }
    let instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    Ok((instructions, history))
}

/// One assistant message → analysis, final and tool-call messages, in that order.
fn parse_assistant(
    m: &Fields<'_>,
    history: &mut Vec<Message>,
    call_names: &mut HashMap<String, String>,
) -> Result<(), ApiError> {
    let mut reasoning = None;
    for key in ["reasoning_content", "reasoning", "thinking"] {
        if let Some(text) = m.str(key)? {
            if reasoning.is_none() && !text.is_empty() {
                reasoning = Some(text.to_owned());
            }
        }
    }
    let content = content_text(m)?.unwrap_or_default();
    let calls = m.array("tool_calls")?.unwrap_or_default();

    if let Some(reasoning) = reasoning {
        history.push(Message::AssistantAnalysis(reasoning));
    }
    if !content.is_empty() || calls.is_empty() {
        history.push(Message::AssistantFinal(content));
    }
    for (j, call) in calls.iter().enumerate() {
        let call = as_object(call, &m.path(&format!("tool_calls[{j}]")))?;
        if let Some(kind) = call.str("type")? {
            if kind != "function" {
                return Err(ApiError::unsupported(
                    call.path("type"),
                    format!(
                        "{} {kind:?} is not supported (only \"function\")",
                        call.path("type")
                    ),
                ));
            }
        }
        let function = call
            .object("function")?
            .ok_or_else(|| missing(&call.path("function")))?;
        let name = function.required_str("name")?;
        check_tool_name(name, &function.path("name"))?;
        let arguments = match function.get("arguments") {
            None => return Err(missing(&function.path("arguments"))),
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Object(_) | Value::Array(_))) => v.to_string(),
            Some(other) => {
                return Err(wrong_type(
                    &function.path("arguments"),
                    "a string of JSON",
                    other,
                ))
            }
        };
        if let Some(id) = call.str("id")? {
            call_names.insert(id.to_owned(), name.to_owned());
        }
        history.push(Message::AssistantToolCall {
            name: name.to_owned(),
            arguments,
        });
    }
    Ok(())
}

/// `content` that must be present (user, system, developer and tool messages).
fn required_content(m: &Fields<'_>) -> Result<String, ApiError> {
    content_text(m)?.ok_or_else(|| missing(&m.path("content")))
}

/// `content` as text: a string, or an array of text parts joined by newlines.
fn content_text(m: &Fields<'_>) -> Result<Option<String>, ApiError> {
    let path = m.path("content");
    match m.get("content") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .enumerate()
                .map(|(k, part)| part_text(part, &format!("{path}[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(texts.join("\n")))
        }
        Some(other) => Err(wrong_type(
            &path,
            "a string or an array of content parts",
            other,
        )),
    }
}

/// The text of one content part; non-text parts are refused.
fn part_text(part: &Value, path: &str) -> Result<String, ApiError> {
    let p = as_object(part, path)?;
    let kind = p.required_str("type")?;
    match kind {
        "text" | "input_text" | "output_text" => Ok(p.required_str("text")?.to_owned()),
        "refusal" => Ok(p.required_str("refusal")?.to_owned()),
        "image_url" | "input_image" | "image" | "input_audio" | "audio" | "video_url"
        | "file" | "input_file" => Err(ApiError::unsupported(
            p.path("type"),
            format!(
                "{path} is an {kind:?} content part; gptossd serves text-only models, so only \"text\" parts are accepted"
            ),
        )),
        other => Err(ApiError::invalid_value(
            p.path("type"),
            format!("{} {other:?} is not a known content part type (expected \"text\")", p.path("type")),
        )),
    }
}

/// A function name: `^[A-Za-z0-9_-]{1,64}$` (it is written into a harmony header).
fn check_tool_name(name: &str, path: &str) -> Result<(), ApiError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > MAX_TOOL_NAME_LEN || !valid_chars {
        return Err(ApiError::invalid_value(
            path,
            format!("{path} must match ^[A-Za-z0-9_-]{{1,{MAX_TOOL_NAME_LEN}}}$, got {name:?}"),
        ));
    }
    Ok(())
}

/// `tools`: function tools with valid, distinct names.
fn parse_tools(f: &Fields<'_>) -> Result<Vec<FunctionTool>, ApiError> {
    let mut tools: Vec<FunctionTool> = Vec::new();
    for (j, value) in f.array("tools")?.unwrap_or_default().iter().enumerate() {
        let tool = as_object(value, &format!("tools[{j}]"))?;
        let kind = tool.str("type")?.unwrap_or("function");
        if kind != "function" {
            return Err(ApiError::unsupported(
                tool.path("type"),
                format!(
                    "{} {kind:?} is not supported (only \"function\" tools)",
                    tool.path("type")
                ),
            ));
        }
        let function = tool
            .object("function")?
            .ok_or_else(|| missing(&tool.path("function")))?;
        let name = function.required_str("name")?;
        check_tool_name(name, &function.path("name"))?;
        if tools.iter().any(|t| t.name == name) {
            return Err(ApiError::invalid_value(
                function.path("name"),
                format!("{} {name:?} is given twice", function.path("name")),
            ));
        }
        let description = function.str("description")?.unwrap_or_default().to_owned();
        let parameters = function
            .object("parameters")?
            .and_then(|_| function.get("parameters").cloned());
        function.bool("strict")?;
        tools.push(FunctionTool {
            name: name.to_owned(),
            description,
            parameters,
        });
    }
    Ok(tools)
}

/// `tool_choice`, checked against the given tools.
fn parse_tool_choice(f: &Fields<'_>, tools: &[FunctionTool]) -> Result<ToolChoice, ApiError> {
    let choice = match f.get("tool_choice") {
        None => return Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(not_one_of(
                    "tool_choice",
                    other,
                    &[
                        "none",
                        "auto",
                        "required",
                        "a {\"type\": \"function\"} object",
                    ],
                ))
            }
        },
        Some(value @ Value::Object(_)) => {
            let c = as_object(value, "tool_choice")?;
            let kind = c.required_str("type")?;
            if kind != "function" {
                return Err(ApiError::unsupported(
                    "tool_choice.type",
                    format!("tool_choice.type {kind:?} is not supported (only \"function\")"),
                ));
            }
            let function = c
                .object("function")?
                .ok_or_else(|| missing("tool_choice.function"))?;
            let name = function.required_str("name")?;
            if !tools.iter().any(|t| t.name == name) {
                let given: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                return Err(ApiError::invalid_value(
                    "tool_choice.function.name",
                    format!(
                        "tool_choice names function {name:?}, which is not among tools ({})",
                        if given.is_empty() {
                            "none given".to_owned()
                        } else {
                            given.join(", ")
                        }
                    ),
                ));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(other) => {
            return Err(wrong_type(
                "tool_choice",
                "a string or a {\"type\": \"function\"} object",
                other,
            ))
        }
    };
    if choice == ToolChoice::Required && tools.is_empty() {
        return Err(ApiError::new(
            ErrorCase::InvalidValue,
            "tool_choice \"required\" needs at least one tool in tools, got none",
        )
        .with_param("tool_choice"));
    }
    Ok(choice)
}
