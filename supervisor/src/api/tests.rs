//! Tests of the API layer: one per bad-input row (status, type, param, and that the message
//! names the value), realistic requests parsed into the expected conversation and rendered to
//! harmony's golden ids, and response bodies in the shapes OpenAI clients read.

use serde_json::{json, Value};

use super::chat::ToolChoice;
use super::completions::{ValidCompletionRequest, DEFAULT_COMPLETION_MAX_TOKENS};
use super::limits::check_limits;
use super::responses::{
    tool_call_id, ChatCompletion, ChatLogprobs, ChatTokenLogprob, ChunkBuilder, Completion,
    CompletionLogprobs, CompletionLogprobsBuilder,
};
use super::*;
use crate::chat::{
    parse_reply, Conversation, Ending, FunctionTool, Message, ReasoningEffort, ReplyParser,
    Summary, SystemOptions, TokenId, Tokenizer,
};
use crate::config::ProfileName;

const TODAY: &str = "2025-06-28";

fn chat(body: Value) -> ValidChatRequest {
    parse_chat(body.to_string().as_bytes(), TODAY).expect("valid chat request")
}

fn chat_err(body: Value) -> ApiError {
    parse_chat(body.to_string().as_bytes(), TODAY).expect_err("request must be refused")
}

fn completion(body: Value) -> ValidCompletionRequest {
    parse_completion(body.to_string().as_bytes(), &Tokenizer::get())
        .expect("valid completion request")
}

fn completion_err(body: Value) -> ApiError {
    parse_completion(body.to_string().as_bytes(), &Tokenizer::get())
        .expect_err("request must be refused")
}

/// Asserts status, type, param and that the message contains each of `names`.
#[track_caller]
fn assert_error(e: &ApiError, status: u16, kind: &str, param: Option<&str>, names: &[&str]) {
    assert_eq!(e.status, status, "{e:?}");
    assert_eq!(e.kind, kind, "{e:?}");
    assert_eq!(e.param.as_deref(), param, "{e:?}");
    for name in names {
        assert!(
            e.message.contains(name),
            "message {:?} lacks {name:?}",
            e.message
        );
    }
}

#[track_caller]
fn assert_400(e: &ApiError, param: Option<&str>, names: &[&str]) {
    assert_error(e, 400, "invalid_request_error", param, names);
}

fn hello(extra: Value) -> Value {
    let mut body = json!({"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            body.insert(k.clone(), v.clone());
        }
    }
    body
}

const LIMITS: Limits = Limits {
    profile_max_new_tokens: 1024,
    context_tokens: 4096,
};

// ---------------------------------------------------------------------------------------------
// Bad input, one row each

#[test]
fn malformed_json_names_line_and_column() {
    let e = parse_chat(b"{\"messages\": [\n  {\"role\": \"user\",,}]}", TODAY).unwrap_err();
    assert_400(&e, None, &["invalid JSON at line 2 column"]);
    assert_eq!(e.code.as_deref(), Some("invalid_json"));
    let e = parse_completion(b"{\"prompt\": \"a\"", &Tokenizer::get()).unwrap_err();
    assert_400(&e, None, &["invalid JSON at line 1 column 14"]);
}

#[test]
fn body_that_is_not_an_object() {
    let e = parse_chat(b"[1, 2]", TODAY).unwrap_err();
    assert_400(&e, None, &["JSON object", "an array of 2 elements"]);
}

#[test]
fn wrong_types_name_the_field_path() {
    let cases = [
        (
            json!({"temperature": "hot"}),
            "temperature",
            "a string (\"hot\")",
        ),
        (json!({"top_p": [1]}), "top_p", "an array"),
        (
            json!({"max_tokens": "10"}),
            "max_tokens",
            "a string (\"10\")",
        ),
        (json!({"seed": 1.5}), "seed", "a number (1.5)"),
        (json!({"stream": "yes"}), "stream", "a string (\"yes\")"),
        (json!({"stop": 5}), "stop", "a number (5)"),
        (json!({"stop": ["a", 7]}), "stop[1]", "a number (7)"),
        (
            json!({"logprobs": "true"}),
            "logprobs",
            "a string (\"true\")",
        ),
        (json!({"model": 20}), "model", "a number (20)"),
        (
            json!({"messages": "hello"}),
            "messages",
            "a string (\"hello\")",
        ),
        (
            json!({"stream": true, "stream_options": {"include_usage": 1}}),
            "stream_options.include_usage",
            "a number (1)",
        ),
        (
            json!({"reasoning": {"effort": 3}}),
            "reasoning.effort",
            "a number (3)",
        ),
        (
            json!({"priority": "high"}),
            "priority",
            "a string (\"high\")",
        ),
        (json!({"tools": {"type": "function"}}), "tools", "an object"),
        (
            json!({"tools": [{"type": "function", "function": {"name": 3}}]}),
            "tools[0].function.name",
            "a number (3)",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}),
            "tools[0].function.parameters",
            "a string (\"{}\")",
        ),
    ];
    for (extra, param, value) in cases {
        let e = chat_err(hello(extra.clone()));
        assert_400(&e, Some(param), &[param, value]);
        assert_eq!(e.code.as_deref(), Some("invalid_type"), "{extra}");
    }
}

#[test]
fn wrong_types_inside_messages() {
    let e = chat_err(
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}),
    );
    assert_400(
        &e,
        Some("messages[1].content"),
        &["messages[1].content", "a number (5)"],
    );
    let e = chat_err(json!({"messages": ["hi"]}));
    assert_400(&e, Some("messages[0]"), &["an object", "\"hi\""]);
    let e = chat_err(json!({"messages": [{"content": "hi"}]}));
    assert_400(
        &e,
        Some("messages[0].role"),
        &["messages[0].role is required"],
    );
    let e = chat_err(json!({"messages": [{"role": "user"}]}));
    assert_400(
        &e,
        Some("messages[0].content"),
        &["messages[0].content is required"],
    );
    let e =
        chat_err(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}));
    assert_400(&e, Some("messages[0].content[0].text"), &["a number (1)"]);
    let e = chat_err(json!({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": 12}}]}
    ]}));
    assert_400(
        &e,
        Some("messages[1].tool_calls[0].function.arguments"),
        &["a number (12)"],
    );
}

