//! Memory: measurements of this process (Linux: resident set size now and its peak since the last
//! reset; on CUDA the device's used and total memory through the CUDA runtime libtorch loaded, see
//! [`cuda_mem_info`]), and [`estimate`]: what a training configuration needs per device before you
//! launch it.
use anyhow::{bail, Context, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// A "Field:   123 kB" line of a /proc file, in KiB.
fn proc_kib(file: &str, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(file).with_context(|| format!("cannot read {file} (Linux only)"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>()))
        .with_context(|| format!("no {field} in {file}"))?
        .with_context(|| format!("cannot parse {field}"))
}

fn status_kib(field: &str) -> Result<u64> {
    proc_kib("/proc/self/status", field)
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> Result<u64> {
    Ok(status_kib("VmRSS:")? * 1024)
}

/// Peak resident set size since the process started or since [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    Ok(status_kib("VmHWM:")? * 1024)
}

/// Resets the peak to the current RSS (writes 5 to /proc/self/clear_refs, Linux >= 4.0), after
/// handing memory that was freed but kept by the C allocator back to the system (`malloc_trim`):
/// otherwise the next peak would reuse it unseen and read low.
pub fn reset_peak_rss() -> Result<()> {
    // SAFETY: malloc_trim only releases free pages of glibc's heap.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak RSS (/proc/self/clear_refs)")
}

/// The model's shape, as far as memory is concerned (the notebook's `ModelConfig` fields).
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub vocab: i64,
    pub hidden: i64,
    pub layers: i64,
    pub experts: i64,
    pub top_k: i64,
    pub intermediate: i64,
    pub shared_experts: i64,
    pub dense_layers: i64,
    pub dense_intermediate: i64,
}

/// How the model is trained, as far as memory is concerned.
#[derive(Clone, Debug)]
pub struct TrainShape {
    pub micro_batch: i64,
    pub seq_len: i64,
    /// Bytes per element of weights, gradients and activations: 4 (fp32) or 2 (bf16).
    pub compute_bytes: i64,
    /// fp32 master weights kept by the optimizer (bf16-mixed).
    pub master_weights: bool,
    /// Fraction of parameters updated by Muon (one state buffer) instead of AdamW (two).
    pub muon_fraction: f64,
    pub activation_checkpointing: bool,
    /// Tokens per chunk of the fused cross-entropy (`train.loss_chunk`); 0 = full logits.
    pub loss_chunk: i64,
}

/// Bytes on one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceMemory {
    pub device: String,
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    /// The device's capacity, when known; the estimate warns above it.
    pub capacity: Option<f64>,
}

impl DeviceMemory {
    /// Peak estimate: weights and optimizer state always; during the backward pass activations are
    /// freed as gradients appear, so the larger of the two (plus a tenth of the other) counts.
    pub fn peak(&self) -> f64 {
        self.weights + self.optimizer + self.activations.max(self.gradients) + 0.1 * self.activations.min(self.gradients)
    }
}

/// A memory estimate per device (see [`estimate`]); `Display` prints the table and warnings.
#[derive(Clone, Debug)]
pub struct Estimate {
    pub devices: Vec<DeviceMemory>,
}

impl Estimate {
    /// Devices whose estimated peak exceeds their capacity.
    pub fn over_capacity(&self) -> Vec<&DeviceMemory> {
        self.devices.iter().filter(|d| d.capacity.is_some_and(|c| d.peak() > c)).collect()
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |b: f64| b / (1u64 << 30) as f64;
        if let [d] = self.devices.as_slice() {
            // one device: one line
            let cap = d.capacity.map_or(String::new(), |c| format!(" of {:.2} GiB", g(c)));
            writeln!(f, "memory estimate on {}: peak {:.3} GiB{cap} (weights {:.3} + gradients {:.3} + optimizer {:.3} + activations {:.3})",
                d.device, g(d.peak()), g(d.weights), g(d.gradients), g(d.optimizer), g(d.activations))?;
        } else {
            writeln!(f, "memory estimate (GiB):")?;
            writeln!(f, "{:10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}", "device", "weights", "gradients", "optimizer", "activations", "peak", "capacity")?;
            for d in &self.devices {
                let cap = d.capacity.map_or("?".to_string(), |c| format!("{:.2}", g(c)));
                writeln!(f, "{:10} {:10.3} {:10.3} {:10.3} {:12.3} {:10.3} {:>10}", d.device, g(d.weights), g(d.gradients), g(d.optimizer), g(d.activations), g(d.peak()), cap)?;
            }
        }
        for d in self.over_capacity() {
            writeln!(f, "WARNING: {} needs about {:.2} GiB but has {:.2} GiB: lower micro_batch_size, turn on activation_checkpointing, or place experts on more devices", d.device, g(d.peak()), g(d.capacity.unwrap_or(0.0)))?;
        }
        Ok(())
    }
}

