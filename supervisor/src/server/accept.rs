//! Accepting connections, for the TCP API and the control socket alike: a cap on connections
//! open at once, and accept errors logged (rate-limited) and backed off. What happens on an
//! accepted connection (HTTP/1 with the header timeout, OpenAI error bodies) is
//! `server::http::canned::serve_connection`.
//!
//! # The cap
//!
//! A connection holds a permit of [`Gate`] from before `accept()` until it closes. Over the
//! cap, the loop stops accepting: new connections wait in the kernel's listen backlog (and are
//! accepted as soon as one closes), instead of failing or being answered with an error.
//!
//! # Accept errors
//!
//! Running out of file descriptors (`EMFILE`, `ENFILE`) or kernel memory makes `accept()`
//! fail at once, again and again, while the pending connection stays queued: retried in a loop
//! it spins a core and serves nobody. After such an error the loop sleeps [`BACKOFF`]; every
//! error is logged, at most one record per [`LOG_EVERY`] with the count of those suppressed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long the accept loop pauses after an error that a retry cannot fix at once.
pub const BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-error record per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// HTTP connections at once when the configuration does not say: this many, or fewer when
/// the file-descriptor limit would not leave [`FD_RESERVE`] descriptors for the rest.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Descriptors kept for everything but client connections (workers' pipes and sockets,
/// rings, the checkpoint, the runtime).
pub const FD_RESERVE: usize = 128;
/// Connections to the control socket at once (an administrator's tools, not clients).
pub const CONTROL_MAX_CONNECTIONS: usize = 32;

/// The cap on HTTP connections: the configured value as it is (an operator who sets it owns
/// it), else [`DEFAULT_MAX_CONNECTIONS`] bounded by the descriptor limit.
pub fn connection_cap(configured: Option<usize>, fd_limit: u64) -> usize {
    configured.unwrap_or_else(|| {
        let room = usize::try_from(fd_limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(FD_RESERVE);
        DEFAULT_MAX_CONNECTIONS.min(room).max(1)
    })
}

/// Raises this process's soft limit on open files to its hard limit (as a server that holds
/// many connections does) and returns the soft limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one plain struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one plain struct that we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// Admission of connections on one socket.
pub struct Gate {
    /// Which socket, for the log (`http`, `control`).
    socket: &'static str,
    permits: Arc<Semaphore>,
    errors: ErrorLog,
}

impl Gate {
    pub fn new(socket: &'static str, max_connections: usize) -> Self {
        Self {
            socket,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            errors: ErrorLog::default(),
        }
    }

    /// Waits for room for one more connection; the permit is given back when dropped.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// The next connection, with the permit it holds until it closes: waits for room under the
    /// cap, then accepts, logging and backing off accept errors.
    pub async fn next<L: Listener>(
        &mut self,
        listener: &L,
    ) -> Option<(L::Stream, OwnedSemaphorePermit)> {
        let permit = self.admit().await?;
        loop {
            match listener.accept_stream().await {
                Ok(stream) => return Some((stream, permit)),
                Err(e) => self.accept_failed(&e).await,
            }
        }
    }

    /// Logs an accept error (rate-limited) and waits before the next `accept()` when the
    /// error is one that would repeat at once.
    pub async fn accept_failed(&mut self, e: &std::io::Error) {
        let persistent = is_resource_exhaustion(e);
        if let Some(suppressed) = self.errors.record(Instant::now()) {
            tracing::warn!(
                socket = self.socket,
                error = %e,
                suppressed,
                backoff_ms = if persistent { BACKOFF.as_millis() } else { 0 },
                "cannot accept a connection"
            );
        }
        if persistent {
            tokio::time::sleep(BACKOFF).await;
        }
    }
}

/// A listening socket the daemon accepts on (TCP for the API, Unix for the control socket).
pub trait Listener {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>>;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Errors that `accept()` would return again immediately: out of descriptors or memory.
fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Rate limit for one kind of log record: the first at once, then at most one per
/// [`LOG_EVERY`], each saying how many were left out since the previous one.
#[derive(Debug, Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    /// Whether to log now; if so, how many records were suppressed before this one.
    fn record(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_is_logged_then_one_per_period_with_the_count_left_out() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.record(t0), Some(0));
        assert_eq!(log.record(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.record(t0 + Duration::from_secs(1)), None);
        assert_eq!(
            log.record(t0 + LOG_EVERY + Duration::from_millis(1)),
            Some(2)
        );
        assert_eq!(log.record(t0 + LOG_EVERY + Duration::from_secs(1)), None);
    }

    #[test]
    fn descriptor_exhaustion_backs_off_and_a_reset_does_not() {
        assert!(is_resource_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_resource_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_resource_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    #[tokio::test]
    async fn over_the_cap_admission_waits_until_a_connection_closes() {
        let gate = Gate::new("test", 2);
        let a = gate.admit().await;
        let _b = gate.admit().await;
        let third = tokio::time::timeout(Duration::from_millis(50), gate.admit()).await;
        assert!(
            third.is_err(),
            "a third connection was admitted over a cap of 2"
        );
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(500), gate.admit()).await;
        assert!(matches!(third, Ok(Some(_))));
    }
}
