//! Round-trip latency through two shared-memory rings between two processes (ping-pong: the
//! parent writes a payload into ring "ping", the child computes its reply from the slot in place
//! straight into a slot of ring "pong", the parent reads the reply): two hops per trip, as a
//! step would take through a stage and back.
//!
//! Cases: a 2880-float payload (one token's hidden state, 11.5 KB) and a 64 × 2880-float one
//! (737 KB), each with the default spin-then-futex wait and with futex only. Prints median, p90,
//! p99 and max over `GPTOSSD_RING_BENCH_TRIPS` (default 10 000) trips after 1 000 warm-up trips.
//!
//! Run with `cargo bench -p gptossd-shared --bench ring`. The binary re-runs itself as the child
//! (`GPTOSSD_RING_BENCH_CHILD` set); the rings' descriptors are inherited.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use gptossd_shared::ring::{Ring, RingError, DEFAULT_SPIN};

const CHILD: &str = "GPTOSSD_RING_BENCH_CHILD";
const TRIPS: &str = "GPTOSSD_RING_BENCH_TRIPS";
const HIDDEN: usize = 2880;
const WARMUP: usize = 1_000;
const TIMEOUT: Duration = Duration::from_secs(30);

struct Case {
    floats: usize,
    spin: Duration,
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    let trips = std::env::var(TRIPS)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(10_000);
    println!("ring round trip (2 hops), {trips} trips after {WARMUP} warm-up");
    println!(
        "{:<22} {:<18} {:>10} {:>10} {:>10} {:>10}",
        "payload", "wait", "median", "p90", "p99", "max"
    );
    for floats in [HIDDEN, 64 * HIDDEN] {
        for spin in [DEFAULT_SPIN, Duration::ZERO] {
            let case = Case { floats, spin };
            let mut times = run(&case, trips);
            times.sort_unstable();
            let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            let payload = format!("{} f32 ({:.1} KB)", floats, (floats * 4) as f64 / 1000.0);
            let wait = if spin.is_zero() {
                "futex only".to_string()
            } else {
                format!("spin {} µs + futex", spin.as_micros())
            };
            println!(
                "{payload:<22} {wait:<18} {:>10} {:>10} {:>10} {:>10}",
                us(at(0.5)),
                us(at(0.9)),
                us(at(0.99)),
                us(at(1.0)),
            );
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// The parent's side of one case: returns the round-trip times of the measured trips.
fn run(case: &Case, trips: usize) -> Vec<Duration> {
    let bytes = case.floats * 4;
    let ping = Ring::create("bench-ping", 4, bytes).expect("create ping");
    let pong = Ring::create("bench-pong", 4, bytes).expect("create pong");
    let ping_fd = ping.inheritable_fd().expect("dup ping");
    let pong_fd = pong.inheritable_fd().expect("dup pong");
    let spec = format!(
        "{} {} {} {}",
        ping_fd.as_raw_fd(),
        pong_fd.as_raw_fd(),
        case.spin.as_nanos(),
        case.floats
    );
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD, spec)
        .spawn()
        .expect("spawn child");
    drop((ping_fd, pong_fd));

    let mut out = ping.producer().expect("ping producer");
    let mut back = pong.consumer().expect("pong consumer");
    out.set_spin(case.spin);
    back.set_spin(case.spin);
    let mut times = Vec::with_capacity(trips);
    let mut check = 0.0f32;
    for trip in 0..WARMUP + trips {
        let start = Instant::now();
        let mut slot = out.reserve(TIMEOUT).expect("reserve ping");
        let xs = slot.view_mut::<f32>(0, case.floats).expect("ping view");
        for (i, x) in xs.iter_mut().enumerate() {
            *x = (i + trip) as f32;
        }
        slot.commit(bytes).expect("commit ping");
        let reply = back.recv(TIMEOUT).expect("recv pong");
        let ys = reply.view::<f32>(0, case.floats).expect("pong view");
        check += ys[0] + ys[case.floats - 1];
        drop(reply);
        if trip >= WARMUP {
            times.push(start.elapsed());
        }
    }
    ping.close();
    let status = child.wait().expect("wait child");
    assert!(status.success(), "bench child: {status}");
    assert!(check > 0.0);
    times
}

/// The child: answers every ping with the payload plus one, computed in place from the ping slot
/// into the pong slot, until the parent closes the ping ring.
fn child(spec: &str) {
    let fields: Vec<u128> = spec
        .split_whitespace()
        .map(|f| f.parse().expect("child spec"))
        .collect();
    let [ping_fd, pong_fd, spin_ns, floats] = fields[..] else {
        panic!("child spec {spec:?}");
    };
    let fd = |raw: u128| {
        let raw = RawFd::try_from(raw).expect("fd number");
        // SAFETY: the parent left this descriptor open for this process and named it in the
        // environment; nothing else here owns it.
        unsafe { OwnedFd::from_raw_fd(raw) }
    };
    let ping = Ring::from_fd(fd(ping_fd)).expect("ping ring");
    let pong = Ring::from_fd(fd(pong_fd)).expect("pong ring");
    let floats = usize::try_from(floats).expect("floats");
    let spin = Duration::from_nanos(u64::try_from(spin_ns).expect("spin"));
    let mut input = ping.consumer().expect("ping consumer");
    let mut output = pong.producer().expect("pong producer");
    input.set_spin(spin);
    output.set_spin(spin);
    loop {
        let request = match input.recv(TIMEOUT) {
            Ok(slot) => slot,
            Err(RingError::Closed) => return,
            Err(e) => panic!("recv ping: {e}"),
        };
        let xs = request.view::<f32>(0, floats).expect("ping view");
        let mut reply = output.reserve(TIMEOUT).expect("reserve pong");
        let ys = reply.view_mut::<f32>(0, floats).expect("pong view");
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = x + 1.0;
        }
        drop(request);
        reply.commit(floats * 4).expect("commit pong");
    }
}