/// Estimates memory per device for training `m` with `t`. `expert_devices[e]` is the index into
/// `devices` of expert e (all on `devices[0]` when empty); everything else (embeddings, attention,
/// router, shared experts, dense layers, head) is on `devices[0]`, as the notebook places it.
/// Activations are counted from what autograd keeps per token in the notebook's forward (fp32
/// norms and router, the K-fold token stream through the experts, the fp32 logits and their
/// log-softmax or, fused, one chunk of them); with activation checkpointing only block inputs plus
/// one block's activations.
pub fn estimate(m: &ModelShape, t: &TrainShape, devices: &[(String, Option<f64>)], expert_devices: &[usize]) -> Result<Estimate> {
    estimate_with_params(m, t, devices, expert_devices, None)
}

/// [`estimate`], with the parameters on each device (one count per entry of `devices`) counted from
/// the model as built rather than from the shape's formula: a copy of the notebook that adds
/// parameters is counted right without editing this crate. Activations still follow the shape.
pub fn estimate_with_params(m: &ModelShape, t: &TrainShape, devices: &[(String, Option<f64>)], expert_devices: &[usize], params: Option<&[f64]>) -> Result<Estimate> {
    anyhow::ensure!(!devices.is_empty(), "no devices given");
    anyhow::ensure!(
        expert_devices.is_empty() || expert_devices.len() as i64 == m.experts,
        "the expert map has {} entries for {} experts",
        expert_devices.len(),
        m.experts
    );
    anyhow::ensure!(expert_devices.iter().all(|&d| d < devices.len()), "the expert map names a device beyond the {} given", devices.len());
    let (d, s, tokens) = (m.hidden as f64, t.compute_bytes as f64, (t.micro_batch * t.seq_len) as f64);
    let (i, k, e) = (m.intermediate as f64, m.top_k as f64, m.experts as f64);
    let moe_layers = (m.layers - m.dense_layers) as f64;
    let expert_params = 3.0 * d * i; // one expert's gate, up, down
    let attn_params = 4.0 * d * d + 4.0 * d;
    let primary_params = 2.0 * m.vocab as f64 * d
        + d
        + m.layers as f64 * attn_params
        + moe_layers * (e * d + m.shared_experts as f64 * expert_params)
        + m.dense_layers as f64 * 3.0 * d * m.dense_intermediate as f64;
    // Per parameter: weights (+ fp32 master), gradients, optimizer state in the master dtype.
    let state_bytes = if t.master_weights { 4.0 } else { s };
    let opt_per_param = (2.0 - t.muon_fraction) * state_bytes + if t.master_weights { 4.0 } else { 0.0 };
    // Activations per token of one block (bytes): attention ~13 D (norm in fp32 ~3 D x 4 B), MoE
    // block: norm, router logits + probs (fp32), gathered tokens, 4 K I (gate, up, silu, product),
    // 3 K D (down, scaled, un-permuted).
    let attn_act = 10.0 * d * s + 3.0 * d * 4.0;
    let moe_act = 3.0 * d * 4.0 + 2.0 * e * 4.0 + (4.0 * k * d + 4.0 * k * i) * s + m.shared_experts as f64 * (4.0 * i + d) * s;
    let dense_act = 3.0 * d * 4.0 + (4.0 * m.dense_intermediate as f64 + d) * s;
    // Final norm; unfused: fp32 logits and log-softmax, and at the start of the backward pass their
    // gradients. Fused: the head's input gradient per token, and once: one chunk's fp32 logits (and
    // a temporary of the same size) and the head's weight gradient (fp32 sum, then its cast).
    let v = m.vocab as f64;
    let (head_act, head_once) = if t.loss_chunk > 0 {
        (3.0 * d * 4.0 + 2.0 * d * s, 2.0 * (t.loss_chunk as f64).min(tokens) * v * 4.0 + v * d * (4.0 + s))
    } else {
        (3.0 * d * 4.0 + 4.0 * v * 4.0, 0.0)
    };
    let block_act = |moe: bool| attn_act + if moe { moe_act } else { dense_act };
    let all_blocks = moe_layers * block_act(true) + m.dense_layers as f64 * block_act(false);
    let acts_per_token = if t.activation_checkpointing {
        m.layers as f64 * d * s + block_act(moe_layers > 0.0) + head_act
    } else {
        all_blocks + head_act
    };

    let mut out: Vec<DeviceMemory> = devices.iter().map(|(n, c)| DeviceMemory { device: n.clone(), capacity: *c, ..Default::default() }).collect();
    let add_params = |dm: &mut DeviceMemory, n: f64| {
        dm.weights += n * s;
        dm.gradients += n * s;
        dm.optimizer += n * opt_per_param;
    };
    if let Some(params) = params {
        anyhow::ensure!(params.len() == devices.len(), "{} parameter counts for {} devices", params.len(), devices.len());
        for (dm, n) in out.iter_mut().zip(params) {
            add_params(dm, *n);
        }
    } else {
        add_params(&mut out[0], primary_params);
    }
    out[0].activations += tokens * acts_per_token + head_once;
    for j in 0..m.experts as usize {
        let dev = expert_devices.get(j).copied().unwrap_or(0);
        if params.is_none() {
            add_params(&mut out[dev], moe_layers * expert_params);
        }
        if dev != 0 {
            // This expert's share of the expert activations lives where it runs.
            let per_expert = tokens * k / e * moe_layers * (4.0 * i + 3.0 * d) * s;
            out[dev].activations += per_expert;
            out[0].activations -= per_expert;
        }
    }
    Ok(Estimate { devices: out })
}