#[test]
fn unknown_profile() {
    let e = chat_err(hello(json!({"profile": "fastest"})));
    assert_400(
        &e,
        Some("profile"),
        &["unknown profile \"fastest\" (expected latency_first, balanced, quality_first)"],
    );
    let e = completion_err(json!({"prompt": "a", "profile": "fastest"}));
    assert_400(&e, Some("profile"), &["\"fastest\""]);
}

#[test]
fn empty_messages() {
    let e = chat_err(json!({"messages": []}));
    assert_400(&e, Some("messages"), &["messages must not be empty"]);
    let e = chat_err(json!({"model": "m"}));
    assert_400(&e, Some("messages"), &["messages is required"]);
    assert_eq!(e.code.as_deref(), Some("missing_required_parameter"));
}

#[test]
fn max_tokens_zero_and_negative() {
    let e = chat_err(hello(json!({"max_tokens": 0})));
    assert_400(
        &e,
        Some("max_tokens"),
        &["max_tokens must be at least 1, got 0"],
    );
    let e = chat_err(hello(json!({"max_completion_tokens": -5})));
    assert_400(
        &e,
        Some("max_completion_tokens"),
        &["max_completion_tokens must be at least 1, got -5"],
    );
    let e = completion_err(json!({"prompt": "a", "max_tokens": -1}));
    assert_400(&e, Some("max_tokens"), &["got -1"]);
    let e = chat_err(hello(
        json!({"max_tokens": 10, "max_completion_tokens": 20}),
    ));
    assert_400(&e, Some("max_tokens"), &["(20)", "(10)", "disagree"]);
    // Equal values are fine.
    assert_eq!(
        chat(hello(json!({"max_tokens": 7, "max_completion_tokens": 7}))).max_tokens(),
        Some(7)
    );
}

#[test]
fn max_tokens_beyond_the_profile() {
    let request = chat(hello(json!({"max_tokens": 5000})));
    let e = request.check_limits(100, &LIMITS).unwrap_err();
    assert_400(&e, Some("max_tokens"), &["1024", "5000"]);
    let e = check_limits(Some(0), 10, &LIMITS).unwrap_err();
    assert_400(&e, Some("max_tokens"), &["got 0"]);
}

#[test]
fn prompt_beyond_the_context() {
    let e = check_limits(None, 5000, &LIMITS).unwrap_err();
    assert_400(
        &e,
        None,
        &["prompt of 5000 tokens exceeds the context of 4096 tokens"],
    );
    assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
    let e = chat(hello(json!({})))
        .check_limits(5000, &LIMITS)
        .unwrap_err();
    assert_400(&e, Some("messages"), &["5000", "4096"]);
    let ids: Vec<u32> = (0..20).collect();
    let small = Limits {
        profile_max_new_tokens: 8,
        context_tokens: 10,
    };
    let e = completion(json!({"prompt": ids}))
        .check_limits(&small)
        .unwrap_err();
    assert_400(
        &e,
        Some("prompt"),
        &["prompt of 20 tokens exceeds the context of 10 tokens"],
    );
    // A prompt that fills the context leaves nothing to generate.
    let e = check_limits(None, 4096, &LIMITS).unwrap_err();
    assert_400(&e, None, &["4096", "no room"]);
    // An explicit max_tokens that does not fit beside the prompt.
    let e = check_limits(Some(1000), 3500, &LIMITS).unwrap_err();
    assert_400(&e, Some("max_tokens"), &["3500", "1000", "4096", "596"]);
}

#[test]
fn token_id_beyond_the_vocabulary() {
    let e = completion_err(json!({"prompt": [1, 2, 201088]}));
    assert_400(&e, Some("prompt[2]"), &["prompt[2]", "201088", "201087"]);
    let e = completion_err(json!({"prompt": [[5, 300000]]}));
    assert_400(&e, Some("prompt[0][1]"), &["300000"]);
    let e = completion_err(json!({"prompt": [3, -1]}));
    assert_400(&e, Some("prompt[1]"), &["-1"]);
    let e = completion_err(json!({"prompt": [3, "x"]}));
    assert_400(&e, Some("prompt[1]"), &["an integer", "\"x\""]);
    // The last valid id is accepted.
    assert_eq!(
        completion(json!({"prompt": [201087]})).prompt_ids(),
        &[201087]
    );
}

#[test]
fn n_greater_than_one() {
    let e = chat_err(hello(json!({"n": 2})));
    assert_400(&e, Some("n"), &["n > 1 is not supported", "got 2"]);
    assert_eq!(e.code.as_deref(), Some("unsupported_parameter"));
    let e = completion_err(json!({"prompt": "a", "n": 3}));
    assert_400(&e, Some("n"), &["got 3"]);
    let e = chat_err(hello(json!({"n": 0})));
    assert_400(&e, Some("n"), &["at least 1, got 0"]);
    chat(hello(json!({"n": 1})));
}

#[test]
fn top_logprobs_without_logprobs() {
    let e = chat_err(hello(json!({"top_logprobs": 3})));
    assert_400(&e, Some("top_logprobs"), &["requires logprobs", "3"]);
    let e = chat_err(hello(json!({"logprobs": true, "top_logprobs": 21})));
    assert_400(&e, Some("top_logprobs"), &["between 0 and 20, got 21"]);
    let e = completion_err(json!({"prompt": "a", "logprobs": 50}));
    assert_400(&e, Some("logprobs"), &["got 50"]);
}

#[test]
fn stream_options_without_stream() {
    let e = chat_err(hello(json!({"stream_options": {"include_usage": true}})));
    assert_400(
        &e,
        Some("stream_options"),
        &["stream_options", "stream is true", "false"],
    );
    let e = completion_err(json!({"prompt": "a", "stream": false, "stream_options": {}}));
    assert_400(&e, Some("stream_options"), &["stream is true"]);
}

