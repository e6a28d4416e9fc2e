"""Past one process (docs/distributed.md): the base experiment's program launched as 2 ranks on this
CPU (Gloo over 127.0.0.1), data parallel or expert parallel, trains as one process with the same
global batch; a rank that dies ends the other with a clear error, and the run resumes from its last
checkpoint exactly."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from test_program import ROOT, clean_env, rows, setup_sh

EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
# A validation split of this test session's own, so its data shards are not cached yet: the first
# launch makes them, which its ranks must do in turn rather than race to write the same files.
VAL_TOKENS = 20000 + os.getpid() % 5000
SHORT = ("model.num_hidden_layers=2 train.log_every=1 train.eval_every=2 train.eval_batches=2 train.ckpt_every=2 "
         f"train.grad_stats_every=2 train.interp_batches=1 train.sample_tokens=4 train.val_tokens={VAL_TOKENS}")
SHARDS = ROOT / "data" / "cache" / "shards"
SETTINGS = dict(MOE_PRESET="cpu", MOE_STEPS="6", MOE_DEVICE="cpu")
# Everything logged that does not depend on the clock, the process or the number of ranks.
COMPARED = ("train.loss", "train.base_loss", "train.aux_loss", "train.z_loss", "grad_norm", "grad_norm.experts",
            "val.loss", "val.accuracy", "tokens", "expert_usage.0.0", "expert_usage.1.5", "lr")


# Muon's Newton-Schulz iterations run in bf16 (8 bits of mantissa): the last-bit differences of a
# gradient summed in another order (two ranks' halves all-reduced, or two micro-batches accumulated
# in one process) can round differently there, and after a few steps the runs differ by up to ~5e-5
# relative (seen: aux_loss 1.2e-5, grad_norm.experts 5.1e-5 at steps 4-5). A wrong average or a
# missed gradient differs by whole percents.
REL = {"adamw": 1e-5, "muon": 2e-4}


def assert_same_training(a: list[dict], b: list[dict], what: str, rel: float = REL["adamw"]):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    n = 0
    for ra, rb in zip(a, b):
        for k in COMPARED:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), f"{what}: {k} at step {ra['step']}: {rb[k]} vs {ra[k]}"
                n += 1
    assert n > 30, n


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The same 6 steps as 2 ranks (1 micro-batch each) and as one process (2 micro-batches); the
    first launch makes this session's data shards."""
    tmp = tmp_path_factory.mktemp("dist")
    cached = set(SHARDS.glob("*")) if SHARDS.exists() else set()
    out = {}
    for opt in ("adamw", "muon"):
        sets = f"{SHORT} train.optimizer={opt}"
        two = tmp / f"{opt}-two"
        proc = setup_sh("launch", "--nproc", "2", str(EXPERIMENT), MOE_RUN_DIR=str(two),
                        MOE_SET=f"{sets} train.grad_accum_steps=1", **SETTINGS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        one = tmp / f"{opt}-one"
        proc = setup_sh("run", "--program", str(EXPERIMENT), MOE_RUN_DIR=str(one), MOE_THREADS="2",
                        MOE_SET=f"{sets} train.grad_accum_steps=2", **SETTINGS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[opt] = (one, two)
    made = (set(SHARDS.glob("*")) if SHARDS.exists() else set()) - cached
    logs = "".join(p.read_text() for p in (out["adamw"][1] / "ranks").rglob("*.log"))
    assert made and "half-written" not in logs, "the first launch made the shards, one rank at a time"
    yield out
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_two_ranks_train_as_one_process_with_the_same_batch(launched, opt):
    one, two = launched[opt]
    assert_same_training(rows(one), rows(two), f"{opt}: 2 ranks vs 1 process", REL[opt])
    r2 = rows(two)
    assert all(r["comm_time"] > 0 for r in r2 if "train.loss" in r), "the launch reports its time in collectives"
    assert all("comm_time" not in r for r in rows(one)), "one process has no collectives"
    # Rank 0 alone wrote the run; every rank's output is kept.
    assert (two / "checkpoints" / "latest").exists() and (two / "hf" / "config.json").exists()
    logs = sorted(p.parent.name for p in (two / "ranks").rglob("stdout.log"))
    assert logs == ["0", "1"], logs
    state = json.loads((two / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world_size"] == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_ends_the_run_and_it_resumes_exactly(launched, tmp_path):
    proc = setup_sh("build", str(EXPERIMENT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    binary = proc.stdout.strip().splitlines()[-1].split("built ")[1].split(";")[0]
    torch_lib = Path(subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import torch, os; print(os.path.dirname(torch.__file__))"],
                                    capture_output=True, text=True, check=True).stdout.strip()) / "lib"
    run = tmp_path / "killed"
    port = str(free_port())
    env = clean_env(**SETTINGS, MOE_RUN_DIR=str(run), MOE_SET=f"{SHORT} train.optimizer=adamw train.grad_accum_steps=1",
                    WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MOE_DIST_TIMEOUT="60",
                    LD_LIBRARY_PATH=str(torch_lib), WANDB_MODE="disabled")
    ranks = [subprocess.Popen([binary], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    # Kill rank 1 once the step-2 checkpoint is written (rank 0 is then inside step 3).
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step-00000002" / "state.json").exists():
        assert time.time() < deadline and ranks[0].poll() is None, "no checkpoint at step 2"
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    out0, _ = ranks[0].communicate(timeout=120)
    ranks[1].communicate()
    print(out0[-3000:])
    print(f"rank 0 stopped {time.time() - t0:.1f}s after rank 1 was killed")
    assert ranks[0].returncode != 0, "rank 0 must fail when rank 1 dies"
    assert "rank 0 of 2: all_reduce failed" in out0 and "Another rank probably stopped" in out0, out0[-2000:]
    # Resume with 2 ranks: the run continues from step 2 exactly as the uninterrupted launch did.
    proc = setup_sh("launch", "--nproc", "2", str(EXPERIMENT), MOE_RESUME=str(run), **SETTINGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert_same_training(rows(launched["adamw"][1]), rows(run), "resumed after a killed rank vs uninterrupted")
    # Resuming with another number of processes is refused, naming the one to use.
    proc = setup_sh("run", "--program", str(EXPERIMENT), MOE_RESUME=str(run), MOE_THREADS="2", **SETTINGS)
    assert proc.returncode != 0 and "resume it with the same number (bash setup.sh launch --nproc 2)" in proc.stdout + proc.stderr


def test_expert_parallel_trains_as_one_process(launched, tmp_path):
    """train.expert_parallel=2: each rank holds half the experts of every MoE layer, tokens go to
    their experts' rank and back. Losses, every expert's gradient norm, and the checkpoint (gathered
    whole stacks of weights and optimizer state) equal one process's with the same batch."""
    from safetensors.torch import load_file
    one = launched["adamw"][0]
    ep = tmp_path / "ep"
    proc = setup_sh("launch", "--nproc", "2", str(EXPERIMENT), MOE_RUN_DIR=str(ep),
                    MOE_SET=f"{SHORT} train.optimizer=adamw train.grad_accum_steps=1 train.expert_parallel=2", **SETTINGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "expert parallel over 2 ranks: this rank holds experts 0..=" in proc.stdout, proc.stdout[-3000:]
    a, b = rows(one), rows(ep)
    assert_same_training(a, b, "expert parallel vs 1 process")
    per_expert = [k for k in a[-1] if k.startswith("grad_norm.expert.")]
    assert len(per_expert) >= 8, sorted(a[-1])  # every expert of every MoE layer, gathered from both ranks
    for ra, rb in zip(a, b):
        for k in per_expert:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), f"{k} at step {ra['step']}"
    ck = lambda run: run / "checkpoints" / "step-00000006"
    files = sorted(p.name for p in ck(one).glob("*.safetensors"))
    assert files and files == sorted(p.name for p in ck(ep).glob("*.safetensors"))
    for f in files:
        x, y = load_file(ck(one) / f), load_file(ck(ep) / f)
        assert sorted(x) == sorted(y), f
        assert any(".mlp.experts." in k for k in x), f"{f} holds the whole expert stacks"
        for k in x:
            assert x[k].shape == y[k].shape, k
            diff = (x[k].double() - y[k].double()).abs().max().item() if x[k].numel() else 0.0
            assert diff <= 2e-5, f"{f}: {k} differs by {diff}"
    # After training rank 0 held the whole model: validation, analysis and the export ran.
    assert (ep / "hf" / "config.json").exists() and (ep / "routing" / "metrics.json").exists()
