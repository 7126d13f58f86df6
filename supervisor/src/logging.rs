//! Where the daemon's log records go, and in which form: one choice, made once at start-up.
//!
//! | `--log` | records go | form |
//! |---|---|---|
//! | `auto` (default) | the journal when stderr *is* the journal (systemd sets `JOURNAL_STREAM` to stderr's device and inode), else stderr | see below |
//! | `journald` | the journal (`/run/systemd/journal/socket`) | native fields |
//! | `text` | stderr | one line: time, level, target, message, fields; ANSI colours only on a terminal |
//! | `json` | stderr | one JSON object per line |
//!
//! In the journal every record carries `PRIORITY` (error 3, warn 4, info 5, debug 6, trace 7),
//! `SYSLOG_IDENTIFIER=gptossd`, `CODE_FILE`, `CODE_LINE`, `TARGET`, and its fields and those of
//! its enclosing spans as `GPTOSSD_<FIELD>`: `GPTOSSD_MODEL`, `GPTOSSD_STAGE`, `GPTOSSD_PID`,
//! `GPTOSSD_EPOCH`, `GPTOSSD_REQUEST_ID`, `GPTOSSD_PROFILE`… (tracing-journald, the tokio
//! project's journald layer: it speaks the native protocol in Rust, with no libsystemd, and
//! keeps span fields, which systemd-journal-logger — a `log` backend — cannot.) When the journal
//! cannot be reached, records fall back to text on stderr, with a warning saying why.
//!
//! `GPTOSSD_LOG` filters, in tracing's env-filter syntax (default `info`).

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The filter in force, replaceable at run time ([`set_level`]).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The environment variable with the log filter.
pub const FILTER_ENV: &str = "GPTOSSD_LOG";
/// The journal's `SYSLOG_IDENTIFIER` and the prefix of every field.
pub const IDENTIFIER: &str = "gptossd";

/// The `--log` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when stderr is connected to it, else text.
    #[default]
    Auto,
    /// Lines of text on stderr.
    Text,
    /// JSON objects, one per line, on stderr.
    Json,
    /// Native journal records.
    Journald,
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let journal_error = match format {
        LogFormat::Journald => match journald_layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => Some(e),
        },
        _ => None,
    };
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = if format == LogFormat::Json {
        stderr.json().boxed()
    } else {
        stderr.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot reach the journal: logging to stderr");
    }
}

/// Puts the configuration's `server.log_level` in force (at start-up and on a reload), unless
/// `$GPTOSSD_LOG` is set, which wins. `None` means `info`.
pub fn set_level(level: Option<&str>) {
    if std::env::var_os(FILTER_ENV).is_some() {
        return;
    }
    let Some(handle) = FILTER.get() else { return };
    match EnvFilter::try_new(level.unwrap_or("info")) {
        Ok(filter) => {
            if let Err(e) = handle.reload(filter) {
                tracing::warn!(error = %e, "cannot change the log level");
            }
        }
        Err(e) => tracing::warn!(error = %e, "not a log filter"),
    }
}

fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_syslog_identifier(IDENTIFIER.to_string())
        .with_field_prefix(Some(IDENTIFIER.to_ascii_uppercase())))
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is
/// `<device>:<inode>` of that stream, and a redirected stderr (`2>file`) no longer matches.
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = parse_journal_stream(&value) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `stat` into memory we own; it is read only if the call succeeded.
    let st = unsafe {
        if libc::fstat(std::io::stderr().as_raw_fd(), st.as_mut_ptr()) != 0 {
            return false;
        }
        st.assume_init()
    };
    st.st_dev == dev && st.st_ino == ino
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123456)));
        assert_eq!(parse_journal_stream("8-123456"), None);
        assert_eq!(parse_journal_stream(":1"), None);
        assert_eq!(parse_journal_stream("a:b"), None);
    }
}
