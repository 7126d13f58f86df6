//! Tests of the ring: in one process, across threads, and across two real processes (the test
//! binary re-runs itself as the child, see [`child_process_entry`]).

use super::*;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::thread;

const LONG: Duration = Duration::from_secs(20);

/// A message whose bytes are derived from `seq`: 8 bytes seq, 8 bytes checksum, then a body of
/// a length that varies with `seq` (up to `max` bytes in all).
fn write_message(buf: &mut [u8], seq: u64, max: usize) -> usize {
    let body_len = (seq.wrapping_mul(2_654_435_761) as usize) % (max - 16 + 1);
    fill_body(seq, &mut buf[16..16 + body_len]);
    let sum = checksum(&buf[16..16 + body_len]);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&sum.to_le_bytes());
    16 + body_len
}

/// The body of message `seq` (xorshift bytes).
fn fill_body(seq: u64, body: &mut [u8]) {
    let mut state = seq ^ 0x9E37_79B9_7F4A_7C15;
    for byte in body {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
}

/// Checks a message made by [`write_message`] byte for byte; returns its seq.
fn check_message(bytes: &[u8]) -> u64 {
    assert!(bytes.len() >= 16, "message of {} bytes", bytes.len());
    let seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    assert_eq!(checksum(&bytes[16..]), sum, "checksum of message {seq}");
    let mut expected = vec![0u8; bytes.len() - 16];
    fill_body(seq, &mut expected);
    assert!(expected == bytes[16..], "body of message {seq}");
    seq
}

/// FNV-1a.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn send(producer: &mut Producer, seq: u64) {
    let mut slot = producer.reserve(LONG).expect("reserve");
    let max = slot.capacity();
    let len = write_message(&mut slot, seq, max);
    slot.commit(len).expect("commit");
}

fn receive(consumer: &mut Consumer) -> u64 {
    let slot = consumer.recv(LONG).expect("recv");
    check_message(&slot)
}

#[test]
fn send_and_receive_in_place() {
    let ring = Ring::create("test-basic", 4, 3 * 2880 * 4).expect("create");
    assert_eq!(ring.slot_count(), 4);
    assert_eq!(ring.slot_bytes(), 3 * 2880 * 4);
    let mut producer = ring.producer().expect("producer");
    let mut consumer = ring.consumer().expect("consumer");

    let mut slot = producer.reserve(LONG).expect("reserve");
    assert_eq!(slot.as_ptr() as usize % SLOT_ALIGN, 0, "payload alignment");
    slot[..4].copy_from_slice(&7u32.to_ne_bytes());
    let hidden = slot.view_mut::<f32>(64, 2880).expect("f32 view");
    for (i, x) in hidden.iter_mut().enumerate() {
        *x = i as f32 * 0.5;
    }
    slot.commit(64 + 2880 * 4).expect("commit");

    let slot = consumer.recv(LONG).expect("recv");
    assert_eq!(slot.len(), 64 + 2880 * 4);
    assert_eq!(slot.as_ptr() as usize % SLOT_ALIGN, 0, "payload alignment");
    assert_eq!(slot.view::<u32>(0, 1).expect("u32 view"), &[7]);
    let hidden = slot.view::<f32>(64, 2880).expect("f32 view");
    assert!(hidden.iter().enumerate().all(|(i, &x)| x == i as f32 * 0.5));
    slot.release();
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Timeout(_))
    ));
}

#[test]
fn views_are_checked() {
    let ring = Ring::create("test-views", 2, 100).expect("create");
    let mut producer = ring.producer().expect("producer");
    let mut slot = producer.reserve(LONG).expect("reserve");
    assert!(slot.view_mut::<f32>(0, 25).is_ok());
    assert!(matches!(
        slot.view_mut::<f32>(0, 26),
        Err(RingError::View { .. })
    ));
    assert!(matches!(
        slot.view_mut::<f32>(2, 1),
        Err(RingError::View { .. })
    ));
    assert!(matches!(
        slot.view_mut::<u8>(usize::MAX, 2),
        Err(RingError::View { .. })
    ));
    assert!(matches!(
        slot.commit(101),
        Err(RingError::TooLong {
            len: 101,
            capacity: 100
        })
    ));
    // The abandoned slot published nothing.
    let mut consumer = ring.consumer().expect("consumer");
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Timeout(_))
    ));
}