#[test]
fn bad_tool_name() {
    let e = chat_err(hello(json!({"tools": [
        {"type": "function", "function": {"name": "get weather"}}
    ]})));
    assert_400(
        &e,
        Some("tools[0].function.name"),
        &["\"get weather\"", "[A-Za-z0-9_-]"],
    );
    let long = "x".repeat(65);
    let e = chat_err(hello(
        json!({"tools": [{"type": "function", "function": {"name": long}}]}),
    ));
    assert_400(&e, Some("tools[0].function.name"), &[&long]);
    let e = chat_err(hello(json!({"tools": [
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "f"}}
    ]})));
    assert_400(&e, Some("tools[1].function.name"), &["\"f\"", "twice"]);
    let e = chat_err(hello(json!({"tools": [{"type": "web_search"}]})));
    assert_400(&e, Some("tools[0].type"), &["\"web_search\""]);
}

#[test]
fn tool_choice_naming_an_unknown_tool() {
    let e = chat_err(hello(json!({
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}
    })));
    assert_400(
        &e,
        Some("tool_choice.function.name"),
        &["\"get_time\"", "get_weather"],
    );
    let e = chat_err(hello(json!({"tool_choice": "required"})));
    assert_400(&e, Some("tool_choice"), &["\"required\"", "none"]);
    let e = chat_err(hello(json!({"tool_choice": "always"})));
    assert_400(&e, Some("tool_choice"), &["\"always\""]);
}

#[test]
fn unknown_tool_call_id() {
    let e = chat_err(json!({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"}
    ]}));
    assert_400(&e, Some("messages[2].tool_call_id"), &["\"call_2\""]);
    let e = chat_err(json!({"messages": [{"role": "tool", "content": "ok"}]}));
    assert_400(&e, Some("messages[0].tool_call_id"), &["required"]);
}

#[test]
fn image_content_part() {
    let e = chat_err(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ]}]}));
    assert_400(
        &e,
        Some("messages[0].content[1].type"),
        &["messages[0].content[1]", "\"image_url\"", "text"],
    );
    assert_eq!(e.code.as_deref(), Some("unsupported_parameter"));
    let e = chat_err(json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}));
    assert_400(
        &e,
        Some("messages[0].content[0].type"),
        &["\"input_audio\""],
    );
    let e = chat_err(json!({"messages": [{"role": "user", "content": [{"type": "sticker"}]}]}));
    assert_400(&e, Some("messages[0].content[0].type"), &["\"sticker\""]);
}

#[test]
fn sampling_values_out_of_range() {
    let e = chat_err(hello(json!({"temperature": 3.5})));
    assert_400(&e, Some("temperature"), &["temperature must be", "got 3.5"]);
    let e = chat_err(hello(json!({"top_p": 0})));
    assert_400(&e, Some("top_p"), &["top_p", "got 0"]);
    let e = chat_err(hello(json!({"seed": -1})));
    assert_400(&e, Some("seed"), &["non-negative", "got -1"]);
    let e = completion_err(json!({"prompt": "a", "top_k": -3}));
    assert_400(&e, Some("top_k"), &["got -3"]);
    let e = chat_err(hello(json!({"priority": 3_000_000_000_i64})));
    assert_400(&e, Some("priority"), &["3000000000"]);
}

#[test]
fn stop_strings() {
    let e = chat_err(hello(json!({"stop": ["a", "b", "c", "d", "e"]})));
    assert_400(&e, Some("stop"), &["at most 4", "got 5"]);
    let e = chat_err(hello(json!({"stop": ["a", ""]})));
    assert_400(
        &e,
        Some("stop[1]"),
        &["stop[1] must not be an empty string"],
    );
    let e = chat_err(hello(json!({"stop": ""})));
    assert_400(&e, Some("stop"), &["empty"]);
    assert_eq!(chat(hello(json!({"stop": "###"}))).stop(), ["###"]);
    assert_eq!(chat(hello(json!({"stop": ["x", "y"]}))).stop(), ["x", "y"]);
}

