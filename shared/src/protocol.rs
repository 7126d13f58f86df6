//! What the supervisor and its stage workers say to each other.
//!
//! Two planes:
//! - **Control** (one Unix stream socket per worker): small framed messages — a `u32`
//!   little-endian length, then the encoded message ([`crate::wire`]). The worker speaks first
//!   with [`WorkerMsg::Hello`] carrying [`PROTOCOL_VERSION`]; a supervisor that sees another
//!   version refuses the worker.
//! - **Data** (the shared-memory rings): each slot holds a [`StepHeader`] (or, on the last hop,
//!   a [`StepResult`]) framed the same way, then, at [`payload_offset`], the payload: token ids
//!   (`u32`) on the first hop, hidden states (`f32`, `tokens × hidden`) between stages, nothing on
//!   the last hop.
//!
//! Epochs: after a worker crash the supervisor bumps the epoch and tells every stage
//! ([`SupervisorMsg::SetEpoch`]); steps of older epochs still in the rings are skipped by the
//! stages and dropped by the supervisor, so nothing stale reaches a client.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::device::BackendKind;
use crate::sampling::SampleAt;
use crate::wire::{self, WireError};

/// Bumped on any incompatible change of these types.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest control message accepted (a guard against a corrupt length prefix).
pub const MAX_CONTROL_MESSAGE: usize = 16 << 20;

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    /// First message after connecting.
    Hello { version: u32, stage: u32, pid: u32 },
    /// Weights mapped and checked, KV pool allocated: ready for steps.
    Loaded(LoadReport),
    /// Loading failed; the worker exits after sending this. Not worth restarting.
    LoadFailed { reason: String },
    /// Sent every heartbeat interval by a thread apart from the compute loop.
    Heartbeat {
        /// Steps completed since the worker started.
        steps_done: u64,
        /// The step being computed and for how long (ms), if any.
        busy: Option<(u64, u64)>,
    },
}

/// What a stage reports once it has loaded: the backend it computes on and what it holds.
/// The supervisor sizes its KV pool from `kv_blocks` (the minimum over the stages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub backend: BackendKind,
    /// The kernels it runs: the CPU's instruction set (`Avx512Vbmi`), or the GPU's.
    pub kernels: String,
    /// For people: the CPU kernels' instruction set and threads (`Avx512Vbmi kernels, 8
    /// threads`); a GPU's name, compute capability and driver.
    pub detail: String,
    /// Host threads that compute (CPU) or assist (a GPU).
    pub threads: u32,
    /// Bytes of checkpoint weights the stage holds.
    pub weight_bytes: u64,
    /// Bytes of its KV memory.
    pub kv_bytes: u64,
    /// Bytes of memory the backend holds for the stage: its KV memory and whatever it
    /// allocated besides (copies of the weights, fixed buffers; not the checkpoint's mapping,
    /// which the CPU backend computes on).
    pub memory_bytes: u64,
    /// KV blocks the stage holds (block ids `0..kv_blocks` are valid in its steps): what the
    /// supervisor asked for (`--kv-blocks`), or fewer where the device cannot hold that many.
    pub kv_blocks: u64,
}

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SupervisorMsg {
    /// Steps of epochs below this one are skipped.
    SetEpoch { epoch: u64 },
    /// Exit now (after the current step).
    Shutdown,
    /// A neighbour was restarted: the descriptor of a new ring for this worker's input
    /// (`input`) or output follows on the socket (SCM_RIGHTS); the old one is closed.
    ReplaceRing { input: bool },
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSeq {
    pub seq: u64,
    pub start_pos: u32,
    pub tokens: u32,
    pub blocks: Vec<u32>,
    /// Set when the chunk's last token must be sampled: the sequence's validated spec and the
    /// index of the token it draws.
    pub sample: Option<SampleAt>,
}

/// The header of a step slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepHeader {
    pub epoch: u64,
    pub step: u64,
    pub seqs: Vec<StepSeq>,
    /// Set by the stage that could not compute the step (the slot then has no payload): the
    /// stages after it forward the header without computing, and the last one reports the
    /// failure as the step's result. `None` when the supervisor writes the step.
    pub failed: Option<StepFailure>,
}

/// Why a stage could not compute a step: its index and its own words (a rejected block table,
/// a device error), carried to the supervisor unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("stage {stage}: {reason}")]
pub struct StepFailure {
    pub stage: u32,
    pub reason: String,
}

impl StepHeader {
    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens as usize).sum()
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqToken {
    pub seq: u64,
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the last stage returns for a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepOutcome {
    Tokens(Vec<SeqToken>),
    /// The step could not run (a bad block table, a device error): which stage, and why.
    Failed(StepFailure),
}

/// The last hop's slot content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub epoch: u64,
    pub step: u64,
    pub outcome: StepOutcome,
}

