//! Golden test of the chat format against openai-harmony, the official renderer.
//!
//! `tests/reference/harmony_golden.json` (written by `tests/reference/harmony_golden.py`, see
//! its header to regenerate) holds conversations in a neutral JSON form with harmony's prompt
//! ids, and model replies with what harmony's parser makes of them. Every prompt must render
//! to exactly harmony's ids, and every reply must parse to harmony's meaning, both fed whole
//! and token by token.

use gptossd::chat::{
    parse_reply, ChatEvent, Conversation, FunctionTool, Message, ReasoningEffort, Reply,
    ReplyParser, SystemOptions, TokenId, Tokenizer, ToolCall,
};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/harmony_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read harmony_golden.json");
    serde_json::from_str(&text).expect("parse harmony_golden.json")
}

fn str_of(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
        .to_owned()
}

fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn ids_of(v: &Value) -> Vec<TokenId> {
    v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| u32::try_from(id.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

/// The neutral JSON form of a conversation → gptossd's types.
fn conversation(v: &Value) -> Conversation {
    let reasoning_effort = match v["reasoning_effort"].as_str() {
        Some("low") => ReasoningEffort::Low,
        Some("medium") => ReasoningEffort::Medium,
        Some("high") => ReasoningEffort::High,
        other => panic!("reasoning_effort {other:?}"),
    };
    let mut system = SystemOptions {
        reasoning_effort,
        current_date: opt_str(v, "current_date"),
        ..SystemOptions::default()
    };
    if let Some(cutoff) = opt_str(v, "knowledge_cutoff") {
        system.knowledge_cutoff = cutoff;
    }
    let tools = v["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| FunctionTool {
            name: str_of(t, "name"),
            description: str_of(t, "description"),
            parameters: Some(t["parameters"].clone()).filter(|p| !p.is_null()),
        })
        .collect();
    let messages = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| match m["type"].as_str() {
            Some("user") => Message::User(str_of(m, "text")),
            Some("assistant_final") => Message::AssistantFinal(str_of(m, "text")),
            Some("assistant_analysis") => Message::AssistantAnalysis(str_of(m, "text")),
            Some("assistant_tool_call") => Message::AssistantToolCall {
                name: str_of(m, "name"),
                arguments: str_of(m, "arguments"),
            },
            Some("tool_result") => Message::ToolResult {
                name: str_of(m, "name"),
                output: str_of(m, "output"),
            },
            other => panic!("message type {other:?}"),
        })
        .collect();
    Conversation {
        system,
        developer_instructions: opt_str(v, "developer_instructions"),
        tools,
        messages,
    }
}

fn expected_reply(v: &Value) -> Reply {
    Reply {
        reasoning: str_of(v, "reasoning"),
        content: str_of(v, "content"),
        tool_calls: v["tool_calls"]
            .as_array()
            .expect("tool_calls")
            .iter()
            .map(|c| ToolCall {
                name: str_of(c, "name"),
                arguments: str_of(c, "arguments"),
            })
            .collect(),
    }
}

#[test]
fn prompts_render_to_harmonys_ids() {
    let golden = golden();
    let tokenizer = Tokenizer::get();
    let cases = golden["render_cases"].as_array().expect("render_cases");
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in cases {
        let name = str_of(case, "name");
        let ours = conversation(&case["conversation"]).render_for_completion(&tokenizer);
        if ours != ids_of(case) {
            let text = tokenizer.decode(&ours).expect("valid ids");
            failures.push(format!(
                "{name}:\n--- harmony\n{}\n--- gptossd\n{text}",
                str_of(case, "text")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn harmony_replies_parse_to_harmonys_meaning() {
    let golden = golden();
    let tokenizer = Tokenizer::get();
    let cases = golden["reply_cases"].as_array().expect("reply_cases");
    assert!(cases.len() >= 4);
    for case in cases {
        let name = str_of(case, "name");
        let ids = ids_of(case);
        let expected = expected_reply(&case["expected"]);
        let (reply, summary) = parse_reply(tokenizer, &ids);
        assert_eq!(reply, expected, "{name}");
        assert_eq!(summary.tool_calls, expected.tool_calls.len(), "{name}");

        // Streaming: every delta is whole text, and the deltas add up to the same reply.
        let mut parser = ReplyParser::new(tokenizer);
        let mut streamed = Reply::default();
        for &id in &ids {
            for event in parser.feed(id) {
                if let ChatEvent::Content(t) | ChatEvent::Reasoning(t) = &event {
                    assert!(!t.contains(char::REPLACEMENT_CHARACTER), "{name}");
                }
                streamed.apply(event);
            }
        }
        assert!(parser.is_done(), "{name}: ends with a stop token");
        let (rest, _) = parser.finish();
        rest.into_iter().for_each(|e| streamed.apply(e));
        assert_eq!(streamed, expected, "{name} (streamed)");
    }
}
