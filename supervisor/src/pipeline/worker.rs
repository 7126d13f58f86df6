//! One stage worker process: how it is started, what state it is in, and the tail of what it
//! wrote on stderr.
//!
//! A worker is spawned with an explicit environment, in its own process group, with a
//! parent-death signal (it dies with the supervisor, even after a `kill -9` of the supervisor),
//! and with exactly two inherited descriptors besides stdio: its input and output rings.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The life of a worker. Shown by health output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// The process was started; it has not said hello yet.
    Spawning,
    /// It said hello and is mapping its weights.
    Loading,
    /// Loaded and idle, or between steps.
    Ready,
    /// Computing a step.
    Busy,
    /// Finishing its current step before stopping.
    Draining,
    /// Exited or killed; not (yet) restarted.
    Dead,
    /// Waiting for its restart backoff to pass.
    Restarting,
    /// Crashed too often (or could not load): not restarted again.
    Failed,
}

/// What is needed to start a stage worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub binary: PathBuf,
    pub model: PathBuf,
    pub stage: usize,
    pub layers: std::ops::Range<usize>,
    pub embedding: bool,
    pub head: bool,
    pub device: String,
    pub cpus: Vec<usize>,
    pub threads: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub heartbeat_ms: u64,
    /// Extra environment for this worker (test fault injection).
    pub extra_env: Vec<(String, String)>,
}

/// A running (or dead) worker process.
pub struct WorkerProcess {
    pub child: Child,
    pub pid: u32,
    pub started: Instant,
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// Environment variables passed through to workers (everything else is dropped).
const PASS_ENV: [&str; 5] = [
    "PATH",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "RUST_BACKTRACE",
    "GPTOSSD_CPU_ISA",
];

impl WorkerProcess {
    /// Starts the worker with its rings inherited as `ring_in` / `ring_out` and the control
    /// socket name to connect to.
    pub fn spawn(
        spec: &WorkerSpec,
        control: &str,
        ring_in: BorrowedFd<'_>,
        ring_out: BorrowedFd<'_>,
        epoch: u64,
        tail_lines: usize,
    ) -> std::io::Result<Self> {
        let (fd_in, fd_out): (RawFd, RawFd) = (ring_in.as_raw_fd(), ring_out.as_raw_fd());
        let mut cmd = Command::new(&spec.binary);
        cmd.env_clear();
        for key in PASS_ENV {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        for (k, v) in &spec.extra_env {
            cmd.env(k, v);
        }
        cmd.arg("--model")
            .arg(&spec.model)
            .args(["--stage", &spec.stage.to_string()])
            .args(["--first-layer", &spec.layers.start.to_string()])
            .args(["--end-layer", &spec.layers.end.to_string()])
            .args(["--device", &spec.device])
            .args(["--threads", &spec.threads.to_string()])
            .args(["--control", control])
            .args(["--ring-in", &fd_in.to_string()])
            .args(["--ring-out", &fd_out.to_string()])
            .args(["--kv-blocks", &spec.kv_blocks.to_string()])
            .args(["--block-size", &spec.block_size.to_string()])
            .args(["--epoch", &epoch.to_string()])
            .args(["--heartbeat-ms", &spec.heartbeat_ms.to_string()]);
        if !spec.cpus.is_empty() {
            let cpus: Vec<String> = spec.cpus.iter().map(|c| c.to_string()).collect();
            cmd.args(["--cpus", &cpus.join(",")]);
        }
        if spec.embedding {
            cmd.arg("--embedding");
        }
        if spec.head {
            cmd.arg("--head");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.process_group(0);
        let parent = std::process::id() as i32;
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid, fcntl, _exit) on plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                for fd in [fd_in, fd_out] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(tail_lines)));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let stage = spec.stage;
            std::thread::Builder::new()
                .name(format!("stage{stage}-stderr"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        if let Ok(mut t) = tail.lock() {
                            if t.len() == tail_lines.max(1) {
                                t.pop_front();
                            }
                            t.push_back(line);
                        }
                    }
                })?;
        }
        Ok(Self {
            child,
            pid,
            started: Instant::now(),
            stderr_tail,
        })
    }

    /// Kills the whole process group and reaps the worker.
    pub fn kill(&mut self) {
        // SAFETY: plain syscall on the worker's process group (its pid, set by process_group(0)).
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines the worker wrote on stderr.
    pub fn tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the process has exited (reaping it), with its status.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}
