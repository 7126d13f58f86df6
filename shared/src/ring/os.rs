//! The operating-system pieces under the ring: the memfd and its mapping, the shared futex, and
//! passing a file descriptor over a Unix socket (SCM_RIGHTS).
//!
//! Nothing here knows the ring's layout; `super` does. Every call that can fail returns
//! [`RingError::Os`] naming the call.

use std::io::{IoSlice, IoSliceMut};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::RingError;

/// The seals a ring's memfd must carry: its size can never change, so a mapping of it never
/// faults with SIGBUS because another process truncated the file.
pub(super) const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

fn os(op: &'static str) -> impl FnOnce(Errno) -> RingError {
    move |errno| RingError::Os { op, errno }
}

/// Creates a memfd of `len` bytes (zero-filled) and seals its size.
pub(super) fn sealed_memfd(name: &str, len: usize) -> Result<OwnedFd, RingError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(os("memfd_create"))?;
    let size = libc::off_t::try_from(len)
        .map_err(|_| RingError::Geometry(format!("mapping of {len} bytes exceeds off_t")))?;
    nix::unistd::ftruncate(&fd, size).map_err(os("ftruncate"))?;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(REQUIRED_SEALS)).map_err(os("fcntl(F_ADD_SEALS)"))?;
    Ok(fd)
}

/// The size of the file behind `fd`, checked to be sealed against resizing.
pub(super) fn sealed_size(fd: BorrowedFd<'_>) -> Result<usize, RingError> {
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|errno| {
        RingError::BadHeader(format!(
            "the descriptor cannot carry seals ({errno}); a ring must be a sealed memfd"
        ))
    })?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
        return Err(RingError::BadHeader(format!(
            "the memfd is not sealed against resizing (seals {seals:?})"
        )));
    }
    let stat = nix::sys::stat::fstat(fd).map_err(os("fstat"))?;
    usize::try_from(stat.st_size)
        .map_err(|_| RingError::BadHeader(format!("file size {} is negative", stat.st_size)))
}

/// A shared, read-write mapping of a whole file, unmapped on drop.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access through it goes either
// through atomics or through slots whose exclusive use the ring protocol hands to one thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only ever read or use atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write, pre-faulting the pages.
    pub(super) fn new(fd: BorrowedFd<'_>, len: usize) -> Result<Self, RingError> {
        let length = NonZeroUsize::new(len)
            .ok_or_else(|| RingError::BadHeader("the file is empty".to_string()))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), so it aliases no Rust
        // object; the file is sealed against shrinking, so every page stays backed.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                fd,
                0,
            )
        }
        .map_err(os("mmap"))?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte; page-aligned.
    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no borrow of the mapping
        // outlives `self` (slots and handles hold an `Arc` of the owner).
        // An error here would mean the range was not mapped; there is nothing to do about it.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Sleeps while `*word == expected`, at most `timeout` (`None`: no limit). Returns on a wake-up,
/// a changed word, a signal or the timeout alike: the caller re-checks its condition.
///
/// The futex is shared (no `FUTEX_PRIVATE_FLAG`): `word` lies in a `MAP_SHARED` mapping and the
/// waker may be another process.
pub(super) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> Result<(), RingError> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 1e9, so it fits any c_long.
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word`, which lives as long as this call;
    // `ts_ptr` is null or points at `ts`, alive until the call returns. The last two arguments
    // are ignored by FUTEX_WAIT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::EAGAIN | Errno::EINTR | Errno::ETIMEDOUT => Ok(()),
        errno => Err(RingError::Os {
            op: "futex(FUTEX_WAIT)",
            errno,
        }),
    }
}

/// Wakes up to `count` waiters sleeping on `word` (in any process).
pub(super) fn futex_wake(word: &AtomicU32, count: i32) {
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; the trailing arguments are
    // ignored. It cannot fail on a valid, aligned address, so its result carries nothing.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            count,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// A duplicate of `fd` without `FD_CLOEXEC`, so that a child inherits it across exec.
pub(super) fn dup_inheritable(fd: BorrowedFd<'_>) -> Result<OwnedFd, RingError> {
    // dup(2) never sets FD_CLOEXEC on the new descriptor.
    nix::unistd::dup(fd).map_err(os("dup"))
}

/// The one byte sent alongside a descriptor (a stream socket carries no empty message).
const FD_MARKER: u8 = b'R';

/// Sends `fd` over the Unix socket `socket` (SCM_RIGHTS). The receiver gets its own descriptor
/// for the same file; `fd` stays open here.
pub fn send_fd(socket: impl AsFd, fd: BorrowedFd<'_>) -> Result<(), RingError> {
    let fds = [fd.as_raw_fd()];
    let iov = [IoSlice::new(std::slice::from_ref(&FD_MARKER))];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(
            socket.as_fd().as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(1) => return Ok(()),
            Ok(n) => {
                return Err(RingError::FdPassing(format!(
                    "sendmsg sent {n} bytes instead of 1"
                )))
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                return Err(RingError::Os {
                    op: "sendmsg",
                    errno,
                })
            }
        }
    }
}

/// Receives one descriptor sent by [`send_fd`] from the Unix socket `socket`, close-on-exec.
/// Blocks like a read of the socket does.
pub fn recv_fd(socket: impl AsFd) -> Result<OwnedFd, RingError> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut received: Vec<OwnedFd> = Vec::new();
    let (bytes, truncated) = loop {
        match recvmsg::<()>(
            socket.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                for cmsg in msg.cmsgs().map_err(os("recvmsg control messages"))? {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        // SAFETY: the kernel just installed these descriptors in this process
                        // for this message; nothing else owns them.
                        received.extend(
                            fds.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC));
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                return Err(RingError::Os {
                    op: "recvmsg",
                    errno,
                })
            }
        }
    };
    if bytes == 0 {
        return Err(RingError::FdPassing(
            "the peer closed the socket before sending a descriptor".to_string(),
        ));
    }
    if truncated {
        return Err(RingError::FdPassing(
            "control data was truncated (more than 4 descriptors sent)".to_string(),
        ));
    }
    if byte[0] != FD_MARKER || received.len() != 1 {
        return Err(RingError::FdPassing(format!(
            "expected one descriptor with marker byte {FD_MARKER:#x}, got {} with byte {:#x}",
            received.len(),
            byte[0]
        )));
    }
    received
        .pop()
        .ok_or_else(|| RingError::FdPassing("no descriptor received".to_string()))
}