#[test]
fn create_rejects_bad_geometry() {
    assert!(matches!(
        Ring::create("g", 0, 64),
        Err(RingError::Geometry(_))
    ));
    assert!(matches!(
        Ring::create("g", 4, 0),
        Err(RingError::Geometry(_))
    ));
    assert!(matches!(
        Ring::create("g", MAX_SLOT_COUNT + 1, 64),
        Err(RingError::Geometry(_))
    ));
    assert!(matches!(
        Ring::create("g", 4, MAX_SLOT_BYTES + 1),
        Err(RingError::Geometry(_))
    ));
}

#[test]
fn wraps_around_a_four_slot_ring_many_times() {
    let ring = Ring::create("test-wrap", 4, 200).expect("create");
    let mut producer = ring.producer().expect("producer");
    let mut consumer = ring.consumer().expect("consumer");
    let mut sent = 0u64;
    let mut received = 0u64;
    // Batches of 1..=4 so that head and tail meet every slot at every fill level.
    for round in 0..5_000u64 {
        let batch = round % 4 + 1;
        for _ in 0..batch {
            send(&mut producer, sent);
            sent += 1;
        }
        if batch == 4 {
            assert!(matches!(
                producer.reserve(Duration::ZERO),
                Err(RingError::Timeout(_))
            ));
        }
        for _ in 0..batch {
            assert_eq!(receive(&mut consumer), received);
            received += 1;
        }
    }
    assert_eq!(sent, 12_500);
    assert_eq!(ring.shared.header().head.load(Ordering::Relaxed), sent);
    assert_eq!(ring.shared.header().tail.load(Ordering::Relaxed), sent);
}

/// The reader does more work per message than the writer: the writer finds the ring full and
/// blocks, and every message arrives once, in order, intact.
fn slow_reader(spin: Duration) {
    const MESSAGES: u64 = 3_000;
    let ring = Ring::create("test-slow-reader", 4, 4096).expect("create");
    let mut producer = ring.producer().expect("producer");
    let mut consumer = ring.consumer().expect("consumer");
    producer.set_spin(spin);
    consumer.set_spin(spin);
    let writer = thread::spawn(move || {
        let mut found_full = 0u64;
        for seq in 0..MESSAGES {
            if matches!(producer.reserve(Duration::ZERO), Err(RingError::Timeout(_))) {
                found_full += 1;
            }
            send(&mut producer, seq);
        }
        found_full
    });
    let mut work = 0u64;
    for seq in 0..MESSAGES {
        let slot = consumer.recv(LONG).expect("recv");
        assert_eq!(check_message(&slot), seq);
        // Extra reading work on the slot, in place.
        for round in 0..20u64 {
            work = work.wrapping_add(checksum(&slot) ^ round);
        }
    }
    let found_full = writer.join().expect("writer thread");
    assert!(
        found_full > 0,
        "the writer never found the ring full ({work})"
    );
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Timeout(_))
    ));
}

#[test]
fn slow_reader_blocks_writer_spin_then_futex() {
    slow_reader(DEFAULT_SPIN);
}

#[test]
fn slow_reader_blocks_writer_futex_only() {
    slow_reader(Duration::ZERO);
}

#[test]
fn recv_and_reserve_time_out() {
    let ring = Ring::create("test-timeout", 2, 64).expect("create");
    let mut consumer = ring.consumer().expect("consumer");
    let mut producer = ring.producer().expect("producer");
    let timeout = Duration::from_millis(30);
    let start = Instant::now();
    assert!(matches!(consumer.recv(timeout), Err(RingError::Timeout(t)) if t == timeout));
    assert!(start.elapsed() >= timeout);

    send(&mut producer, 0);
    send(&mut producer, 1);
    let start = Instant::now();
    assert!(matches!(
        producer.reserve(timeout),
        Err(RingError::Timeout(_))
    ));
    assert!(start.elapsed() >= timeout);
    // Futex only, timeout shorter than the spin: both end the wait.
    consumer.set_spin(Duration::ZERO);
    assert_eq!(receive(&mut consumer), 0);
    assert_eq!(receive(&mut consumer), 1);
    assert!(matches!(
        consumer.recv(Duration::from_micros(5)),
        Err(RingError::Timeout(_))
    ));
}

