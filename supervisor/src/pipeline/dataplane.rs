//! The data plane, supervisor side: the rings between the stages, the epoch, what the
//! supervisor tells the stages over their control connections (epoch, replacement rings,
//! shutdown), step encoding, and the result reader thread.
//!
//! ```text
//!  engine ──ring 0──► stage 0 ──ring 1──► … ──ring S−1──► stage S−1 ──ring S──► result reader
//! ```
//!
//! `rings[k]` feeds stage k; `rings[S]` carries step results back. The engine is the only
//! producer of ring 0; the result reader thread is the only consumer of ring S and hands every
//! [`StepResult`] to the engine as an event.
//!
//! Epochs: every step carries the epoch it was sent in. After a stage is taken down the epoch
//! moves on and every connected stage is told; stages skip steps of older epochs and the engine
//! drops their results, so nothing stale reaches a client.
//!
//! Ring replacement: a taken-down stage leaves its two rings in an unknown state, so both are
//! replaced. The old ring is closed first (waking whoever waits on it, the result reader
//! included); the live ends get the new one: the engine itself (ring 0), a neighbour over its
//! control connection (`ReplaceRing` then the descriptor), the result reader over its channel
//! (ring S). A restarted stage inherits the current rings when it is spawned.
//!
//! It does not know requests, lifecycles or processes.

use std::os::fd::BorrowedFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use gptossd_shared::protocol::{
    read_slot_header, write_message, write_slot_header, ProtocolError, StepHeader, StepResult,
    StepSeq, SupervisorMsg,
};
use gptossd_shared::ring::{send_fd, Producer, Ring, RingError};
use gptossd_shared::sampling::{SampleAt, SamplingSpec};
use interprocess::os::unix::uds_local_socket::Stream;

use super::Event;
use crate::scheduler::{SeqId, StepPlan};

/// Bytes reserved for a step header in every slot.
const HEADER_BYTES: usize = 1 << 20;
/// How long sending a step waits for a free slot in ring 0. It never should: ring 0 has more
/// slots than steps can be in flight.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A data-plane operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("encoding a step: {0}")]
    Encode(#[from] ProtocolError),
    #[error("duplicating a ring descriptor: {0}")]
    Dup(std::io::Error),
    #[error("there is no ring to stage 0")]
    NoRingToStage0,
    #[error("the result reader has stopped")]
    ResultReaderGone,
    #[error("cannot start the result reader thread: {0}")]
    Thread(std::io::Error),
}

/// What sizes the rings.
#[derive(Debug, Clone, Copy)]
pub struct RingSizes {
    pub stages: usize,
    pub max_tokens_per_step: usize,
    pub hidden_size: usize,
    /// Most steps in flight at once.
    pub max_in_flight: usize,
}

impl RingSizes {
    fn new_ring(&self, hop: usize) -> Result<Ring, RingError> {
        let payload = if hop == 0 {
            self.max_tokens_per_step * 4
        } else if hop == self.stages {
            0
        } else {
            self.max_tokens_per_step * self.hidden_size * 4
        };
        // One slot more than steps in flight: a producer never waits on a full ring.
        let slots = (self.max_in_flight + 2) as u32;
        Ring::create(&format!("gptossd-hop{hop}"), slots, HEADER_BYTES + payload)
    }
}

/// The supervisor's ends of the data plane.
pub struct DataPlane {
    sizes: RingSizes,
    /// `rings[k]` feeds stage k; `rings[S]` carries results back.
    rings: Vec<Ring>,
    to_stage0: Option<Producer>,
    /// Hands the result reader its (replacement) ring.
    result_rings: Sender<Ring>,
    /// Each stage's control connection, once it has connected.
    controls: Vec<Option<Arc<Stream>>>,
    epoch: u64,
}

