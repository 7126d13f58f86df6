//! Figures both binaries' benches report (`gptossd bench`: the in-process bench runs in the stage
//! worker binary, the pipeline bench in the supervisor), measured and written the same way.

/// Peak resident memory of this process (VmHWM), in bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A figure for the JSON output, rounded to 3 decimals.
pub fn round(x: f64) -> serde_json::Value {
    serde_json::json!((x * 1000.0).round() / 1000.0)
}
