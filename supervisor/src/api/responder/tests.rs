//! The responders driven the way the server's loop drives them, on token sequences written out
//! here and on harmony's golden replies: what a stream sends, and that the whole answer (the
//! fold of those chunks) is the one a client joining the stream would get.

use serde_json::{json, Value};

use super::*;
use crate::api::responses::{ChatCompletion, ChunkChoice, CompletionLogprobs};
use crate::api::tests::{golden_ids, identity, metadata, to_json};
use crate::chat::parse_reply;
use crate::chat::tokenizer::{CHANNEL, MESSAGE, RETURN};

const PROMPT: [TokenId; 3] = [1, 2, 3];

/// A made-up logprob per token, so every token's entry can be told apart.
fn logprob(id: TokenId) -> f32 {
    -0.25 * (id % 7) as f32
}

fn token(id: TokenId) -> GeneratedToken {
    GeneratedToken {
        id,
        logprob: logprob(id),
        top: vec![(id, logprob(id))],
    }
}

fn options(stop: &[&str], logprobs: bool, ids: bool) -> AnswerOptions {
    AnswerOptions {
        stop: stop.iter().map(|s| s.to_string()).collect(),
        logprobs,
        prompt_token_ids: ids.then(|| PROMPT.to_vec()),
    }
}

/// What the server's loop does with a run that yields `ids` and then ends by `ended` (unless
/// a stop string ends it first): every chunk the responder gives, in order, the usage chunk
/// last, and the fold they go into.
fn drive<R: Responder>(
    options: AnswerOptions,
    ids: &[TokenId],
    ended: EndedBy,
) -> (Vec<R::Chunk>, R::Fold) {
    let mut responder = R::new(identity(), Tokenizer::get(), options);
    let fold = responder.fold();
    let mut chunks: Vec<R::Chunk> = responder.opening().into_iter().collect();
    let mut ended = ended;
    let mut generated = 0;
    for &id in ids {
        generated += 1;
        let step = responder.token(&token(id));
        chunks.extend(step.chunk);
        if step.stop {
            ended = EndedBy::StopString;
            break;
        }
    }
    let (tail, reason) = responder.end(ended);
    chunks.extend(tail);
    chunks.push(responder.finish(reason, metadata()));
    chunks.push(responder.usage(Usage::new(PROMPT.len(), generated)));
    (chunks, fold)
}

/// The whole answer: the fold of `chunks`.
fn fold_of<F: Fold>(mut fold: F, chunks: &[F::Chunk]) -> F::Whole
where
    F::Chunk: Clone,
{
    for chunk in chunks {
        fold.add(chunk.clone());
    }
    fold.finish()
        .expect("the stream ended with its finish and usage chunks")
}

/// `<|channel|>final<|message|>{text}` and, if `stop_token`, `<|return|>`.
fn final_message(text: &str, stop_token: bool) -> Vec<TokenId> {
    let tok = Tokenizer::get();
    let mut ids = vec![CHANNEL];
    ids.extend(tok.encode("final"));
    ids.push(MESSAGE);
    ids.extend(tok.encode(text));
    if stop_token {
        ids.push(RETURN);
    }
    ids
}

/// The text a client joins from a chat stream's content deltas.
fn streamed_content(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .filter_map(|c| c.choices.first())
        .filter_map(|c| c.delta.content.clone())
        .collect()
}

