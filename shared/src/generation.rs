//! How a generation ends ([`Finish`], one type for the supervisor's scheduler, pipeline and API
//! and the stage worker's in-process generator), and what the in-process generator
//! (`gptossd-stage generate`, started by `gptossd generate` without `--stages`) prints on its
//! stdout: one JSON line per event ([`GenerateLine`]), a token per generated token, then one
//! line with the finish reason. A failure prints no finish line: the process exits non-zero
//! with its error on stderr.

use serde::{Deserialize, Serialize};

/// Why a generation ended: one type for the scheduler, the pipeline, the in-process generator
/// and the API (which maps it to OpenAI's strings in one place, `api::EndedBy`). The
/// scheduler itself ends sequences with `Stop` or `Length`; `Cancelled` comes from a cancel.
/// Serialized as [`Finish::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    /// It sampled one of its stop tokens.
    #[serde(rename = "stop")]
    Stop,
    /// It generated `max_new_tokens` tokens or reached the context limit.
    #[serde(rename = "length")]
    Length,
    /// It was cancelled (by the API's cancel endpoint, a client gone, a stop string).
    #[serde(rename = "abort")]
    Cancelled,
}

impl Finish {
    /// The name in the command-line tools' JSON (the API's are OpenAI's: `api::FinishReason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "abort",
        }
    }
}

/// One line of `gptossd-stage generate`'s stdout (JSON): `{"token": 13}` for each generated
/// token, as it is sampled, then `{"finish_reason": "stop"}` once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GenerateLine {
    Token { token: u32 },
    End { finish_reason: Finish },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_back_and_finish_names_match_as_str() {
        for f in [Finish::Stop, Finish::Length, Finish::Cancelled] {
            let json = serde_json::to_string(&f).expect("encode");
            assert_eq!(json, format!("\"{}\"", f.as_str()));
        }
        let lines = [
            (GenerateLine::Token { token: 13 }, r#"{"token":13}"#),
            (
                GenerateLine::End {
                    finish_reason: Finish::Stop,
                },
                r#"{"finish_reason":"stop"}"#,
            ),
        ];
        for (line, json) in lines {
            assert_eq!(serde_json::to_string(&line).expect("encode"), json);
            assert_eq!(
                serde_json::from_str::<GenerateLine>(json).expect("decode"),
                line
            );
        }
        assert!(serde_json::from_str::<GenerateLine>(r#"{"tokens":1}"#).is_err());
    }
}
