//! One stage worker's operating-system process: how it is started, the tail of what it wrote
//! on stderr, how it is killed and reaped. It knows nothing of the stage's lifecycle (that is
//! `lifecycle.rs`) nor of the rings' contents (that is `dataplane.rs`).
//!
//! A stage process is spawned with an explicit environment, in its own process group, with a
//! parent-death signal (it dies with the supervisor, even after a `kill -9` of the
//! supervisor), and with exactly two inherited descriptors besides stdio: its input and output
//! rings. The environment is the supervisor's [`PASS_ENV`] variables, `CUDA_DEVICE_ORDER`
//! (`PCI_BUS_ID` unless the supervisor's environment sets it, so that `cuda:N` is the GPU
//! `nvidia-smi` calls N) and the spec's extras. When its stderr closes (it exited, or is about to), the `on_stderr_closed` callback
//! given to [`StageProcess::spawn`] runs once with its pid: that is how the engine learns of a
//! process that dies before it ever connected.
//!
//! Once reaped, a process's pid may be given to another: [`StageProcess::kill`] signals only a
//! process not yet reaped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gptossd_shared::device::Device;

/// What is needed to start one stage's process.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub binary: PathBuf,
    pub model: PathBuf,
    pub stage: usize,
    pub layers: std::ops::Range<usize>,
    pub embedding: bool,
    pub head: bool,
    /// Where it computes (`--device`; a CPU core set pins the process).
    pub device: Device,
    pub threads: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub heartbeat_ms: u64,
    /// Extra environment for this stage (test fault injection).
    pub extra_env: Vec<(String, String)>,
}

/// How a new process is wired to the rest of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Wiring<'a> {
    /// The supervisor's control socket name to connect to.
    pub control: &'a str,
    /// The ring it reads steps from (inherited).
    pub ring_in: BorrowedFd<'a>,
    /// The ring it writes its output to (inherited).
    pub ring_out: BorrowedFd<'a>,
    /// Steps of epochs below this one are skipped.
    pub epoch: u64,
}

