//! A sequence's logits are bitwise identical whether it runs alone or batched with others, in
//! one prefill chunk or token by token, with any prefill chunking, any thread count and any
//! stage split: the `Backend` contract, checked end to end on every backend compiled in.

#[macro_use]
mod common;

use common::{blocks, chunk, stage, TestBackend};
use gptossd_stage::model::{Logits, StageInput, StepBatch};

const VOCAB: usize = 201_088;

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7919 + i * 104_729) % 199_000)
        .collect()
}

/// Logits of every position of `tokens`, fed in chunks of the given sizes.
fn logits_chunked<B: TestBackend>(tokens: &[u32], chunks: &[usize], threads: usize) -> Vec<f32> {
    let mut m = stage::<B>(None, threads);
    let table = blocks(0, 8);
    let mut out = Vec::new();
    let mut all = Vec::new();
    let mut pos = 0;
    for &c in chunks {
        let batch = StepBatch {
            seqs: vec![chunk(pos, c, &table, Logits::All)],
        };
        m.forward(&batch, StageInput::Tokens(&tokens[pos..pos + c]), &mut out)
            .expect("step");
        all.extend_from_slice(&out);
        pos += c;
    }
    assert_eq!(pos, tokens.len());
    all
}

fn prefill_chunking_and_decode_give_identical_bits<B: TestBackend>() {
    let tokens = prompt(1, 21);
    let whole = logits_chunked::<B>(&tokens, &[21], 1);
    assert_eq!(whole.len(), 21 * VOCAB);
    assert!(whole.iter().all(|v| v.is_finite()));
    let one_by_one = logits_chunked::<B>(&tokens, &[1; 21], 1);
    assert!(
        whole == one_by_one,
        "token-by-token decode differs from one prefill"
    );
    let uneven = logits_chunked::<B>(&tokens, &[5, 1, 9, 6], 1);
    assert!(whole == uneven, "chunked prefill differs from one prefill");
}

fn thread_count_does_not_change_bits<B: TestBackend>() {
    let tokens = prompt(2, 13);
    let one = logits_chunked::<B>(&tokens, &[13], 1);
    let two = logits_chunked::<B>(&tokens, &[7, 6], 2);
    let three = logits_chunked::<B>(&tokens, &[13], 3);
    assert!(one == two && one == three);
}

fn batching_with_other_sequences_gives_identical_bits<B: TestBackend>() {
    let a = prompt(3, 11);
    let b = prompt(4, 17);
    let c = prompt(5, 3);
    let alone_a = logits_chunked::<B>(&a, &[11], 1);
    let alone_b = logits_chunked::<B>(&b, &[17], 1);

    // a, b and c prefilled together in one step, each in its own blocks.
    let mut m = stage::<B>(None, 2);
    let (ta, tb, tc) = (blocks(0, 4), blocks(10, 4), blocks(20, 4));
    let batch = StepBatch {
        seqs: vec![
            chunk(0, 11, &ta, Logits::All),
            chunk(0, 17, &tb, Logits::All),
            chunk(0, 3, &tc, Logits::All),
        ],
    };
    let ids: Vec<u32> = a.iter().chain(&b).chain(&c).copied().collect();
    let mut out = Vec::new();
    m.forward(&batch, StageInput::Tokens(&ids), &mut out)
        .expect("step");
    assert!(
        out[..11 * VOCAB] == alone_a[..],
        "a batched differs from a alone"
    );
    assert!(
        out[11 * VOCAB..28 * VOCAB] == alone_b[..],
        "b batched differs from b alone"
    );

    // Then a decode step of a mixed with a prefill chunk of a new sequence d.
    let d = prompt(6, 9);
    let next_a = 42u32;
    let td = blocks(30, 4);
    let batch = StepBatch {
        seqs: vec![
            chunk(11, 1, &ta, Logits::Last),
            chunk(0, 9, &td, Logits::Last),
        ],
    };
    let ids: Vec<u32> = std::iter::once(next_a).chain(d.iter().copied()).collect();
    m.forward(&batch, StageInput::Tokens(&ids), &mut out)
        .expect("step");
    let mut a2 = a.clone();
    a2.push(next_a);
    let alone_a2 = logits_chunked::<B>(&a2, &[12], 1);
    assert!(
        out[..VOCAB] == alone_a2[11 * VOCAB..],
        "decode of a in a mixed batch differs"
    );
    let alone_d = logits_chunked::<B>(&d, &[9], 1);
    assert!(
        out[VOCAB..] == alone_d[8 * VOCAB..],
        "prefill of d in a mixed batch differs"
    );
}

fn split_stages_equal_one_stage<B: TestBackend>() {
    use gptossd_shared::weights::StageSpan;
    let tokens = prompt(7, 10);
    let whole = logits_chunked::<B>(&tokens, &[10], 1);
    let mut first = stage::<B>(
        Some(StageSpan {
            layers: 0..1,
            embedding: true,
            head: false,
        }),
        1,
    );
    let mut middle = stage::<B>(
        Some(StageSpan {
            layers: 1..3,
            embedding: false,
            head: false,
        }),
        1,
    );
    let mut last = stage::<B>(
        Some(StageSpan {
            layers: 3..4,
            embedding: false,
            head: true,
        }),
        1,
    );
    let table = blocks(0, 1);
    let batch = StepBatch {
        seqs: vec![chunk(0, 10, &table, Logits::All)],
    };
    let (mut h1, mut h2, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    first
        .forward(&batch, StageInput::Tokens(&tokens), &mut h1)
        .expect("stage 0");
    middle
        .forward(&batch, StageInput::Hidden(&h1), &mut h2)
        .expect("stage 1");
    last.forward(&batch, StageInput::Hidden(&h2), &mut logits)
        .expect("stage 2");
    assert!(logits == whole);
}

backend_tests!(
    prefill_chunking_and_decode_give_identical_bits,
    thread_count_does_not_change_bits,
    batching_with_other_sequences_gives_identical_bits,
    split_stages_equal_one_stage,
);
