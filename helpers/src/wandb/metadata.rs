//! `wandb-metadata.json`: what the official client records about the machine and the code, shown
//! on the run's Overview page (OS, host, command, git remote and commit, CPUs, memory, GPUs and
//! the CUDA version). Field names are the official client's; what cannot be known is left out.
use serde_json::{json, Value};
use std::path::Path;

/// The metadata of this process, run from the project at `root`.
pub fn metadata(root: &Path, program: &str) -> Value {
    let git = |args: &[&str]| {
        std::process::Command::new("git").args(args).current_dir(root).output().ok().filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).filter(|s| !s.is_empty())
    };
    let t = crate::run::utc_timestamp(); // YYYYMMDD-HHMMSS
    let mut m = json!({
        "os": os_name(),
        "startedAt": format!("{}-{}-{}T{}:{}:{}Z", &t[0..4], &t[4..6], &t[6..8], &t[9..11], &t[11..13], &t[13..15]),
        "program": program,
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
        "executable": std::env::current_exe().ok().map(|p| p.display().to_string()),
        "root": root.display().to_string(),
        "host": super::host_name(),
        "username": std::env::var("USER").ok(),
        "cpu_count_logical": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "git": { "remote": git(&["remote", "get-url", "origin"]), "commit": git(&["rev-parse", "HEAD"]) },
    });
    if let Some(total) = mem_total_bytes() {
        m["memory"] = json!({ "total": total.to_string() });
    }
    let gpus = nvidia_gpus();
    if let Some((name, _)) = gpus.first() {
        m["gpu"] = name.clone().into();
        m["gpu_count"] = gpus.len().into();
        m["gpu_nvidia"] = gpus.iter().map(|(name, mem)| json!({ "name": name, "memoryTotal": mem.to_string() })).collect();
        if let Some(cuda) = cuda_version() {
            m["cudaVersion"] = cuda.into();
        }
    }
    strip_nulls(&mut m);
    m
}

/// `Linux-6.8.0-x86_64`, as Python's `platform.platform()` starts.
fn os_name() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "macOS",
        other => other,
    };
    [os, &release, std::env::consts::ARCH].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join("-")
}

fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (name, memory in bytes) of every NVIDIA GPU the driver lists; none without a driver.
fn nvidia_gpus() -> Vec<(String, u64)> {
    let Ok(out) = std::process::Command::new("nvidia-smi").args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, mib) = l.rsplit_once(',')?;
            Some((name.trim().to_string(), mib.trim().parse::<u64>().ok()? * 1024 * 1024))
        })
        .collect()
}

/// The CUDA version the driver supports (nvidia-smi's header, NVML's `cudaDriverVersion`).
fn cuda_version() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi").output().ok()?;
    cuda_version_in(&String::from_utf8_lossy(&out.stdout))
}

fn cuda_version_in(nvidia_smi: &str) -> Option<String> {
    let rest = &nvidia_smi[nvidia_smi.find("CUDA Version:")? + "CUDA Version:".len()..];
    rest.split_whitespace().next().map(|v| v.trim_end_matches('|').to_string()).filter(|v| !v.is_empty())
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cuda_version_from_nvidia_smi() {
        let text = "+---+\n| NVIDIA-SMI 580.65.06    Driver Version: 580.65.06    CUDA Version: 13.0     |\n";
        assert_eq!(cuda_version_in(text).as_deref(), Some("13.0"));
        assert_eq!(cuda_version_in("No devices were found"), None);
    }

    #[test]
    fn describes_this_machine_without_nulls() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let m = metadata(root, "experiment.ipynb");
        assert!(m["os"].as_str().unwrap().starts_with("Linux-"), "{m}");
        assert_eq!(m["program"], "experiment.ipynb");
        assert!(m["cpu_count_logical"].as_u64().unwrap() >= 1);
        assert!(m["memory"]["total"].as_str().unwrap().parse::<u64>().unwrap() > 0);
        assert!(m["startedAt"].as_str().unwrap().ends_with('Z') && m["startedAt"].as_str().unwrap().len() == 20, "{m}");
        assert!(!m.to_string().contains("null"), "{m}");
    }
}
