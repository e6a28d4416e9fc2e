"""Data-parallel throughput on this machine: the base experiment's program as one process (every
core) and as `--nproc` ranks (`bash setup.sh launch`, the cores divided among them), with the same
global batch, interleaved `--repeats` times (machines are noisy). Prints tokens/s of the steps after
`--warmup` and the time per step spent in collectives; writes runs/bench/dist-<time>.json.

    bash setup.sh bench-dist [--nproc 2] [--steps 12] [--warmup 4] [--repeats 2] [--preset cpu]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NB = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"


def run(args, run_dir: Path, accum: int, launch: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update(MOE_PRESET=args.preset, MOE_STEPS=str(args.steps), MOE_DEVICE="cpu", MOE_RUN_DIR=str(run_dir),
               WANDB_MODE="disabled",
               MOE_SET=f"train.grad_accum_steps={accum} train.log_every=1 train.eval_every=100000 train.ckpt_every=0 "
                       "train.grad_stats_every=0 train.interp_batches=0 train.sample_tokens=1")
    cmd = ["bash", str(ROOT / "setup.sh")] + (["launch", "--nproc", str(args.nproc)] if launch else ["run", "--program"]) + [str(NB)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out (the allocator and caches settle)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", default="cpu")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    res = {"one": [], "launch": [], "comm": []}
    for i in range(args.repeats):
        for name, launch in (("one", False), ("launch", True)):
            rows = run(args, tmp / f"{name}-{i}", 1 if launch else args.nproc, launch)
            tok = statistics.median(r["tokens_per_s"] for r in rows)
            res[name].append(tok)
            if launch:
                res["comm"].append(statistics.median(r["comm_time"] / r["batch_time"] for r in rows))
            print(f"round {i + 1}: {'1 process' if not launch else f'{args.nproc} ranks'}: {tok:,.0f} tokens/s"
                  + (f", {res['comm'][-1]:.1%} of each step in collectives" if launch else ""), flush=True)
    one, many = statistics.median(res["one"]), statistics.median(res["launch"])
    print(f"\npreset {args.preset}, global batch of {args.nproc} micro-batches, steps {args.warmup + 1}..{args.steps}, "
          f"{args.repeats} interleaved rounds (medians), {os.cpu_count()} cores:")
    print(f"  1 process ({os.cpu_count()} threads): {one:,.0f} tokens/s")
    print(f"  {args.nproc} ranks (Gloo):          {many:,.0f} tokens/s ({many / one:.2f}x), "
          f"collectives {statistics.median(res['comm']):.1%} of a step")
    out = ROOT / "runs" / "bench" / f"dist-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "tokens_per_s": res, "cores": os.cpu_count()}, indent=1))
    print(f"  {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
