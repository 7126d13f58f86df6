//! The shared-memory single-producer / single-consumer ring that carries one pipeline hop
//! (supervisor → stage 0, stage i → stage i+1, last stage → supervisor).
//!
//! The supervisor creates each ring in a sealed memfd ([`Ring::create`]) and hands the descriptor
//! to the two processes of the hop, by inheritance ([`Ring::inheritable_fd`]) or over a Unix
//! socket ([`send_fd`] / [`recv_fd`]); they map it with [`Ring::from_fd`], which validates the
//! header. One process attaches the [`Producer`], the other the [`Consumer`]. The producer
//! writes a step straight into the next free slot ([`Producer::reserve`] gives a
//! [`WriteSlot`], `&mut [u8]`) and publishes it with [`WriteSlot::commit`]; the consumer reads
//! the next full slot in place ([`Consumer::recv`] gives a [`ReadSlot`], `&[u8]`) and frees it by
//! dropping it. No byte is copied by the ring. What a slot holds (step header, token ids, hidden
//! states, sampled tokens) is the callers' business: the ring knows a length and bytes.
//!
//! # Layout
//!
//! Native-endian integers (both ends run on this machine), offsets in bytes. The header lines
//! are 128 bytes apart so that the producer's and the consumer's hot words never share a cache
//! line (nor an adjacent-line prefetch pair).
//!
//! | offset | field | type | written by |
//! |---|---|---|---|
//! | 0 | `magic` = `b"GPTRING\0"` | u64 | creator, once |
//! | 8 | `version` = [`VERSION`] | u32 | creator, once |
//! | 12 | `slot_count` | u32 | creator, once |
//! | 16 | `slot_bytes`: payload capacity of a slot | u64 | creator, once |
//! | 24 | `slot_stride`: 64 + `slot_bytes` rounded up to 64 | u64 | creator, once |
//! | 32 | `map_len`: 4096 + `slot_count` × `slot_stride`, rounded up to 4096 | u64 | creator, once |
//! | 40 | `closed`: 0 open, 1 closed | u32 | [`Ring::close`] (anyone), [`Ring::reset`] |
//! | 44 | `epoch`: ≥ 1, +1 per reset | u32 | [`Ring::reset`] |
//! | 48 | `producer_claim`: 0 free, else the epoch it attached in | u32 | producer attach/detach, reset |
//! | 52 | `consumer_claim`: likewise for the consumer | u32 | consumer attach/detach, reset |
//! | 128 | `head`: slots committed, ever | u64 | producer (reset) |
//! | 136 | `data_event`: futex word the consumer sleeps on | u32 | producer (+1 per commit), close, reset |
//! | 140 | `consumer_sleeping`: 1 while the consumer may sleep | u32 | consumer |
//! | 256 | `tail`: slots released, ever | u64 | consumer (reset) |
//! | 264 | `space_event`: futex word the producer sleeps on | u32 | consumer (+1 per release), close, reset |
//! | 268 | `producer_sleeping`: 1 while the producer may sleep | u32 | producer |
//! | 4096 + i × `slot_stride` | slot i: `len` u64, `seq` u64 (a 64-byte descriptor line), then the payload | | producer |
//!
//! Payloads start 64-byte aligned (the mapping is page-aligned, the slots start at 4096 and the
//! stride is a multiple of 64), so callers can view them as `[f32]` ([`ReadSlot::view`]).
//!
//! # Invariants and the wrap rule
//!
//! - `head` and `tail` are monotonic u64 counters that never wrap in practice; the slot of
//!   counter `c` is `c % slot_count`. Empty when `head == tail`, full when
//!   `head - tail == slot_count`; always `tail <= head <= tail + slot_count`. Slots
//!   `[tail, head)` belong to the consumer, the others to the producer.
//! - The producer writes the payload and the descriptor (`len`, `seq = head`) of slot
//!   `head % slot_count`, then stores `head + 1` with Release; the consumer loads `head` with
//!   Acquire before reading a slot. Symmetrically the consumer stores `tail + 1` with Release
//!   after its last read of a slot and the producer loads `tail` with Acquire before reusing it.
//! - Everything read from the mapping is checked, because the other process may be broken: the
//!   header at [`Ring::from_fd`] (magic, version, geometry against the file's sealed size), and on
//!   every step `tail <= head <= tail + slot_count`, `seq` and `len <= slot_bytes`
//!   ([`RingError::Corrupt`] otherwise).
//!
//! # Waiting
//!
//! A side that cannot proceed spins for a short, configurable time ([`DEFAULT_SPIN`];
//! [`Duration::ZERO`] for futex only), yielding the core between batches of 64 checks (the
//! scheduler likes to wake the peer on the waker's core, where a pure spin would keep it from
//! running for the whole spin: 72 µs instead of 8 µs round trips measured here), then sleeps
//! on the other side's event word with FUTEX_WAIT on a shared futex, up to the caller's timeout
//! ([`RingError::Timeout`]). To sleep it reads the event word, sets its `*_sleeping` flag,
//! issues a SeqCst fence and re-checks its condition; the other side publishes, bumps the event
//! word, issues a SeqCst fence and calls FUTEX_WAKE only if the flag is set. Either the waker sees the flag or the sleeper sees the
//! new counter, and a bump between the read and the FUTEX_WAIT makes the wait return at once.
//! Nothing ever sleeps for a fixed time or polls.
//!
//! # Close and reset
//!
//! [`Ring::close`] (any holder of the ring, typically the supervisor when a stage died) sets
//! `closed`, bumps both event words and wakes both sides: every wait and every later call
//! returns [`RingError::Closed`], even with full slots waiting (closing is poisoning, not a
//! graceful end of stream).
//!
//! # Replacement: how a hop survives a crashed stage
//!
//! When a stage dies, the supervisor does not reuse the two rings it touched: it closes each
//! (waking the live peer, whose calls now return [`RingError::Closed`]), creates a new ring in a
//! new memfd, and hands the new descriptor to the live peer over its control socket (and to the
//! restarted stage on its command line). The peer drops its end of the old ring and attaches to
//! the new one; a step it holds for the current epoch waits for the replacement rather than
//! being dropped. Nothing is ever reset under a live end: the old mapping simply goes away when
//! its last holder drops it.
//!
//! [`Ring::reset`] empties a ring in place (in-flight steps dropped, `closed` and both claims
//! cleared, `epoch` bumped) for a holder that knows neither end uses it; a handle from an older
//! epoch that is still used gets [`RingError::Stale`] and writes nothing. The pipeline does not
//! use it (replacement needs no such knowledge); it stays for tools and tests that reuse a
//! ring.
//!
//! # Attaching
//!
//! [`Ring::producer`] and [`Ring::consumer`] claim their role in the header, so a second
//! producer or consumer, in this process or another, gets [`RingError::AlreadyAttached`]. A
//! handle frees its claim when dropped; the claim of a process that died is never freed: its
//! ring is replaced (above).

