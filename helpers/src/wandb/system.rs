//! System metrics for the run page's System section, as the official client samples them:
//! `system.cpu` (percent of all cores busy since the last sample), `system.memory` (percent of the
//! host's memory in use), `system.proc.memory.rssMB`, `system.proc.memory.availableMB`,
//! `system.proc.cpu.threads`, and per visible CUDA device `system.gpu.<i>.memoryAllocated` (percent
//! of its memory in use) and `system.gpu.<i>.memoryAllocatedBytes`. They go up as lines of
//! `wandb-events.jsonl` (`{"_wandb": true, "_timestamp", "_runtime", "system.<k>": v}`). GPU
//! utilisation, temperature and power need NVML and are not sampled.
use std::collections::BTreeMap;

/// CPU time counters of /proc/stat's first line: (busy, total) jiffies.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum(); // user nice system idle iowait irq softirq steal
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Takes samples; CPU use is measured between two of them.
#[derive(Default)]
pub struct Sampler {
    last_cpu: Option<(u64, u64)>,
    /// CUDA devices to sample (none on a CPU machine).
    pub cuda_devices: usize,
}

impl Sampler {
    pub fn new() -> Self {
        Self { last_cpu: cpu_times(), cuda_devices: if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 } }
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
        for i in 0..self.cuda_devices {
            if let Ok((free, total)) = crate::memory::cuda_mem_info(i) {
                out.insert(format!("system.gpu.{i}.memoryAllocated"), 100.0 * (1.0 - free as f64 / total.max(1) as f64));
                out.insert(format!("system.gpu.{i}.memoryAllocatedBytes"), (total - free) as f64);
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
        let mut s = Sampler { cuda_devices: 0, ..Sampler::new() };
        let x: f64 = (0..2_000_000).map(|i| (i as f64).sqrt()).sum(); // some CPU time between samples
        assert!(x > 0.0);
        let m = s.sample();
        for k in ["system.cpu", "system.memory", "system.proc.memory.rssMB", "system.proc.memory.availableMB", "system.proc.cpu.threads"] {
            assert!(m.contains_key(k), "{k} missing: {m:?}");
        }
        assert!((0.0..=100.0).contains(&m["system.cpu"]) && (0.0..=100.0).contains(&m["system.memory"]), "{m:?}");
        assert!(m["system.proc.memory.rssMB"] > 1.0 && m["system.proc.cpu.threads"] >= 1.0, "{m:?}");
        assert!(!m.keys().any(|k| k.starts_with("system.gpu")), "no GPU keys without a CUDA device");
    }
}
