//! The o200k_harmony tokenizer: text ↔ token ids, and the special ids of the harmony format.
//!
//! Owns the one `CoreBPE` of the process (tiktoken-rs builds it lazily from its embedded
//! o200k_base vocabulary, once; no file or network is read). Invariants:
//! - [`Tokenizer::encode`] is *ordinary* encoding: text that spells a special token (say a user
//!   typing `<|end|>`) becomes plain text tokens, never a special id.
//! - Decoding never panics: ids at or above [`VOCAB_EDGE`] (or otherwise unknown) are a
//!   [`TokenizerError::InvalidToken`]; invalid UTF-8 is replaced by U+FFFD, and
//!   [`Utf8Stream`] holds back an incomplete UTF-8 sequence until the token that completes it.
//!
//! It knows nothing about conversations: that is `render` (prompt) and `parser` (reply).

use gptossd_shared::VOCAB_EDGE;
use tiktoken_rs::CoreBPE;

/// A token id of the o200k_harmony vocabulary (the model's embedding row).
pub type TokenId = u32;

/// `<|startoftext|>`: Hugging Face's bos; harmony never renders it.
pub const STARTOFTEXT: TokenId = 199_998;
/// `<|endoftext|>`: padding, and a stop token in generation_config.
pub const ENDOFTEXT: TokenId = 199_999;
/// `<|return|>`: the assistant's final answer is complete (stop).
pub const RETURN: TokenId = 200_002;
/// `<|constrain|>`: introduces a constrained content type in a header (` <|constrain|>json`).
pub const CONSTRAIN: TokenId = 200_003;
/// `<|channel|>`: introduces the channel name in a header.
pub const CHANNEL: TokenId = 200_005;
/// `<|start|>`: begins a message; its header follows.
pub const START: TokenId = 200_006;
/// `<|end|>`: ends a message (not a stop token for the assistant).
pub const END: TokenId = 200_007;
/// `<|message|>`: ends a header; the message content follows.
pub const MESSAGE: TokenId = 200_008;
/// `<|call|>`: the assistant ends a tool call (stop).
pub const CALL: TokenId = 200_012;

/// The tokens that end generation of an assistant turn: `<|return|>`, `<|call|>` and
/// `<|endoftext|>`. `<|end|>` is deliberately absent: it separates the analysis message from
/// the final one.
pub const STOP_TOKENS: [TokenId; 3] = [RETURN, CALL, ENDOFTEXT];

/// Errors of the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// The id is not in the vocabulary (ids are valid below 201088).
    #[error("token id {id} is not in the vocabulary (valid ids are below {VOCAB_EDGE})")]
    InvalidToken {
        /// The offending id.
        id: TokenId,
    },
}

/// Handle to the process-wide o200k_harmony tokenizer; cheap to copy.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: &'static CoreBPE,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokenizer(o200k_harmony)")
    }
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::get()
    }
}

impl Tokenizer {
    /// The shared tokenizer. The first call builds the vocabulary (about a second).
    pub fn get() -> Self {
        Self {
            bpe: tiktoken_rs::o200k_harmony_singleton(),
        }
    }

    /// Encodes `text` as ordinary text: special-token spellings are not recognised.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        self.bpe.encode_ordinary(text)
    }

    /// The bytes of one token: its UTF-8 fragment, or the spelling of a special token
    /// (`<|start|>` for [`START`]).
    pub fn token_bytes(&self, id: TokenId) -> Result<Vec<u8>, TokenizerError> {
        if id >= VOCAB_EDGE {
            return Err(TokenizerError::InvalidToken { id });
        }
        self.bpe
            .decode_bytes(&[id])
            .map_err(|e| TokenizerError::InvalidToken { id: e.token })
    }

    /// Decodes `ids` to text (special tokens spelled out); invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id >= VOCAB_EDGE) {
            return Err(TokenizerError::InvalidToken { id });
        }
        let bytes = self
            .bpe
            .decode_bytes(ids)
            .map_err(|e| TokenizerError::InvalidToken { id: e.token })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Whether `id` is a special token (a harmony marker or a reserved id) rather than text.
    pub fn is_special(id: TokenId) -> bool {
        (STARTOFTEXT..VOCAB_EDGE).contains(&id)
    }
}