/// The estimate for a model as built: its parameters by device (`named`: the trainable tensors, placed
/// experts' shards on their devices), `primary` the training device, `expert_devices[e]` the device of
/// routed expert e (empty: all on `primary`). Capacity: the host's memory on CPU; a GPU's total as the
/// driver reports it, or `MOE_DEVICE_MEMORY_GIB` to budget less (a GPU shared with other jobs).
pub fn estimate_built(m: &ModelShape, t: &TrainShape, named: &[(String, tch::Tensor)], primary: tch::Device, expert_devices: &[tch::Device]) -> Result<Estimate> {
    let budget = std::env::var("MOE_DEVICE_MEMORY_GIB").ok().and_then(|v| v.parse::<f64>().ok()).map(|gib| gib * (1u64 << 30) as f64);
    let capacity = |d: &tch::Device| match d {
        tch::Device::Cuda(i) => budget.or_else(|| cuda_mem_info(*i).ok().map(|(_, total)| total as f64)),
        _ => host_total_bytes().ok().map(|b| b as f64),
    };
    let mut devices = vec![primary];
    for d in expert_devices.iter().chain(named.iter().map(|(_, t)| t.device()).collect::<Vec<_>>().iter()) {
        if !devices.contains(d) {
            devices.push(*d);
        }
    }
    let expert_ix: Vec<usize> = expert_devices.iter().map(|d| devices.iter().position(|x| x == d).unwrap()).collect();
    let named_devices: Vec<(String, Option<f64>)> = devices.iter().map(|d| (crate::runtime::device_name(*d), capacity(d))).collect();
    let params: Vec<f64> = devices.iter().map(|d| named.iter().filter(|(_, t)| t.device() == *d).map(|(_, t)| t.numel() as f64).sum()).collect();
    estimate_with_params(m, t, &named_devices, &expert_ix, Some(&params))
}

