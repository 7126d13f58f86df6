//! gptossd supervisor library: chat format and tokenizer, scheduling, the pipeline, the HTTP
//! server, the CLI's commands. The `gptossd` binary is a thin layer over it ([`cli::main`]).
//!
//! Everything is private to the crate (`pub(crate)`) but the two things used from outside:
//! [`cli`], the binary's commands, and [`chat`], the harmony chat format (its golden test,
//! `tests/harmony_golden.rs`, drives it as a library).

pub(crate) mod api;
pub(crate) mod bench;
pub mod chat;
pub mod cli;
pub(crate) mod config;
pub(crate) mod deadline;
pub(crate) mod launch;
pub(crate) mod loadgen;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub(crate) mod response_cache;
pub(crate) mod scheduler;
pub(crate) mod server;
pub(crate) mod single_process;
pub(crate) mod slo;
pub(crate) mod split;

/// The UTC calendar date of `t` as `YYYY-MM-DD` (for harmony's `Current date:` line).
pub(crate) fn civil_date(t: std::time::SystemTime) -> String {
    let days = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_date(UNIX_EPOCH), "1970-01-01");
        assert_eq!(
            super::civil_date(UNIX_EPOCH + Duration::from_secs(1_751_068_800)),
            "2025-06-28"
        );
        assert_eq!(
            super::civil_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29"
        );
    }
}
