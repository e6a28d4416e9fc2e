"""Sweeps (issue: a grid over config fields run headlessly, collected into a table and plots): the
real `bash setup.sh sweep --program` on a 2-point grid of a tiny model (each point the notebook's
program, which trains exactly as the notebook: tests/test_program.py), logged to a fake W&B server,
then the same command again, which finds both runs done. The grid parsing, the table and the plots on
hand-made run directories are tested in helpers/tests/sweep.rs."""
import csv
import json
import os
import struct
import subprocess
from pathlib import Path

from fake_wandb import KEY, FakeWandb
from test_notebooks import ROOT

# The cpu preset (D 128, E 8, K 2) narrowed to D 64, I 64; 2 steps of 2 x 64 tokens, one
# validation batch, a configured peak so MFU does not measure a GEMM first.
GRID = "model.num_hidden_layers=1,2"
TINY = ("model.hidden_size=64 model.intermediate_size=64 train.seq_len=64 train.micro_batch_size=2 "
        "train.eval_every=1 train.eval_batches=1 train.log_every=1 train.sample_tokens=2 train.peak_tflops=1")
ARGS = ["--program", "--preset", "cpu", "--steps", "2", "--grid", GRID, "--set", TINY, "--group", "sweep-test"]
NAMES = ["num_hidden_layers=1", "num_hidden_layers=2"]


def sweep(*args, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "setup.sh", "sweep", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:])
    print(proc.stderr[-3000:])
    return proc


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_sweep_runs_a_grid_in_one_wandb_group_collects_it_and_skips_finished_runs(tmp_path):
    fake = FakeWandb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_", "WANDB_"))}
    env.update(MOE_DEVICE="cpu", MOE_SECRETS=os.devnull, WANDB_API_KEY=KEY, WANDB_BASE_URL=fake.url,
               WANDB_PROJECT="moe-tests", WANDB_MODE="online")
    out = tmp_path / "sweep"
    try:
        first = sweep(*ARGS, "--out", str(out), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "sweep sweep-test: 2 run(s) of experiments/base-olmoe/experiment.ipynb as a program" in first.stdout
        assert "[1/2] num_hidden_layers=1: running" in first.stdout and "[2/2] num_hidden_layers=2: ok in" in first.stdout
        for name in NAMES:
            log = (out / name / "log.txt").read_text()
            assert "program finished; run dir" in log and "step     2 |" in log, "the program's output is in log.txt"
            assert json.loads((out / name / "sweep_run.json").read_text())["exit_code"] == 0

        # W&B: one run per point, all in the sweep's group, named <group>/<run>, with the point's config.
        assert fake.violations == []
        runs = {r["upserts"][0]["displayName"]: r for r in fake.runs.values()}
        assert sorted(runs) == [f"sweep-test/{n}" for n in NAMES]
        for name, r in runs.items():
            assert r["upserts"][0]["groupName"] == "sweep-test"
            assert r["upserts"][0]["config"]["model"]["value"]["num_hidden_layers"] == int(name[-1])
            assert r["upserts"][0]["config"]["model"]["value"]["hidden_size"] == 64
            assert r["complete"] == 0

        # The table: both rows in grid order, one more layer = one more MoE block of parameters.
        rows = list(csv.DictReader((out / "results.csv").open()))
        assert [r["run"] for r in rows] == NAMES and [r["model.num_hidden_layers"] for r in rows] == ["1", "2"]
        assert all(r["status"] == "ok" and r["tokens"] == "256" for r in rows)
        d, e, k, i = 64, 8, 2, 64
        attn = 4 * d * d + 4 * d  # q, k, v, o; q_norm, k_norm and the two block norms
        total, active = [int(r["parameters"]) for r in rows], [int(r["active_parameters"]) for r in rows]
        assert total[1] - total[0] == attn + e * d + e * 3 * d * i
        assert active[1] - active[0] == attn + e * d + k * 3 * d * i
        for r in rows:
            summary = json.loads((out / r["run"] / "summary.json").read_text())
            assert float(r["val_loss"]) == json.loads((out / r["run"] / "training_results.json").read_text())["final"]["val.loss"]
            assert int(r["parameters"]) == summary["parameters"] and 5 < float(r["val_loss"]) < 12
        table = (out / "results.md").read_text()
        assert table.splitlines()[0].startswith("| num_hidden_layers | status | params |") and len(table.splitlines()) == 4
        assert table in first.stdout, "the table is printed"
        assert png_size(out / "loss_vs_params.png") == (1200, 480)
        assert png_size(out / "loss_vs_tokens.png") == (960, 540)
        assert json.loads((out / "sweep.json").read_text())["grid"] == [{"key": "model.num_hidden_layers", "values": ["1", "2"]}]

        # The same command again (an interrupted sweep restarted): both runs are done, nothing runs.
        again = sweep(*ARGS, "--out", str(out), env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert all(f"{n}: skipped, already done" in again.stdout for n in NAMES)
        assert len(fake.runs) == 2 and all(len(r["upserts"]) == 1 for r in fake.runs.values())

        # Other fixed settings in the same directory would mix incomparable runs: an error.
        other = sweep("--out", str(out), "--steps", "3", env=env)
        assert other.returncode == 2 and "was started with different --steps" in other.stderr
    finally:
        fake.close()