/// The measured memory to log next to the estimate, for `devices` (the training device first): with
/// training on the CPU the process's peak RSS (`memory.peak_rss_gib`); on each GPU the driver's used memory
/// (`memory.cuda_used_gib.N`), which is the caching allocator's reserved peak (it keeps what it
/// reserved) plus the CUDA context (and any other process on that GPU).
pub fn measured(devices: &[tch::Device]) -> Vec<(String, f64)> {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut out = Vec::new();
    if devices.first().is_some_and(|d| !d.is_cuda()) {
        if let Ok(peak) = peak_rss_bytes() {
            out.push(("memory.peak_rss_gib".to_string(), gib(peak as f64)));
        }
    }
    let mut gpus: Vec<usize> = devices.iter().filter_map(|d| match d { tch::Device::Cuda(i) => Some(*i), _ => None }).collect();
    gpus.sort();
    gpus.dedup();
    for i in gpus {
        if let Ok((free, total)) = cuda_mem_info(i) {
            out.push((format!("memory.cuda_used_gib.{i}"), gib((total - free) as f64)));
        }
    }
    out
}

/// Total memory of this machine in bytes (`MemTotal` of /proc/meminfo).
pub fn host_total_bytes() -> Result<u64> {
    Ok(proc_kib("/proc/meminfo", "MemTotal:")? * 1024)
}

/// Memory available to new allocations on this host (`MemAvailable` of /proc/meminfo), in bytes.
pub fn host_available_bytes() -> Result<u64> {
    Ok(proc_kib("/proc/meminfo", "MemAvailable:")? * 1024)
}

/// The CUDA runtime's sonames, newest first; libtorch 2.13's CUDA wheels bring libcudart.so.13.
const CUDART: [&str; 4] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"];

