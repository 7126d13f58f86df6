"""Runs the official `openai` Python client against a running gptossd.

    python3 tests/openai_client.py --base-url http://127.0.0.1:PORT/v1 --model NAME

Exercised: chat (non-streaming, with reasoning), completions, streaming chat with usage,
streaming completions, a tool round trip (tools declared, an earlier tool call and its
result in the history), extension fields in `extra_body`, and clean 400s. Exits non-zero with a message on the first failure. The model is the
tiny random test model, so the checks are about the API's shapes and invariants, not the text.
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)

    # Models.
    models = client.models.list()
    check(any(m.id == args.model for m in models.data), f"model {args.model} listed")

    # Chat, non-streaming, greedy.
    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0,
        reasoning_effort="low",
    )
    check(chat.object == "chat.completion", "chat object")
    choice = chat.choices[0]
    check(choice.finish_reason in ("stop", "length", "tool_calls"), f"finish_reason {choice.finish_reason}")
    check(choice.message.role == "assistant", "assistant role")
    check(chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 10, f"usage {chat.usage}")
    check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, "total tokens")

    # Same seed, streaming and not: the same text.
    kwargs = dict(model=args.model, messages=[{"role": "user", "content": "Count"}], max_tokens=10, temperature=1.0, seed=7)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    content, reasoning, usage, finishes, roles = "", "", None, [], []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            check(len(chunk.choices) == 0, "usage chunk has empty choices")
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    check(roles == ["assistant"], f"one role chunk, got {roles}")
    check(len(finishes) == 1, f"one finish_reason, got {finishes}")
    check(usage is not None and usage.completion_tokens >= 1, "usage in the last chunk")
    check(content == (whole.choices[0].message.content or ""), "streamed content equals the non-streamed one")
    whole_reasoning = getattr(whole.choices[0].message, "reasoning_content", None) or ""
    check(reasoning == whole_reasoning, "streamed reasoning equals the non-streamed one")

    # Completions, text prompt and streaming.
    comp = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=8, temperature=0)
    check(comp.object == "text_completion", "completion object")
    check(comp.usage.completion_tokens == 8 or comp.choices[0].finish_reason == "stop", "completion length")
    text = ""
    for chunk in client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    check(text == comp.choices[0].text, "streamed completion equals the non-streamed one")

    # A tool round trip.
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
    ]
    tool_chat = client.chat.completions.create(model=args.model, messages=messages, tools=tools, max_tokens=8, temperature=0)
    tc = tool_chat.choices[0]
    check(tc.finish_reason in ("stop", "length", "tool_calls"), "tool chat finish")
    if tc.finish_reason == "tool_calls":
        check(tc.message.tool_calls and tc.message.tool_calls[0].function.name, "tool call named")

    # A bad request comes back as a clean OpenAI error.
    try:
        client.chat.completions.create(model=args.model, messages=[], max_tokens=4)
        check(False, "empty messages must be rejected")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "400 for empty messages")
    # Other servers' extension fields pass; an unknown field is a 400 that names it.
    client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"top_k": 5, "min_p": 0, "repetition_penalty": 1, "chat_template_kwargs": {}},
    )
    try:
        client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={"temprature": 0.5},
        )
        check(False, "an unknown field must be rejected")
    except openai.BadRequestError as e:
        check("Unrecognized request argument supplied: temprature" in str(e), f"unknown field named: {e}")
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