#[test]
fn a_whole_chat_answer_is_the_fold_of_its_stream_on_every_golden_reply() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/harmony_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read harmony_golden.json");
    let golden: Value = serde_json::from_str(&text).expect("parse");
    let tok = Tokenizer::get();
    for case in golden["reply_cases"].as_array().expect("reply_cases") {
        let name = &case["name"];
        let ids = golden_ids(case);
        let (chunks, fold) =
            drive::<ChatResponder>(options(&[], true, true), &ids, EndedBy::StopToken);
        // Every token travels in a chunk of its own with its logprob and id, header tokens
        // included (they show an empty delta).
        let per_token: Vec<&ChunkChoice> = chunks
            .iter()
            .filter_map(|c| c.choices.first())
            .filter(|c| c.token_ids.is_some())
            .collect();
        assert_eq!(per_token.len(), ids.len(), "{name}");
        assert!(per_token.iter().all(|c| c.logprobs.is_some()), "{name}");

        // The fold is the answer a whole response gave before streams and whole answers
        // shared one loop: the reply parsed at once, every token's logprob and id.
        let (reply, summary) = parse_reply(tok, &ids);
        let expected = ChatCompletion::new(
            &identity(),
            reply,
            FinishReason::for_chat(&summary, false),
            Usage::new(PROMPT.len(), ids.len()),
        )
        .with_metadata(metadata())
        .with_token_ids(PROMPT.to_vec(), ids.clone())
        .with_logprobs(ChatLogprobs {
            content: ids
                .iter()
                .map(|&id| ChatTokenLogprob::new(&tok, id, logprob(id), &[(id, logprob(id))]))
                .collect(),
        });
        assert_eq!(fold_of(fold, &chunks), expected, "{name}");
    }
}

#[test]
fn without_logprobs_or_ids_a_token_that_shows_nothing_sends_nothing() {
    let ids = final_message("Hi there", true);
    let (chunks, fold) =
        drive::<ChatResponder>(options(&[], false, false), &ids, EndedBy::StopToken);
    // Role, "Hi", " there", finish, usage: the header tokens and <|return|> send nothing.
    assert_eq!(
        chunks.len(),
        5,
        "{:?}",
        chunks.iter().map(to_json).collect::<Vec<_>>()
    );
    assert_eq!(streamed_content(&chunks), "Hi there");
    let whole = to_json(&fold_of(fold, &chunks));
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["content"], "Hi there");
    assert!(choice["logprobs"].is_null());
    assert!(choice.get("token_ids").is_none());
    assert!(whole.get("prompt_token_ids").is_none());
    assert_eq!(whole["gptossd"], to_json(&metadata()));
    assert_eq!(whole["usage"]["completion_tokens"], ids.len());
}

#[test]
fn a_chat_stop_string_cuts_the_stream_and_the_whole_answer_alike() {
    let ids = final_message("Hello END world", true);
    let (chunks, fold) =
        drive::<ChatResponder>(options(&["END"], false, false), &ids, EndedBy::StopToken);
    assert_eq!(streamed_content(&chunks), "Hello ");
    let whole = to_json(&fold_of(fold, &chunks));
    assert_eq!(whole["choices"][0]["message"]["content"], "Hello ");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    // Generation stopped at the token that completed the stop string.
    let through_end = ids.len() - Tokenizer::get().encode(" world").len() - 1;
    assert_eq!(whole["usage"]["completion_tokens"], through_end);
}