/// A control or slot message that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket or pipe failed; the OS error is the whole message (and no `source()`, so an
    /// error chain shows it once).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("slot of {have} bytes is too small for {need}")]
    SlotTooSmall { have: usize, need: usize },
}

/// Writes one framed message.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let body = wire::encode(msg)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one framed message (blocking).
pub fn read_message<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(wire::decode(&body)?)
}

/// Where a slot's payload starts for a header of `header_len` encoded bytes (64-aligned).
pub fn payload_offset(header_len: usize) -> usize {
    (4 + header_len).next_multiple_of(64)
}

/// Writes a framed header at the start of `slot`; returns the payload offset.
pub fn write_slot_header<T: Serialize>(
    slot: &mut [u8],
    header: &T,
) -> Result<usize, ProtocolError> {
    let body = wire::encode(header)?;
    let offset = payload_offset(body.len());
    if slot.len() < offset {
        return Err(ProtocolError::SlotTooSmall {
            have: slot.len(),
            need: offset,
        });
    }
    slot[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    slot[4..4 + body.len()].copy_from_slice(&body);
    Ok(offset)
}

/// Reads the framed header at the start of `slot`; returns it and the payload offset.
pub fn read_slot_header<T: serde::de::DeserializeOwned>(
    slot: &[u8],
) -> Result<(T, usize), ProtocolError> {
    let len_bytes: [u8; 4] =
        slot.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(ProtocolError::SlotTooSmall {
                have: slot.len(),
                need: 4,
            })?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let body = slot.get(4..4 + len).ok_or(ProtocolError::SlotTooSmall {
        have: slot.len(),
        need: 4 + len,
    })?;
    Ok((wire::decode(body)?, payload_offset(len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingSpec;

    #[test]
    fn control_messages_round_trip() {
        let mut buf = Vec::new();
        let msgs = vec![
            WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                stage: 2,
                pid: 77,
            },
            WorkerMsg::Heartbeat {
                steps_done: 9,
                busy: Some((4, 12)),
            },
            WorkerMsg::LoadFailed {
                reason: "no file".into(),
            },
            WorkerMsg::Loaded(LoadReport {
                backend: BackendKind::Cuda,
                kernels: "sm_90".into(),
                detail: "NVIDIA H200, sm_90, driver 13.0".into(),
                threads: 2,
                weight_bytes: 1 << 33,
                kv_bytes: 1 << 30,
                memory_bytes: (1 << 33) + (1 << 30),
                kv_blocks: 4096,
            }),
        ];
        for m in &msgs {
            write_message(&mut buf, m).expect("write");
        }
        let mut r = buf.as_slice();
        for m in &msgs {
            let got: WorkerMsg = read_message(&mut r).expect("read");
            assert_eq!(&got, m);
        }
        assert!(
            read_message::<WorkerMsg>(&mut r).is_err(),
            "end of stream is an error"
        );
    }

    #[test]
    fn slot_header_round_trip_and_alignment() {
        let h = StepHeader {
            epoch: 1,
            step: 5,
            seqs: vec![
                StepSeq {
                    seq: 3,
                    start_pos: 10,
                    tokens: 1,
                    blocks: vec![1, 2],
                    sample: None,
                },
                StepSeq {
                    seq: 4,
                    start_pos: 0,
                    tokens: 2,
                    blocks: vec![3],
                    sample: Some(SampleAt {
                        spec: SamplingSpec::default(),
                        index: 7,
                    }),
                },
            ],
            failed: None,
        };
        let mut slot = vec![0u8; 256];
        let off = write_slot_header(&mut slot, &h).expect("write");
        assert_eq!(off % 64, 0);
        let (got, off2): (StepHeader, usize) = read_slot_header(&slot).expect("read");
        assert_eq!(got, h);
        assert_eq!(off, off2);
        // A stage's failure travels in the header, with its words.
        let failed = StepHeader {
            failed: Some(StepFailure {
                stage: 2,
                reason: "step 5: block 900 is outside the KV pool (512 blocks)".into(),
            }),
            ..h.clone()
        };
        write_slot_header(&mut slot, &failed).expect("write");
        let (got, _): (StepHeader, usize) = read_slot_header(&slot).expect("read");
        assert_eq!(got, failed);
        assert_eq!(
            got.failed.map(|f| f.to_string()).as_deref(),
            Some("stage 2: step 5: block 900 is outside the KV pool (512 blocks)")
        );
        let mut tiny = vec![0u8; 8];
        assert!(write_slot_header(&mut tiny, &h).is_err());
    }

    #[test]
    fn corrupt_length_is_an_error_not_an_allocation() {
        let frame = [0xff, 0xff, 0xff, 0x7f, 1, 2, 3];
        assert!(matches!(
            read_message::<WorkerMsg>(&mut &frame[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(read_slot_header::<StepHeader>(&frame).is_err());
    }
}