mod os;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use os::{recv_fd, send_fd};

/// `b"GPTRING\0"` read as a native-endian u64.
pub const MAGIC: u64 = u64::from_ne_bytes(*b"GPTRING\0");
/// Layout version; bump on any change to the header or slot layout.
pub const VERSION: u32 = 1;
/// Alignment of every slot payload, in bytes.
pub const SLOT_ALIGN: usize = 64;
/// Most slots a ring may have.
pub const MAX_SLOT_COUNT: u32 = 1 << 16;
/// Largest payload capacity of a slot (1 GiB).
pub const MAX_SLOT_BYTES: usize = 1 << 30;
/// Spin before sleeping when a handle is not told otherwise ([`Producer::set_spin`]).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(30);

/// Distance between the header's cache lines.
const LINE: usize = 128;
/// Where the slots start: the header's page.
const SLOTS_OFFSET: usize = 4096;
/// The descriptor line in front of each payload.
const DESC_BYTES: usize = 64;
const PAGE: usize = 4096;
/// Spin iterations between two clock reads (and yields).
const SPINS_PER_CLOCK_READ: u32 = 64;

/// Errors of the ring, its mapping and descriptor passing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// A system call failed. The errno is in the message only, not chained as a `source()`
    /// too, so an error chain shows it once.
    #[error("{op} failed: {errno}")]
    Os {
        op: &'static str,
        errno: nix::errno::Errno,
    },
    /// [`Ring::create`] was asked for a ring it cannot make.
    #[error("ring geometry rejected: {0}")]
    Geometry(String),
    /// The mapping handed in does not start with the ring magic.
    #[error("not a ring: magic {found:#018x}, expected {MAGIC:#018x}")]
    BadMagic { found: u64 },
    /// The mapping handed in has another layout version.
    #[error("ring layout version {found}, this build reads version {VERSION}")]
    BadVersion { found: u32 },
    /// The header's geometry or the file behind it is inconsistent.
    #[error("ring header rejected: {0}")]
    BadHeader(String),
    /// Nothing arrived (or no slot freed up) within the timeout.
    #[error("ring wait timed out after {0:?}")]
    Timeout(Duration),
    /// The ring was closed ([`Ring::close`]).
    #[error("ring is closed")]
    Closed,
    /// The ring was reset since this handle attached: attach again.
    #[error("ring was reset since this {0} attached")]
    Stale(Role),
    /// Another handle already holds this role.
    #[error("a {0} is already attached to this ring")]
    AlreadyAttached(Role),
    /// A commit longer than the slot.
    #[error("payload of {len} bytes exceeds the slot capacity of {capacity} bytes")]
    TooLong { len: usize, capacity: usize },
    /// A typed view that does not fit the slot or is misaligned.
    #[error(
        "view of {count} items of {item_bytes} bytes at byte {offset}: past the slot's {len} \
         bytes or not aligned to {item_align}"
    )]
    View {
        offset: usize,
        count: usize,
        item_bytes: usize,
        item_align: usize,
        len: usize,
    },
    /// The shared counters or a slot descriptor break the ring's invariants: the peer is broken.
    #[error("ring state is inconsistent: {0}")]
    Corrupt(String),
    /// A descriptor could not be passed over the socket.
    #[error("file descriptor passing: {0}")]
    FdPassing(String),
}

