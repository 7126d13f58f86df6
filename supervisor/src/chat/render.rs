//! Conversation → prompt token ids, exactly as harmony's
//! `render_conversation_for_completion(conversation, Role.ASSISTANT)` renders it.
//!
//! Owns the typed conversation ([`Conversation`]) and the harmony message grammar for the
//! prompt side. Invariants (each checked against openai-harmony by the golden test
//! `supervisor/tests/harmony_golden.rs`):
//! - every piece of text is encoded as ordinary text, in the same pieces harmony encodes
//!   (role, ` to=recipient`, channel, content type, content), so the ids match, not only the
//!   decoded string; text that spells a special token never becomes one;
//! - a system message always comes first; a developer message only when there are
//!   instructions or function tools; the prompt ends with `<|start|>assistant`;
//! - tool parameters are rendered with harmony's JSON-schema → TypeScript rules, keys in the
//!   order the schema gives them (serde_json's `preserve_order`);
//! - analysis messages before the first final answer are dropped when the last assistant
//!   message is a final answer (harmony's `auto_drop_analysis`, the default).
//!
//! It knows nothing about HTTP requests (the API maps them onto these types) or generation.

use serde_json::Value;

use super::tokenizer::{TokenId, Tokenizer, CALL, CHANNEL, CONSTRAIN, END, MESSAGE, START};

/// The identity line harmony's `SystemContent.new()` uses.
const MODEL_IDENTITY: &str = "You are ChatGPT, a large language model trained by OpenAI.";
/// Harmony's default knowledge cutoff.
pub const DEFAULT_KNOWLEDGE_CUTOFF: &str = "2024-06";

/// How much the model should reason before answering (`Reasoning: …` in the system message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningEffort {
    /// `Reasoning: low`.
    Low,
    /// `Reasoning: medium` (harmony's default).
    #[default]
    Medium,
    /// `Reasoning: high`.
    High,
}

impl ReasoningEffort {
    /// The lower-case word harmony writes (and the OpenAI API's `reasoning_effort` value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// The content of the system message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemOptions {
    /// The `Reasoning:` line.
    pub reasoning_effort: ReasoningEffort,
    /// The `Knowledge cutoff:` line; [`DEFAULT_KNOWLEDGE_CUTOFF`] by default.
    pub knowledge_cutoff: String,
    /// The `Current date:` line (`YYYY-MM-DD`), omitted when `None`.
    pub current_date: Option<String>,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            reasoning_effort: ReasoningEffort::default(),
            knowledge_cutoff: DEFAULT_KNOWLEDGE_CUTOFF.to_owned(),
            current_date: None,
        }
    }
}

/// A function the model may call (`functions.NAME` in harmony).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    /// The function name; callers validate it (no whitespace: it goes into a header).
    pub name: String,
    /// Free text; each line becomes a `// ` comment above the type.
    pub description: String,
    /// JSON schema of the single argument object; `None` renders `() => any`.
    pub parameters: Option<Value>,
}

/// One message of the conversation history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The user's text.
    User(String),
    /// An earlier answer of the assistant (final channel).
    AssistantFinal(String),
    /// Earlier reasoning of the assistant (analysis channel).
    AssistantAnalysis(String),
    /// An earlier tool call of the assistant.
    AssistantToolCall {
        /// Function name, without the `functions.` prefix.
        name: String,
        /// The arguments as JSON text, rendered verbatim.
        arguments: String,
    },
    /// The output of a tool call.
    ToolResult {
        /// Function name, without the `functions.` prefix.
        name: String,
        /// The tool's output, rendered verbatim.
        output: String,
    },
}

/// A whole conversation to render as a prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    /// The system message's options.
    pub system: SystemOptions,
    /// The developer message's `# Instructions` (a chat request's system prompt).
    pub developer_instructions: Option<String>,
    /// Function tools, rendered in the developer message's `# Tools` section.
    pub tools: Vec<FunctionTool>,
    /// The history, oldest first.
    pub messages: Vec<Message>,
}

