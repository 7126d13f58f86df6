//! The registry of open requests: for each sequence the pipeline serves, where its events go,
//! how its tokens are sampled and whether it has been scheduled yet; and for each step in
//! flight, which sequences it carries.
//!
//! Invariants: a request gets exactly one `Finished` or `Failed`, and nothing after it (both
//! remove it); `Scheduled` is sent at most once, before its first token. The registry only
//! sends: what a sequence's scheduler state is, is the scheduler's business.

use std::collections::HashMap;

use gptossd_shared::sampling::SamplingSpec;

use super::{Finish, GenEvent, GenFailure, GenSender};
use crate::scheduler::{SeqId, StepId, StepPlan};

/// One open request.
struct OpenRequest {
    tx: GenSender,
    sampling: SamplingSpec,
    scheduled: bool,
}

/// What happened to a token sent to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// The receiver was dropped (the client went away): the request is removed; cancel its
    /// sequence.
    ReceiverGone,
    /// No such open request (it was cancelled or failed meanwhile).
    Unknown,
}

/// Open requests and in-flight step members.
#[derive(Default)]
pub struct Registry {
    open: HashMap<SeqId, OpenRequest>,
    in_flight: HashMap<StepId, Vec<SeqId>>,
}

impl Registry {
    pub fn open(&mut self, id: SeqId, tx: GenSender, sampling: SamplingSpec) {
        self.open.insert(
            id,
            OpenRequest {
                tx,
                sampling,
                scheduled: false,
            },
        );
    }

    /// The ids of every open request.
    pub fn ids(&self) -> Vec<SeqId> {
        self.open.keys().copied().collect()
    }

    /// How a request samples (its parameters and seed).
    pub fn sampling(&self, id: SeqId) -> Option<SamplingSpec> {
        self.open.get(&id).map(|r| r.sampling)
    }

    /// A step was sent: remember its members, and tell each request it carries for the
    /// first time that it is scheduled.
    pub fn step_launched(&mut self, plan: &StepPlan) {
        for p in &plan.seqs {
            if let Some(r) = self.open.get_mut(&p.id) {
                if !r.scheduled {
                    r.scheduled = true;
                    let _ = r.tx.send(GenEvent::Scheduled);
                }
            }
        }
        self.in_flight
            .insert(plan.id, plan.seqs.iter().map(|p| p.id).collect());
    }

    /// A step came back: its members.
    pub fn step_returned(&mut self, step: StepId) -> Vec<SeqId> {
        self.in_flight.remove(&step).unwrap_or_default()
    }

    /// Every step in flight was dropped (a replay).
    pub fn forget_steps(&mut self) {
        self.in_flight.clear();
    }

    /// Sends a request its next token.
    pub fn token(
        &mut self,
        id: SeqId,
        index: u64,
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    ) -> Delivery {
        let Some(r) = self.open.get(&id) else {
            return Delivery::Unknown;
        };
        let event = GenEvent::Token {
            index,
            token,
            logprob,
            top,
        };
        if r.tx.send(event).is_ok() {
            Delivery::Sent
        } else {
            self.open.remove(&id);
            Delivery::ReceiverGone
        }
    }

    /// Ends a request; false if it was not open.
    pub fn finish(&mut self, id: SeqId, finish: Finish) -> bool {
        self.close(id, GenEvent::Finished(finish))
    }

    /// Fails a request; false if it was not open.
    pub fn fail(&mut self, id: SeqId, failure: GenFailure) -> bool {
        self.close(id, GenEvent::Failed(failure))
    }

    fn close(&mut self, id: SeqId, last: GenEvent) -> bool {
        match self.open.remove(&id) {
            Some(r) => {
                let _ = r.tx.send(last);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::PlannedSeq;
    use gptossd_shared::sampling::SamplingParams;

    fn sampling() -> SamplingSpec {
        let params = SamplingParams {
            temperature: 0.7,
            ..SamplingParams::default()
        };
        SamplingSpec::new(params, 42).expect("valid spec")
    }

    fn plan(step: u64, ids: &[SeqId]) -> StepPlan {
        StepPlan {
            id: StepId(step),
            seqs: ids
                .iter()
                .map(|&id| PlannedSeq {
                    id,
                    start_pos: 0,
                    tokens: vec![1],
                    blocks: vec![0],
                    sample: true,
                    sample_index: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_request_is_scheduled_once_then_gets_tokens_then_exactly_one_end() {
        let mut reg = Registry::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        reg.open(1, tx, sampling());
        assert_eq!(
            reg.sampling(1).map(|s| (s.params().temperature, s.seed())),
            Some((0.7, 42))
        );
        reg.step_launched(&plan(10, &[1]));
        assert_eq!(reg.step_returned(StepId(10)), vec![1]);
        reg.step_launched(&plan(11, &[1]));
        assert_eq!(reg.token(1, 0, 77, -0.5, vec![(77, -0.5)]), Delivery::Sent);
        assert!(reg.finish(1, Finish::Stop));
        assert!(!reg.fail(1, GenFailure::ShuttingDown));
        assert_eq!(reg.token(1, 1, 78, 0.0, Vec::new()), Delivery::Unknown);
        let mut seen = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            seen.push(ev);
        }
        assert_eq!(
            seen,
            vec![
                GenEvent::Scheduled,
                GenEvent::Token {
                    index: 0,
                    token: 77,
                    logprob: -0.5,
                    top: vec![(77, -0.5)]
                },
                GenEvent::Finished(Finish::Stop),
            ]
        );
        assert!(reg.ids().is_empty());
    }

    #[test]
    fn a_dropped_receiver_closes_the_request() {
        let mut reg = Registry::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        reg.open(5, tx, sampling());
        drop(rx);
        assert_eq!(reg.token(5, 0, 1, 0.0, Vec::new()), Delivery::ReceiverGone);
        assert_eq!(reg.sampling(5), None);
    }

    #[test]
    fn forgotten_steps_have_no_members() {
        let mut reg = Registry::default();
        reg.step_launched(&plan(3, &[1, 2]));
        reg.forget_steps();
        assert_eq!(reg.step_returned(StepId(3)), Vec::<SeqId>::new());
    }
}