#[test]
fn unsupported_parameters() {
    let e = chat_err(hello(json!({"presence_penalty": 0.5})));
    assert_400(&e, Some("presence_penalty"), &["not supported", "0.5"]);
    let e = chat_err(hello(json!({"frequency_penalty": -1})));
    assert_400(&e, Some("frequency_penalty"), &["-1"]);
    let e = chat_err(hello(json!({"logit_bias": {"50256": -100}})));
    assert_400(&e, Some("logit_bias"), &["logit_bias"]);
    let e = chat_err(hello(json!({"response_format": {"type": "json_schema"}})));
    assert_400(&e, Some("response_format.type"), &["\"json_schema\""]);
    let e = completion_err(json!({"prompt": "a", "echo": true}));
    assert_400(&e, Some("echo"), &["echo", "true"]);
    let e = completion_err(json!({"prompt": "a", "best_of": 2}));
    assert_400(&e, Some("best_of"), &["got 2"]);
    let e = chat_err(json!({"messages": [{"role": "function", "name": "f", "content": "x"}]}));
    assert_400(&e, Some("messages[0].role"), &["\"function\""]);
    // Zero penalties, an empty logit_bias and a text response_format are accepted.
    chat(hello(
        json!({"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                      "response_format": {"type": "text"}}),
    ));
}

#[test]
fn unknown_top_level_fields_are_refused_by_name() {
    for (body, name) in [
        (hello(json!({"temprature": 0.5})), "temprature"),
        (
            hello(json!({"extra_vendor_field": {"anything": [1, 2]}})),
            "extra_vendor_field",
        ),
        (hello(json!({"functions": []})), "functions"),
        // A completions-only field on chat, and a chat-only field on completions.
        (hello(json!({"echo": false})), "echo"),
    ] {
        let e = chat_err(body);
        assert_400(
            &e,
            Some(name),
            &[&format!("Unrecognized request argument supplied: {name}")],
        );
        assert_eq!(e.code.as_deref(), Some("unknown_parameter"));
    }
    for name in ["reasoning_effort", "tools", "chat_template_kwargs", "foo"] {
        let e = completion_err(json!({"prompt": "a", name: "x"}));
        assert_400(&e, Some(name), &[name]);
        assert_eq!(e.code.as_deref(), Some("unknown_parameter"));
    }
    // The first unknown field in the client's order is the one named.
    let e = parse_chat(
        br#"{"zeta": 1, "messages": [{"role": "user", "content": "x"}], "alpha": 2}"#,
        TODAY,
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("zeta"));
    // Unknown fields inside known objects are not refused (only the top level is checked).
    chat(hello(
        json!({"stream": true, "stream_options": {"include_usage": true, "x": 1}}),
    ));
}

#[test]
fn other_servers_extension_fields_are_accepted() {
    let accepted = json!({
        "user": "u", "metadata": {"k": "v"}, "store": false, "service_tier": "auto",
        "safety_identifier": "s", "prompt_cache_key": "k", "cache_prompt": true,
        "parallel_tool_calls": true, "chat_template_kwargs": {"enable_thinking": false},
        "top_k": 40, "min_p": 0, "repetition_penalty": 1.0, "skip_special_tokens": true,
        "include_reasoning": true, "ignore_eos": true, "reasoning": {"effort": "low"},
    });
    let request = chat(hello(accepted));
    assert!(request.ignore_eos());
    assert_eq!(request.sampling().top_k, Some(40));
    assert!(!chat(hello(json!({}))).ignore_eos());
    let request = completion(json!({
        "prompt": "a", "user": "u", "metadata": {}, "store": true, "service_tier": "default",
        "top_k": -1, "min_p": 0.0, "repetition_penalty": 1, "skip_special_tokens": true,
        "ignore_eos": true, "cache_prompt": false,
    }));
    assert!(request.ignore_eos());

    // Options the sampler does not have are accepted only at the value that turns them off.
    let e = chat_err(hello(json!({"min_p": 0.05})));
    assert_400(&e, Some("min_p"), &["min_p", "only 0", "0.05"]);
    let e = completion_err(json!({"prompt": "a", "repetition_penalty": 1.1}));
    assert_400(&e, Some("repetition_penalty"), &["only 1", "1.1"]);
    let e = chat_err(hello(json!({"skip_special_tokens": false})));
    assert_400(&e, Some("skip_special_tokens"), &["only", "true", "false"]);
    let e = chat_err(hello(json!({"include_reasoning": false})));
    assert_400(
        &e,
        Some("include_reasoning"),
        &["include_reasoning", "false"],
    );
    let e = chat_err(hello(json!({"ignore_eos": "yes"})));
    assert_400(&e, Some("ignore_eos"), &["a boolean"]);
}

#[test]
fn bad_prompts() {
    let e = completion_err(json!({"prompt": ["a", "b", "c"]}));
    assert_400(&e, Some("prompt"), &["multiple prompts", "got 3"]);
    let e = completion_err(json!({"prompt": [[1], [2]]}));
    assert_400(&e, Some("prompt"), &["got 2"]);
    let e = completion_err(json!({"prompt": []}));
    assert_400(&e, Some("prompt"), &["must not be empty"]);
    let e = completion_err(json!({"prompt": ""}));
    assert_400(&e, Some("prompt"), &["at least one token"]);
    let e = completion_err(json!({"model": "m"}));
    assert_400(&e, Some("prompt"), &["prompt is required"]);
    let e = completion_err(json!({"prompt": 42}));
    assert_400(&e, Some("prompt"), &["a number (42)"]);
}

#[test]
fn bad_roles_and_efforts() {
    let e = chat_err(json!({"messages": [{"role": "robot", "content": "x"}]}));
    assert_400(
        &e,
        Some("messages[0].role"),
        &["\"robot\"", "system, developer, user, assistant, tool"],
    );
    let e = chat_err(hello(json!({"reasoning_effort": "extreme"})));
    assert_400(
        &e,
        Some("reasoning_effort"),
        &["\"extreme\"", "low, medium, high"],
    );
    let e = chat_err(hello(
        json!({"reasoning_effort": "low", "reasoning": {"effort": "high"}}),
    ));
    assert_400(&e, Some("reasoning.effort"), &["low", "high"]);
}

#[test]
fn error_table_and_body() {
    let e = ApiError::new(ErrorCase::QueueFull, "queue full: 256 requests waiting");
    assert_eq!((e.status, e.kind), (429, "rate_limit_error"));
    assert_eq!(
        ApiError::new(ErrorCase::Unavailable, "x").kind,
        "service_unavailable"
    );
    assert_eq!(ApiError::internal().status, 500);
    let e = ApiError::new(ErrorCase::Timeout, "x");
    assert_eq!(
        (e.status, e.kind, e.code.as_deref(), e.case.retry_after()),
        (504, "timeout_error", Some("deadline_exceeded"), None)
    );
    assert!(!e.case.is_rejection(), "a timeout is the server's failure");
    let e = ApiError::model_not_found("gpt-5", &["gpt-oss-20b"]);
    assert_eq!((e.status, e.kind), (404, "not_found_error"));
    let body = chat_err(hello(json!({"n": 2}))).body();
    assert_eq!(
        body,
        json!({"error": {
            "message": "n > 1 is not supported, got 2; send one request per choice",
            "type": "invalid_request_error",
            "param": "n",
            "code": "unsupported_parameter"
        }})
    );
    let body = ApiError::new(ErrorCase::InvalidJson, "x").body();
    assert_eq!(body["error"].as_object().map(|o| o.len()), Some(4));
    assert!(body["error"]["param"].is_null());
}

// ---------------------------------------------------------------------------------------------
// Realistic requests

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
        },
        "required": ["location"]
    })
}