/// Free and total memory of CUDA device `index` in bytes, as the driver reports them
/// (`cudaMemGetInfo`), through the CUDA runtime libtorch already loaded into this process (tch binds
/// no allocator statistics). Used = total - free is device-wide: this process's CUDA context and
/// everything libtorch's caching allocator holds (which it keeps once reserved, so used memory read
/// after the first steps is the reserved peak), plus other processes on the same GPU.
/// Errors on a machine without a usable GPU, or when no CUDA runtime is loaded (call
/// `runtime::init` first, which loads libtorch_cuda and with it the runtime).
pub fn cuda_mem_info(index: usize) -> Result<(u64, u64)> {
    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
    // SAFETY: RTLD_NOLOAD returns a handle only to a library already mapped (libtorch's own CUDA
    // runtime, never a second copy); the symbols are the CUDA runtime's documented C API with
    // these signatures; the handle stays open (the library is never unloaded while libtorch lives).
    unsafe {
        let handle = CUDART
            .iter()
            .map(|n| CString::new(*n).unwrap())
            .map(|n| libc::dlopen(n.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD))
            .find(|h| !h.is_null())
            .context("no CUDA runtime (libcudart) is loaded in this process: CPU-only libtorch, or runtime::init not called yet")?;
        let sym = |name: &str| -> Result<*mut c_void> {
            let c = CString::new(name).unwrap();
            let p = libc::dlsym(handle, c.as_ptr());
            if p.is_null() {
                bail!("the loaded CUDA runtime has no {name}");
            }
            Ok(p)
        };
        let get_device: GetDevice = std::mem::transmute(sym("cudaGetDevice")?);
        let set_device: SetDevice = std::mem::transmute(sym("cudaSetDevice")?);
        let mem_get_info: MemGetInfo = std::mem::transmute(sym("cudaMemGetInfo")?);
        let error_string: ErrorString = std::mem::transmute(sym("cudaGetErrorString")?);
        let check = |code: c_int, what: &str| -> Result<()> {
            if code != 0 {
                let msg = CStr::from_ptr(error_string(code)).to_string_lossy();
                bail!("cuda:{index}: {what} failed: {msg} (error {code})");
            }
            Ok(())
        };
        let mut previous: c_int = 0;
        check(get_device(&mut previous), "cudaGetDevice")?;
        check(set_device(index as c_int), "cudaSetDevice")?;
        let (mut free, mut total) = (0usize, 0usize);
        let result = check(mem_get_info(&mut free, &mut total), "cudaMemGetInfo");
        // Give the thread its device back: libtorch's device guards assume nobody else switches it.
        check(set_device(previous), "cudaSetDevice (restoring)")?;
        result?;
        Ok((free as u64, total as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_is_one_line_several_a_table() {
        let dev = |name: &str, cap| DeviceMemory { device: name.into(), capacity: cap, weights: (1u64 << 30) as f64, gradients: (1u64 << 30) as f64, optimizer: 0.0, activations: 0.0 };
        let one = Estimate { devices: vec![dev("cpu", Some(16.0 * (1u64 << 30) as f64))] }.to_string();
        assert_eq!(one, "memory estimate on cpu: peak 2.000 GiB of 16.00 GiB (weights 1.000 + gradients 1.000 + optimizer 0.000 + activations 0.000)\n");
        let two = Estimate { devices: vec![dev("cuda:0", None), dev("cuda:1", None)] }.to_string();
        assert_eq!(two.lines().count(), 4, "{two}");
        assert!(two.starts_with("memory estimate (GiB):\ndevice"), "{two}");
        assert!(two.lines().nth(3).unwrap().starts_with("cuda:1"), "{two}");
    }

    #[test]
    fn proc_figures_are_read_and_consistent() {
        let (total, available) = (host_total_bytes().unwrap(), host_available_bytes().unwrap());
        assert!(0 < available && available <= total, "available {available}, total {total}");
        let (rss, peak) = (rss_bytes().unwrap(), peak_rss_bytes().unwrap());
        assert!(0 < rss && rss <= peak, "rss {rss}, peak {peak}");
        let e = proc_kib("/proc/meminfo", "NoSuchField:").unwrap_err().to_string();
        assert_eq!(e, "no NoSuchField: in /proc/meminfo");
    }

    #[test]
    fn counted_parameters_replace_the_formula() {
        let m = ModelShape { vocab: 1000, hidden: 64, layers: 2, experts: 4, top_k: 2, intermediate: 32, shared_experts: 0, dense_layers: 0, dense_intermediate: 0 };
        let t = TrainShape { micro_batch: 2, seq_len: 16, compute_bytes: 4, master_weights: false, muon_fraction: 0.0, activation_checkpointing: false, loss_chunk: 0 };
        let devs = [("cpu".to_string(), None), ("cpu:experts".to_string(), None)];
        let placed = [1usize; 4];
        let formula = estimate(&m, &t, &devs, &placed).unwrap();
        // The formula's own counts, given per device, give the same estimate.
        let (d, e, i) = (64.0, 4.0, 32.0);
        let primary = 2.0 * 1000.0 * d + d + 2.0 * (4.0 * d * d + 4.0 * d) + 2.0 * (e * d);
        let experts = 2.0 * e * 3.0 * d * i;
        let counted = estimate_with_params(&m, &t, &devs, &placed, Some(&[primary, experts])).unwrap();
        for (a, b) in formula.devices.iter().zip(&counted.devices) {
            assert_eq!((a.weights, a.optimizer, a.activations), (b.weights, b.optimizer, b.activations));
        }
        // A copy with a million more parameters on the first device is counted with them.
        let more = estimate_with_params(&m, &t, &devs, &placed, Some(&[primary + 1e6, experts])).unwrap();
        assert_eq!(more.devices[0].weights - counted.devices[0].weights, 4e6);
        assert!(estimate_with_params(&m, &t, &devs, &placed, Some(&[1.0])).unwrap_err().to_string().contains("1 parameter counts for 2 devices"));
    }
}