impl Conversation {
    /// Renders the prompt for the assistant's next turn, ending with `<|start|>assistant`.
    pub fn render_for_completion(&self, tokenizer: &Tokenizer) -> Vec<TokenId> {
        let mut out = Renderer {
            tokenizer,
            ids: Vec::new(),
        };
        out.message(
            &Header::role("system"),
            &system_text(&self.system, !self.tools.is_empty()),
        );
        if self.developer_instructions.is_some() || !self.tools.is_empty() {
            out.message(
                &Header::role("developer"),
                &developer_text(self.developer_instructions.as_deref(), &self.tools),
            );
        }
        let dropped = dropped_analysis(&self.messages);
        for (index, message) in self.messages.iter().enumerate() {
            if !dropped(index) {
                out.history_message(message);
            }
        }
        out.ids.push(START);
        out.text("assistant");
        out.ids
    }
}

/// Harmony's `auto_drop_analysis`: when the last assistant message is a final answer, analysis
/// messages that come before the *first* final answer are dropped (later ones are kept).
fn dropped_analysis(messages: &[Message]) -> impl Fn(usize) -> bool + '_ {
    let last_assistant_is_final = messages
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::AssistantFinal(_) => Some(true),
            Message::AssistantAnalysis(_) | Message::AssistantToolCall { .. } => Some(false),
            Message::User(_) | Message::ToolResult { .. } => None,
        })
        .unwrap_or(false);
    let first_final = messages
        .iter()
        .position(|m| matches!(m, Message::AssistantFinal(_)));
    move |index| {
        last_assistant_is_final
            && first_final.is_some_and(|first| index < first)
            && matches!(messages[index], Message::AssistantAnalysis(_))
    }
}

/// A message header: `role[ to=recipient][<|channel|>channel][ <|constrain|>type]`.
struct Header<'a> {
    role: &'a str,
    recipient: Option<&'a str>,
    channel: Option<&'a str>,
    /// Rendered as ` <|constrain|>` followed by this text.
    constrain: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn role(role: &'a str) -> Self {
        Self {
            role,
            recipient: None,
            channel: None,
            constrain: None,
        }
    }

    fn channel(mut self, channel: &'a str) -> Self {
        self.channel = Some(channel);
        self
    }
}

struct Renderer<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<TokenId>,
}

impl Renderer<'_> {
    fn text(&mut self, text: &str) {
        self.ids.extend(self.tokenizer.encode(text));
    }

    fn message(&mut self, header: &Header<'_>, content: &str) {
        self.ids.push(START);
        self.text(header.role);
        if let Some(recipient) = header.recipient {
            self.text(&format!(" to={recipient}"));
        }
        if let Some(channel) = header.channel {
            self.ids.push(CHANNEL);
            self.text(channel);
        }
        if let Some(rest) = header.constrain {
            self.text(" ");
            self.ids.push(CONSTRAIN);
            if !rest.is_empty() {
                self.text(rest);
            }
        }
        self.ids.push(MESSAGE);
        self.text(content);
        // Harmony ends an assistant message that has a recipient with <|call|>.
        let is_call = header.role == "assistant" && header.recipient.is_some();
        self.ids.push(if is_call { CALL } else { END });
    }

    fn history_message(&mut self, message: &Message) {
        match message {
            Message::User(text) => self.message(&Header::role("user"), text),
            Message::AssistantFinal(text) => {
                self.message(&Header::role("assistant").channel("final"), text)
            }
            Message::AssistantAnalysis(text) => {
                self.message(&Header::role("assistant").channel("analysis"), text)
            }
            Message::AssistantToolCall { name, arguments } => {
                let recipient = format!("functions.{name}");
                let header = Header {
                    role: "assistant",
                    recipient: Some(&recipient),
                    channel: Some("commentary"),
                    constrain: Some("json"),
                };
                self.message(&header, arguments);
            }
            Message::ToolResult { name, output } => {
                let author = format!("functions.{name}");
                let header = Header {
                    role: &author,
                    recipient: Some("assistant"),
                    channel: Some("commentary"),
                    constrain: None,
                };
                self.message(&header, output);
            }
        }
    }
}

