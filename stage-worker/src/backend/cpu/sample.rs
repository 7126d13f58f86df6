//! Sampling on the CPU: one task per logits row on the stage's threads, each with its own
//! thread-local scratch. Each draw depends only on its row, its spec and its token index
//! (see `sampler.rs`), so the split over threads changes nothing.

use std::cell::RefCell;
use std::sync::Mutex;

use super::ThreadPool;
use gptossd_shared::sampling::SampleAt;

use crate::backend::BackendError;
use crate::sampler::{sample, LogitsError, SampleScratch, Sampled};

thread_local! {
    static SCRATCH: RefCell<SampleScratch> = RefCell::new(SampleScratch::default());
}

/// Samples row `r` of `logits` (`rows.len() × vocab`) with `rows[r]`, in parallel.
pub(super) fn sample_rows(
    pool: &ThreadPool,
    logits: &[f32],
    vocab: usize,
    rows: &[SampleAt],
) -> Result<Vec<Result<Sampled, LogitsError>>, BackendError> {
    assert_eq!(
        logits.len(),
        rows.len() * vocab,
        "{} logits for {} rows of {vocab}",
        logits.len(),
        rows.len()
    );
    let results: Vec<Mutex<Option<Result<Sampled, LogitsError>>>> =
        (0..rows.len()).map(|_| Mutex::new(None)).collect();
    pool.run(rows.len(), &|i| {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let SampleAt { spec, index } = rows[i];
        let r = SCRATCH.with(|s| sample(&spec, row, index, &mut s.borrow_mut()));
        if let Ok(mut slot) = results[i].lock() {
            *slot = Some(r);
        }
    });
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            // Every task ran (a panic would have resumed above) and no lock is poisoned (no
            // task panics while holding one), so this error is not expected to happen.
            r.into_inner()
                .ok()
                .flatten()
                .ok_or_else(|| BackendError::Device {
                    op: "sample",
                    reason: format!("row {i} was not sampled"),
                })
        })
        .collect()
}