/// The two ends of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        })
    }
}

/// The header as it lies in the mapping (see the layout table above). All atomics: the other
/// process may touch any word at any time, and every bit pattern is a valid value.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    slot_count: AtomicU32,
    slot_bytes: AtomicU64,
    slot_stride: AtomicU64,
    map_len: AtomicU64,
    closed: AtomicU32,
    epoch: AtomicU32,
    producer_claim: AtomicU32,
    consumer_claim: AtomicU32,
    _pad0: [u8; LINE - 56],
    head: AtomicU64,
    data_event: AtomicU32,
    consumer_sleeping: AtomicU32,
    _pad1: [u8; LINE - 16],
    tail: AtomicU64,
    space_event: AtomicU32,
    producer_sleeping: AtomicU32,
    _pad2: [u8; LINE - 16],
}

const _: () = {
    assert!(std::mem::offset_of!(Header, closed) == 40);
    assert!(std::mem::offset_of!(Header, consumer_claim) == 52);
    assert!(std::mem::offset_of!(Header, head) == LINE);
    assert!(std::mem::offset_of!(Header, consumer_sleeping) == LINE + 12);
    assert!(std::mem::offset_of!(Header, tail) == 2 * LINE);
    assert!(std::mem::offset_of!(Header, producer_sleeping) == 2 * LINE + 12);
    assert!(std::mem::size_of::<Header>() <= SLOTS_OFFSET);
    assert!(std::mem::size_of::<SlotDesc>() <= DESC_BYTES);
};

/// The descriptor line in front of a payload.
#[repr(C)]
struct SlotDesc {
    /// Bytes of payload committed.
    len: AtomicU64,
    /// The `head` value this slot was committed at; checks the consumer reads what it expects.
    seq: AtomicU64,
}

/// Sizes of a ring, derived from `slot_count` and `slot_bytes` by one rule for both the creator
/// and the validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    slot_count: u32,
    slot_bytes: usize,
    stride: usize,
    map_len: usize,
}

impl Geometry {
    fn new(slot_count: u32, slot_bytes: usize) -> Result<Self, String> {
        if slot_count == 0 || slot_count > MAX_SLOT_COUNT {
            return Err(format!(
                "slot count {slot_count} is outside 1..={MAX_SLOT_COUNT}"
            ));
        }
        if slot_bytes == 0 || slot_bytes > MAX_SLOT_BYTES {
            return Err(format!(
                "slot size {slot_bytes} bytes is outside 1..={MAX_SLOT_BYTES}"
            ));
        }
        let stride = DESC_BYTES + slot_bytes.next_multiple_of(SLOT_ALIGN);
        let map_len = (slot_count as usize)
            .checked_mul(stride)
            .and_then(|slots| slots.checked_add(SLOTS_OFFSET))
            .map(|len| len.next_multiple_of(PAGE))
            .filter(|&len| len <= isize::MAX as usize)
            .ok_or_else(|| {
                format!("{slot_count} slots of {slot_bytes} bytes do not fit an address space")
            })?;
        Ok(Self {
            slot_count,
            slot_bytes,
            stride,
            map_len,
        })
    }
}