/// Incremental UTF-8 decoding of a byte stream cut at arbitrary points (token boundaries).
///
/// [`Utf8Stream::push`] returns the longest complete text available and keeps back a trailing
/// incomplete sequence (at most 3 bytes); bytes that can never be valid become U+FFFD.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// A stream with nothing held back.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `bytes` and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is UTF-8 by the error's contract.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            // An incomplete sequence at the end: wait for more bytes.
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is held back comes out, an incomplete sequence as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_tokens_are_return_call_endoftext_not_end() {
        let tok = Tokenizer::get();
        let names: Vec<String> = STOP_TOKENS
            .iter()
            .map(|&id| String::from_utf8_lossy(&tok.token_bytes(id).expect("special")).into_owned())
            .collect();
        assert_eq!(names, ["<|return|>", "<|call|>", "<|endoftext|>"]);
        assert!(
            !STOP_TOKENS.contains(&END),
            "<|end|> separates messages, it does not stop"
        );
    }

    #[test]
    fn special_ids_spell_their_tokens() {
        let tok = Tokenizer::get();
        for (id, text) in [
            (STARTOFTEXT, "<|startoftext|>"),
            (ENDOFTEXT, "<|endoftext|>"),
            (RETURN, "<|return|>"),
            (CONSTRAIN, "<|constrain|>"),
            (CHANNEL, "<|channel|>"),
            (START, "<|start|>"),
            (END, "<|end|>"),
            (MESSAGE, "<|message|>"),
            (CALL, "<|call|>"),
            (201_087, "<|reserved_201087|>"),
        ] {
            assert_eq!(tok.token_bytes(id).expect("valid id"), text.as_bytes());
            assert!(Tokenizer::is_special(id));
        }
        assert!(!Tokenizer::is_special(173_781));
    }

    #[test]
    fn known_text_ids() {
        let tok = Tokenizer::get();
        assert_eq!(tok.encode("assistant"), vec![173_781]);
        assert_eq!(tok.encode("analysis"), vec![35_644]);
        assert_eq!(tok.encode("final"), vec![17_196]);
    }

    #[test]
    fn special_text_in_input_stays_text() {
        let tok = Tokenizer::get();
        let ids = tok.encode("a <|end|> b <|start|>");
        assert!(ids.iter().all(|&id| !Tokenizer::is_special(id)));
        assert_eq!(
            tok.decode(&ids).expect("valid ids"),
            "a <|end|> b <|start|>"
        );
    }

    #[test]
    fn round_trip_unicode() {
        let tok = Tokenizer::get();
        let text = "héllo 世界 🦀 — ok";
        assert_eq!(tok.decode(&tok.encode(text)).expect("valid ids"), text);
    }

    #[test]
    fn invalid_ids_are_errors_not_panics() {
        let tok = Tokenizer::get();
        for id in [VOCAB_EDGE, VOCAB_EDGE + 1, u32::MAX] {
            assert_eq!(
                tok.token_bytes(id),
                Err(TokenizerError::InvalidToken { id })
            );
            assert_eq!(
                tok.decode(&[1, id]),
                Err(TokenizerError::InvalidToken { id })
            );
        }
    }

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let tok = Tokenizer::get();
        let text = "a🦀b世界";
        let mut stream = Utf8Stream::new();
        let mut out = String::new();
        for byte in text.as_bytes() {
            out.push_str(&stream.push(&[*byte]));
        }
        out.push_str(&stream.finish());
        assert_eq!(out, text);

        // Tokens whose bytes are not whole characters still come out whole.
        let mut stream = Utf8Stream::new();
        let mut out = String::new();
        for id in tok.encode("🦀🦀🦀") {
            let piece = stream.push(&tok.token_bytes(id).expect("valid id"));
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        assert!(!stream.has_pending());
        assert_eq!(out, "🦀🦀🦀");
    }

    #[test]
    fn utf8_stream_replaces_invalid_bytes() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(stream.push(b"\xe4\xb8"), "");
        assert_eq!(stream.finish(), "\u{fffd}");
    }
}