/// Spins (yielding) until the other thread has announced it may sleep on the futex.
fn until_flag_raised(flag: &AtomicU32) {
    let start = Instant::now();
    while flag.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < LONG, "the other side never went to sleep");
        thread::yield_now();
    }
}

#[test]
fn close_wakes_a_blocked_reader_and_writer() {
    let ring = Ring::create("test-close", 1, 64).expect("create");
    let mut consumer = ring.consumer().expect("consumer");
    let mut producer = ring.producer().expect("producer");
    consumer.set_spin(Duration::ZERO);
    producer.set_spin(Duration::ZERO);

    let reader = thread::spawn(move || {
        let start = Instant::now();
        let result = consumer.recv(LONG).map(|slot| slot.len());
        (result, start.elapsed())
    });
    until_flag_raised(&ring.shared.header().consumer_sleeping);
    ring.close();
    let (result, waited) = reader.join().expect("reader");
    assert!(matches!(result, Err(RingError::Closed)), "{result:?}");
    assert!(waited < LONG / 2);
    assert!(ring.is_closed());

    // A writer blocked on a full ring is released too.
    ring.reset();
    let mut producer2 = ring.producer().expect("producer after reset");
    producer2.set_spin(Duration::ZERO);
    send(&mut producer2, 0);
    let writer = thread::spawn(move || producer2.reserve(LONG).map(|slot| slot.capacity()));
    until_flag_raised(&ring.shared.header().producer_sleeping);
    ring.close();
    assert!(matches!(
        writer.join().expect("writer"),
        Err(RingError::Closed)
    ));
    // The stale producer from before the reset writes nothing.
    assert!(matches!(
        producer.reserve(Duration::ZERO),
        Err(RingError::Stale(Role::Producer))
    ));
}

#[test]
fn one_producer_and_one_consumer_and_reset() {
    let ring = Ring::create("test-attach", 4, 64).expect("create");
    let mut producer = ring.producer().expect("producer");
    assert!(matches!(
        ring.producer(),
        Err(RingError::AlreadyAttached(Role::Producer))
    ));
    let consumer = ring.consumer().expect("consumer");
    assert!(matches!(
        ring.consumer(),
        Err(RingError::AlreadyAttached(Role::Consumer))
    ));
    // The claim is in the mapping: a second mapping of the same memfd sees it.
    let other = Ring::from_fd(ring.inheritable_fd().expect("dup")).expect("from_fd");
    assert!(matches!(
        other.producer(),
        Err(RingError::AlreadyAttached(_))
    ));
    drop(consumer);
    let mut consumer = other.consumer().expect("consumer after detach");

    send(&mut producer, 0);
    send(&mut producer, 1);
    // The supervisor restarts the consumer's stage: close, reset, both ends attach again.
    ring.close();
    assert!(matches!(consumer.recv(LONG), Err(RingError::Closed)));
    ring.reset();
    assert!(!ring.is_closed());
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Stale(Role::Consumer))
    ));
    assert!(matches!(
        producer.reserve(Duration::ZERO),
        Err(RingError::Stale(Role::Producer))
    ));
    let mut producer = other.producer().expect("producer after reset");
    let mut consumer = ring.consumer().expect("consumer after reset");
    // The two in-flight messages were dropped.
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Timeout(_))
    ));
    send(&mut producer, 7);
    assert_eq!(receive(&mut consumer), 7);
}

#[test]
fn inconsistent_counters_are_reported() {
    let ring = Ring::create("test-corrupt-counters", 4, 64).expect("create");
    let mut consumer = ring.consumer().expect("consumer");
    let mut producer = ring.producer().expect("producer");
    ring.shared.header().head.store(9, Ordering::Release);
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Corrupt(_))
    ));
    assert!(matches!(
        producer.reserve(Duration::ZERO),
        Err(RingError::Corrupt(_))
    ));
    // A slot whose descriptor does not match its counter.
    ring.shared.header().head.store(1, Ordering::Release);
    ring.shared.desc(0).seq.store(5, Ordering::Relaxed);
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Corrupt(_))
    ));
    // A slot claiming more bytes than it has.
    ring.shared.desc(0).seq.store(0, Ordering::Relaxed);
    ring.shared.desc(0).len.store(65, Ordering::Relaxed);
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Corrupt(_))
    ));
}