/// The header at the start of a mapping of at least `SLOTS_OFFSET` bytes.
fn header_of(map: &os::Mapping) -> &Header {
    debug_assert!(map.len() >= SLOTS_OFFSET);
    // SAFETY: the mapping is page-aligned and at least SLOTS_OFFSET (>= size of `Header`) bytes
    // long (checked by `Geometry` at creation, by `from_fd` before mapping), so it holds an
    // aligned `Header`; the header has only atomics and padding, valid for every bit pattern,
    // and the borrow cannot outlive the mapping.
    unsafe { &*map.ptr().cast::<Header>() }
}

/// The mapping and what was validated about it; shared by a [`Ring`] and its handles.
struct Shared {
    map: os::Mapping,
    geo: Geometry,
    fd: OwnedFd,
}

impl Shared {
    fn header(&self) -> &Header {
        header_of(&self.map)
    }

    /// Start of slot `index` (< slot_count).
    fn slot_ptr(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.geo.slot_count as usize);
        // SAFETY: SLOTS_OFFSET + index * stride + stride <= map_len = the mapping's length, as
        // `Geometry` computed and validation checked; so the offset stays inside the mapping.
        unsafe { self.map.ptr().add(SLOTS_OFFSET + index * self.geo.stride) }
    }

    fn desc(&self, index: usize) -> &SlotDesc {
        // SAFETY: the slot starts 64-byte aligned inside the mapping with DESC_BYTES (>= the
        // size of `SlotDesc`) for its descriptor; atomics are valid for every bit pattern.
        unsafe { &*self.slot_ptr(index).cast::<SlotDesc>() }
    }

    fn payload_ptr(&self, index: usize) -> *mut u8 {
        // SAFETY: the payload follows the descriptor inside the slot, in the mapping.
        unsafe { self.slot_ptr(index).add(DESC_BYTES) }
    }

    fn slot_index(&self, counter: u64) -> usize {
        // The remainder is < slot_count <= MAX_SLOT_COUNT, so it fits usize.
        (counter % u64::from(self.geo.slot_count)) as usize
    }

    /// Checks `tail <= head <= tail + slot_count`; returns `head - tail`.
    fn occupancy(&self, head: u64, tail: u64) -> Result<u64, RingError> {
        match head.checked_sub(tail) {
            Some(used) if used <= u64::from(self.geo.slot_count) => Ok(used),
            _ => Err(RingError::Corrupt(format!(
                "head {head} and tail {tail} are not within {} slots",
                self.geo.slot_count
            ))),
        }
    }

    /// The state every operation of an attached handle checks first.
    fn check_live(&self, epoch: u32, role: Role) -> Result<(), RingError> {
        let header = self.header();
        if header.epoch.load(Ordering::Acquire) != epoch {
            return Err(RingError::Stale(role));
        }
        if header.closed.load(Ordering::Acquire) != 0 {
            return Err(RingError::Closed);
        }
        Ok(())
    }

    fn claim(&self, role: Role) -> &AtomicU32 {
        let header = self.header();
        match role {
            Role::Producer => &header.producer_claim,
            Role::Consumer => &header.consumer_claim,
        }
    }

    fn attach(&self, role: Role) -> Result<u32, RingError> {
        let header = self.header();
        let epoch = header.epoch.load(Ordering::Acquire);
        let claim = self.claim(role);
        claim
            .compare_exchange(0, epoch, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| RingError::AlreadyAttached(role))?;
        if header.epoch.load(Ordering::Acquire) != epoch {
            // A reset ran in between and already cleared the claims.
            let _ = claim.compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Relaxed);
            return Err(RingError::Stale(role));
        }
        Ok(epoch)
    }

    fn detach(&self, role: Role, epoch: u32) {
        // Fails harmlessly when a reset already freed the claim (or a newer handle holds it).
        let _ = self
            .claim(role)
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Waits until `ready` yields a value: spins up to `spin`, then sleeps on the futex word
    /// `event` with `sleeping` raised, until `deadline` (see "Waiting" above).
    fn wait<T>(
        &self,
        event: &AtomicU32,
        sleeping: &AtomicU32,
        spin: Duration,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<Option<T>, RingError>,
    ) -> Result<T, RingError> {
        if let Some(value) = ready()? {
            return Ok(value);
        }
        let start = Instant::now();
        // `None`: no deadline (a timeout too large to add).
        let deadline = start.checked_add(timeout);
        // `None`: spin until ready (both the spin and the timeout unbounded).
        let spin_end = start.checked_add(spin.min(timeout));
        if !spin.is_zero() {
            loop {
                for _ in 0..SPINS_PER_CLOCK_READ {
                    std::hint::spin_loop();
                    if let Some(value) = ready()? {
                        return Ok(value);
                    }
                }
                if spin_end.is_some_and(|end| Instant::now() >= end) {
                    break;
                }
                // The scheduler tends to wake the peer on this very core (it is the waker's
                // partner): let it run instead of spinning it off the core.
                std::thread::yield_now();
            }
        }
        loop {
            let seen = event.load(Ordering::Acquire);
            if let Some(value) = ready()? {
                return Ok(value);
            }
            let remaining = match deadline {
                None => None,
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(RingError::Timeout(timeout)),
                },
            };
            sleeping.store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let outcome = match ready() {
                Ok(None) => os::futex_wait(event, seen, remaining).map(|()| None),
                other => other,
            };
            sleeping.store(0, Ordering::Relaxed);
            if let Some(value) = outcome? {
                return Ok(value);
            }
        }
    }

    /// After publishing: bumps `event` and wakes the other side if it may be asleep.
    fn notify(&self, event: &AtomicU32, sleeping: &AtomicU32) {
        event.fetch_add(1, Ordering::Release);
        fence(Ordering::SeqCst);
        if sleeping.load(Ordering::Relaxed) != 0 {
            os::futex_wake(event, 1);
        }
    }

    /// Bumps both event words and wakes every sleeper (close and reset).
    fn wake_all(&self) {
        let header = self.header();
        for event in [&header.data_event, &header.space_event] {
            event.fetch_add(1, Ordering::Release);
            os::futex_wake(event, i32::MAX);
        }
    }
}