fn golden_case(name: &str) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/harmony_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read harmony_golden.json");
    let golden: Value = serde_json::from_str(&text).expect("parse harmony_golden.json");
    golden["render_cases"]
        .as_array()
        .and_then(|cases| cases.iter().find(|c| c["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

pub(super) fn golden_ids(case: &Value) -> Vec<TokenId> {
    case["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .expect("id")
        })
        .collect()
}

/// What the OpenAI Python client sends for a tool round trip (the assistant message echoed
/// back as gptossd returned it, with both reasoning names).
fn tool_round_trip_body() -> Value {
    json!({
        "model": "gpt-oss-20b",
        "messages": [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "What is the weather in Tokyo?"},
            {"role": "assistant", "content": null, "refusal": null,
             "reasoning_content": "Need to use the weather tool.",
             "reasoning": "Need to use the weather tool.",
             "tool_calls": [{"id": "call_8f2a", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"location\": \"Tokyo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_8f2a", "content": "{\"temperature\": 20, \"sunny\": true}"},
            {"role": "assistant", "content": "It is 20°C and sunny in Tokyo."},
            {"role": "user", "content": [{"type": "text", "text": "And in Paris?"}]}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "Gets the current weather in the provided location.",
            "parameters": weather_schema(),
            "strict": false
        }}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "max_completion_tokens": 512,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "someone",
        "metadata": {"k": "v"},
        "profile": "quality_first",
        "priority": -3,
        "return_token_ids": true
    })
}

#[test]
fn tool_round_trip_parses_into_the_conversation() {
    let request = chat(tool_round_trip_body());
    let expected = Conversation {
        system: SystemOptions {
            reasoning_effort: ReasoningEffort::Medium,
            current_date: Some(TODAY.to_owned()),
            ..SystemOptions::default()
        },
        developer_instructions: Some("Use tools when useful.".to_owned()),
        tools: vec![FunctionTool {
            name: "get_weather".to_owned(),
            description: "Gets the current weather in the provided location.".to_owned(),
            parameters: Some(weather_schema()),
        }],
        messages: vec![
            Message::User("What is the weather in Tokyo?".to_owned()),
            Message::AssistantAnalysis("Need to use the weather tool.".to_owned()),
            Message::AssistantToolCall {
                name: "get_weather".to_owned(),
                arguments: "{\"location\": \"Tokyo\"}".to_owned(),
            },
            Message::ToolResult {
                name: "get_weather".to_owned(),
                output: "{\"temperature\": 20, \"sunny\": true}".to_owned(),
            },
            Message::AssistantFinal("It is 20°C and sunny in Tokyo.".to_owned()),
            Message::User("And in Paris?".to_owned()),
        ],
    };
    assert_eq!(request.conversation(), &expected);
    assert_eq!(request.model(), Some("gpt-oss-20b"));
    assert_eq!(request.max_tokens(), Some(512));
    assert_eq!(request.sampling().temperature, 0.7);
    assert_eq!(request.sampling().top_p, 0.9);
    assert_eq!(request.sampling().seed, Some(42));
    assert_eq!(request.sampling().logprobs, None);
    assert_eq!(
        request.stream(),
        Some(StreamOptions {
            include_usage: true
        })
    );
    assert_eq!(request.tool_choice(), &ToolChoice::Auto);
    assert_eq!(request.profile(), Some(ProfileName::QualityFirst));
    assert_eq!(request.priority(), -3);
    assert!(request.return_token_ids());
    assert_eq!(request.reasoning_effort(), None);
}

#[test]
fn tool_round_trip_renders_to_harmonys_golden_ids() {
    let case = golden_case("tool_call_result_and_follow_up");
    let mut request = chat(tool_round_trip_body());
    // The golden case's effort is medium: what a balanced profile would apply.
    request.set_default_effort(ReasoningEffort::Medium);
    let ids = request
        .conversation()
        .render_for_completion(&Tokenizer::get());
    assert_eq!(ids, golden_ids(&case));
}

#[test]
fn system_user_request_renders_to_the_reference_prompt() {
    // gpt-oss.md §5.4, with the effort given the Responses-API way.
    let case = golden_case("date_effort_high_reference_5_4");
    let request = chat(json!({
        "model": "gpt-oss-20b",
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello"}],
        "reasoning": {"effort": "high"}
    }));
    let ids = request
        .conversation()
        .render_for_completion(&Tokenizer::get());
    assert_eq!(ids, golden_ids(&case));
    assert_eq!(request.reasoning_effort(), Some(ReasoningEffort::High));
}

#[test]
fn profile_effort_applies_only_when_the_request_names_none() {
    let mut request = chat(hello(json!({})));
    assert_eq!(
        request.conversation().system.reasoning_effort,
        ReasoningEffort::Medium
    );
    // The answer says whether a prompt rendered before is stale.
    assert!(!request.clone().set_default_effort(ReasoningEffort::Medium));
    assert!(request.set_default_effort(ReasoningEffort::Low));
    assert_eq!(
        request.conversation().system.reasoning_effort,
        ReasoningEffort::Low
    );
    let mut request = chat(hello(json!({"reasoning_effort": "high"})));
    assert!(!request.set_default_effort(ReasoningEffort::Low));
    assert_eq!(
        request.conversation().system.reasoning_effort,
        ReasoningEffort::High
    );
}

#[test]
fn nulls_missing_model_and_content_parts() {
    let request = chat(json!({
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."},
                                              {"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": "Hi", "name": "alice"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "system", "content": "Answer in French."},
            {"role": "system", "content": ""},
            {"role": "user", "content": "Bye"}
        ],
        "temperature": null, "max_tokens": null, "tools": null, "stop": null, "seed": null
    }));
    assert_eq!(request.model(), None);
    let c = request.conversation();
    assert_eq!(
        c.developer_instructions.as_deref(),
        Some("Be brief.\nBe kind.\n\nAnswer in French.")
    );
    assert_eq!(
        c.messages,
        [
            Message::User("Hi".to_owned()),
            Message::AssistantFinal("Hello.".to_owned()),
            Message::User("Bye".to_owned()),
        ]
    );
    assert_eq!(request.sampling().temperature, 1.0);
    assert_eq!(request.max_tokens(), None);
    assert!(c.tools.is_empty());
    assert_eq!(request.stream(), None);
}

#[test]
fn tool_choice_none_and_named() {
    let tools = json!([
        {"type": "function", "function": {"name": "a", "description": "A"}},
        {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {}}}}
    ]);
    let request = chat(hello(json!({"tools": tools, "tool_choice": "none"})));
    assert!(request.conversation().tools.is_empty());
    assert_eq!(request.tool_choice(), &ToolChoice::None);
    let request = chat(hello(json!({"tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "b"}}})));
    let names: Vec<&str> = request
        .conversation()
        .tools
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["b"]);
    assert_eq!(request.tool_choice(), &ToolChoice::Function("b".to_owned()));
    let request = chat(hello(json!({"tools": tools, "tool_choice": "required"})));
    assert_eq!(request.conversation().tools.len(), 2);
    assert_eq!(request.tool_choice(), &ToolChoice::Required);
}

#[test]
fn assistant_preamble_and_object_arguments() {
    let request = chat(json!({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "x", "content": [{"type": "text", "text": "done"}]}
    ]}));
    assert_eq!(
        request.conversation().messages[1..],
        [
            Message::AssistantFinal("Let me check.".to_owned()),
            Message::AssistantToolCall {
                name: "f".to_owned(),
                arguments: "{\"a\":1}".to_owned()
            },
            Message::ToolResult {
                name: "f".to_owned(),
                output: "done".to_owned()
            },
        ]
    );
}

