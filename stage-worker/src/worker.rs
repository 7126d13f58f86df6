//! The stage worker process: one slice of the model's layers, fed by one shared-memory ring
//! and feeding the next, steered over one control socket.
//!
//! Threads: the **compute loop** (this module's [`run`]) takes a step from the input ring,
//! computes it straight into the output ring's next slot, commits, and repeats; a **control
//! reader** applies supervisor messages (epoch, shutdown, ring replacement); a
//! **heartbeat** thread reports progress at a fixed interval, so a stopped or wedged compute
//! loop is visible to the supervisor even though the process is alive.
//!
//! Invariants: steps are handled strictly in ring order (the KV pool relies on it: a step's
//! writes happen before those of any later step); a step of an older epoch than the current one
//! is dropped without computing; nothing a peer wrote into a slot is trusted (a bad header fails
//! the step, it does not crash the worker).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gptossd_shared::protocol::{
    read_message, read_slot_header, write_message, write_slot_header, SeqToken, StepFailure,
    StepHeader, StepOutcome, StepResult, SupervisorMsg, WorkerMsg,
};
use gptossd_shared::ring::{recv_fd, Consumer, Producer, ReadSlot, Ring, RingError};
use gptossd_shared::sampling::SampleAt;
use interprocess::os::unix::uds_local_socket::Stream;

use crate::stage::Stage;
use crate::step::{Logits, SeqStep, StageInput, StepBatch};

/// How long one ring wait lasts before the loop re-checks its flags.
const POLL: Duration = Duration::from_millis(50);
/// After this long with no step, the step buffers are given back to the OS.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// The state the worker's threads share: the control reader and the heartbeat thread beside
/// the step loop.
pub struct WorkerState {
    pub epoch: AtomicU64,
    pub shutdown: AtomicBool,
    pub steps_done: AtomicU64,
    /// Step being computed and when it started.
    pub busy: Mutex<Option<(u64, Instant)>>,
    /// Replacement rings sent by the supervisor after a neighbour crashed.
    pub new_in: Mutex<Option<Ring>>,
    pub new_out: Mutex<Option<Ring>>,
}

impl WorkerState {
    pub fn new(epoch: u64) -> Arc<Self> {
        Arc::new(Self {
            epoch: AtomicU64::new(epoch),
            shutdown: AtomicBool::new(false),
            steps_done: AtomicU64::new(0),
            busy: Mutex::new(None),
            new_in: Mutex::new(None),
            new_out: Mutex::new(None),
        })
    }
}

/// Which ring a replacement is for.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    In,
    Out,
}