/// One hop's ring, mapped in this process. Attach an end with [`Ring::producer`] or
/// [`Ring::consumer`]; the handles keep the mapping alive.
pub struct Ring {
    shared: Arc<Shared>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("slot_count", &self.shared.geo.slot_count)
            .field("slot_bytes", &self.shared.geo.slot_bytes)
            .field("map_len", &self.shared.geo.map_len)
            .finish()
    }
}

impl Ring {
    /// Creates an empty ring of `slot_count` slots of `slot_bytes` payload bytes each, in a new
    /// sealed memfd named `name` (visible as `memfd:name` in `/proc/<pid>/fd`).
    pub fn create(name: &str, slot_count: u32, slot_bytes: usize) -> Result<Ring, RingError> {
        let geo = Geometry::new(slot_count, slot_bytes).map_err(RingError::Geometry)?;
        let fd = os::sealed_memfd(name, geo.map_len)?;
        let map = os::Mapping::new(fd.as_fd(), geo.map_len)?;
        let shared = Shared { map, geo, fd };
        let header = shared.header();
        // The memfd is zero-filled: counters, flags and claims start at 0.
        header.version.store(VERSION, Ordering::Relaxed);
        header.slot_count.store(slot_count, Ordering::Relaxed);
        header
            .slot_bytes
            .store(slot_bytes as u64, Ordering::Relaxed);
        header
            .slot_stride
            .store(geo.stride as u64, Ordering::Relaxed);
        header.map_len.store(geo.map_len as u64, Ordering::Relaxed);
        header.epoch.store(1, Ordering::Relaxed);
        // Last, with Release: a reader that sees the magic sees the rest.
        header.magic.store(MAGIC, Ordering::Release);
        Ok(Ring {
            shared: Arc::new(shared),
        })
    }

    /// Maps a ring made by [`Ring::create`] from its descriptor (received with [`recv_fd`] or
    /// inherited), validating the memfd's seals, the magic, the version and the geometry
    /// against the file's size.
    pub fn from_fd(fd: OwnedFd) -> Result<Ring, RingError> {
        let file_len = os::sealed_size(fd.as_fd())?;
        if file_len < SLOTS_OFFSET {
            return Err(RingError::BadHeader(format!(
                "the file is {file_len} bytes, less than the {SLOTS_OFFSET}-byte header"
            )));
        }
        let map = os::Mapping::new(fd.as_fd(), file_len)?;
        let geo = validate_header(header_of(&map), map.len())?;
        let shared = Shared { map, geo, fd };
        Ok(Ring {
            shared: Arc::new(shared),
        })
    }

