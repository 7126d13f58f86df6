//! Opening the model's files: regular files only.
//!
//! Owns: the one way the checkpoint and config readers open a file. A named pipe, device,
//! socket or directory put where `config.json`, the index or a shard should be is refused at
//! once, instead of blocking forever in `open` (a FIFO with no writer) or `read` (a pipe, a
//! terminal) or reading endless bytes (`/dev/zero`).
//!
//! How: the path is checked with `stat` first (so a device is normally never opened), then opened
//! with `O_NONBLOCK` (so even a FIFO swapped in after the check cannot block the open), checked
//! again with `fstat` on the descriptor (the check that cannot race), and `O_NONBLOCK` is cleared
//! before the file is handed out. Symbolic links are followed: the Hugging Face cache links
//! every file of a snapshot to a blob.
//!
//! Errors carry the OS error in their message and do not chain it again as a `source()`, so
//! `{:#}` prints it once. The caller adds the path.

use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Why a file could not be opened or read; the caller's error names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// `open` (or the `stat` before it) failed: missing, no permission, …
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    /// Something other than a regular file is at the path.
    #[error("is not a regular file (it is {0})")]
    NotRegular(&'static str),
    /// The file opened but reading it failed (an I/O error, or text that is not UTF-8).
    #[error("cannot read: {0}")]
    Read(std::io::Error),
}

/// Opens `path` read-only, refusing anything but a regular file without blocking.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let before = std::fs::metadata(path).map_err(FileError::Open)?;
    refuse_non_regular(before.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(FileError::Open)?;
    let opened = file.metadata().map_err(FileError::Open)?;
    refuse_non_regular(opened.file_type())?;
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(|e| FileError::Open(e.into()))?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(blocking)).map_err(|e| FileError::Open(e.into()))?;
    Ok(file)
}

/// Reads a whole regular file as UTF-8 text (for the small JSON files of a checkpoint).
pub fn read_regular_to_string(path: &Path) -> Result<String, FileError> {
    let mut text = String::new();
    open_regular(path)?
        .read_to_string(&mut text)
        .map_err(FileError::Read)?;
    Ok(text)
}

fn refuse_non_regular(kind: FileType) -> Result<(), FileError> {
    if kind.is_file() {
        return Ok(());
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    Err(FileError::NotRegular(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_opens_and_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{}").expect("write");
        assert_eq!(read_regular_to_string(&path).expect("read"), "{}");
    }

    #[test]
    fn a_symlink_to_a_regular_file_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = dir.path().join("blob");
        std::fs::write(&blob, "x").expect("write");
        let link = dir.path().join("config.json");
        std::os::unix::fs::symlink(&blob, &link).expect("symlink");
        assert_eq!(read_regular_to_string(&link).expect("read"), "x");
    }

    #[test]
    fn directories_pipes_and_devices_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        for (path, what) in [
            (dir.path(), "a directory"),
            (fifo.as_path(), "a named pipe"),
            (Path::new("/dev/null"), "a character device"),
        ] {
            let e = open_regular(path).expect_err("must be refused").to_string();
            assert_eq!(e, format!("is not a regular file (it is {what})"));
        }
    }
}
