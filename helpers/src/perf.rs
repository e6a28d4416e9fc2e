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
