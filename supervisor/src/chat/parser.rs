//! Incremental parser of the assistant's reply: generated token ids → [`ChatEvent`]s.
//!
//! Owns the reading of harmony messages as the model writes them after the prompt's
//! `<|start|>assistant`: a header (`<|channel|>analysis`, `<|channel|>commentary
//! to=functions.x <|constrain|>json`, or the recipient first), `<|message|>`, the body, then
//! `<|end|>` (another message follows) or a stop token. Invariants:
//! - it never fails and never panics: output it cannot interpret degrades to content text
//!   (see [`ReplyParser`] for the exact rules); ids outside the vocabulary are skipped;
//! - text comes out as whole UTF-8 characters: bytes of a character split across tokens are
//!   held back until it is complete, and flushed (as U+FFFD if still incomplete) when the
//!   message ends;
//! - after a stop token (`<|return|>`, `<|call|>`, `<|endoftext|>`) further ids are ignored.
//!
//! It knows nothing about sampling or HTTP: the caller decides when to stop generating (on
//! [`ReplyParser::is_done`] or a length limit) and how to present the events.

use super::tokenizer::{
    TokenId, Tokenizer, Utf8Stream, CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN,
    START,
};

/// A header longer than this (in tokens) without `<|message|>` is not a header: its text is
/// passed on as content. Real headers are under 30 tokens even with long function names.
const MAX_HEADER_TOKENS: usize = 48;

/// Something the reply says, in the order generated. Text fields are deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// Chain of thought (the analysis channel).
    Reasoning(String),
    /// Answer text: the final channel, a commentary preamble, or anything uninterpretable.
    Content(String),
    /// A tool call begins (`to=functions.NAME`); `index` counts calls from 0.
    ToolCallStart {
        /// Position of this call among the reply's calls.
        index: usize,
        /// Function name, without the `functions.` prefix.
        name: String,
    },
    /// More of a tool call's arguments (JSON text, as generated).
    ToolCallArguments {
        /// The call this text belongs to.
        index: usize,
        /// The new text.
        delta: String,
    },
    /// The tool call's message ended.
    ToolCallEnd {
        /// The call that ended.
        index: usize,
    },
}

/// How the reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `<|return|>`: the final answer is complete.
    Return,
    /// `<|call|>`: the assistant waits for a tool result.
    Call,
    /// `<|endoftext|>`.
    EndOfText,
    /// No stop token was seen (a length limit, or the generator stopped for another reason).
    Unterminated,
}

/// What [`ReplyParser::finish`] reports besides the last events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// How the reply ended.
    pub ending: Ending,
    /// How many tool calls the reply made.
    pub tool_calls: usize,
}

/// Where the body of the current message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Reasoning,
    Content,
    ToolCall { index: usize },
}

#[derive(Debug)]
enum State {
    /// Collecting header ids until `<|message|>`. `role_known`: the role was already given
    /// (the prompt's `<|start|>assistant`); otherwise the header must begin with it.
    Header { ids: Vec<TokenId>, role_known: bool },
    /// Inside a message body.
    Body { target: Target, text: Utf8Stream },
    /// After `<|end|>`, waiting for `<|start|>`.
    BetweenMessages,
    /// A stop token was seen.
    Done,
}

/// Streaming parser of one assistant reply. Feed it every generated id with
/// [`ReplyParser::feed`], then call [`ReplyParser::finish`].
///
/// Degradation rules, for output that does not follow harmony:
/// - a header that ends in `<|message|>` is metadata and never shown; the body goes to a tool
///   call when the recipient is `functions.NAME`, to reasoning on the `analysis` channel, and
///   to content otherwise (final, commentary preamble, unknown channel or recipient, a role
///   other than assistant);
/// - the first header, if it is plain text with no header token (the model skipped the
///   header), is content; so is a header that grows past 48 tokens; other unfinished headers
///   (cut off, or interrupted by `<|start|>`/`<|end|>`) are dropped;
/// - text after `<|end|>` without `<|start|>` is content; header tokens inside a body and
///   reserved ids are skipped.
#[derive(Debug)]
pub struct ReplyParser {
    tokenizer: Tokenizer,
    state: State,
    tool_calls: usize,
    ending: Option<Ending>,
}