/// Reads supervisor messages until the socket closes or a shutdown arrives. A replacement
/// ring's descriptor follows its [`SupervisorMsg`] on the socket (SCM_RIGHTS).
pub fn control_reader(stream: Arc<Stream>, state: Arc<WorkerState>) {
    loop {
        let msg: SupervisorMsg = match read_message(&mut &*stream) {
            Ok(m) => m,
            Err(_) => {
                // The supervisor is gone: nothing more to do.
                state.shutdown.store(true, Ordering::SeqCst);
                return;
            }
        };
        match msg {
            SupervisorMsg::SetEpoch { epoch } => state.epoch.store(epoch, Ordering::SeqCst),
            SupervisorMsg::Shutdown => {
                state.shutdown.store(true, Ordering::SeqCst);
                return;
            }
            SupervisorMsg::ReplaceRing { input } => {
                let ring = recv_fd(&*stream).and_then(Ring::from_fd);
                match ring {
                    Ok(ring) => {
                        let slot = if input { &state.new_in } else { &state.new_out };
                        if let Ok(mut s) = slot.lock() {
                            *s = Some(ring);
                        }
                    }
                    Err(e) => {
                        eprintln!("gptossd-stage: replacement ring rejected: {e}");
                        state.shutdown.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
    }
}

/// Sends a heartbeat every `interval` until shutdown.
pub fn heartbeat(stream: Arc<Stream>, state: Arc<WorkerState>, interval: Duration) {
    while !state.shutdown.load(Ordering::SeqCst) {
        let busy = state
            .busy
            .lock()
            .ok()
            .and_then(|b| b.map(|(step, since)| (step, since.elapsed().as_millis() as u64)));
        let msg = WorkerMsg::Heartbeat {
            steps_done: state.steps_done.load(Ordering::SeqCst),
            busy,
        };
        if write_message(&mut &*stream, &msg).is_err() {
            state.shutdown.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(interval);
    }
}

/// The rings of this stage and their attached ends.
/// Which stage this worker is, and how it computes.
#[derive(Debug, Clone, Copy)]
pub struct StageRole {
    /// The stage's index in the pipeline (named in the failures it reports).
    pub index: u32,
    /// Test-only fault injection (`GPTOSSD_FAULT=fail-steps`): every step fails here, as a
    /// device error would, so tests see a failure travel to the client.
    pub fail_steps: bool,
}

pub struct Hops {
    pub input: Ring,
    pub output: Ring,
}

/// Why the compute loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("ring: {0}")]
    Ring(#[from] RingError),
}

/// The compute loop: until shutdown, take a step, compute it into the next hop, commit.
pub fn run(
    stage: &mut Stage,
    who: StageRole,
    hops: Hops,
    state: &WorkerState,
) -> Result<(), LoopError> {
    let mut in_ring = hops.input;
    let mut out_ring = hops.output;
    let mut consumer: Option<Consumer> = Some(in_ring.consumer()?);
    let mut producer: Option<Producer> = Some(out_ring.producer()?);
    // Set when the input ring was found closed: its end is dropped at the top of the next turn.
    let mut lost_input = false;
    // When the last step finished, while its buffers are still held.
    let mut holding_since: Option<Instant> = None;
    while !state.shutdown.load(Ordering::SeqCst) {
        if std::mem::take(&mut lost_input) {
            consumer = None;
        }
        if let Some(ring) = state.new_in.lock().ok().and_then(|mut s| s.take()) {
            drop(consumer.take());
            in_ring = ring;
            consumer = Some(in_ring.consumer()?);
        }
        let Some(cons) = consumer.as_mut() else {
            std::thread::sleep(POLL);
            continue;
        };
        let slot = match cons.recv(POLL) {
            Ok(slot) => slot,
            Err(RingError::Timeout(_)) => {
                if holding_since.is_some_and(|t| t.elapsed() >= IDLE_RELEASE) {
                    release_memory(stage);
                    holding_since = None;
                }
                continue;
            }
            Err(RingError::Closed) | Err(RingError::Stale(_)) => {
                // The neighbour upstream died; the supervisor sends a replacement.
                lost_input = true;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let parsed: Result<(StepHeader, usize), _> = read_slot_header(&slot);
        let Ok((header, payload_at)) = parsed else {
            eprintln!("gptossd-stage: dropping a slot with an unreadable header");
            continue;
        };
        if header.epoch < state.epoch.load(Ordering::SeqCst) {
            continue;
        }
        if let Ok(mut b) = state.busy.lock() {
            *b = Some((header.step, Instant::now()));
        }
        // The output ring may have been replaced (the next stage restarted) after this loop
        // last looked, and the replacement may still be on its way from the control reader:
        // the step belongs to the current epoch, so it waits for the new ring rather than
        // being dropped (a dropped step would leave its sequences waiting forever). Computing
        // a step twice writes the same KV rows with the same values.
        let written = loop {
            if let Some(ring) = state.new_out.lock().ok().and_then(|mut s| s.take()) {
                drop(producer.take());
                out_ring = ring;
                producer = Some(out_ring.producer()?);
            }
            let result = match producer.as_mut() {
                Some(prod) => compute_step(stage, who, &header, &slot, payload_at, prod),
                None => Err(RingError::Closed),
            };
            match result {
                Err(RingError::Closed) | Err(RingError::Stale(_)) => {
                    producer = None;
                    if !await_replacement(&state.new_out, state, header.epoch) {
                        break Err(RingError::Closed);
                    }
                }
                other => break other,
            }
        };
        drop(slot);
        match written {
            // Closed: no replacement came (shutdown, or the step went stale): dropped.
            Ok(()) | Err(RingError::Closed) => {}
            Err(e) => return Err(e.into()),
        }
        if let Ok(mut b) = state.busy.lock() {
            *b = None;
        }
        state.steps_done.fetch_add(1, Ordering::SeqCst);
        holding_since = Some(Instant::now());
    }
    Ok(())
}

/// How long a step of the current epoch waits for a replacement output ring.
const REPLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// Waits until a replacement ring is in `slot` (true), or gives up (false): on shutdown, when
/// the epoch moves past `epoch` (the step is stale and will be replayed), or after
/// [`REPLACEMENT_WAIT`].
fn await_replacement(slot: &Mutex<Option<Ring>>, state: &WorkerState, epoch: u64) -> bool {
    let deadline = Instant::now() + REPLACEMENT_WAIT;
    while Instant::now() < deadline
        && !state.shutdown.load(Ordering::SeqCst)
        && state.epoch.load(Ordering::SeqCst) <= epoch
    {
        if slot.lock().is_ok_and(|s| s.is_some()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Gives an idle stage's step buffers back to the OS: the stage's are dropped, then glibc
/// returns the freed heap pages (large buffers were mapped and are unmapped on free already).
fn release_memory(stage: &mut Stage) {
    stage.release_scratch();
    // SAFETY: malloc_trim only walks glibc's own free lists; no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn batch_of(header: &StepHeader, last_stage: bool) -> StepBatch {
    StepBatch {
        seqs: header
            .seqs
            .iter()
            .map(|s| SeqStep {
                start_pos: s.start_pos as usize,
                tokens: s.tokens as usize,
                blocks: s.blocks.clone(),
                logits: if last_stage && s.sample.is_some() {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect(),
    }
}

/// Computes one step into the next hop's slot. A step this stage cannot compute, or one an
/// earlier stage failed (`header.failed`), becomes a failed result on the last stage; on the
/// others the header goes on with the failure in it and no payload, so the supervisor learns
/// which stage failed and why.
fn compute_step(
    stage: &mut Stage,
    who: StageRole,
    header: &StepHeader,
    slot: &ReadSlot<'_>,
    payload_at: usize,
    prod: &mut Producer,
) -> Result<(), RingError> {
    let h = stage.config().hidden_size;
    let n = header.total_tokens();
    let last = stage.is_last();
    let batch = batch_of(header, last);
    let failure = |reason: String| StepFailure {
        stage: who.index,
        reason: format!("step {}: {reason}", header.step),
    };

    // Input, read in place: token ids on the first hop, hidden states afterwards.
    let input = match &header.failed {
        Some(earlier) => Err(earlier.clone()),
        None => if stage.is_first() {
            slot.view::<u32>(payload_at, n).map(StageInput::Tokens)
        } else {
            slot.view::<f32>(payload_at, n * h).map(StageInput::Hidden)
        }
        .map_err(|_| failure(format!("the slot holds fewer than the header's {n} tokens"))),
    };
    let input = match input {
        Ok(_) if who.fail_steps => Err(failure(
            "GPTOSSD_FAULT=fail-steps (test fault injection)".into(),
        )),
        other => other,
    };

    if last {
        let outcome = match input {
            Err(failed) => StepOutcome::Failed(failed),
            Ok(input) => sample_step(stage, header, &batch, input, &failure),
        };
        let mut slot = prod.reserve(Duration::MAX)?;
        let result = StepResult {
            epoch: header.epoch,
            step: header.step,
            outcome,
        };
        let len =
            write_slot_header(&mut slot, &result).map_err(|e| RingError::Corrupt(e.to_string()))?;
        return slot.commit(len);
    }

    let mut out = prod.reserve(Duration::MAX)?;
    let failed = match input {
        Err(failed) => failed,
        Ok(input) => {
            let offset = write_slot_header(&mut out, header)
                .map_err(|e| RingError::Corrupt(e.to_string()))?;
            let x = out.view_mut::<f32>(offset, n * h)?;
            match stage.forward_hidden(&batch, input, x) {
                Ok(()) => return out.commit(offset + n * h * 4),
                Err(e) => failure(e.to_string()),
            }
        }
    };
    // The header goes on without hidden states, carrying the failure.
    if failed.stage == who.index {
        eprintln!("gptossd-stage: {failed}");
    }
    let forwarded = StepHeader {
        failed: Some(failed),
        ..header.clone()
    };
    let offset =
        write_slot_header(&mut out, &forwarded).map_err(|e| RingError::Corrupt(e.to_string()))?;
    out.commit(offset)
}

/// The last stage: runs the step and samples every sequence that asked for a token (the
/// backend samples all rows at once; each draw depends only on its logits row, seed and
/// index).
fn sample_step(
    stage: &mut Stage,
    header: &StepHeader,
    batch: &StepBatch,
    input: StageInput<'_>,
    failure: &impl Fn(String) -> StepFailure,
) -> StepOutcome {
    // The specs were validated when the header was decoded: nothing to check per token.
    let (seqs, rows): (Vec<u64>, Vec<SampleAt>) = header
        .seqs
        .iter()
        .filter_map(|s| s.sample.map(|at| (s.seq, at)))
        .unzip();
    let sampled = match stage.forward_sample(batch, input, &rows) {
        Ok(sampled) => sampled,
        Err(e) => return StepOutcome::Failed(failure(e.to_string())),
    };
    let mut tokens = Vec::with_capacity(seqs.len());
    for (seq, r) in seqs.iter().zip(sampled) {
        match r {
            Ok(s) => tokens.push(SeqToken {
                seq: *seq,
                token: s.token,
                logprob: s.logprob,
                top: s.top,
            }),
            Err(e) => return StepOutcome::Failed(failure(format!("sequence {seq}: {e}"))),
        }
    }
    StepOutcome::Tokens(tokens)
}

/// Sends one message on the control socket, ignoring a closed socket (the reader thread
/// notices that and stops the worker).
pub fn send(stream: &Stream, msg: &WorkerMsg) {
    let _ = write_message(&mut &*stream, msg);
    let _ = (&*stream).flush();
}

/// Keeps an fd alive (used for the inherited ring descriptors until they are mapped).
pub fn ring_from_inherited(fd: OwnedFd) -> Result<Ring, RingError> {
    Ring::from_fd(fd)
}
