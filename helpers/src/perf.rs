//! Throughput accounting: model FLOPs per token (PaLM accounting, docs/performance.md) and a
//! matmul peak measured in this process, for an honest MFU on any machine.
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Training FLOPs per token: 6 * (matmul parameters a token touches) + 12 * L * D * T for
/// attention scores and values, halved because attention is causal (counted causal here).
pub fn train_flops_per_token(active_matmul_params: i64, layers: i64, hidden: i64, seq_len: i64) -> f64 {
    6.0 * active_matmul_params as f64 + 12.0 * (layers * hidden * seq_len) as f64 / 2.0
}

/// The peak a dense GEMM reaches here, in FLOP/s: known vendor figures for CUDA bf16 when the GPU
/// is recognised would overstate on a busy machine, so this measures an n x n x n matmul in `kind`
/// (best of `reps` after a warm-up) with the current thread count.
pub fn measure_gemm_peak(device: Device, kind: Kind, n: i64, reps: usize) -> f64 {
    tch::no_grad(|| {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let _ = a.matmul(&b);
        sync();
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            let c = a.matmul(&b);
            sync();
            let _ = c.size();
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * (n as f64).powi(3) / best
    })
}

/// The name of CUDA device `index` as the driver reports it (`nvidia-smi`), e.g. "NVIDIA H200";
/// None without a GPU or the tool.
pub fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi").args(["-i", &index.to_string(), "--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// The datasheet's dense peak of a GPU (by its driver name) in `kind`, FLOP/s, for an MFU that
/// compares with published figures (which use these peaks). Tensor-core bf16/fp16 without
/// sparsity only; None for other dtypes or GPUs not listed.
pub fn datasheet_peak_flops(gpu: &str, kind: Kind) -> Option<f64> {
    if !matches!(kind, Kind::BFloat16 | Kind::Half) {
        return None;
    }
    let g = gpu.to_ascii_uppercase();
    let tflops = if g.contains("H200") || g.contains("H100") && !g.contains("PCIE") {
        989.0 // H100 SXM / H200 (1979 is the sparsity figure)
    } else if g.contains("H100") {
        756.0 // H100 PCIe
    } else if g.contains("A100") {
        312.0
    } else if g.contains("L40S") {
        362.0
    } else {
        return None;
    };
    Some(tflops * 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasheet_peaks_are_the_dense_bf16_figures() {
        assert_eq!(datasheet_peak_flops("NVIDIA H200", Kind::BFloat16), Some(989e12));
        assert_eq!(datasheet_peak_flops("NVIDIA H100 80GB HBM3", Kind::BFloat16), Some(989e12));
        assert_eq!(datasheet_peak_flops("NVIDIA H100 PCIe", Kind::Half), Some(756e12));
        assert_eq!(datasheet_peak_flops("NVIDIA A100-SXM4-80GB", Kind::BFloat16), Some(312e12));
        assert_eq!(datasheet_peak_flops("NVIDIA H200", Kind::Float), None, "fp32 has no tensor-core figure here");
        assert_eq!(datasheet_peak_flops("Tesla T4", Kind::BFloat16), None);
    }
}
