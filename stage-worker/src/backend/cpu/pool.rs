//! A fixed-size pool of persistent worker threads, and the instruction set the kernels use.
//!
//! - The pool of `threads` threads is the caller plus `threads − 1` workers spawned once, in
//!   [`ThreadPool::new`]; nothing is spawned per call. With `threads == 1` everything runs inline
//!   on the caller.
//! - [`ThreadPool::run`] hands out task indices `0..tasks` dynamically (an atomic counter) to
//!   the caller and the workers, and returns only once every task has finished and no worker
//!   still holds the job: the closure may borrow the caller's stack.
//! - Idle workers spin briefly on an atomic generation counter, then sleep on a condvar (a
//!   futex on Linux): no sleep polling.
//! - A panic in a task is caught, the remaining unclaimed tasks are skipped, and the first panic
//!   is resumed on the caller once all workers have let go of the job. Workers survive it.
//! - Re-entrance: a `run` issued while the pool is already running a job (from inside a task, or
//!   from another thread) runs its tasks inline on its own thread, so nesting cannot deadlock.
//! - What the pool must not know: anything about the kernels' data. It only carries the
//!   [`Isa`] that the kernels called with it should use.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Isa;

/// How long an idle thread spins before it sleeps.
const SPIN: Duration = Duration::from_micros(20);
/// Stack size of the workers (the kernels keep ~300 KiB of tiles on the stack).
const WORKER_STACK: usize = 4 << 20;

/// Persistent threads that run the tasks of [`ThreadPool::run`].
pub struct ThreadPool {
    threads: usize,
    isa: Isa,
    shared: Arc<PoolState>,
    workers: Vec<JoinHandle<()>>,
    /// Set while a job is running on the workers.
    busy: AtomicBool,
}

/// State shared between the caller of `run` and the workers.
struct PoolState {
    state: Mutex<State>,
    /// Signalled when a job is published or the pool shuts down.
    wake: Condvar,
    /// Signalled when the last worker lets go of a job.
    idle: Condvar,
    /// Mirror of `State::generation` for spinning without the lock.
    generation: AtomicU64,
    /// Workers holding the current job; changed only under the lock, read lock-free to spin.
    holders: AtomicUsize,
}

struct State {
    generation: u64,
    job: Option<JobPtr>,
    shutdown: bool,
}