    /// The memfd, to pass with [`send_fd`]. It is close-on-exec.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.fd.as_fd()
    }

    /// A duplicate of the memfd without close-on-exec, for a child to inherit across exec:
    /// give the child its number (e.g. in an argument), spawn, then drop it here. The child
    /// takes it with `OwnedFd::from_raw_fd` and [`Ring::from_fd`]. Until it is dropped, every
    /// child this process spawns inherits it.
    pub fn inheritable_fd(&self) -> Result<OwnedFd, RingError> {
        os::dup_inheritable(self.fd())
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        self.shared.geo.slot_count
    }

    /// Payload capacity of one slot, in bytes.
    pub fn slot_bytes(&self) -> usize {
        self.shared.geo.slot_bytes
    }

    /// Attaches the producing end. Fails with [`RingError::AlreadyAttached`] while another
    /// producer (in any process) holds the ring.
    pub fn producer(&self) -> Result<Producer, RingError> {
        let epoch = self.shared.attach(Role::Producer)?;
        Ok(Producer {
            shared: Arc::clone(&self.shared),
            epoch,
            spin: DEFAULT_SPIN,
        })
    }

    /// Attaches the consuming end. Fails with [`RingError::AlreadyAttached`] while another
    /// consumer (in any process) holds the ring.
    pub fn consumer(&self) -> Result<Consumer, RingError> {
        let epoch = self.shared.attach(Role::Consumer)?;
        Ok(Consumer {
            shared: Arc::clone(&self.shared),
            epoch,
            spin: DEFAULT_SPIN,
        })
    }

    /// Poisons the ring: both ends' waits and calls return [`RingError::Closed`] from now on,
    /// and a side asleep in a wait is woken. Anyone holding the ring may call it.
    pub fn close(&self) {
        self.shared.header().closed.store(1, Ordering::Release);
        self.shared.wake_all();
    }

    /// Whether [`Ring::close`] was called (and no reset since).
    pub fn is_closed(&self) -> bool {
        self.shared.header().closed.load(Ordering::Acquire) != 0
    }

    /// Empties the ring, drops the in-flight steps, reopens it and frees both ends' claims, so
    /// that a restarted stage and its live peer can attach again. Supervisor only, and only
    /// while no end uses the ring (after [`Ring::close`], once each end is dead or detached);
    /// handles from before get [`RingError::Stale`]. The ends attach again only after this
    /// returns, told so by the supervisor (the control socket orders the two).
    pub fn reset(&self) {
        let header = self.shared.header();
        // First invalidate old handles, then clear the state they would have checked.
        let next = match header.epoch.load(Ordering::Acquire).wrapping_add(1) {
            0 => 1,
            epoch => epoch,
        };
        header.epoch.store(next, Ordering::Release);
        header.head.store(0, Ordering::Relaxed);
        header.tail.store(0, Ordering::Relaxed);
        header.consumer_sleeping.store(0, Ordering::Relaxed);
        header.producer_sleeping.store(0, Ordering::Relaxed);
        header.producer_claim.store(0, Ordering::Relaxed);
        header.consumer_claim.store(0, Ordering::Relaxed);
        header.closed.store(0, Ordering::Release);
        self.shared.wake_all();
    }
}

/// Checks a header handed in by another process against the mapping's length.
fn validate_header(header: &Header, map_len: usize) -> Result<Geometry, RingError> {
    let magic = header.magic.load(Ordering::Acquire);
    if magic != MAGIC {
        return Err(RingError::BadMagic { found: magic });
    }
    let version = header.version.load(Ordering::Relaxed);
    if version != VERSION {
        return Err(RingError::BadVersion { found: version });
    }
    let slot_count = header.slot_count.load(Ordering::Relaxed);
    let slot_bytes = header.slot_bytes.load(Ordering::Relaxed);
    let slot_bytes = usize::try_from(slot_bytes)
        .map_err(|_| RingError::BadHeader(format!("slot size {slot_bytes} exceeds usize")))?;
    let geo = Geometry::new(slot_count, slot_bytes).map_err(RingError::BadHeader)?;
    let stride = header.slot_stride.load(Ordering::Relaxed);
    if stride != geo.stride as u64 {
        return Err(RingError::BadHeader(format!(
            "slot stride {stride}, expected {} for {slot_bytes}-byte slots",
            geo.stride
        )));
    }
    let stored_len = header.map_len.load(Ordering::Relaxed);
    if stored_len != geo.map_len as u64 || geo.map_len > map_len {
        return Err(RingError::BadHeader(format!(
            "{slot_count} slots of {slot_bytes} bytes need {} bytes; the header says {stored_len} \
             and the file has {map_len}",
            geo.map_len
        )));
    }
    if header.epoch.load(Ordering::Relaxed) == 0 {
        return Err(RingError::BadHeader("epoch 0 is never valid".to_string()));
    }
    Ok(geo)
}