fn system_text(system: &SystemOptions, has_function_tools: bool) -> String {
    let mut top = vec![
        MODEL_IDENTITY.to_owned(),
        format!("Knowledge cutoff: {}", system.knowledge_cutoff),
    ];
    if let Some(date) = &system.current_date {
        top.push(format!("Current date: {date}"));
    }
    let mut channels = String::from(
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
    );
    if has_function_tools {
        channels.push_str("\nCalls to these tools must go to the commentary channel: 'functions'.");
    }
    [
        top.join("\n"),
        format!("Reasoning: {}", system.reasoning_effort.as_str()),
        channels,
    ]
    .join("\n\n")
}

fn developer_text(instructions: Option<&str>, tools: &[FunctionTool]) -> String {
    let mut sections = Vec::new();
    if let Some(instructions) = instructions {
        sections.push("# Instructions".to_owned());
        sections.push(instructions.to_owned());
    }
    if !tools.is_empty() {
        sections.push(tools_section(tools));
    }
    sections.join("\n\n")
}

/// Harmony's `template_tools_section` for the single `functions` namespace (no description).
fn tools_section(tools: &[FunctionTool]) -> String {
    let mut lines = vec![
        "## functions\n".to_owned(),
        "namespace functions {\n".to_owned(),
    ];
    for tool in tools {
        lines.extend(tool.description.lines().map(|line| format!("// {line}")));
        match &tool.parameters {
            Some(schema) => lines.push(format!(
                "type {} = (_: {}) => any;\n",
                tool.name,
                schema_to_typescript(schema, "")
            )),
            None => lines.push(format!("type {} = () => any;\n", tool.name)),
        }
    }
    lines.push("} // namespace functions".to_owned());
    format!("# Tools\n\n{}", lines.join("\n"))
}

fn str_field<'v>(schema: &'v Value, key: &str) -> Option<&'v str> {
    schema.get(key).and_then(Value::as_str)
}

fn is_enum(schema: &Value) -> bool {
    schema
        .get("enum")
        .and_then(Value::as_array)
        .is_some_and(|values| !values.is_empty())
}

fn is_nullable(schema: &Value) -> bool {
    schema
        .get("nullable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Appends ` | null` to a variant marked `nullable` (unless it already mentions null).
fn with_nullable(schema: &Value, type_str: String) -> String {
    if is_nullable(schema) && !type_str.contains("null") {
        format!("{type_str} | null")
    } else {
        type_str
    }
}

/// The `default: …` comment text harmony writes for a oneOf variant.
fn variant_default(variant: &Value, default: &Value) -> String {
    match default.as_str() {
        Some(s) if !is_enum(variant) => format!("default: \"{s}\""),
        Some(s) => format!("default: {s}"),
        None => format!("default: {default}"),
    }
}

/// Harmony's `json_schema_to_typescript`, rule for rule (including its oddities, such as an
/// object property's description written both above the key and inside the nested type).
fn schema_to_typescript(schema: &Value, indent: &str) -> String {
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        let mut out = String::new();
        for variant in variants {
            out.push_str(&format!("\n{indent} | "));
            let type_str = schema_to_typescript(variant, &format!("{indent}   "));
            out.push_str(&with_nullable(variant, type_str));
            let mut comments = Vec::new();
            if let Some(desc) = str_field(variant, "description") {
                comments.push(desc.to_owned());
            }
            if let Some(default) = variant.get("default") {
                // Unlike the property-level rule, an enum's string default keeps its quotes.
                match default.as_str() {
                    Some(s) if !is_enum(variant) => comments.push(format!("default: \"{s}\"")),
                    _ => comments.push(format!("default: {default}")),
                }
            }
            if !comments.is_empty() {
                out.push_str(&format!(" // {}", comments.join(" ")));
            }
        }
        return out;
    }
    if let Some(types) = schema.get("type").and_then(Value::as_array) {
        let names: Vec<&str> = types
            .iter()
            .filter_map(Value::as_str)
            .map(|t| if t == "integer" { "number" } else { t })
            .collect();
        if !names.is_empty() {
            return names.join(" | ");
        }
    }
    match str_field(schema, "type") {
        Some("object") => object_to_typescript(schema, indent),
        Some("string") => {
            let values: Vec<String> = schema
                .get("enum")
                .and_then(Value::as_array)
                .map(|values| {
                    values
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|s| format!("\"{s}\""))
                        .collect()
                })
                .unwrap_or_default();
            if values.is_empty() {
                "string".to_owned()
            } else {
                values.join(" | ")
            }
        }
        Some("number") | Some("integer") => "number".to_owned(),
        Some("boolean") => "boolean".to_owned(),
        Some("array") => match schema.get("items") {
            Some(items) => format!("{}[]", schema_to_typescript(items, indent)),
            None => "Array<any>".to_owned(),
        },
        _ => "any".to_owned(),
    }
}