/// A running (or dead, not yet dropped) stage process.
pub struct StageProcess {
    child: Child,
    pub pid: u32,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// How often [`StageProcess::wait_exit`] asks the kernel whether the process has exited.
const EXIT_POLL: Duration = Duration::from_millis(2);

/// Environment variables passed through to stage processes (everything else is dropped). The
/// last three locate a CUDA stage's cubin cache (`GPTOSSD_KERNEL_CACHE`, else under
/// `XDG_CACHE_HOME` or `HOME`: `stage-worker/src/backend/cuda/cache.rs`).
const PASS_ENV: [&str; 8] = [
    "PATH",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "RUST_BACKTRACE",
    "GPTOSSD_CPU_ISA",
    "GPTOSSD_KERNEL_CACHE",
    "XDG_CACHE_HOME",
    "HOME",
];

/// How CUDA numbers the GPUs a worker sees: passed to every worker, `PCI_BUS_ID` by default so
/// that `cuda:N` is `nvidia-smi`'s GPU N (CUDA's own default puts the fastest GPU first).
const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
const CUDA_DEVICE_ORDER_DEFAULT: &str = "PCI_BUS_ID";

/// A worker's environment, given the supervisor's variables (`lookup`): every [`PASS_ENV`]
/// variable that is set, and [`CUDA_DEVICE_ORDER`], set or defaulted.
fn worker_env(lookup: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = PASS_ENV
        .iter()
        .filter_map(|&key| lookup(key).map(|v| (key, v)))
        .collect();
    let order = lookup(CUDA_DEVICE_ORDER).unwrap_or_else(|| CUDA_DEVICE_ORDER_DEFAULT.into());
    env.push((CUDA_DEVICE_ORDER, order));
    env
}

impl StageProcess {
    /// Starts the stage's process, keeping the last `tail_lines` lines of its stderr.
    /// `on_stderr_closed` runs (on the stderr reader thread, with the pid) once its stderr
    /// closes.
    pub fn spawn(
        spec: &StageSpec,
        wiring: Wiring<'_>,
        tail_lines: usize,
        on_stderr_closed: impl FnOnce(u32) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (fd_in, fd_out): (RawFd, RawFd) =
            (wiring.ring_in.as_raw_fd(), wiring.ring_out.as_raw_fd());
        let mut cmd = Command::new(&spec.binary);
        cmd.env_clear();
        for (key, value) in worker_env(|key| std::env::var(key).ok()) {
            cmd.env(key, value);
        }
        for (k, v) in &spec.extra_env {
            cmd.env(k, v);
        }
        cmd.arg("worker")
            .arg("--model")
            .arg(&spec.model)
            .args(["--stage", &spec.stage.to_string()])
            .args(["--first-layer", &spec.layers.start.to_string()])
            .args(["--end-layer", &spec.layers.end.to_string()])
            .args(["--device", &spec.device.to_string()])
            .args(["--threads", &spec.threads.to_string()])
            .args(["--control", wiring.control])
            .args(["--ring-in", &fd_in.to_string()])
            .args(["--ring-out", &fd_out.to_string()])
            .args(["--kv-blocks", &spec.kv_blocks.to_string()])
            .args(["--block-size", &spec.block_size.to_string()])
            .args(["--epoch", &wiring.epoch.to_string()])
            .args(["--heartbeat-ms", &spec.heartbeat_ms.to_string()]);
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
            // The spawner's span (the pipeline's, with the model's name) goes with the lines.
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name(format!("stage{stage}-stderr"))
                .spawn(move || {
                    let _entered = span.enter();
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        // A stage writes to stderr only when something is wrong: each line is
                        // a record of its own, under the stage's fields, as it comes.
                        tracing::warn!(target: "gptossd::stage", stage, pid, "{line}");
                        if let Ok(mut t) = tail.lock() {
                            if t.len() == tail_lines.max(1) {
                                t.pop_front();
                            }
                            t.push_back(line);
                        }
                    }
                    on_stderr_closed(pid);
                })?;
        }
        Ok(Self {
            child,
            pid,
            stderr_tail,
        })
    }

    /// Kills the whole process group and reaps the process (unless it was reaped already).
    pub fn kill(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // A process not yet reaped keeps its pid (as a zombie at worst), so this reaches it.
        // SAFETY: plain syscall on the process's own group (its pid, set by process_group(0)).
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines the process wrote on stderr.
    pub fn tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the process has exited (reaping it), with its status.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit (reaping it). For the moments when it is
    /// known to be on its way out: its control socket or stderr just closed, or it was told to
    /// shut down. Polls the kernel every 2 ms: a child's exit has no descriptor to wait on
    /// here without taking over SIGCHLD.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep(EXIT_POLL.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        worker_env(|key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn workers_get_the_passed_variables_and_a_cuda_device_order() {
        let env = env_of(&[
            ("PATH", "/bin"),
            ("TERM", "xterm"),
            ("HOME", "/root"),
            ("GPTOSSD_CPU_ISA", "avx2"),
            ("GPTOSSD_KERNEL_CACHE", "/var/cache/gptossd/kernels"),
        ]);
        assert_eq!(
            env,
            vec![
                ("PATH", "/bin".to_string()),
                ("GPTOSSD_CPU_ISA", "avx2".to_string()),
                (
                    "GPTOSSD_KERNEL_CACHE",
                    "/var/cache/gptossd/kernels".to_string()
                ),
                ("HOME", "/root".to_string()),
                ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string()),
            ]
        );
        let env = env_of(&[("CUDA_DEVICE_ORDER", "FASTEST_FIRST")]);
        assert_eq!(
            env,
            vec![("CUDA_DEVICE_ORDER", "FASTEST_FIRST".to_string())]
        );
    }
}