impl DataPlane {
    /// Creates every ring and starts the result reader thread, which sends step results to
    /// `events`.
    pub fn start(sizes: RingSizes, events: Sender<Event>) -> Result<Self, DataPlaneError> {
        let rings = (0..=sizes.stages)
            .map(|hop| sizes.new_ring(hop))
            .collect::<Result<Vec<_>, _>>()?;
        let to_stage0 = Some(rings[0].producer()?);
        let (result_rings, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("results".into())
            .spawn(move || read_results(rx, events))
            .map_err(DataPlaneError::Thread)?;
        let plane = Self {
            sizes,
            rings,
            to_stage0,
            result_rings,
            controls: vec![None; sizes.stages],
            epoch: 1,
        };
        plane.hand_results_ring()?;
        Ok(plane)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The rings a new process of `stage` inherits: its input and its output.
    pub fn stage_rings(&self, stage: usize) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.rings[stage].fd(), self.rings[stage + 1].fd())
    }

    pub fn connect(&mut self, stage: usize, control: Arc<Stream>) {
        if let Some(c) = self.controls.get_mut(stage) {
            *c = Some(control);
        }
    }

    pub fn disconnect(&mut self, stage: usize) {
        if let Some(c) = self.controls.get_mut(stage) {
            *c = None;
        }
    }

    pub fn is_connected(&self, stage: usize) -> bool {
        self.controls.get(stage).is_some_and(Option::is_some)
    }

    /// Tells a stage (that just loaded) the current epoch.
    pub fn tell_epoch(&self, stage: usize) {
        if let Some(Some(c)) = self.controls.get(stage) {
            let _ = write_message(&mut &**c, &SupervisorMsg::SetEpoch { epoch: self.epoch });
        }
    }

    /// Starts a new epoch: every connected stage skips steps of older ones from now on, and
    /// results of older ones are to be dropped.
    pub fn bump_epoch(&mut self) {
        self.epoch += 1;
        for stage in 0..self.controls.len() {
            self.tell_epoch(stage);
        }
    }

    /// Swaps ring `hop` for a new one: the old one is closed (waking whoever waits on it), the
    /// live ends get the new one.
    pub fn replace_ring(&mut self, hop: usize) -> Result<(), DataPlaneError> {
        let ring = self.sizes.new_ring(hop)?;
        self.rings[hop].close();
        // Producer side: stage hop−1, or the engine for hop 0.
        if hop == 0 {
            self.to_stage0 = None;
            self.to_stage0 = Some(ring.producer()?);
        } else if let Some(Some(c)) = self.controls.get(hop - 1) {
            send_ring(c, &ring, false);
        }
        self.rings[hop] = ring;
        // Consumer side: stage hop, or the result reader for hop S.
        if hop == self.sizes.stages {
            self.hand_results_ring()?;
        } else if let Some(Some(c)) = self.controls.get(hop) {
            send_ring(c, &self.rings[hop], true);
        }
        Ok(())
    }

    /// Encodes `plan` and writes it into ring 0. `sampling` gives a sequence's sampling spec.
    pub fn send_step(
        &mut self,
        plan: &StepPlan,
        sampling: impl Fn(SeqId) -> Option<SamplingSpec>,
    ) -> Result<(), DataPlaneError> {
        let (header, tokens) = encode_step(self.epoch, plan, sampling);
        let producer = self
            .to_stage0
            .as_mut()
            .ok_or(DataPlaneError::NoRingToStage0)?;
        let mut slot = producer.reserve(SEND_TIMEOUT)?;
        let offset = write_slot_header(&mut slot, &header)?;
        let ids = slot.view_mut::<u32>(offset, tokens.len())?;
        ids.copy_from_slice(&tokens);
        slot.commit(offset + tokens.len() * 4)?;
        Ok(())
    }

    /// Tells every connected stage to exit and closes every ring (which also ends the result
    /// reader's wait).
    pub fn shut_down(&mut self) {
        for c in self.controls.iter().flatten() {
            let _ = write_message(&mut &**c, &SupervisorMsg::Shutdown);
        }
        for ring in &self.rings {
            ring.close();
        }
    }

    /// Gives the result reader its own mapping of the last ring.
    fn hand_results_ring(&self) -> Result<(), DataPlaneError> {
        let last = &self.rings[self.sizes.stages];
        let fd = last
            .fd()
            .try_clone_to_owned()
            .map_err(DataPlaneError::Dup)?;
        let copy = Ring::from_fd(fd)?;
        self.result_rings
            .send(copy)
            .map_err(|_| DataPlaneError::ResultReaderGone)
    }
}