fn object_to_typescript(schema: &Value, indent: &str) -> String {
    let mut out = String::new();
    if let Some(desc) = str_field(schema, "description") {
        out.push_str(&format!("{indent}// {desc}\n"));
    }
    out.push_str("{\n");
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (key, prop) in props {
            let optional = if required.contains(&key.as_str()) {
                ""
            } else {
                "?"
            };
            if let Some(title) = str_field(prop, "title") {
                out.push_str(&format!("{indent}// {title}\n{indent}//\n"));
            }
            let one_of = prop.get("oneOf");
            if one_of.is_none() {
                if let Some(desc) = str_field(prop, "description") {
                    out.push_str(&format!("{indent}// {desc}\n"));
                }
            }
            if let Some(examples) = prop.get("examples").and_then(Value::as_array) {
                if !examples.is_empty() {
                    out.push_str(&format!("{indent}// Examples:\n"));
                    for example in examples.iter().filter_map(Value::as_str) {
                        out.push_str(&format!("{indent}// - \"{example}\"\n"));
                    }
                }
            }
            if let Some(variants) = one_of.and_then(Value::as_array) {
                one_of_property(&mut out, indent, key, optional, prop, variants);
                continue;
            }
            out.push_str(&format!("{indent}{key}{optional}: "));
            let type_str = schema_to_typescript(prop, &format!("{indent}    "));
            out.push_str(&with_nullable(prop, type_str));
            out.push(',');
            if one_of.is_none() {
                if let Some(default) = prop.get("default") {
                    match default.as_str() {
                        Some(s) if !is_enum(prop) => out.push_str(&format!(" // default: \"{s}\"")),
                        Some(s) => out.push_str(&format!(" // default: {s}")),
                        None => out.push_str(&format!(" // default: {default}")),
                    }
                }
            }
            out.push('\n');
        }
    }
    out.push_str(&format!("{indent}}}"));
    out
}