#[test]
fn logprobs_request() {
    let request = chat(hello(json!({"logprobs": true, "top_logprobs": 5})));
    assert_eq!(request.sampling().logprobs, Some(5));
    let request = chat(hello(json!({"logprobs": true})));
    assert_eq!(request.sampling().logprobs, Some(0));
    let request = chat(hello(json!({"logprobs": false})));
    assert_eq!(request.sampling().logprobs, None);
    let request = completion(json!({"prompt": "a", "logprobs": 2}));
    assert_eq!(request.sampling().logprobs, Some(2));
}

#[test]
fn completion_prompts() {
    let tok = Tokenizer::get();
    let request = completion(
        json!({"model": "m", "prompt": "Hello world", "stream": true,
                                    "profile": "latency_first", "priority": 4, "seed": 0}),
    );
    assert_eq!(request.prompt_ids(), tok.encode("Hello world").as_slice());
    assert_eq!(request.max_tokens(), None);
    assert_eq!(request.stream(), Some(StreamOptions::default()));
    assert_eq!(request.profile(), Some(ProfileName::LatencyFirst));
    assert_eq!(request.priority(), 4);
    assert_eq!(request.sampling().seed, Some(0));
    assert_eq!(
        completion(json!({"prompt": ["Hello world"]})).prompt_ids(),
        request.prompt_ids()
    );
    assert_eq!(
        completion(json!({"prompt": [1, 2, 3]})).prompt_ids(),
        &[1, 2, 3]
    );
    assert_eq!(
        completion(json!({"prompt": [[4, 5]]})).prompt_ids(),
        &[4, 5]
    );
    // Special-token spellings in a text prompt become the special ids.
    let ids = completion(
        json!({"prompt": "<|start|>user<|message|>Hi<|end|><|start|>assistant <|bogus|>"}),
    )
    .prompt_ids()
    .to_vec();
    let mut expected = vec![200_006];
    expected.extend(tok.encode("user"));
    expected.push(200_008);
    expected.extend(tok.encode("Hi"));
    expected.extend([200_007, 200_006]);
    expected.extend(tok.encode("assistant <|bogus|>"));
    assert_eq!(ids, expected);
}

#[test]
fn effective_max_tokens() {
    assert_eq!(check_limits(None, 100, &LIMITS), Ok(1024));
    assert_eq!(check_limits(None, 3500, &LIMITS), Ok(596));
    assert_eq!(check_limits(Some(10), 100, &LIMITS), Ok(10));
    assert_eq!(check_limits(Some(1024), 3072, &LIMITS), Ok(1024));
    let request = completion(json!({"prompt": [1, 2, 3]}));
    assert_eq!(
        request.check_limits(&LIMITS),
        Ok(DEFAULT_COMPLETION_MAX_TOKENS)
    );
    let tight = Limits {
        profile_max_new_tokens: 1024,
        context_tokens: 8,
    };
    assert_eq!(request.check_limits(&tight), Ok(5));
    let request = completion(json!({"prompt": [1, 2, 3], "max_tokens": 100}));
    assert_eq!(request.check_limits(&LIMITS), Ok(100));
}

// ---------------------------------------------------------------------------------------------
// Response bodies

pub(super) fn identity() -> ResponseIdentity {
    ResponseIdentity {
        id: "chatcmpl-abc".to_owned(),
        created: 1_751_068_800,
        model: "gpt-oss-20b".to_owned(),
    }
}

/// gptossd's metadata of a request that ran on a fallback.
pub(super) fn metadata() -> GptossdMetadata {
    GptossdMetadata {
        request_id: "chatcmpl-abc".to_owned(),
        profile: ProfileName::QualityFirst,
        model: "gpt-oss-20b".to_owned(),
        model_size: crate::config::ModelSize::B20,
        gpu_mode: "pipeline",
        engine: "gptossd-pipeline",
        backend: "cuda".to_owned(),
        fallback: true,
        queue_time_ms: Some(1.5),
        time_to_first_token_ms: None,
        cancelled: false,
        cached: false,
        deadline_ms: 600_000,
    }
}