/// One call of `run`: lives on the caller's stack for the duration of the call.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A type-erased pointer to the running [`Job`].
#[derive(Clone, Copy)]
struct JobPtr(*const Job<'static>);

// SAFETY: the pointee is a `Job` whose closure is `Sync` and whose other fields are atomics and
// a mutex; `run` does not return (so the job stays alive) until every worker that copied the
// pointer has released it (`holders == 0` after the pointer was withdrawn under the lock).
unsafe impl Send for JobPtr {}

impl ThreadPool {
    /// A pool of `threads` threads (at least one; the caller counts as one), with the fastest
    /// instruction set this CPU supports.
    ///
    /// Panics if the operating system cannot spawn a thread (see [`ThreadPool::try_new`]).
    pub fn new(threads: usize) -> Self {
        match Self::try_new(threads, Isa::detect()) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot spawn {threads} CPU worker threads: {e}"),
        }
    }

    /// A pool of `threads` threads whose kernels use `isa`, or the portable path if this CPU
    /// lacks `isa` (check [`ThreadPool::isa`]).
    pub fn try_new(threads: usize, isa: Isa) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let isa = if isa.is_available() {
            isa
        } else {
            Isa::Portable
        };
        let shared = Arc::new(PoolState {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            generation: AtomicU64::new(0),
            holders: AtomicUsize::new(0),
        });
        let mut pool = ThreadPool {
            threads,
            isa,
            shared,
            workers: Vec::with_capacity(threads - 1),
            busy: AtomicBool::new(false),
        };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("gptossd-cpu-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || pool_thread(&shared))?;
            // On an error above, dropping `pool` shuts down the workers spawned so far.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// How many threads the pool runs (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The instruction set of the kernels run with this pool.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs `f(i)` for every `i` in `0..tasks`, spread over the pool's threads (the caller
    /// included), and returns when all are done. Tasks run in no particular order. If a task
    /// panics, the tasks not yet started are skipped and the panic resumes here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers.is_empty()
            || tasks == 1
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            // Single thread, a single task, or a nested / concurrent call: run inline.
            (0..tasks).for_each(f);
            return;
        }
        let _busy = BusyGuard(&self.busy);
        let job = Job {
            f,
            tasks,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        let ptr = JobPtr(std::ptr::from_ref(&job).cast::<Job<'static>>());
        {
            let mut st = lock(&self.shared.state);
            st.generation += 1;
            st.job = Some(ptr);
            self.shared
                .generation
                .store(st.generation, Ordering::Release);
        }
        self.shared.wake.notify_all();
        execute(&job);
        // Withdraw the job so that no late worker picks it up, then wait for those holding it.
        lock(&self.shared.state).job = None;
        let spin_until = Instant::now() + SPIN;
        while self.shared.holders.load(Ordering::Acquire) > 0 && Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        let mut st = lock(&self.shared.state);
        while self.shared.holders.load(Ordering::Acquire) > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        let payload = lock(&job.panic).take();
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
        for handle in self.workers.drain(..) {
            // A worker never panics outside `catch_unwind`; nothing to report if one did.
            let _ = handle.join();
        }
    }
}

/// Clears the busy flag when `run` returns or unwinds.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Locks, ignoring poisoning: no code panics while holding these locks.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims and runs tasks of `job` until none is left; records the first panic.
fn execute(job: &Job<'_>) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (job.f)(i))) {
            job.next.store(job.tasks, Ordering::Relaxed);
            let mut slot = lock(&job.panic);
            if slot.is_none() {
                *slot = Some(payload);
            }
        }
    }
}

/// A worker: waits for a new job, joins it, runs tasks, lets go of it.
fn pool_thread(shared: &PoolState) {
    let mut seen = 0u64;
    loop {
        let spin_until = Instant::now() + SPIN;
        while shared.generation.load(Ordering::Acquire) == seen && Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        let mut st = lock(&shared.state);
        while !st.shutdown && st.generation == seen {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.shutdown {
            return;
        }
        seen = st.generation;
        let Some(ptr) = st.job else { continue };
        shared.holders.fetch_add(1, Ordering::AcqRel);
        drop(st);
        // SAFETY: the job was published and not yet withdrawn when we incremented `holders`
        // under the lock; `run` keeps it alive until `holders` is back to zero (see `JobPtr`).
        execute(unsafe { &*ptr.0 });
        let st = lock(&shared.state);
        if shared.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.idle.notify_all();
        }
        drop(st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn runs_every_task_once() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            for tasks in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn many_calls_in_a_row() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            pool.run(4, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 10);
    }

    #[test]
    fn uses_worker_threads() {
        let pool = ThreadPool::new(2);
        let ids = Mutex::new(std::collections::HashSet::new());
        // Each task waits for a while so the worker is bound to pick some up.
        pool.run(8, &|_| {
            std::thread::sleep(Duration::from_millis(5));
            lock(&ids).insert(std::thread::current().id());
        });
        assert_eq!(lock(&ids).len(), 2);
    }

    #[test]
    fn panic_propagates_and_pool_survives() {
        let pool = ThreadPool::new(3);
        for _ in 0..3 {
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.run(16, &|i| {
                    if i == 5 {
                        panic!("task five");
                    }
                })
            }));
            let payload = r.expect_err("the panic must reach the caller");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"task five"));
        }
        let count = AtomicUsize::new(0);
        pool.run(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_run_does_not_deadlock() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_callers() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.run(5, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 3 * 200 * 5);
    }

    #[test]
    fn forced_portable_isa() {
        let pool = ThreadPool::try_new(2, Isa::Portable).expect("spawn");
        assert_eq!(pool.isa(), Isa::Portable);
        assert_eq!(ThreadPool::new(1).isa(), Isa::detect());
    }
}