/// The producing end of a ring. Not `Clone`: one per ring (the header claim enforces it).
pub struct Producer {
    shared: Arc<Shared>,
    epoch: u32,
    spin: Duration,
}

impl Producer {
    /// How long a full ring is spun on before sleeping ([`Duration::ZERO`]: sleep at once).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Payload capacity of a slot.
    pub fn slot_bytes(&self) -> usize {
        self.shared.geo.slot_bytes
    }

    /// The next free slot, waiting up to `timeout` while the ring is full ([`Duration::MAX`]:
    /// no limit). Write into it, then [`WriteSlot::commit`]; dropping it publishes nothing.
    pub fn reserve(&mut self, timeout: Duration) -> Result<WriteSlot<'_>, RingError> {
        let shared = &*self.shared;
        let header = shared.header();
        let epoch = self.epoch;
        let seq = shared.wait(
            &header.space_event,
            &header.producer_sleeping,
            self.spin,
            timeout,
            || {
                shared.check_live(epoch, Role::Producer)?;
                // Our own counter: only this end writes it.
                let head = header.head.load(Ordering::Relaxed);
                let tail = header.tail.load(Ordering::Acquire);
                let used = shared.occupancy(head, tail)?;
                Ok((used < u64::from(shared.geo.slot_count)).then_some(head))
            },
        )?;
        let index = shared.slot_index(seq);
        // SAFETY: slot `seq % slot_count` is outside `[tail, head)`, so the consumer has
        // released it (its reads happened before our Acquire of `tail`) and will not read it
        // until we publish `head = seq + 1`. This producer is the only one (header claim) and
        // `&mut self` keeps a second `WriteSlot` from existing, so this is the only reference
        // to these `slot_bytes` bytes, which lie inside the mapping kept alive by `self`.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(shared.payload_ptr(index), shared.geo.slot_bytes)
        };
        Ok(WriteSlot {
            producer: self,
            seq,
            buf,
        })
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.detach(Role::Producer, self.epoch);
    }
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("epoch", &self.epoch)
            .field("spin", &self.spin)
            .finish()
    }
}

/// A free slot lent to the producer: the whole payload capacity, `&mut [u8]`, 64-byte aligned.
pub struct WriteSlot<'a> {
    producer: &'a Producer,
    seq: u64,
    buf: &'a mut [u8],
}

impl WriteSlot<'_> {
    /// Payload capacity (the length of the slice).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// `count` items of `T` starting at byte `offset` of the slot, to write in place.
    pub fn view_mut<T: Plain>(
        &mut self,
        offset: usize,
        count: usize,
    ) -> Result<&mut [T], RingError> {
        let range = view_range::<T>(self.buf, offset, count)?;
        // SAFETY: `view_range` checked that the bytes lie in `buf` and are aligned for `T`;
        // `T: Plain` is valid for every bit pattern; the result borrows `self` mutably.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.buf[range].as_mut_ptr().cast::<T>(), count)
        })
    }

    /// Publishes the first `len` bytes to the consumer and wakes it if it sleeps. On a closed
    /// ring ([`RingError::Closed`]) or a reset one ([`RingError::Stale`]) nothing is published.
    pub fn commit(self, len: usize) -> Result<(), RingError> {
        let capacity = self.buf.len();
        if len > capacity {
            return Err(RingError::TooLong { len, capacity });
        }
        let shared = &*self.producer.shared;
        shared.check_live(self.producer.epoch, Role::Producer)?;
        let header = shared.header();
        let desc = shared.desc(shared.slot_index(self.seq));
        desc.len.store(len as u64, Ordering::Relaxed);
        desc.seq.store(self.seq, Ordering::Relaxed);
        // Release: the payload and the descriptor are visible to whoever Acquires this head.
        header.head.store(self.seq + 1, Ordering::Release);
        shared.notify(&header.data_event, &header.consumer_sleeping);
        Ok(())
    }
}

impl Deref for WriteSlot<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
    }
}

impl DerefMut for WriteSlot<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf
    }
}

/// The consuming end of a ring. Not `Clone`: one per ring (the header claim enforces it).
pub struct Consumer {
    shared: Arc<Shared>,
    epoch: u32,
    spin: Duration,
}

impl Consumer {
    /// How long an empty ring is spun on before sleeping ([`Duration::ZERO`]: sleep at once).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Payload capacity of a slot.
    pub fn slot_bytes(&self) -> usize {
        self.shared.geo.slot_bytes
    }

