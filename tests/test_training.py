"""The base notebook's training loop (issue: a training loop researchers can leave running for a
week): exact resume after SIGKILL, non-finite handling, the generate command, and, in a notebook
made of the experiment's own cells plus one test cell, activation checkpointing (same gradients,
lower peak memory), bf16 mixed precision on CPU, Muon's parameter split and the KV cache.

The reference run executes the notebook in the kernel; the runs that are killed, resumed or meant
to fail run the experiment's program (the same cells compiled once; tests/test_program.py checks it
trains exactly as the notebook), which starts in seconds where a kernel execution compiles cells for
minutes. Comparing the two to the bit is then also a check that they are the same code."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fake_wandb import KEY, FakeWandb
from test_notebooks import ROOT, run_notebook, run_program
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers" / "scripts"))
from nbcells import section  # noqa: E402

EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
# A short CPU run: 2 layers, a checkpoint every 4 steps, one row per step, a NaN injected at step 3
# (0-based 2) and skipped, so the skip path is part of what must resume exactly.
TINY = ("model.num_hidden_layers=2 train.log_every=1 train.eval_every=6 train.ckpt_every=4 "
        "train.keep_checkpoints=2 train.grad_stats_every=6 train.sample_tokens=4 "
        "train.on_nonfinite=skip train.debug_nan_at_step=2")
STEPS = "14"
COMPARED = ("step", "tokens", "lr", "train.loss", "train.base_loss", "train.aux_loss", "train.z_loss",
            "grad_norm", "val.loss", "val.accuracy", "skipped", "skipped_steps", "grad_norm.group.experts")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in rows(run_dir)]


def processes_with_env(var: str, value: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{var}={value}".encode() in env:
            pids.append(int(p.name))
    return pids


@pytest.fixture(scope="module")
def wandb_server():
    fake = FakeWandb()
    yield fake
    fake.close()


def wandb_env(fake: FakeWandb) -> dict:
    return {"WANDB_API_KEY": KEY, "WANDB_BASE_URL": fake.url, "WANDB_PROJECT": "moe-tests", "WANDB_MODE": "online",
            "MOE_SECRETS": os.devnull}


def wandb_id(run_dir: Path) -> str:
    return wandb_id_at(run_dir, 14)


def wandb_id_at(run_dir: Path, step: int) -> str:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())["wandb_run_id"]


def no_key_in(run_dir: Path):
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"the W&B key is in {p}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, wandb_server):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_notebook(EXPERIMENT, run_dir, MOE_PRESET="cpu", MOE_STEPS=STEPS, MOE_SET=TINY, **wandb_env(wandb_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_run_is_logged_to_wandb(uninterrupted, wandb_server):
    run_dir, proc = uninterrupted
    run_id = wandb_id(run_dir)
    assert f"/fake-entity/moe-tests/runs/{run_id}" in proc.stdout
    assert wandb_server.violations == []
    r = wandb_server.runs[run_id]
    assert wandb_server.steps(run_id) == list(range(0, int(STEPS) + 1)), "every metrics row, once, in order"
    local = rows(run_dir)
    # W&B's sections (helpers::wandb::panel_name): train/, val/, perf/; metrics.jsonl keeps the flat names.
    assert [h.get("train/loss") for h in r["history"]] == [x.get("train.loss") for x in local]
    assert [h.get("train/lr") for h in r["history"]] == [x.get("lr") for x in local]
    assert [h.get("perf/tokens_per_s") for h in r["history"]] == [x.get("tokens_per_s") for x in local]
    assert r["history"][3].get("train/skipped") is True, "the skipped step's row, merged into its step's line"
    cfg = r["upserts"][0]["config"]
    assert cfg["train"]["value"]["max_steps"] == int(STEPS) and cfg["model"]["value"]["num_hidden_layers"] == 2
    assert cfg["parameters"]["value"]["total"] > cfg["parameters"]["value"]["active"] > 0
    assert len(cfg["git"]["value"]["commit"]) == 40 and isinstance(cfg["git"]["value"]["dirty"], bool)
    assert r["upserts"][0]["commit"] == cfg["git"]["value"]["commit"]
    assert r["summary"]["val/loss"] == local[-1]["val.loss"] and r["summary"]["_step"] == int(STEPS)
    assert 0 < r["summary"]["perf/mfu"] < 1 and "mfu" not in r["summary"]
    assert r["complete"] == 0
    assert set(r["uploaded"]) >= {"config.yaml", "training_curves.png", "wandb-metadata.json"}
    assert r["files"]["training_curves.png"][:4] == b"\x89PNG"
    # Per-expert usage as one heatmap image per statistics row, not L x E scalar panels.
    with_usage = [h for h in r["history"] if "expert_usage" in h]
    assert [h["_step"] for h in with_usage] == [6, 12] and all(h["expert_usage"]["_type"] == "image-file" for h in with_usage)
    assert not any(k.startswith("expert_usage/") for h in r["history"] for k in h)
    # The figures as W&B media in the last step's line: the image object, its file uploaded.
    last = r["history"][-1]
    for key in ("training_curves", "routing/usage", "routing/usage_over_training"):
        assert last[key]["_type"] == "image-file" and last[key]["path"].startswith("media/images/"), (key, last.get(key))
        assert r["files"][last[key]["path"]][:4] == b"\x89PNG"
    no_key_in(run_dir)


def test_run_writes_checkpoints_results_and_metrics(uninterrupted):
    run_dir, proc = uninterrupted
    r = rows(run_dir)
    assert [x["step"] for x in r] == list(range(0, int(STEPS) + 1))
    skipped = [x for x in r if x.get("skipped")]
    assert [x["step"] for x in skipped] == [3], "the NaN step is skipped, not applied"
    assert skipped[0]["nonfinite.first"].startswith("group embeddings (first tensor model.embed_tokens.weight)")
    assert "skipped: non-finite loss or gradient" in proc.stdout
    logged = [x for x in r if "train.loss" in x]
    for key in ("train.base_loss", "train.aux_loss", "train.z_loss", "lr", "aux_coef", "tokens", "tokens_per_s",
                "mfu", "batch_time", "fwd_time", "bwd_time", "data_time", "grad_norm", "grad_norm.experts"):
        assert all(key in x for x in logged), key
    stats = [x for x in logged if "grad_norm.global" in x]
    assert [x["step"] for x in stats] == [6, 12]
    assert {"grad_norm.layer.0", "grad_norm.expert.1.7", "grad_norm.group.router", "grad.nonfinite_count",
            "expert_usage.0.0", "expert_usage.1.7"} <= set(stats[0])
    assert abs(sum(stats[0][f"expert_usage.1.{e}"] for e in range(8)) - 1.0) < 1e-5
    vals = [x for x in r if "val.loss" in x]
    assert [x["step"] for x in vals] == [0, 6, 12, 14]
    assert all(0 <= x["val.accuracy"] <= 1 and x["val.perplexity"] > 1 for x in vals)
    assert 0 < logged[-1]["mfu"] < 1
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000012", "step-00000014"], "keep the last 2, and a final one"
    state = json.loads((run_dir / "checkpoints" / "step-00000014" / "state.json").read_text())
    assert state["step"] == 14 and state["skipped_steps"] == 1 and state["data_position"] == 14
    assert state["config"]["train"]["max_steps"] == 14
    results = json.loads((run_dir / "training_results.json").read_text())
    assert results["final"]["val.loss"] == vals[-1]["val.loss"]
    assert len(results["history"]["train.loss"]) == int(STEPS) - 1
    assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    executed = nbformat.read(run_dir / "executed.ipynb", as_version=4)
    assert any(o.get("data", {}).get("image/png") for c in executed.cells for o in c.get("outputs", [])), \
        "the curves are shown inline"


def test_sigkill_then_resume_repeats_the_uninterrupted_run_bit_for_bit(uninterrupted, tmp_path, wandb_server):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    # Killed after the step-8 checkpoint; the program steps fast, so from step 9 on leaves time.
    killed_at = run_and_kill(EXPERIMENT, run_dir, TINY, 9, **wandb_env(wandb_server))
    assert 9 <= killed_at < int(STEPS)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running", "killed: nobody marked it"
    resumed = run_program(EXPERIMENT, run_dir, MOE_RESUME=str(run_dir), MOE_SET=TINY, **wandb_env(wandb_server))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and ("(step 8," in resumed.stdout or "(step 12," in resumed.stdout)
    assert comparable(run_dir) == comparable(reference)
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", int(STEPS))
    # The same W&B run continues: every step once, in order, and it ends complete.
    run_id = wandb_id(run_dir)
    assert len(wandb_server.runs[run_id]["upserts"]) == 2
    assert wandb_server.steps(run_id) == list(range(0, int(STEPS) + 1))
    assert wandb_server.runs[run_id]["complete"] == 0 and wandb_server.violations == []
    no_key_in(run_dir)


def test_sigterm_ends_after_the_step_with_a_checkpoint_marks_wandb_preempted_and_resumes_exactly(uninterrupted, tmp_path, wandb_server):
    """A preempted pod: SIGTERM to the training process. It finishes its step, checkpoints there (not
    at the last ckpt_every), marks the W&B run preempting and ends it with exit code 143; resuming
    from that checkpoint repeats the uninterrupted run exactly and completes the same W&B run."""
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    last, status = run_and_kill(EXPERIMENT, run_dir, TINY, 5, sig=signal.SIGTERM, **wandb_env(wandb_server))
    assert status != 0, "a non-zero exit, so a scheduler requeues the job"
    assert 5 <= last < int(STEPS)
    log = (run_dir / "program.log").read_text()
    assert f"step {last:5} | SIGTERM (preempted): training ends here" in log, log[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{last:08d}", "the checkpoint is of the step SIGTERM interrupted"
    assert json.loads((run_dir / "checkpoints" / f"step-{last:08d}" / "state.json").read_text())["step"] == last
    run_id = wandb_id_at(run_dir, last)
    r = wandb_server.runs[run_id]
    assert r.get("preempting") is True and r["complete"] == 143, "W&B: preempted, not crashed"
    resumed = run_program(EXPERIMENT, run_dir, MOE_RESUME=str(run_dir), MOE_SET=TINY, **wandb_env(wandb_server))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {last}," in resumed.stdout
    assert comparable(run_dir) == comparable(reference)
    assert wandb_server.steps(run_id) == list(range(0, int(STEPS) + 1))
    assert wandb_server.runs[run_id]["complete"] == 0 and wandb_server.violations == []


def test_resume_with_a_different_model_is_an_error_naming_the_field(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    proc = run_program(EXPERIMENT, tmp_path / "other", MOE_RESUME=str(reference),
                        MOE_SET=TINY + " model.intermediate_size=128")
    assert proc.returncode == 1
    assert "model.intermediate_size: checkpoint 256, now 128" in proc.stdout + proc.stderr


def test_generate_command_samples_from_a_saved_run(uninterrupted):
    run_dir, _ = uninterrupted
    before = (run_dir / "metrics.jsonl").read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env["MOE_DEVICE"] = "cpu"
    proc = subprocess.run(["bash", str(ROOT / "setup.sh"), "generate", str(run_dir), "JULIET."], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- sample (" in proc.stdout and "JULIET." in proc.stdout
    assert "step    14 | checkpoint" not in proc.stdout, "the training cells are skipped"
    assert (run_dir / "metrics.jsonl").read_bytes() == before, "generation leaves the run untouched"


def test_nonfinite_stop_names_the_group_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_program(EXPERIMENT, run_dir, MOE_PRESET="cpu", MOE_STEPS="10",
                        MOE_SET=TINY.replace("on_nonfinite=skip", "on_nonfinite=stop").replace("nan_at_step=2", "nan_at_step=5"))
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "step 6: non-finite loss or gradient, first in group embeddings" in out
    assert "Last good checkpoint:" in out and "step-00000004 (step 4)" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert rows(run_dir)[-1] == {"step": 6, "nonfinite": True, "nonfinite.first": rows(run_dir)[-1]["nonfinite.first"]}


TEST_CELL = r'''
// Checks of the training machinery on this model, written to $MOE_RUN_DIR/report.json.
let mut report = serde_json::Map::new();
{
    // 1. Activation checkpointing: the same gradients, a lower peak memory (checkpointed measured
    //    first, so memory it leaves behind could only raise the plain path's figure).
    let (x, y) = train_data.batch(0, train_cfg.micro_batch_size as usize, 0, 1);
    let mut grads: Vec<Vec<(String, Tensor)>> = Vec::new();
    for ckpt in [true, false] {
        let c = TrainConfig { activation_checkpointing: ckpt, z_loss_coef: 0.001, ..train_cfg.clone() };
        opt.zero_grad();
        let _ = forward_backward(&model, &x, &y, &c, 0.01, 0.5, false, false); // warm-up, allocates .grad
        opt.zero_grad();
        helpers::memory::reset_peak_rss()?;
        let base = helpers::memory::rss_bytes()?;
        let out = forward_backward(&model, &x, &y, &c, 0.01, 0.5, false, false);
        let peak = helpers::memory::peak_rss_bytes()?.saturating_sub(base);
        drop(out);
        grads.push(opt.grads().into_iter().map(|(n, g)| (n, g.copy())).collect());
        let mut secs = Vec::new();
        for _ in 0..3 {
            opt.zero_grad();
            let t = std::time::Instant::now();
            let _ = forward_backward(&model, &x, &y, &c, 0.01, 0.5, false, false);
            secs.push(t.elapsed().as_secs_f64());
        }
        secs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let tag = if ckpt { "checkpointed" } else { "plain" };
        report.insert(format!("{tag}.peak_bytes"), (peak as f64).into());
        report.insert(format!("{tag}.seconds"), secs[1].into());
    }
    let mut worst = 0f64;
    let mut bit_equal = true;
    for ((n, a), (m, b)) in grads[0].iter().zip(&grads[1]) {
        assert_eq!(n, m);
        bit_equal &= a.equal(b);
        let rel = (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30);
        worst = worst.max(rel);
    }
    report.insert("grad_worst_rel_diff".into(), worst.into());
    report.insert("grad_bit_equal".into(), bit_equal.into());
    report.insert("grad_tensors".into(), (grads[0].len() as f64).into());

    // 2. bf16 mixed precision on CPU (the CUDA default), and pure bf16: the loss falls on one batch,
    //    the model holds bf16, the optimizer fp32 masters (mixed) or nothing extra (pure).
    let (xb, yb) = train_data.batch(1, 4, 0, 1);
    let (xb, yb) = (xb.narrow(1, 0, 64), yb.narrow(1, 0, 64));
    for (mode, masters) in [("bf16-mixed", true), ("bf16", false)] {
        tch::manual_seed(0);
        let bvs = nn::VarStore::new(Device::Cpu);
        let bmodel = OlmoeForCausalLM::new(&bvs, &model_cfg);
        let bc = TrainConfig { lr: 3e-3, ..train_cfg.clone() };
        let mut named: Vec<(String, Tensor)> = bvs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut bopt = helpers::optim::Optimizer::new(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone(), update_rule(n, t, &bc))).collect(), opt.cfg.clone())?;
        bopt.cast_params(Kind::BFloat16, masters);
        let mut losses = Vec::new();
        for _ in 0..6 {
            bopt.zero_grad();
            let out = forward_backward(&bmodel, &xb, &yb, &bc, 0.01, 1.0, false, false);
            bopt.step(1.0);
            losses.push(out.get("base_loss").double_value(&[]));
        }
        report.insert(format!("{mode}.losses"), losses.clone().into());
        report.insert(format!("{mode}.param_kind"), format!("{:?}", bmodel.lm_head.weight.kind()).into());
        report.insert(format!("{mode}.saved_kind"), format!("{:?}", bopt.weights()[0].1.kind()).into());
    }

    // 3. Muon takes the 2-D hidden matrices; AdamW the router, embeddings, head and norms.
    let mc = TrainConfig { optimizer: OptimizerKind::Muon, decay_norms_and_embeddings: false, ..train_cfg.clone() };
    let rule_of = |n: &str| format!("{:?}", update_rule(n, &vs.variables()[n], &mc));
    for n in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.down_proj",
              "model.layers.0.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] {
        report.insert(format!("rule.{n}"), rule_of(n).into());
    }

    // 4. KV cache: greedy generation with the cache equals recomputing the whole prefix each token,
    //    and generation stops at EOS.
    let prompt = tokenizer.encode("ROMEO.\n")?;
    let cached = generate(&model, &prompt, 12, &helpers::generate::Sampling::greedy(), -1, Device::Cpu);
    let mut ids = prompt.clone();
    for _ in 0..12 {
        let (logits, _) = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0)));
        ids.push(logits.select(1, -1).argmax(-1, false).int64_value(&[0]));
    }
    report.insert("kv_cache_equal".into(), (cached == ids).into());
    let first = cached[prompt.len()];
    let stopped = generate(&model, &prompt, 12, &helpers::generate::Sampling::greedy(), first, Device::Cpu);
    report.insert("eos_stop_len".into(), ((stopped.len() - prompt.len()) as f64).into());
}
let report_path = std::path::PathBuf::from(std::env::var("MOE_RUN_DIR")?).join("report.json");
std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
println!("report: {}", report_path.display());
'''




@pytest.fixture(scope="module")
def machinery(tmp_path_factory):
    src = nbformat.read(EXPERIMENT, as_version=4)
    first_code = next(c.source for c in src.cells if c.cell_type == "code")
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        first_code, *(section(src.cells, h) for h in (
            "## Configuration", "## Model", "## Data", "## Optimizer", "## Training step", "## Generation")),
        TEST_CELL)]
    nb_path = EXPERIMENT.parent / ".training-test.ipynb"  # the experiment's folder: same relative :dep paths
    nbformat.write(nb, nb_path)
    run_dir = tmp_path_factory.mktemp("machinery")
    try:
        # Big allocations go straight to mmap and back to the system when freed, so the peak RSS of
        # each pass measures that pass (glibc would otherwise keep freed memory and raise the floor).
        proc = run_notebook(nb_path, run_dir, MOE_PRESET="cpu", MALLOC_MMAP_THRESHOLD_="65536",
                            MOE_SET="model.num_hidden_layers=6 train.seq_len=256 train.micro_batch_size=8")
    finally:
        nb_path.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


def test_activation_checkpointing_same_gradients_less_memory(machinery):
    r = machinery
    mib = 1 << 20
    print(f"activation checkpointing: gradients bit-equal {r['grad_bit_equal']}, worst relative difference "
          f"{r['grad_worst_rel_diff']:.2e} over {r['grad_tensors']:.0f} tensors; peak memory of one forward+backward "
          f"{r['plain.peak_bytes'] / mib:.0f} MiB plain vs {r['checkpointed.peak_bytes'] / mib:.0f} MiB checkpointed; "
          f"time {r['plain.seconds']:.3f} s vs {r['checkpointed.seconds']:.3f} s "
          f"({r['checkpointed.seconds'] / r['plain.seconds'] - 1:+.0%})")
    assert r["grad_worst_rel_diff"] <= 1e-5
    assert r["checkpointed.peak_bytes"] < r["plain.peak_bytes"]


def test_bf16_training_on_cpu(machinery):
    for mode in ("bf16-mixed", "bf16"):
        losses = machinery[f"{mode}.losses"]
        print(f"{mode}: losses {[round(l, 3) for l in losses]}")
        assert losses[-1] < losses[0] - 0.5
        assert machinery[f"{mode}.param_kind"] == "BFloat16"
    assert machinery["bf16-mixed.saved_kind"] == "Float", "checkpoints hold the fp32 masters"
    assert machinery["bf16.saved_kind"] == "BFloat16"


def test_muon_takes_hidden_matrices_only(machinery):
    rules = {k[len("rule."):]: v for k, v in machinery.items() if k.startswith("rule.")}
    assert rules == {
        "model.layers.0.self_attn.q_proj.weight": "Muon", "model.layers.0.mlp.experts.down_proj": "Muon",
        "model.layers.0.mlp.gate.weight": "AdamW", "model.embed_tokens.weight": "AdamWNoDecay",
        "lm_head.weight": "AdamW", "model.norm.weight": "AdamWNoDecay"}


def test_kv_cache_generation(machinery):
    assert machinery["kv_cache_equal"] is True
    assert machinery["eos_stop_len"] == 1


def test_wandb_sync_command_uploads_a_spool(uninterrupted, tmp_path):
    """`setup.sh wandb-sync` replays a run's spool (here: the 14-step run's, to a fresh server) and
    produces the same W&B run; a second sync has nothing to do."""
    run_dir, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "wandb", copy / "wandb")
    (copy / "wandb" / "synced").unlink()
    fresh = FakeWandb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_", "WANDB_"))}
    env.update(wandb_env(fresh))
    try:
        cmd = ["bash", str(ROOT / "setup.sh"), "wandb-sync", str(copy)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_id = wandb_id(run_dir)
        assert fresh.steps(run_id) == list(range(0, int(STEPS) + 1))
        assert fresh.runs[run_id]["complete"] == 0 and fresh.violations == []
        assert "wandb-sync: 15 rows in the spool, 15 on the server, run complete" in proc.stdout
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "already uploaded" in again.stdout
        env.pop("WANDB_API_KEY")
        env.pop("WANDB_MODE")
        # No ~/.netrc either (cargo and rustup keep their homes).
        env.setdefault("CARGO_HOME", str(Path.home() / ".cargo"))
        env.setdefault("RUSTUP_HOME", str(Path.home() / ".rustup"))
        env["HOME"] = str(tmp_path)
        (copy / "wandb" / "synced").unlink()
        nokey = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert nokey.returncode == 1 and "no W&B API key" in nokey.stderr
    finally:
        fresh.close()



def run_and_kill(notebook: Path, run_dir: Path, overrides: str, at_step: int, sig=signal.SIGKILL, **extra):
    """Starts a STEPS-step run of the notebook's program and SIGKILLs it (and setup.sh, which started
    it) once step `at_step` is logged: no cleanup runs anywhere. Returns the last logged step.
    With `sig=signal.SIGTERM` only the program gets the signal (as a preempted pod's main process),
    and the run ends on its own; returns (last logged step, exit status of setup.sh)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update(MOE_RUN_DIR=str(run_dir), MOE_DEVICE="cpu", MOE_PRESET="cpu", MOE_STEPS=STEPS, MOE_SET=overrides, **extra)
    proc = subprocess.Popen(["bash", str(ROOT / "setup.sh"), "run", "--program", str(notebook)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(l).get("step", 0) >= at_step for l in metrics.read_text().splitlines() if l.endswith("}")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    for pid in processes_with_env("MOE_RUN_DIR", str(run_dir)):
        if sig == signal.SIGKILL or Path(f"/proc/{pid}/comm").read_text().strip() not in ("bash", "tee"):
            os.kill(pid, sig)
    status = proc.wait(timeout=120)
    last = max(r["step"] for r in rows(run_dir))
    return last if sig == signal.SIGKILL else (last, status)


@pytest.mark.parametrize("notebook", [p for p in sorted((ROOT / "experiments").glob("*/experiment.ipynb")) if p != EXPERIMENT],
                         ids=lambda p: p.parent.name)
def test_every_copy_resumes_exactly_even_under_another_expert_placement(notebook, tmp_path):
    """A copy of the base (its own cells: model, objective, optimizer; run as its program) trained
    with its experts placed (a shard per device), then resumed unplaced from its step-12 checkpoint,
    repeats its own last steps exactly: checkpoints hold the whole stacks, cut back into what the
    model has."""
    run_dir = tmp_path / "run"
    placed = run_program(notebook, run_dir, MOE_PRESET="cpu", MOE_STEPS=STEPS, MOE_SET=TINY + " train.expert_placement=round-robin:cpu")
    assert placed.returncode == 0, placed.stderr[-3000:]
    assert "experts placed" in placed.stdout
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    rest = run_program(notebook, again, MOE_RESUME=str(again / "checkpoints" / "step-00000012"), MOE_SET=TINY + " train.expert_placement=")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resuming from" in rest.stdout and "(step 12," in rest.stdout
    assert comparable(again) == comparable(run_dir)
