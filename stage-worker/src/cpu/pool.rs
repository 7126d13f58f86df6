//! A fixed-size pool of worker threads for the CPU kernels.
//!
//! Placeholder implementation: runs on the calling thread.

/// Threads that split the rows of a kernel's output.
pub struct ThreadPool {
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// How many threads the pool runs.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..tasks)` and returns when all are done (placeholder: inline).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        for i in 0..tasks {
            f(i);
        }
    }
}