/// The `gptossd` object and the headers say the same, in the names clients and scripts read.
#[test]
fn gptossd_metadata_shape_and_headers() {
    let body = serde_json::to_string(&metadata()).expect("serialisable");
    assert_eq!(
        body,
        r#"{"request_id":"chatcmpl-abc","profile":"quality_first","model":"gpt-oss-20b","model_size":"20b","gpu_mode":"pipeline","engine":"gptossd-pipeline","backend":"cuda","fallback":true,"queue_time_ms":1.5,"time_to_first_token_ms":null,"cancelled":false,"cached":false,"deadline_ms":600000}"#
    );
    assert_eq!(
        metadata()
            .headers()
            .map(|(name, value)| format!("{name}: {value}")),
        [
            "x-request-id: chatcmpl-abc",
            "x-gptossd-profile: quality_first",
            "x-gptossd-model: gpt-oss-20b",
            "x-gptossd-model-size: 20b",
            "x-gptossd-gpu-mode: pipeline",
            "x-gptossd-engine: gptossd-pipeline",
            "x-gptossd-backend: cuda",
            "x-gptossd-fallback: true",
        ]
    );
}

pub(super) fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("serialisable")
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}

#[test]
fn chat_completion_shape() {
    let reply = crate::chat::Reply {
        reasoning: "Think.".to_owned(),
        content: "Hello!".to_owned(),
        tool_calls: Vec::new(),
    };
    let usage = Usage::new(50, 12)
        .with_cached_tokens(32)
        .with_reasoning_tokens(4);
    let body = to_json(
        &ChatCompletion::new(&identity(), reply, FinishReason::Stop, usage)
            .with_metadata(metadata())
            .with_token_ids(vec![1, 2], vec![3, 4]),
    );
    assert_eq!(
        keys(&body),
        [
            "choices",
            "created",
            "gptossd",
            "id",
            "model",
            "object",
            "prompt_token_ids",
            "usage"
        ]
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["id"], "chatcmpl-abc");
    assert_eq!(body["created"], 1_751_068_800);
    let choice = &body["choices"][0];
    assert_eq!(
        keys(choice),
        ["finish_reason", "index", "logprobs", "message", "token_ids"]
    );
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": "Hello!", "refusal": null,
               "reasoning_content": "Think.", "reasoning": "Think."})
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62,
               "prompt_tokens_details": {"cached_tokens": 32},
               "completion_tokens_details": {"reasoning_tokens": 4}})
    );
    assert_eq!(body["gptossd"], to_json(&metadata()));
}

#[test]
fn chat_completion_with_tool_calls() {
    let reply = crate::chat::Reply {
        reasoning: String::new(),
        content: String::new(),
        tool_calls: vec![crate::chat::ToolCall {
            name: "get_weather".to_owned(),
            arguments: "{\"location\":\"Paris\"}".to_owned(),
        }],
    };
    let body = to_json(&ChatCompletion::new(
        &identity(),
        reply,
        FinishReason::ToolCalls,
        Usage::new(1, 2),
    ));
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_null());
    assert!(message.get("reasoning").is_none());
    assert_eq!(
        message["tool_calls"],
        json!([{"id": tool_call_id("chatcmpl-abc", 0), "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}])
    );
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert!(body.get("gptossd").is_none());
}

#[test]
fn tool_call_ids_are_deterministic_and_distinct() {
    let a = tool_call_id("chatcmpl-1", 0);
    assert_eq!(a, tool_call_id("chatcmpl-1", 0));
    assert_ne!(a, tool_call_id("chatcmpl-1", 1));
    assert_ne!(a, tool_call_id("chatcmpl-2", 0));
    assert!(a.starts_with("call_"));
    assert_eq!(a.len(), 5 + 24);
    assert!(a[5..].chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn chunk_shapes() {
    let builder = ChunkBuilder::new(identity());
    let role = to_json(&builder.role().with_prompt_token_ids(vec![7]));
    assert_eq!(
        keys(&role),
        [
            "choices",
            "created",
            "id",
            "model",
            "object",
            "prompt_token_ids"
        ]
    );
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(
        role["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}])
    );

    let reasoning = to_json(
        &builder
            .on_event(crate::chat::ChatEvent::Reasoning("Hm".to_owned()))
            .expect("chunk"),
    );
    assert_eq!(
        reasoning["choices"][0]["delta"],
        json!({"reasoning_content": "Hm", "reasoning": "Hm"})
    );

    let content = to_json(
        &builder
            .on_event(crate::chat::ChatEvent::Content("Hi".to_owned()))
            .expect("chunk"),
    );
    assert_eq!(content["choices"][0]["delta"], json!({"content": "Hi"}));

    let start = to_json(
        &builder
            .on_events(&[
                crate::chat::ChatEvent::ToolCallStart {
                    index: 0,
                    name: "f".to_owned(),
                },
                crate::chat::ChatEvent::ToolCallArguments {
                    index: 0,
                    delta: "{\"a\"".to_owned(),
                },
            ])
            .expect("chunk"),
    );
    assert_eq!(
        start["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "id": tool_call_id("chatcmpl-abc", 0), "type": "function",
                               "function": {"name": "f", "arguments": "{\"a\""}}]})
    );
    let more = to_json(
        &builder
            .on_event(crate::chat::ChatEvent::ToolCallArguments {
                index: 0,
                delta: ":1}".to_owned(),
            })
            .expect("chunk"),
    );
    assert_eq!(
        more["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]})
    );
    assert!(builder
        .on_event(crate::chat::ChatEvent::ToolCallEnd { index: 0 })
        .is_none());
    assert!(builder
        .on_event(crate::chat::ChatEvent::Content(String::new()))
        .is_none());
    // What a token that shows nothing travels in when its logprobs or id were asked for.
    assert_eq!(
        to_json(&builder.empty())["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": null}])
    );

    let finish = to_json(
        &builder
            .finish(FinishReason::Length)
            .with_metadata(metadata()),
    );
    assert_eq!(
        finish["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}])
    );
    assert_eq!(finish["gptossd"], to_json(&metadata()));

    let usage = to_json(&builder.usage(Usage::new(3, 4)));
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );
}

/// Streaming the golden replies through the parser and the chunk builder, then joining the
/// deltas the way OpenAI clients do, gives the same reply as parsing it whole.
#[test]
fn streamed_chunks_add_up_to_the_reply() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/harmony_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read harmony_golden.json");
    let golden: Value = serde_json::from_str(&text).expect("parse");
    let tok = Tokenizer::get();
    for case in golden["reply_cases"].as_array().expect("reply_cases") {
        let ids = golden_ids(case);
        let (whole, summary) = parse_reply(tok, &ids);
        let builder = ChunkBuilder::new(identity());
        let mut parser = ReplyParser::new(tok);
        let mut chunks = vec![to_json(&builder.role())];
        for &id in &ids {
            chunks.extend(builder.on_events(&parser.feed(id)).map(|c| to_json(&c)));
        }
        let (last, streamed_summary) = parser.finish();
        chunks.extend(builder.on_events(&last).map(|c| to_json(&c)));
        assert_eq!(streamed_summary, summary);
        chunks.push(to_json(
            &builder.finish(FinishReason::for_chat(&summary, false)),
        ));

        let (mut content, mut reasoning, mut reasoning2) =
            (String::new(), String::new(), String::new());
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for chunk in &chunks {
            let delta = &chunk["choices"][0]["delta"];
            content.push_str(delta["content"].as_str().unwrap_or(""));
            reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
            reasoning2.push_str(delta["reasoning"].as_str().unwrap_or(""));
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().expect("index") as usize;
                if index == calls.len() {
                    calls.push(Default::default());
                }
                let entry = &mut calls[index];
                entry.0.push_str(call["id"].as_str().unwrap_or(""));
                entry
                    .1
                    .push_str(call["function"]["name"].as_str().unwrap_or(""));
                entry
                    .2
                    .push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        let name = &case["name"];
        assert_eq!(content, whole.content, "{name}");
        assert_eq!(reasoning, whole.reasoning, "{name}");
        assert_eq!(reasoning2, whole.reasoning, "{name}");
        let expected: Vec<(String, String, String)> = whole
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    tool_call_id("chatcmpl-abc", i),
                    c.name.clone(),
                    c.arguments.clone(),
                )
            })
            .collect();
        assert_eq!(calls, expected, "{name}");
        let finish = &chunks[chunks.len() - 1]["choices"][0]["finish_reason"];
        let want = if whole.tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        };
        assert_eq!(finish, want, "{name}");
    }
}