    /// The next full slot, waiting up to `timeout` while the ring is empty ([`Duration::MAX`]:
    /// no limit). Read it in place; dropping it (or [`ReadSlot::release`]) frees the slot.
    pub fn recv(&mut self, timeout: Duration) -> Result<ReadSlot<'_>, RingError> {
        let shared = &*self.shared;
        let header = shared.header();
        let epoch = self.epoch;
        let seq = shared.wait(
            &header.data_event,
            &header.consumer_sleeping,
            self.spin,
            timeout,
            || {
                shared.check_live(epoch, Role::Consumer)?;
                // Our own counter: only this end writes it.
                let tail = header.tail.load(Ordering::Relaxed);
                let head = header.head.load(Ordering::Acquire);
                let used = shared.occupancy(head, tail)?;
                Ok((used > 0).then_some(tail))
            },
        )?;
        let index = shared.slot_index(seq);
        let desc = shared.desc(index);
        let stored_seq = desc.seq.load(Ordering::Relaxed);
        if stored_seq != seq {
            return Err(RingError::Corrupt(format!(
                "slot {index} holds step {stored_seq}, expected {seq}"
            )));
        }
        let len = desc.len.load(Ordering::Relaxed);
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= shared.geo.slot_bytes)
            .ok_or_else(|| {
                RingError::Corrupt(format!(
                    "slot {index} claims {len} bytes, more than its {} bytes",
                    shared.geo.slot_bytes
                ))
            })?;
        // SAFETY: slot `seq` is in `[tail, head)` (Acquire of `head` above), so the producer has
        // finished writing it and will not touch it until we advance `tail`; `len` is within the
        // slot's payload, inside the mapping kept alive by `self`; `&mut self` keeps a second
        // `ReadSlot` (which would release this slot under us) from existing.
        let buf = unsafe { std::slice::from_raw_parts(shared.payload_ptr(index), len) };
        Ok(ReadSlot {
            consumer: self,
            seq,
            buf,
        })
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.detach(Role::Consumer, self.epoch);
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("epoch", &self.epoch)
            .field("spin", &self.spin)
            .finish()
    }
}

/// A full slot lent to the consumer: the committed bytes, `&[u8]`, 64-byte aligned. Dropping
/// it frees the slot for the producer.
pub struct ReadSlot<'a> {
    consumer: &'a Consumer,
    seq: u64,
    buf: &'a [u8],
}

impl ReadSlot<'_> {
    /// `count` items of `T` starting at byte `offset` of the committed bytes, read in place.
    pub fn view<T: Plain>(&self, offset: usize, count: usize) -> Result<&[T], RingError> {
        let range = view_range::<T>(self.buf, offset, count)?;
        // SAFETY: `view_range` checked that the bytes lie in `buf` and are aligned for `T`;
        // `T: Plain` is valid for every bit pattern; the result borrows `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.buf[range].as_ptr().cast::<T>(), count) })
    }

    /// Frees the slot (the same as dropping it).
    pub fn release(self) {}
}

impl Deref for ReadSlot<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
    }
}

impl Drop for ReadSlot<'_> {
    fn drop(&mut self) {
        let shared = &*self.consumer.shared;
        // A reset ring is not ours to advance any more.
        if shared.header().epoch.load(Ordering::Acquire) != self.consumer.epoch {
            return;
        }
        let header = shared.header();
        // Release: our reads of the slot happen before the producer reuses it.
        header.tail.store(self.seq + 1, Ordering::Release);
        shared.notify(&header.space_event, &header.producer_sleeping);
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Plain numbers a slot's bytes may be viewed as: every bit pattern is a valid value.
pub trait Plain: sealed::Sealed + Copy {}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(
    u8,
    u16,
    u32,
    u64,
    i8,
    i16,
    i32,
    i64,
    f32,
    f64,
    half::bf16,
    half::f16
);

/// The byte range of `count` items of `T` at `offset` in `buf`, if it fits and is aligned.
fn view_range<T: Plain>(
    buf: &[u8],
    offset: usize,
    count: usize,
) -> Result<std::ops::Range<usize>, RingError> {
    let size = std::mem::size_of::<T>();
    let align = std::mem::align_of::<T>();
    let end = count
        .checked_mul(size)
        .and_then(|bytes| bytes.checked_add(offset))
        .filter(|&end| end <= buf.len());
    match end {
        Some(end) if (buf.as_ptr() as usize + offset).is_multiple_of(align) => Ok(offset..end),
        _ => Err(RingError::View {
            offset,
            count,
            item_bytes: size,
            item_align: align,
            len: buf.len(),
        }),
    }
}