/// Writes `bytes` at `offset` of the file behind `fd`.
fn poke(fd: BorrowedFd<'_>, offset: i64, bytes: &[u8]) {
    let written = nix::sys::uio::pwrite(fd, bytes, offset).expect("pwrite");
    assert_eq!(written, bytes.len());
}

fn from_fd_of(ring: &Ring) -> Result<Ring, RingError> {
    Ring::from_fd(ring.inheritable_fd().expect("dup"))
}

#[test]
fn corrupt_headers_are_rejected() {
    let ring = Ring::create("test-corrupt-header", 4, 1000).expect("create");
    let good = from_fd_of(&ring).expect("a valid header");
    assert_eq!((good.slot_count(), good.slot_bytes()), (4, 1000));

    poke(ring.fd(), 0, b"NOTARING");
    assert!(matches!(from_fd_of(&ring), Err(RingError::BadMagic { .. })));
    poke(ring.fd(), 0, &MAGIC.to_ne_bytes());

    poke(ring.fd(), 8, &2u32.to_ne_bytes());
    assert!(matches!(
        from_fd_of(&ring),
        Err(RingError::BadVersion { found: 2 })
    ));
    poke(ring.fd(), 8, &VERSION.to_ne_bytes());

    // More slots than the file holds.
    poke(ring.fd(), 12, &64u32.to_ne_bytes());
    assert!(matches!(from_fd_of(&ring), Err(RingError::BadHeader(_))));
    poke(ring.fd(), 12, &0u32.to_ne_bytes());
    assert!(matches!(from_fd_of(&ring), Err(RingError::BadHeader(_))));
    poke(ring.fd(), 12, &4u32.to_ne_bytes());

    // Larger slots than the file holds, stride and length updated to match.
    let geo = Geometry::new(4, 100_000).expect("geometry");
    poke(ring.fd(), 16, &100_000u64.to_ne_bytes());
    poke(ring.fd(), 24, &(geo.stride as u64).to_ne_bytes());
    poke(ring.fd(), 32, &(geo.map_len as u64).to_ne_bytes());
    assert!(matches!(from_fd_of(&ring), Err(RingError::BadHeader(_))));
    poke(ring.fd(), 16, &1000u64.to_ne_bytes());
    assert!(matches!(from_fd_of(&ring), Err(RingError::BadHeader(_))));
    poke(
        ring.fd(),
        24,
        &(ring.shared.geo.stride as u64).to_ne_bytes(),
    );
    poke(
        ring.fd(),
        32,
        &(ring.shared.geo.map_len as u64).to_ne_bytes(),
    );
    from_fd_of(&ring).expect("restored header");

    // A valid header in a memfd that is not sealed: it could shrink under the mapping.
    let unsealed =
        nix::sys::memfd::memfd_create("test-unsealed", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
    let image = {
        let mut image = vec![0u8; ring.shared.geo.map_len];
        nix::sys::uio::pread(ring.fd(), &mut image, 0).expect("pread");
        image
    };
    poke(unsealed.as_fd(), 0, &image);
    assert!(matches!(
        Ring::from_fd(unsealed),
        Err(RingError::BadHeader(_))
    ));

    // Not a memfd at all, and a sealed memfd shorter than a header.
    let (a, _b) = UnixStream::pair().expect("socketpair");
    assert!(matches!(
        Ring::from_fd(OwnedFd::from(a)),
        Err(RingError::BadHeader(_))
    ));
    let short = os::sealed_memfd("test-short", 100).expect("memfd");
    assert!(matches!(Ring::from_fd(short), Err(RingError::BadHeader(_))));
}

#[test]
fn recv_fd_reports_a_closed_peer() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    drop(b);
    assert!(matches!(recv_fd(&a), Err(RingError::FdPassing(_))));
}

const CHILD_SOCKET: &str = "GPTOSSD_RING_TEST_CHILD_SOCKET";
const CHILD_INHERITED: &str = "GPTOSSD_RING_TEST_CHILD_INHERITED";
const CHILD_SPIN_NS: &str = "GPTOSSD_RING_TEST_CHILD_SPIN_NS";
const PROCESS_MESSAGES: u64 = 10_000;