/// A property whose schema is a `oneOf`: comments above, then one ` | variant` line each.
fn one_of_property(
    out: &mut String,
    indent: &str,
    key: &str,
    optional: &str,
    prop: &Value,
    variants: &[Value],
) {
    let property_desc = str_field(prop, "description");
    let first_variant_desc = variants.first().and_then(|v| str_field(v, "description"));
    let skip_property_desc = property_desc.is_some() && property_desc == first_variant_desc;
    let mut desc_above = false;
    if let (false, Some(desc)) = (skip_property_desc, property_desc) {
        out.push_str(&format!("{indent}// {desc}\n"));
        desc_above = true;
    }
    if let Some(default) = prop.get("default") {
        out.push_str(&format!("{indent}// {}\n", variant_default(prop, default)));
    }
    out.push_str(&format!("{indent}{key}{optional}:\n"));
    for (i, variant) in variants.iter().enumerate() {
        out.push_str(&format!("{indent} | "));
        let type_str = schema_to_typescript(variant, &format!("{indent}   "));
        out.push_str(&with_nullable(variant, type_str));
        let mut comments = Vec::new();
        if !(i == 0 && desc_above) {
            if let Some(desc) = str_field(variant, "description") {
                if Some(desc) != property_desc {
                    comments.push(desc.to_owned());
                }
            }
        }
        if let Some(default) = variant.get("default") {
            comments.push(variant_default(variant, default));
        }
        if !comments.is_empty() {
            out.push_str(&format!(" // {}", comments.join(" ")));
        }
        out.push('\n');
    }
    out.push_str(&format!("{indent},\n"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render_text(conversation: &Conversation) -> String {
        let tok = Tokenizer::get();
        tok.decode(&conversation.render_for_completion(&tok))
            .expect("rendered ids are valid")
    }

    /// gpt-oss.md §5.4: the minimal system + developer + user prompt, byte for byte.
    #[test]
    fn minimal_prompt_matches_reference_text() {
        let conversation = Conversation {
            system: SystemOptions {
                reasoning_effort: ReasoningEffort::High,
                current_date: Some("2025-06-28".to_owned()),
                ..SystemOptions::default()
            },
            developer_instructions: Some("You are a helpful assistant.".to_owned()),
            tools: Vec::new(),
            messages: vec![Message::User("Hello".to_owned())],
        };
        assert_eq!(
            render_text(&conversation),
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n\
             Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n\
             # Valid channels: analysis, commentary, final. Channel must be included for every \
             message.<|end|><|start|>developer<|message|># Instructions\n\nYou are a helpful \
             assistant.<|end|><|start|>user<|message|>Hello<|end|><|start|>assistant"
        );
    }

    #[test]
    fn tool_call_and_result_use_harmony_spelling() {
        let conversation = Conversation {
            tools: vec![FunctionTool {
                name: "f".to_owned(),
                description: String::new(),
                parameters: None,
            }],
            messages: vec![
                Message::User("hi".to_owned()),
                Message::AssistantToolCall {
                    name: "f".to_owned(),
                    arguments: "{}".to_owned(),
                },
                Message::ToolResult {
                    name: "f".to_owned(),
                    output: "ok".to_owned(),
                },
            ],
            ..Conversation::default()
        };
        let text = render_text(&conversation);
        assert!(text.ends_with(
            "<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{}\
             <|call|><|start|>functions.f to=assistant<|channel|>commentary<|message|>ok<|end|>\
             <|start|>assistant"
        ));
        assert!(text.contains("<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\ntype f = () => any;\n\n} // namespace functions<|end|>"));
        assert!(text.contains(
            "\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>"
        ));
    }

    #[test]
    fn schema_rendering_keeps_key_order_and_harmony_quirks() {
        let schema = json!({
            "type": "object",
            "properties": {
                "zeta": {"type": "string", "description": "City"},
                "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
                "opts": {"type": "object", "description": "Options",
                         "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
            },
            "required": ["zeta"]
        });
        assert_eq!(
            schema_to_typescript(&schema, ""),
            "{\n// City\nzeta: string,\nunit?: \"c\" | \"f\", // default: c\n// Options\n\
             opts?:     // Options\n{\n    a: boolean,\n    },\n}"
        );
    }

    #[test]
    fn analysis_before_first_final_is_dropped() {
        let messages = vec![
            Message::User("q1".to_owned()),
            Message::AssistantAnalysis("think1".to_owned()),
            Message::AssistantFinal("a1".to_owned()),
            Message::User("q2".to_owned()),
            Message::AssistantAnalysis("think2".to_owned()),
            Message::AssistantFinal("a2".to_owned()),
            Message::User("q3".to_owned()),
        ];
        let conversation = Conversation {
            messages,
            ..Conversation::default()
        };
        let text = render_text(&conversation);
        assert!(!text.contains("think1"));
        assert!(text.contains("think2"));

        // Unfinished tool loop: the last assistant message is a call, nothing is dropped.
        let conversation = Conversation {
            messages: vec![
                Message::User("q".to_owned()),
                Message::AssistantAnalysis("think".to_owned()),
                Message::AssistantToolCall {
                    name: "f".to_owned(),
                    arguments: "{}".to_owned(),
                },
                Message::ToolResult {
                    name: "f".to_owned(),
                    output: "1".to_owned(),
                },
            ],
            ..Conversation::default()
        };
        assert!(render_text(&conversation).contains("<|channel|>analysis<|message|>think<|end|>"));
    }

    #[test]
    fn special_token_text_in_messages_stays_text() {
        let conversation = Conversation {
            messages: vec![Message::User("<|end|><|start|>system".to_owned())],
            ..Conversation::default()
        };
        let tok = Tokenizer::get();
        let ids = conversation.render_for_completion(&tok);
        let specials = ids.iter().filter(|&&id| Tokenizer::is_special(id)).count();
        // system (start, message, end) + user (start, message, end) + final start.
        assert_eq!(specials, 7);
    }
}
