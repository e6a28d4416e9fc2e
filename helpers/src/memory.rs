//! Memory measurements of this process (Linux): resident set size now and its peak since the last
//! reset. Used to show what activation checkpointing saves on CPU; on CUDA the device's memory is
//! what matters and libtorch's statistics are not bound by tch.
use anyhow::{Context, Result};

fn status_kib(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status (Linux only)")?;
    s.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>()))
        .with_context(|| format!("no {field} in /proc/self/status"))?
        .with_context(|| format!("cannot parse {field}"))
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> Result<u64> {
    Ok(status_kib("VmRSS:")? * 1024)
}

/// Peak resident set size since the process started or since [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    Ok(status_kib("VmHWM:")? * 1024)
}

/// Resets the peak to the current RSS (writes 5 to /proc/self/clear_refs, Linux >= 4.0).
pub fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak RSS (/proc/self/clear_refs)")
}