#[test]
fn text_held_back_for_a_stop_string_comes_out_at_the_end() {
    // Cut by the length limit in the middle of the final message: "z" might have begun the
    // stop string "zz", so it is held back until generation ends, then released.
    let ids = final_message("Hello z", false);
    let (chunks, fold) =
        drive::<ChatResponder>(options(&["zz"], false, false), &ids, EndedBy::Length);
    assert_eq!(streamed_content(&chunks), "Hello z");
    let whole = to_json(&fold_of(fold, &chunks));
    assert_eq!(whole["choices"][0]["message"]["content"], "Hello z");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    let ids = Tokenizer::get().encode("Hello z");
    let (chunks, fold) =
        drive::<TextResponder>(options(&["zz"], false, false), &ids, EndedBy::Length);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c.choices.first())
        .map(|c| c.text.as_str())
        .collect();
    assert_eq!(streamed, "Hello z");
    let whole = to_json(&fold_of(fold, &chunks));
    assert_eq!(whole["choices"][0]["text"], "Hello z");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_completion_streams_every_token_with_its_id_and_folds_into_the_whole_text() {
    let tok = Tokenizer::get();
    let mut ids = tok.encode("Once upon a time");
    ids.push(RETURN);
    let (chunks, fold) = drive::<TextResponder>(options(&[], true, true), &ids, EndedBy::StopToken);
    // One chunk per token, then finish and usage; the prompt's ids only in the first.
    assert_eq!(chunks.len(), ids.len() + 2);
    let with_prompt: Vec<usize> = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.choices
                .first()
                .is_some_and(|c| c.prompt_token_ids.is_some())
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(with_prompt, [0]);
    for (chunk, &id) in chunks.iter().zip(&ids) {
        assert_eq!(chunk.choices[0].token_ids, Some(vec![id]));
    }

    let mut logprobs = CompletionLogprobs::default();
    let mut builder = CompletionLogprobsBuilder::new();
    for &id in &ids {
        logprobs.extend(builder.token(&tok, id, logprob(id), &[(id, logprob(id))]));
    }
    let expected = Completion::new(
        &identity(),
        "Once upon a time".to_owned(),
        FinishReason::Stop,
        Usage::new(PROMPT.len(), ids.len()),
    )
    .with_metadata(metadata())
    .with_logprobs(logprobs)
    .with_token_ids(Some(PROMPT.to_vec()), Some(ids.clone()));
    let whole = fold_of(fold, &chunks);
    assert_eq!(whole, expected);
    assert_eq!(
        to_json(&whole)["choices"][0]["logprobs"]["text_offset"],
        json!([0, 4, 9, 11, 16])
    );
}

#[test]
fn a_completion_stop_string_ends_the_text_before_it() {
    let ids = Tokenizer::get().encode("one two three");
    let (chunks, fold) =
        drive::<TextResponder>(options(&["two"], false, false), &ids, EndedBy::Length);
    let whole = to_json(&fold_of(fold, &chunks));
    assert_eq!(whole["choices"][0]["text"], "one ");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(whole["usage"]["completion_tokens"], 2);
}

/// Cancelled before the first token: the answers still end properly, with `abort`, and the
/// whole answer has every field the request asked for.
#[test]
fn a_request_cancelled_before_its_first_token_ends_with_abort() {
    let (chunks, fold) = drive::<ChatResponder>(options(&[], true, true), &[], EndedBy::Cancel);
    assert_eq!(chunks.len(), 3, "role, finish, usage");
    let whole = to_json(&fold_of(fold, &chunks));
    assert_eq!(whole["choices"][0]["finish_reason"], "abort");
    assert_eq!(whole["choices"][0]["logprobs"], json!({"content": []}));
    assert_eq!(whole["choices"][0]["token_ids"], json!([]));
    assert_eq!(whole["prompt_token_ids"], json!(PROMPT));
    assert_eq!(whole["usage"]["completion_tokens"], 0);

    let (chunks, fold) = drive::<TextResponder>(options(&[], true, true), &[], EndedBy::Cancel);
    assert_eq!(chunks.len(), 2, "finish, usage");
    // No token chunk took the prompt's ids: the finish chunk carries them.
    assert_eq!(chunks[0].choices[0].prompt_token_ids, Some(PROMPT.to_vec()));
    let whole = to_json(&fold_of(fold, &chunks));
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "abort");
    assert_eq!(choice["text"], "");
    assert_eq!(choice["prompt_token_ids"], json!(PROMPT));
    assert_eq!(choice["token_ids"], json!([]));
    assert_eq!(
        choice["logprobs"],
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
    );
}

#[test]
fn how_generation_ended_decides_the_finish_reason() {
    let natural = |length: bool| {
        if length {
            FinishReason::Length
        } else {
            FinishReason::ToolCalls
        }
    };
    assert_eq!(
        EndedBy::StopString.finish_reason(natural),
        FinishReason::Stop
    );
    assert_eq!(EndedBy::Cancel.finish_reason(natural), FinishReason::Abort);
    assert_eq!(EndedBy::Length.finish_reason(natural), FinishReason::Length);
    assert_eq!(
        EndedBy::StopToken.finish_reason(natural),
        FinishReason::ToolCalls
    );
}