impl ReplyParser {
    /// A parser positioned right after the prompt's `<|start|>assistant`.
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            state: State::Header {
                ids: Vec::new(),
                role_known: true,
            },
            tool_calls: 0,
            ending: None,
        }
    }

    /// Whether a stop token has been seen (generation should stop).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Consumes one generated id and returns the events it completes (often none or one).
    pub fn feed(&mut self, id: TokenId) -> Vec<ChatEvent> {
        let mut events = Vec::new();
        if self.is_done() {
            return events;
        }
        let stop = match id {
            RETURN => Some(Ending::Return),
            CALL => Some(Ending::Call),
            ENDOFTEXT => Some(Ending::EndOfText),
            _ => None,
        };
        if let Some(ending) = stop {
            self.close(&mut events);
            self.ending = Some(ending);
            self.state = State::Done;
            return events;
        }
        match id {
            START => {
                self.close(&mut events);
                self.state = State::Header {
                    ids: Vec::new(),
                    role_known: false,
                };
            }
            END => {
                self.close(&mut events);
                self.state = State::BetweenMessages;
            }
            _ => self.feed_other(id, &mut events),
        }
        events
    }

    /// Ends the reply: flushes held-back text, closes an open tool call, and reports how the
    /// reply ended.
    pub fn finish(mut self) -> (Vec<ChatEvent>, Summary) {
        let mut events = Vec::new();
        self.close(&mut events);
        let summary = Summary {
            ending: self.ending.unwrap_or(Ending::Unterminated),
            tool_calls: self.tool_calls,
        };
        (events, summary)
    }

    /// Any id but a stop token, `<|start|>` or `<|end|>`.
    fn feed_other(&mut self, id: TokenId, events: &mut Vec<ChatEvent>) {
        match &mut self.state {
            State::Header { ids, role_known } => {
                if id == MESSAGE {
                    let (ids, role_known) = (std::mem::take(ids), *role_known);
                    let target = self.parse_header(&ids, role_known, events);
                    self.state = State::Body {
                        target,
                        text: Utf8Stream::new(),
                    };
                } else {
                    ids.push(id);
                    if ids.len() > MAX_HEADER_TOKENS {
                        // Not a header after all: everything so far is answer text.
                        let ids = std::mem::take(ids);
                        let mut text = Utf8Stream::new();
                        for &id in ids.iter().filter(|&&id| !Tokenizer::is_special(id)) {
                            let bytes = self.tokenizer.token_bytes(id).unwrap_or_default();
                            emit(events, Target::Content, text.push(&bytes));
                        }
                        self.state = State::Body {
                            target: Target::Content,
                            text,
                        };
                    }
                }
            }
            State::Body { target, text } => {
                if Tokenizer::is_special(id) {
                    return; // A stray header token or a reserved id: not text.
                }
                if let Ok(bytes) = self.tokenizer.token_bytes(id) {
                    emit(events, *target, text.push(&bytes));
                }
            }
            State::BetweenMessages => {
                if id == CHANNEL {
                    // `<|end|><|channel|>…`: the model forgot `<|start|>assistant`.
                    self.state = State::Header {
                        ids: vec![id],
                        role_known: true,
                    };
                } else if !Tokenizer::is_special(id) {
                    self.state = State::Body {
                        target: Target::Content,
                        text: Utf8Stream::new(),
                    };
                    self.feed_other(id, events);
                }
            }
            State::Done => {}
        }
    }

    /// Ends whatever is open (a header or a body), emitting what it still holds.
    fn close(&mut self, events: &mut Vec<ChatEvent>) {
        match std::mem::replace(&mut self.state, State::BetweenMessages) {
            State::Header { ids, role_known } => {
                // The first header with no header token at all was answer text.
                if role_known && !ids.iter().any(|&id| Tokenizer::is_special(id)) {
                    if let Ok(text) = self.tokenizer.decode(&ids) {
                        emit(events, Target::Content, text);
                    }
                }
            }
            State::Body { target, mut text } => {
                emit(events, target, text.finish());
                if let Target::ToolCall { index } = target {
                    events.push(ChatEvent::ToolCallEnd { index });
                }
            }
            State::BetweenMessages => {}
            State::Done => self.state = State::Done,
        }
    }

    /// Decides where a body goes from its header; a tool call is counted and announced.
    fn parse_header(
        &mut self,
        ids: &[TokenId],
        role_known: bool,
        events: &mut Vec<ChatEvent>,
    ) -> Target {
        let header = Header::parse(&self.header_text(ids), role_known);
        if !header.is_assistant {
            return Target::Content;
        }
        if let Some(name) = header.function {
            let index = self.tool_calls;
            self.tool_calls += 1;
            events.push(ChatEvent::ToolCallStart { index, name });
            return Target::ToolCall { index };
        }
        match header.channel.as_deref() {
            Some("analysis") => Target::Reasoning,
            _ => Target::Content,
        }
    }

    /// The header as text: ordinary tokens decoded, `<|channel|>` and `<|constrain|>` spelled
    /// out, any other special id dropped.
    fn header_text(&self, ids: &[TokenId]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if !Tokenizer::is_special(id) || id == CHANNEL || id == CONSTRAIN {
                bytes.extend(self.tokenizer.token_bytes(id).unwrap_or_default());
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn emit(events: &mut Vec<ChatEvent>, target: Target, text: String) {
    if text.is_empty() {
        return;
    }
    events.push(match target {
        Target::Reasoning => ChatEvent::Reasoning(text),
        Target::Content => ChatEvent::Content(text),
        Target::ToolCall { index } => ChatEvent::ToolCallArguments { index, delta: text },
    });
}

/// The parts of a header that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    is_assistant: bool,
    channel: Option<String>,
    /// `NAME` from a `to=functions.NAME` recipient.
    function: Option<String>,
}

impl Header {
    /// Parses header text the way harmony does: the channel is the word after `<|channel|>`
    /// (up to whitespace or `<`); the rest splits on whitespace into role, `to=recipient` and
    /// content type, in either order.
    fn parse(text: &str, role_known: bool) -> Self {
        const CHANNEL_MARK: &str = "<|channel|>";
        const CONSTRAIN_MARK: &str = "<|constrain|>";
        let mut rest = text.to_owned();
        let mut channel = None;
        if let Some(at) = rest.find(CHANNEL_MARK) {
            let after = &rest[at + CHANNEL_MARK.len()..];
            let len = after
                .find(|c: char| c.is_whitespace() || c == '<')
                .unwrap_or(after.len());
            if len > 0 {
                channel = Some(after[..len].to_owned());
            }
            rest = format!("{}{}", &rest[..at], &after[len..]);
        }
        let rest = rest.replace(CONSTRAIN_MARK, &format!(" {CONSTRAIN_MARK}"));
        let mut parts = rest.split_whitespace().peekable();
        let is_assistant = match parts.peek() {
            Some(&"assistant") => {
                parts.next();
                true
            }
            _ => role_known,
        };
        let function = parts
            .filter_map(|part| part.strip_prefix("to=functions."))
            .find(|name| !name.is_empty())
            .map(str::to_owned);
        Self {
            is_assistant,
            channel,
            function,
        }
    }
}

/// A whole reply, gathered from its events (for non-streaming callers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// All reasoning text.
    pub reasoning: String,
    /// All content text.
    pub content: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// One tool call of a [`Reply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// Function name, without the `functions.` prefix.
    pub name: String,
    /// The arguments as generated (normally JSON).
    pub arguments: String,
}