#[test]
fn finish_reasons() {
    let s = |ending, tool_calls| Summary { ending, tool_calls };
    assert_eq!(
        FinishReason::for_chat(&s(Ending::Return, 0), false),
        FinishReason::Stop
    );
    assert_eq!(
        FinishReason::for_chat(&s(Ending::Call, 1), false),
        FinishReason::ToolCalls
    );
    assert_eq!(
        FinishReason::for_chat(&s(Ending::Unterminated, 0), true),
        FinishReason::Length
    );
    assert_eq!(
        FinishReason::for_chat(&s(Ending::Unterminated, 1), true),
        FinishReason::Length
    );
    // A stop string ends an unterminated reply: "stop".
    assert_eq!(
        FinishReason::for_chat(&s(Ending::Unterminated, 0), false),
        FinishReason::Stop
    );
    assert_eq!(
        FinishReason::for_chat(&s(Ending::EndOfText, 0), false),
        FinishReason::Stop
    );
}

#[test]
fn chat_logprobs_shape() {
    let tok = Tokenizer::get();
    let hi = tok.encode("Hi")[0];
    let entry = ChatTokenLogprob::new(
        &tok,
        hi,
        -0.25,
        &[(hi, -0.25), (200_002, f32::NEG_INFINITY)],
    );
    let body = to_json(&ChatLogprobs {
        content: vec![entry],
    });
    assert_eq!(
        body,
        json!({"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                            "top_logprobs": [
                                {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                                {"token": "<|return|>", "logprob": -9999.0,
                                 "bytes": "<|return|>".bytes().collect::<Vec<u8>>()}]}]})
    );
}

#[test]
fn text_completion_shapes() {
    let tok = Tokenizer::get();
    let m = ResponseIdentity {
        id: "cmpl-1".to_owned(),
        ..identity()
    };
    let ids = tok.encode("Hello world");
    let mut builder = CompletionLogprobsBuilder::new();
    let mut logprobs = CompletionLogprobs::default();
    for &id in &ids {
        logprobs.extend(builder.token(&tok, id, -0.5, &[(id, -0.5)]));
    }
    let body = to_json(
        &Completion::new(
            &m,
            "Hello world".to_owned(),
            FinishReason::Length,
            Usage::new(3, 2),
        )
        .with_logprobs(logprobs)
        .with_token_ids(Some(vec![1, 2, 3]), Some(ids.clone())),
    );
    assert_eq!(
        keys(&body),
        ["choices", "created", "id", "model", "object", "usage"]
    );
    assert_eq!(body["object"], "text_completion");
    let choice = &body["choices"][0];
    assert_eq!(
        keys(choice),
        [
            "finish_reason",
            "index",
            "logprobs",
            "prompt_token_ids",
            "text",
            "token_ids"
        ]
    );
    assert_eq!(choice["text"], "Hello world");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["prompt_token_ids"], json!([1, 2, 3]));
    assert_eq!(
        choice["logprobs"],
        json!({"tokens": ["Hello", " world"], "token_logprobs": [-0.5, -0.5],
               "top_logprobs": [{"Hello": -0.5}, {" world": -0.5}], "text_offset": [0, 5]})
    );
    assert_eq!(body["usage"]["total_tokens"], 5);

    let chunk = to_json(&Completion::text_chunk(&m, "Hel".to_owned()));
    assert!(chunk.get("usage").is_none());
    assert_eq!(
        chunk["choices"],
        json!([{"text": "Hel", "index": 0, "logprobs": null, "finish_reason": null}])
    );
    let finish = to_json(&Completion::finish_chunk(&m, FinishReason::Stop));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = to_json(&Completion::usage_chunk(&m, Usage::new(3, 2)));
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
}