fn env_number<T: std::str::FromStr>(name: &str) -> T {
    match std::env::var(name)
        .expect("variable set by the parent")
        .parse()
    {
        Ok(value) => value,
        Err(_) => panic!("{name} is not a number"),
    }
}

/// The child half of the two-process tests; does nothing when run as an ordinary test. It
/// receives ring A over the socket (SCM_RIGHTS) and has inherited ring B; it reads each message
/// from A and writes it, transformed in place, into B.
#[test]
fn child_process_entry() {
    if std::env::var_os(CHILD_SOCKET).is_none() {
        return;
    }
    // SAFETY: the parent left these descriptors open for this process and named them in the
    // environment; nothing else in this process owns them.
    let socket = unsafe { OwnedFd::from_raw_fd(env_number::<RawFd>(CHILD_SOCKET)) };
    // SAFETY: as above.
    let inherited = unsafe { OwnedFd::from_raw_fd(env_number::<RawFd>(CHILD_INHERITED)) };
    let spin = Duration::from_nanos(env_number(CHILD_SPIN_NS));
    let ring_a = Ring::from_fd(recv_fd(&socket).expect("recv_fd")).expect("ring A");
    let ring_b = Ring::from_fd(inherited).expect("ring B");
    let mut input = ring_a.consumer().expect("consumer A");
    let mut output = ring_b.producer().expect("producer B");
    input.set_spin(spin);
    output.set_spin(spin);
    for seq in 0..PROCESS_MESSAGES {
        let inbox = input.recv(LONG).expect("recv A");
        assert_eq!(check_message(&inbox), seq);
        let mut outbox = output.reserve(LONG).expect("reserve B");
        // Computes the output straight from the input slot into the output slot.
        let len = inbox.len();
        for (out, byte) in outbox[..len].iter_mut().zip(inbox.iter()) {
            *out = byte ^ 0xA5;
        }
        drop(inbox);
        outbox.commit(len).expect("commit B");
    }
}

/// Parent → child through ring A (its memfd passed by SCM_RIGHTS), child → parent through ring
/// B (inherited across exec): every message arrives once, in order, intact.
fn two_processes(spin: Duration) {
    let ring_a = Ring::create("test-proc-a", 8, 16 * 1024).expect("ring A");
    let ring_b = Ring::create("test-proc-b", 8, 16 * 1024).expect("ring B");
    let (parent_socket, child_socket) = UnixStream::pair().expect("socketpair");
    let child_socket = nix::unistd::dup(&child_socket).expect("dup socket");
    let inherited = ring_b.inheritable_fd().expect("inheritable fd");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "ring::tests::child_process_entry", "--nocapture"])
        .env(CHILD_SOCKET, child_socket.as_raw_fd().to_string())
        .env(CHILD_INHERITED, inherited.as_raw_fd().to_string())
        .env(CHILD_SPIN_NS, spin.as_nanos().to_string())
        // The harness's own report would mix with the parent's; failures go to stderr.
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child");
    drop(child_socket);
    drop(inherited);
    send_fd(&parent_socket, ring_a.fd()).expect("send_fd");

    let mut producer = ring_a.producer().expect("producer A");
    let mut consumer = ring_b.consumer().expect("consumer B");
    producer.set_spin(spin);
    consumer.set_spin(spin);
    let writer = thread::spawn(move || {
        for seq in 0..PROCESS_MESSAGES {
            send(&mut producer, seq);
        }
    });
    for seq in 0..PROCESS_MESSAGES {
        let slot = consumer.recv(LONG).expect("recv B");
        let restored: Vec<u8> = slot.iter().map(|byte| byte ^ 0xA5).collect();
        assert_eq!(check_message(&restored), seq);
    }
    writer.join().expect("writer thread");
    let status = child.wait().expect("wait child");
    assert!(status.success(), "child: {status}");
    assert!(matches!(
        consumer.recv(Duration::ZERO),
        Err(RingError::Timeout(_))
    ));
}

#[test]
fn two_processes_pass_ten_thousand_messages_spin_then_futex() {
    two_processes(DEFAULT_SPIN);
}

#[test]
fn two_processes_pass_ten_thousand_messages_futex_only() {
    two_processes(Duration::ZERO);
}