/// A step as it travels: its header (which sequences, their positions, block tables and
/// sampling) and the token ids of every chunk, in the header's order.
pub fn encode_step(
    epoch: u64,
    plan: &StepPlan,
    sampling: impl Fn(SeqId) -> Option<SamplingSpec>,
) -> (StepHeader, Vec<u32>) {
    let seqs = plan
        .seqs
        .iter()
        .map(|p| StepSeq {
            seq: p.id,
            start_pos: p.start_pos as u32,
            tokens: p.tokens.len() as u32,
            blocks: p.blocks.clone(),
            // A sequence no longer open (cancelled meanwhile) samples with the defaults; its
            // token is dropped when it comes back.
            sample: p.sample.then(|| SampleAt {
                spec: sampling(p.id).unwrap_or_default(),
                index: p.sample_index,
            }),
        })
        .collect();
    let tokens = plan
        .seqs
        .iter()
        .flat_map(|p| p.tokens.iter().copied())
        .collect();
    let header = StepHeader {
        epoch,
        step: plan.id.0,
        seqs,
        failed: None,
    };
    (header, tokens)
}

fn send_ring(control: &Stream, ring: &Ring, input: bool) {
    if write_message(&mut &*control, &SupervisorMsg::ReplaceRing { input }).is_ok() {
        let _ = send_fd(control, ring.fd());
    }
}

/// The result reader thread: reads step results from the last ring and sends them to the
/// engine; when the ring is closed (replaced, or the pipeline stops) it waits for the next
/// one. Ends when the engine is gone.
fn read_results(rings: Receiver<Ring>, events: Sender<Event>) {
    while let Ok(ring) = rings.recv() {
        let Ok(mut consumer) = ring.consumer() else {
            continue;
        };
        // Waits without a time limit: closing the ring wakes it.
        while let Ok(slot) = consumer.recv(Duration::MAX) {
            let result = read_slot_header::<StepResult>(&slot);
            drop(slot);
            if let Ok((result, _)) = result {
                if events.send(Event::Result(result)).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{PlannedSeq, StepId};
    use gptossd_shared::sampling::SamplingParams;

    fn seq(id: SeqId, tokens: Vec<u32>, sample: bool, sample_index: u64) -> PlannedSeq {
        PlannedSeq {
            id,
            start_pos: 16,
            tokens,
            blocks: vec![3, 9],
            sample,
            sample_index,
        }
    }

    #[test]
    fn a_step_carries_its_chunks_in_order_and_samples_only_where_planned() {
        let plan = StepPlan {
            id: StepId(41),
            seqs: vec![
                seq(7, vec![10, 11, 12], false, 0),
                seq(8, vec![20], true, 5),
            ],
        };
        let params = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            top_k: Some(40),
            seed: Some(1),
            logprobs: Some(3),
        };
        let spec = SamplingSpec::new(params, 99).expect("valid");
        let (header, tokens) = encode_step(6, &plan, |id| (id == 8).then_some(spec));
        assert_eq!(tokens, vec![10, 11, 12, 20]);
        assert_eq!((header.epoch, header.step), (6, 41));
        assert_eq!(header.total_tokens(), 4);
        let first = &header.seqs[0];
        assert_eq!((first.seq, first.start_pos, first.tokens), (7, 16, 3));
        assert_eq!(first.blocks, vec![3, 9]);
        assert_eq!(first.sample, None);
        assert_eq!(header.seqs[1].sample, Some(SampleAt { spec, index: 5 }));
    }

    #[test]
    fn a_sequence_no_longer_open_is_sampled_with_the_defaults() {
        let plan = StepPlan {
            id: StepId(1),
            seqs: vec![seq(3, vec![1], true, 0)],
        };
        let (header, _) = encode_step(1, &plan, |_| None);
        let at = header.seqs[0].sample.expect("sampled");
        assert_eq!(at.spec, SamplingSpec::default());
        assert_eq!(
            (
                at.spec.params().temperature,
                at.spec.params().top_k,
                at.spec.seed()
            ),
            (1.0, None, 0)
        );
    }
}