impl Reply {
    /// Adds one event to the reply.
    pub fn apply(&mut self, event: ChatEvent) {
        match event {
            ChatEvent::Reasoning(text) => self.reasoning.push_str(&text),
            ChatEvent::Content(text) => self.content.push_str(&text),
            ChatEvent::ToolCallStart { name, .. } => self.tool_calls.push(ToolCall {
                name,
                arguments: String::new(),
            }),
            ChatEvent::ToolCallArguments { index, delta } => {
                if let Some(call) = self.tool_calls.get_mut(index) {
                    call.arguments.push_str(&delta);
                }
            }
            ChatEvent::ToolCallEnd { .. } => {}
        }
    }
}

/// Parses a complete reply (the ids generated after `<|start|>assistant`).
pub fn parse_reply(tokenizer: Tokenizer, ids: &[TokenId]) -> (Reply, Summary) {
    let mut parser = ReplyParser::new(tokenizer);
    let mut reply = Reply::default();
    for &id in ids {
        parser.feed(id).into_iter().for_each(|e| reply.apply(e));
    }
    let (events, summary) = parser.finish();
    events.into_iter().for_each(|e| reply.apply(e));
    (reply, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token ids of a harmony text: `<|name|>` markers become their ids, the rest is text.
    fn ids(text: &str) -> Vec<TokenId> {
        let tok = Tokenizer::get();
        let markers = [
            ("<|start|>", START),
            ("<|end|>", END),
            ("<|message|>", MESSAGE),
            ("<|channel|>", CHANNEL),
            ("<|constrain|>", CONSTRAIN),
            ("<|return|>", RETURN),
            ("<|call|>", CALL),
            ("<|endoftext|>", ENDOFTEXT),
        ];
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = markers
                .iter()
                .filter_map(|(m, id)| rest.find(m).map(|at| (at, *m, *id)))
                .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, mark, id)) => {
                    out.extend(tok.encode(&rest[..at]));
                    out.push(id);
                    rest = &rest[at + mark.len()..];
                }
                None => {
                    out.extend(tok.encode(rest));
                    rest = "";
                }
            }
        }
        out
    }

    fn parse(text: &str) -> (Reply, Summary) {
        parse_reply(Tokenizer::get(), &ids(text))
    }

    fn events(ids: &[TokenId]) -> Vec<ChatEvent> {
        let mut parser = ReplyParser::new(Tokenizer::get());
        let mut out: Vec<ChatEvent> = ids.iter().flat_map(|&id| parser.feed(id)).collect();
        out.extend(parser.finish().0);
        out
    }

    #[test]
    fn analysis_then_final() {
        let (reply, summary) = parse(
            "<|channel|>analysis<|message|>User says hi.<|end|>\
             <|start|>assistant<|channel|>final<|message|>Hello there!<|return|>",
        );
        assert_eq!(reply.reasoning, "User says hi.");
        assert_eq!(reply.content, "Hello there!");
        assert!(reply.tool_calls.is_empty());
        assert_eq!(
            summary,
            Summary {
                ending: Ending::Return,
                tool_calls: 0
            }
        );
    }

    #[test]
    fn tool_call_with_json_arguments() {
        let text = "<|channel|>analysis<|message|>Need weather.<|end|>\
                    <|start|>assistant<|channel|>commentary to=functions.get_weather \
                    <|constrain|>json<|message|>{\"location\": \"Tokyo\"}<|call|>";
        let evs = events(&ids(text));
        assert_eq!(evs.first(), Some(&ChatEvent::Reasoning("Need".into())));
        assert!(evs.contains(&ChatEvent::ToolCallStart {
            index: 0,
            name: "get_weather".into()
        }));
        assert_eq!(evs.last(), Some(&ChatEvent::ToolCallEnd { index: 0 }));
        let (reply, summary) = parse(text);
        assert_eq!(
            reply.tool_calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: "{\"location\": \"Tokyo\"}".into()
            }]
        );
        assert_eq!(reply.content, "");
        assert_eq!(summary.ending, Ending::Call);
        assert_eq!(summary.tool_calls, 1);
    }

    #[test]
    fn recipient_before_channel() {
        for text in [
            " to=functions.lookup<|channel|>commentary json<|message|>{\"q\":1}<|call|>",
            " to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{\"q\":1}<|call|>",
            "<|channel|>commentary to=functions.lookup<|constrain|>json<|message|>{\"q\":1}<|call|>",
            "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.lookup\
             <|channel|>commentary json<|message|>{\"q\":1}<|call|>",
        ] {
            let (reply, summary) = parse(text);
            assert_eq!(
                reply.tool_calls,
                vec![ToolCall {
                    name: "lookup".into(),
                    arguments: "{\"q\":1}".into()
                }],
                "{text}"
            );
            assert_eq!(summary.tool_calls, 1);
        }
    }

    #[test]
    fn commentary_preamble_is_content() {
        let (reply, _) = parse(
            "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant\
             <|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
        );
        assert_eq!(reply.content, "Let me check.");
        assert_eq!(reply.tool_calls.len(), 1);
    }

    #[test]
    fn garbage_degrades_to_content() {
        // No header at all.
        let (reply, summary) = parse("Just an answer.<|return|>");
        assert_eq!(reply.content, "Just an answer.");
        assert_eq!(summary.ending, Ending::Return);
        // Unknown channel, and a header-less stream longer than any header.
        let (reply, _) = parse("<|channel|>bogus<|message|>text<|end|>");
        assert_eq!(reply.content, "text");
        let long = "word ".repeat(100);
        let (reply, summary) = parse(&long);
        assert_eq!(reply.content, long);
        assert_eq!(summary.ending, Ending::Unterminated);
        // Text after <|end|> without <|start|>; header tokens inside a body.
        let (reply, _) = parse("<|channel|>final<|message|>a<|channel|>b<|end|>c<|message|>d");
        assert_eq!(reply.content, "abcd");
        // Another role, an unknown recipient, and ids outside the vocabulary.
        let (reply, _) = parse("<|channel|>final<|message|>x<|end|><|start|>user<|message|>y");
        assert_eq!(reply.content, "xy");
        let (reply, _) = parse("<|channel|>analysis to=browser.search<|message|>q<|call|>");
        assert_eq!((reply.reasoning.as_str(), reply.tool_calls.len()), ("q", 0));
        let mut parser = ReplyParser::new(Tokenizer::get());
        for id in [u32::MAX, 201_088, 200_020, MESSAGE, 9906, u32::MAX] {
            parser.feed(id);
        }
        let _ = parser.finish();
        // Random ids never panic.
        let mut state = 12345u64;
        let mut parser = ReplyParser::new(Tokenizer::get());
        for _ in 0..5000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = match state >> 60 {
                0..=5 => 199_998 + ((state >> 20) % 16) as u32,
                _ => ((state >> 20) % 201_100) as u32,
            };
            if id != RETURN && id != CALL && id != ENDOFTEXT {
                parser.feed(id);
            }
        }
        let _ = parser.finish();
    }

    #[test]
    fn tokens_after_a_stop_are_ignored() {
        let mut parser = ReplyParser::new(Tokenizer::get());
        for id in ids("<|channel|>final<|message|>ok<|return|>") {
            parser.feed(id);
        }
        assert!(parser.is_done());
        assert!(parser.feed(9906).is_empty());
        let (events, summary) = parser.finish();
        assert!(events.is_empty());
        assert_eq!(summary.ending, Ending::Return);
    }

    #[test]
    fn multibyte_characters_split_across_tokens_come_out_whole() {
        let tok = Tokenizer::get();
        let text = "🦀 日本語 😀😀 é";
        let mut stream = ids("<|channel|>final<|message|>");
        let body = tok.encode(text);
        assert!(body
            .iter()
            .any(|&id| std::str::from_utf8(&tok.token_bytes(id).expect("valid")).is_err()));
        stream.extend(body);
        stream.push(RETURN);
        let mut parser = ReplyParser::new(tok);
        let mut out = String::new();
        for id in stream {
            for event in parser.feed(id) {
                match event {
                    ChatEvent::Content(delta) => {
                        assert!(!delta.contains(char::REPLACEMENT_CHARACTER));
                        out.push_str(&delta);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(out, text);
    }

    #[test]
    fn stream_cut_off_mid_header() {
        for text in [
            "<|channel|>ana",
            "<|channel|>analysis<|message|>thinking<|end|><|start|>assis",
            "<|channel|>commentary to=functions.f",
            "",
        ] {
            let (reply, summary) = parse(text);
            assert_eq!(reply.content, "", "{text}");
            assert_eq!(summary.ending, Ending::Unterminated);
        }
        // Cut off mid-body: the held-back bytes are flushed, the open call is ended.
        let tok = Tokenizer::get();
        let mut stream = ids("<|channel|>commentary to=functions.f<|message|>{\"a\":");
        stream.extend(tok.encode("🦀").into_iter().take(1));
        let evs = events(&stream);
        assert_eq!(evs.last(), Some(&ChatEvent::ToolCallEnd { index: 0 }));
        let (_, summary) = parse_reply(tok, &stream);
        assert_eq!(summary.tool_calls, 1);
    }

    #[test]
    fn two_tool_calls_are_numbered() {
        let (reply, summary) = parse(
            "<|channel|>commentary to=functions.a <|constrain|>json<|message|>1<|end|>\
             <|start|>assistant<|channel|>commentary to=functions.b json<|message|>2<|call|>",
        );
        assert_eq!(summary.tool_calls, 2);
        assert_eq!(reply.tool_calls[1].name, "b");
        assert_eq!(reply.tool_calls[1].arguments, "2");
    }
}
