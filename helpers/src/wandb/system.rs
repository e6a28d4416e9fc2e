//! System metrics for the run page's System section, as the official client samples them:
//! `system.cpu` (percent of all cores busy since the last sample), `system.memory` (percent of the
//! host's memory in use), `system.proc.memory.rssMB`, `system.proc.memory.availableMB`,
//! `system.proc.cpu.threads`, and per NVIDIA GPU (from `nvidia-smi`, which reads NVML; no CUDA
//! context is created, so GPUs this process does not use stay untouched) `system.gpu.<i>.gpu`
//! (utilisation, percent), `.memory` (memory-bandwidth utilisation), `.memoryAllocated` (percent of
//! its memory in use), `.memoryAllocatedBytes`, `.temp` (degrees C), `.powerWatts` and
//! `.powerPercent` (of its power limit). They go up as lines of `wandb-events.jsonl`
//! (`{"_wandb": true, "_timestamp", "_runtime", "system.<k>": v}`).
use std::collections::BTreeMap;

/// CPU time counters of /proc/stat's first line: (busy, total) jiffies.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum(); // user nice system idle iowait irq softirq steal
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The `nvidia-smi` query the GPU metrics come from.
const GPU_QUERY: &str = "--query-gpu=index,utilization.gpu,utilization.memory,memory.used,memory.total,temperature.gpu,power.draw,power.limit";

/// GPU metrics from `nvidia-smi --format=csv,noheader,nounits` lines of [`GPU_QUERY`] (MiB, W);
/// fields it cannot read (`[N/A]`) are left out.
pub fn parse_gpu_lines(csv: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in csv.lines() {
        let f: Vec<Option<f64>> = line.split(',').map(|x| x.trim().parse::<f64>().ok()).collect();
        let Some(Some(i)) = f.first() else { continue };
        let at = |j: usize| f.get(j).copied().flatten();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                out.insert(format!("system.gpu.{i}.{k}"), v);
            }
        };
        put("gpu", at(1));
        put("memory", at(2));
        if let (Some(used), Some(total)) = (at(3), at(4)) {
            put("memoryAllocated", Some(100.0 * used / total.max(1.0)));
            put("memoryAllocatedBytes", Some(used * (1u64 << 20) as f64));
        }
        put("temp", at(5));
        put("powerWatts", at(6));
        if let (Some(draw), Some(limit)) = (at(6), at(7)) {
            put("powerPercent", Some(100.0 * draw / limit.max(1e-9)));
        }
    }
    out
}

/// Takes samples; CPU use is measured between two of them.
#[derive(Default)]
pub struct Sampler {
    last_cpu: Option<(u64, u64)>,
    /// Whether to ask `nvidia-smi` (found on the PATH at start).
    pub gpus: bool,
}

impl Sampler {
    pub fn new() -> Self {
        let gpus = std::process::Command::new("nvidia-smi").arg("-L").output().is_ok_and(|o| o.status.success());
        Self { last_cpu: cpu_times(), gpus }
    }

    /// One sample: metric name -> value. Readings that fail are left out.
    pub fn sample(&mut self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if let (Some((b0, t0)), Some((b1, t1))) = (self.last_cpu, cpu_times()) {
            if t1 > t0 {
                out.insert("system.cpu".into(), 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64);
            }
        }
        self.last_cpu = cpu_times();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        if let (Ok(total), Ok(avail)) = (crate::memory::host_total_bytes(), crate::memory::host_available_bytes()) {
            out.insert("system.memory".into(), 100.0 * (1.0 - avail as f64 / total.max(1) as f64));
            out.insert("system.proc.memory.availableMB".into(), mib(avail));
        }
        if let Ok(rss) = crate::memory::rss_bytes() {
            out.insert("system.proc.memory.rssMB".into(), mib(rss));
        }
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            out.insert("system.proc.cpu.threads".into(), tasks.count() as f64);
        }
        if self.gpus {
            let smi = std::process::Command::new("nvidia-smi").args([GPU_QUERY, "--format=csv,noheader,nounits"]).output();
            if let Some(o) = smi.ok().filter(|o| o.status.success()) {
                out.extend(parse_gpu_lines(&String::from_utf8_lossy(&o.stdout)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_has_cpu_memory_and_the_process() {
        let mut s = Sampler { gpus: false, ..Sampler::new() };
        let x: f64 = (0..2_000_000).map(|i| (i as f64).sqrt()).sum(); // some CPU time between samples
        assert!(x > 0.0);
        let m = s.sample();
        for k in ["system.cpu", "system.memory", "system.proc.memory.rssMB", "system.proc.memory.availableMB", "system.proc.cpu.threads"] {
            assert!(m.contains_key(k), "{k} missing: {m:?}");
        }
        assert!((0.0..=100.0).contains(&m["system.cpu"]) && (0.0..=100.0).contains(&m["system.memory"]), "{m:?}");
        assert!(m["system.proc.memory.rssMB"] > 1.0 && m["system.proc.cpu.threads"] >= 1.0, "{m:?}");
        assert!(!m.keys().any(|k| k.starts_with("system.gpu")), "no GPU keys without a GPU");
    }

    #[test]
    fn nvidia_smi_lines_become_gpu_metrics() {
        // Two H200s as nvidia-smi prints them; the second cannot read its power.
        let m = parse_gpu_lines("0, 87, 41, 71680, 143771, 64, 512.33, 700.00\n1, 0, 0, 4, 143771, 31, [N/A], [N/A]\n");
        assert_eq!(m["system.gpu.0.gpu"], 87.0);
        assert_eq!(m["system.gpu.0.memory"], 41.0);
        assert!((m["system.gpu.0.memoryAllocated"] - 100.0 * 71680.0 / 143771.0).abs() < 1e-9);
        assert_eq!(m["system.gpu.0.memoryAllocatedBytes"], 71680.0 * 1048576.0);
        assert_eq!((m["system.gpu.0.temp"], m["system.gpu.0.powerWatts"]), (64.0, 512.33));
        assert!((m["system.gpu.0.powerPercent"] - 100.0 * 512.33 / 700.0).abs() < 1e-9);
        assert_eq!(m["system.gpu.1.temp"], 31.0);
        assert!(!m.contains_key("system.gpu.1.powerWatts") && !m.contains_key("system.gpu.1.powerPercent"));
        assert!(parse_gpu_lines("No devices were found\n").is_empty());
    }
}
