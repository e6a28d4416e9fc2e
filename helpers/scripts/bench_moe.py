#!/usr/bin/env python3
"""The speed benchmark: the base notebook's model against Hugging Face transformers, in one run.

    bash setup.sh bench [--presets cpu,cpu-e64,cpu-moe] [--repeats 5] [--steps 3] [--threads N] [--baseline REV]

One invocation, one machine, one thread count. The Rust side is the experiment notebook's own
config and model cells, running in a live Rust (evcxr) kernel; the Python side is transformers'
OlmoeForCausalLM with the same shapes in this process. Rounds are interleaved (Rust, then each
transformers variant, then the next round) and the median of `--repeats` rounds is reported:
(a) the full training step (forward, cross-entropy + load-balancing loss, backward, AdamW step):
    the notebook (expert path `auto`, fused cross-entropy; also with the logits' cross-entropy) vs transformers with each experts implementation (`eager`,
    `batched_mm`, `grouped_mm`), tokens/s and ratios against the faster and the eager one;
(b) the MoE layer forward+backward vs a dense SwiGLU with the same active FLOPs (intermediate
    size K x I): the MoE overhead ratio; and vs transformers' OlmoeSparseMoeBlock;
(c) MFU against a GEMM peak measured in the same process, in the compute dtype.
Routing is the router's own (random init) unless `--balanced`. `--baseline REV` also runs the base
notebook as it was at git revision REV in a second kernel, in the same rounds (before/after figures of
a change, interleaved). Prints a table (with each kernel's peak RSS: the training step's memory) and
writes the figures as JSON (runs/bench/moe-<time>.json).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from hf_bench import hf_moe_layer, hf_train_step  # this folder
from nbcells import section

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
MARK = "@@bench@@"

# name: (hidden D, layers L, heads, experts E, top-k K, expert intermediate I[, vocab V]); vocab 50304 as OLMoE.
PRESETS = {
    "cpu": (128, 4, 4, 8, 2, 256),          # the notebook's CPU preset
    "cpu-e64": (128, 4, 4, 64, 8, 64),      # OLMoE's routing (64 experts, top-8, I = D/2) at CPU width
    # OLMoE's granularity where the experts dominate the step: an 8k vocabulary (cpu-e64 spends ~85%
    # of its step in the 50k-row LM head), 8 layers of 64 experts, top-8, I = D/2.
    "cpu-moe": (256, 8, 4, 64, 8, 128, 8192),
    "seed-newer-base": (768, 12, 12, 64, 8, 384),
    "olmoe-1b-7b": (2048, 16, 16, 64, 8, 1024),
}

RUST_BENCH = r'''
fn bench_sync(device: Device) { if device.is_cuda() { tch::Cuda::synchronize(0); } }

fn bench_cfg(p: &[i64], balanced: bool) -> ModelConfig {
    ModelConfig { hidden_size: p[0], num_hidden_layers: p[1], num_attention_heads: p[2], num_experts: p[3], num_experts_per_tok: p[4],
                  intermediate_size: p[5], vocab_size: p.get(6).copied().unwrap_or(50304), max_position_embeddings: 4096,
                  debug_balanced_routing: balanced, ..ModelConfig::olmoe_1b_7b() }
}

/// Seconds per training step (the notebook's `forward_backward`: forward, CE + 0.01 x load balancing,
/// backward; then AdamW), median of `steps` after `warmup` untimed steps. `loss_chunk` > 0: the notebook's fused
/// cross-entropy in chunks of that many tokens; 0: logits, then cross-entropy.
fn bench_train_step(cfg: &ModelConfig, b: i64, t: i64, warmup: usize, steps: usize, device: Device, kind: Kind, loss_chunk: i64) -> f64 {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let model = OlmoeForCausalLM::new(&vs, cfg);
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut opt = helpers::optim::Optimizer::new(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone(), helpers::optim::Rule::AdamW)).collect(),
        helpers::optim::OptimConfig { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, muon_lr: 0.0, muon_momentum: 0.95,
                                      muon_nesterov: true, muon_ns_steps: 5, muon_weight_decay: 0.0 }).unwrap();
    if kind != Kind::Float { opt.cast_params(kind, true); }
    let x = Tensor::randint_low(2, cfg.vocab_size.min(50000), [b, t + 1], (Kind::Int64, device));
    let c = TrainConfig { loss_chunk, activation_checkpointing: false, z_loss_coef: 0.0, load_balancing_norm: LoadBalancingNorm::Transformers, ..TrainConfig::olmoe() };
    let (inp, tgt) = (x.narrow(1, 0, t), x.narrow(1, 1, t));
    let mut times = Vec::new();
    for s in 0..warmup + steps {
        bench_sync(device);
        let t0 = std::time::Instant::now();
        opt.zero_grad();
        let _ = forward_backward(&model, &inp, &tgt, &c, 0.01, 1.0, false, false);
        opt.step(1.0);
        bench_sync(device);
        if s >= warmup { times.push(t0.elapsed().as_secs_f64()); }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

/// Seconds for forward + backward of one MoE layer and of a dense SwiGLU with intermediate K x I.
fn bench_layers(cfg: &ModelConfig, n: i64, warmup: usize, steps: usize, device: Device, kind: Kind) -> (f64, f64) {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(device);
    let moe = SparseMoeBlock::new(&(vs.root() / "moe"), cfg);
    let dense = Mlp::new(&(vs.root() / "dense"), cfg.hidden_size, cfg.num_experts_per_tok * cfg.intermediate_size, cfg);
    if kind != Kind::Float { vs.set_kind(kind); }
    let x = Tensor::randn([1, n, cfg.hidden_size], (kind, device)).set_requires_grad(true);
    let g = Tensor::randn([1, n, cfg.hidden_size], (kind, device));
    let time = |f: &dyn Fn() -> Tensor| {
        let mut times = Vec::new();
        for s in 0..warmup + steps {
            bench_sync(device);
            let t0 = std::time::Instant::now();
            (f() * &g).sum(Kind::Float).backward();
            bench_sync(device);
            if s >= warmup { times.push(t0.elapsed().as_secs_f64()); }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        times[times.len() / 2]
    };
    (time(&|| moe.forward(&x).0), time(&|| dense.forward(&x)))
}

fn bench_round(p: &[i64], balanced: bool, b: i64, t: i64, warmup: usize, steps: usize, device: Device, kind: Kind) {
    let cfg = bench_cfg(p, balanced);
    let _ = helpers::memory::reset_peak_rss();
    let step_s = bench_train_step(&cfg, b, t, warmup, steps, device, kind, TrainConfig::olmoe().loss_chunk);
    let rss = helpers::memory::peak_rss_bytes().unwrap_or(0); // the training step's peak (weights, optimizer, activations)
    let plain_s = bench_train_step(&cfg, b, t, warmup, steps, device, kind, 0);
    let (moe_s, dense_s) = bench_layers(&cfg, b * t, warmup, steps, device, kind);
    let (_, active) = cfg.param_counts();
    let flops = helpers::perf::train_flops_per_token(active - cfg.vocab_size * cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size, t);
    println!("@@bench@@{}", serde_json::json!({"step_s": step_s, "step_plain_ce_s": plain_s, "moe_layer_s": moe_s, "dense_layer_s": dense_s, "flops_per_token": flops, "peak_rss_bytes": rss}));
}

fn bench_peak(device: Device, kind: Kind) {
    let n = if device.is_cuda() { 8192 } else { 1024 };
    println!("@@bench@@{}", serde_json::json!({"peak_flops": helpers::perf::measure_gemm_peak(device, kind, n, 3)}));
}
'''


def rust_json(cell) -> dict:
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    for line in text.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"the Rust benchmark cell printed no result:\n{text[-3000:]}")


class RustSide:
    """The experiment's deps, config, model, optimizer and training-step cells plus the benchmark
    functions, in one live kernel. `notebook`: the experiment's notebook, or a version of it."""

    def __init__(self, env: dict, notebook: Path = EXPERIMENT):
        src = nbformat.read(notebook, as_version=4)
        codes = [c.source for c in src.cells if c.cell_type == "code"]
        sections = ["## Configuration", "## Model", "## Optimizer, precision, resume", "## Training step"]
        setup = [":preserve_vars_on_panic 0\n" + codes[0], *(section(src.cells, s) for s in sections), RUST_BENCH]
        self.nb = nbformat.v4.new_notebook(metadata=src.metadata)
        os.environ.update(env)
        self.client = NotebookClient(self.nb, kernel_name="rust", timeout=-1, startup_timeout=600,
                                     resources={"metadata": {"path": str(EXPERIMENT.parent)}})
        self.ctx = self.client.setup_kernel()
        self.ctx.__enter__()
        for s in setup:
            self.run(s)

    def run(self, source: str):
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        if errors:
            raise RuntimeError("Rust cell failed: " + "\n".join(errors[0].get("traceback", []))[-3000:])
        return cell

    def close(self):
        self.ctx.__exit__(None, None, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="cpu,cpu-e64", help=f"comma-separated, of: {', '.join(PRESETS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round (after --warmup), median taken")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first, on both sides: on CPU a step reaches its "
                    "steady speed only after a few (the allocator settles: the first steps ran 1.2-2x slower)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--balanced", action="store_true", help="round-robin routing on both sides is not available in "
                    "transformers; applies to the notebook only, reported as such")
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm", help="transformers experts implementations")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--baseline", metavar="REV", help="also run the base notebook as it was at this git revision, interleaved")
    args = ap.parse_args()
    presets = args.presets.split(",")
    for p in presets:
        if p not in PRESETS:
            sys.exit(f"bench: unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    rkind = "Kind::BFloat16" if cuda else "Kind::Float"
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    print(f"bench: presets {presets}, batch {args.batch} x {args.seq} tokens, {args.threads} threads, device {device}, "
          f"{'bf16' if cuda else 'fp32'}, {args.repeats} interleaved rounds of {args.warmup} warm-up + {args.steps} timed steps; "
          f"torch {torch.__version__}", flush=True)
    env = {"MOE_THREADS": str(args.threads), "MOE_DEVICE": args.device, "MOE_PRESET": "cpu", "MOE_RUN_DIR": str(ROOT / "runs" / "bench" / "kernel")}
    baseline_nb = None
    if args.baseline:
        # The notebook as it was, in the experiment's folder (same relative :dep paths), current helpers.
        old = subprocess.run(["git", "show", f"{args.baseline}:experiments/base-olmoe/experiment.ipynb"], cwd=ROOT, capture_output=True, text=True)
        if old.returncode != 0:
            sys.exit(f"bench: cannot read the base notebook at {args.baseline}: {old.stderr.strip()}")
        baseline_nb = EXPERIMENT.parent / ".bench-baseline.ipynb"
        baseline_nb.write_text(old.stdout)
    sides = {"rust": RustSide(env)}
    if baseline_nb:
        sides[f"rust@{args.baseline}"] = RustSide(env, baseline_nb)
    rust = sides["rust"]
    results = {}
    try:
        rdev = "Device::Cuda(0)" if cuda else "Device::Cpu"
        peak = rust_json(rust.run(f"bench_peak({rdev}, {rkind});"))["peak_flops"]
        print(f"GEMM peak measured in the kernel: {peak / 1e12:.3f} TFLOP/s", flush=True)
        for name in presets:
            p = PRESETS[name]
            runs = {**{k: [] for s in sides for k in (s, f"{s}:plain-ce")}, **{f"hf:{i}": [] for i in impls}}
            layer = {**{k: [] for s in sides for k in (f"{s}_moe", f"{s}_dense")}, **{f"hf_moe:{i}": [] for i in impls}}
            rss = {s: [] for s in sides}
            for r in range(args.repeats):
                for s, side in sides.items():
                    out = rust_json(side.run(f"bench_round(&{list(p)}, {str(args.balanced).lower()}, {args.batch}, {args.seq}, {args.warmup}, {args.steps}, {rdev}, {rkind});"))
                    runs[s].append(out["step_s"])
                    runs[f"{s}:plain-ce"].append(out["step_plain_ce_s"])
                    layer[f"{s}_moe"].append(out["moe_layer_s"])
                    layer[f"{s}_dense"].append(out["dense_layer_s"])
                    rss[s].append(out["peak_rss_bytes"])
                    if s == "rust":
                        flops = out["flops_per_token"]
                for i in impls:
                    runs[f"hf:{i}"].append(hf_train_step(p, i, args.batch, args.seq, args.steps, device, dtype, warmup=args.warmup))
                    layer[f"hf_moe:{i}"].append(hf_moe_layer(p, i, args.batch * args.seq, args.steps, device, dtype, warmup=args.warmup))
                print(f"  {name} round {r + 1}/{args.repeats}: " + ", ".join(f"{s} {runs[s][-1]:.3f}s/step (plain CE {runs[s + ':plain-ce'][-1]:.3f}s)" for s in sides) + ", "
                      + ", ".join(f"{i} {runs[f'hf:{i}'][-1]:.3f}s" for i in impls), flush=True)
            tokens = args.batch * args.seq
            med = {k: statistics.median(v) for k, v in runs.items()}
            lmed = {k: statistics.median(v) for k, v in layer.items()}
            fastest = min(impls, key=lambda i: med[f"hf:{i}"])
            results[name] = {
                "shape": dict(zip(["hidden", "layers", "heads", "experts", "top_k", "intermediate", "vocab"], p)),
                "step_peak_rss_bytes": {s: max(v) for s, v in rss.items()},
                "tokens_per_step": tokens, "flops_per_token": flops,
                "train_step": {k: {"median_s": v, "tokens_per_s": tokens / v, "mfu": tokens / v * flops / peak,
                                   "rounds_s": runs[k]} for k, v in med.items()},
                "fastest_transformers": fastest,
                "speedup_vs_fastest_transformers": med[f"hf:{fastest}"] / med["rust"],
                "speedup_vs_eager_transformers": med["hf:eager"] / med["rust"] if "eager" in impls else None,
                "moe_layer": {k: {"median_s": v, "rounds_s": layer[k]} for k, v in lmed.items()},
                "moe_overhead_ratio": lmed["rust_moe"] / lmed["rust_dense"],
                "moe_overhead_ratio_by_kernel": {s: lmed[f"{s}_moe"] / lmed[f"{s}_dense"] for s in sides},
                "moe_layer_speedup_vs_transformers": {i: lmed[f"hf_moe:{i}"] / lmed["rust_moe"] for i in impls},
            }
    finally:
        for side in sides.values():
            side.close()
        if baseline_nb:
            baseline_nb.unlink()

    print(f"\n{'preset':10} {'implementation':28} {'tokens/s':>10} {'MFU':>7} {'ours is':>10}")
    for name, r in results.items():
        for k, v in r["train_step"].items():
            label = (f"transformers {k[3:]}" if k.startswith("hf:") else
                     ("notebook" + k[4:].split(":")[0]) + (", unfused CE" if k.endswith(":plain-ce") else " (auto)"))
            ratio = r["train_step"][k]["median_s"] / r["train_step"]["rust"]["median_s"]
            print(f"{name:10} {label:28} {v['tokens_per_s']:10,.0f} {v['mfu'] * 100:6.1f}% {ratio:9.2f}x")
    print(f"\n{'preset':10} {'MoE layer fwd+bwd':28} {'ms':>10} {'vs dense':>9}")
    for name, r in results.items():
        dense = r["moe_layer"]["rust_dense"]["median_s"]
        for k, v in r["moe_layer"].items():
            print(f"{name:10} {k:28} {v['median_s'] * 1e3:10.2f} {v['median_s'] / dense:8.2f}x")
        print(f"{name:10} MoE overhead ratio (notebook MoE / dense SwiGLU, same active FLOPs): {r['moe_overhead_ratio']:.2f}; "
              f"full step {r['speedup_vs_fastest_transformers']:.2f}x the fastest transformers ({r['fastest_transformers']})")
        for s, x in r["moe_overhead_ratio_by_kernel"].items():
            if s != "rust":
                print(f"{name:10} MoE overhead ratio, {'notebook' + s[4:]}: {x:.2f}")
        for s, b in r["step_peak_rss_bytes"].items():
            print(f"{name:10} peak RSS of the training step, {'notebook' + s[4:]}: {b / 2**30:.3f} GiB")
    out = args.json or ROOT / "runs" / "bench" / f"moe-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "threads": args.threads, "batch": args.batch, "seq": args.seq,
                               "repeats": args.repeats, "warmup": args.warmup, "steps": args.steps, "balanced_routing_notebook": args.balanced,
                               "peak_flops": peak, "torch": torch.__version__, "results": results}, indent=1))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
