"""Notebooks executed headlessly in the real Rust (evcxr) kernel, through the same runner as
`bash setup.sh run`. Every notebook under experiments/ gets a very short CPU run. Checks that only
need the experiment's code (a second start from the exported weights, options, bad overrides) run
its program, the same cells compiled once (tests/test_program.py checks it trains exactly as the
notebook): a kernel execution spends minutes compiling cells, a program starts in seconds."""
import base64
import importlib.util
import json
import math
import re
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "helpers" / "scripts" / "run_notebook.py"
EXPERIMENTS = sorted(ROOT.glob("experiments/*/experiment.ipynb"))
TORCH_LIB = Path(importlib.util.find_spec("torch").origin).parent / "lib"  # without importing torch


def run_notebook(nb: Path, run_dir: Path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_") or k == "MOE_SECRETS"}
    full_env.update({"MOE_RUN_DIR": str(run_dir), "MOE_DEVICE": "cpu", **env})
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(nb)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=1800,
    )
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    return proc


def run_program(nb: Path, run_dir: Path, **env) -> subprocess.CompletedProcess:
    """`bash setup.sh run --program nb` with the environment run_notebook gives the notebook."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_") or k == "MOE_SECRETS"}
    full_env.update({"MOE_RUN_DIR": str(run_dir), "MOE_DEVICE": "cpu", **env})
    proc = subprocess.run(["bash", str(ROOT / "setup.sh"), "run", "--program", str(nb)],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    return proc


def safetensors_names(path: Path) -> set[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k for k in header if k != "__metadata__"}


BRIEF = dict(MOE_PRESET="cpu", MOE_STEPS="20", MOE_SET="train.log_every=5 train.eval_every=10 train.grad_stats_every=10 train.sample_tokens=8",
             MOE_THREADS="2")


@pytest.mark.uses("brief_base_run")  # asked for below (base only), so conftest cannot see it
@pytest.mark.parametrize("nb", EXPERIMENTS, ids=[p.parent.name for p in EXPERIMENTS])
def test_experiment_trains_briefly_on_cpu(nb, tmp_path, request):
    if nb.parent.name == "base-olmoe":
        run_dir, proc = request.getfixturevalue("brief_base_run")
    else:
        run_dir = tmp_path / "run"
        proc = run_notebook(nb, run_dir, **BRIEF)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CUDA library loaded, no CUDA device visible" in proc.stdout or not (TORCH_LIB / "libtorch_cuda.so").exists()
    # Progress: one line per logged step with loss and tokens/s.
    assert re.search(r"step    20 \| [0-9.]+M tok \| loss [0-9.]+ .* tok/s .* eta", proc.stdout)
    assert "wandb: disabled" in proc.stdout, "without a key W&B says it is off, in one line"
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert all("train.loss" in r and "tokens_per_s" in r for r in rows[1:])
    val = [r["val.loss"] for r in rows if "val.loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0, val
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 20 and cfg["model"]["num_experts"] >= 2
    names = safetensors_names(run_dir / "model.safetensors")
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate.weight"} <= names
    tree = "n_tree_layers" in cfg["model"]
    stacks = [f"model.layers.0.mlp.depth{d}.experts" for d in range(1, cfg["model"]["n_tree_layers"] + 1)] if tree else ["model.layers.0.mlp.experts"]
    assert {f"{s}.{w}" for s in stacks for w in ("gate_up_proj", "down_proj")} <= names
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss_final"] < summary["val_loss_step0"]
    assert (run_dir / "executed.ipynb").exists()
    # The runner keeps the run's status and points `latest` beside it at the newest finished run.
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 20) and "error" not in status
    assert (run_dir.parent / "latest").is_symlink() and (run_dir.parent / "latest").resolve() == run_dir.resolve()
    check_routing_outputs(run_dir, rows, cfg)
    if nb.parent.name == "cross-layer-experts":
        check_cross_layer(run_dir, rows, cfg, proc.stdout)
        return
    if tree:
        check_tree(run_dir, cfg, proc.stdout)
        return
    # Every run writes a Hugging Face directory that transformers loads as it is.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert hf.config.num_experts == cfg["model"]["num_experts"] and hf.config.eos_token_id == 50279
    assert AutoTokenizer.from_pretrained(run_dir / "hf")("Hello world")["input_ids"] == [12092, 1533]

    # ... and the experiment starts from it again (its program: the same cells): validation at step 0
    # is the first run's final one.
    again = run_program(nb, tmp_path / "again", MOE_PRESET="cpu", MOE_STEPS="1", MOE_INIT_FROM=str(run_dir / "hf"),
                         MOE_SET="train.eval_every=1 train.sample_tokens=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "loaded " in again.stdout
    first = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["val.loss"] - val[-1]) < 1e-4, (first, val[-1])


def check_routing_outputs(run_dir: Path, rows: list, cfg: dict):
    """The routing probes: interp.* metrics with each validation, usage counts at each log step, and
    the analysis cell's export, summary and plots."""
    import pyarrow.parquet as pq
    m, n_layers = cfg["model"], cfg["model"]["num_hidden_layers"]
    # a token's (token, slot) assignments per MoE layer: K, or K paths of n experts in the tree
    e, k = m["num_experts"], m["num_experts_per_tok"] * m.get("n_tree_layers", 1)
    for r in (r for r in rows[1:] if "val.loss" in r):
        assert 0 < r[f"interp.usage_entropy.{n_layers - 1}"] <= math.log(e) + 1e-9
        assert 0 <= r["interp.max_vio_mean"] <= e - 1 and 0 <= r["interp.consistency_mean"] <= 1
        assert -1 <= r["interp.router_cos_max.0"] <= 1 and r["interp.stay_mean"] >= 1
    usage = [json.loads(l) for l in (run_dir / "expert_usage.jsonl").read_text().splitlines()]
    assert [u["step"] for u in usage] == [5, 10, 15, 20] and usage[-1]["layers"] == list(range(n_layers))
    # A log step's counts: every (token, slot) of its 5 steps, in every MoE layer.
    tokens_per_log = 5 * cfg["train"]["micro_batch_size"] * cfg["train"]["seq_len"] * cfg["train"]["grad_accum_steps"]
    assert all(sum(c) == tokens_per_log * k for c in usage[-1]["counts"])
    table = pq.read_table(run_dir / "routing" / "routing.parquet").to_pydict()
    assert list(table) == ["sequence_ix", "token_ix", "token_id", "layer_ix", "topk_ix", "expert", "weight"]
    n_tokens = cfg["train"]["eval_batches"] * cfg["train"]["micro_batch_size"] * cfg["train"]["seq_len"]
    assert len(table["expert"]) == n_tokens * n_layers * k
    with open(run_dir / "routing" / "routing.csv") as f:
        assert sum(1 for _ in f) == 1 + len(table["expert"])
    summary = json.loads((run_dir / "routing" / "metrics.json").read_text())
    counts = [0] * e
    for layer, expert in zip(table["layer_ix"], table["expert"]):
        if layer == 0:
            counts[expert] += 1
    p = [c / sum(counts) for c in counts if c]
    assert abs(summary["usage_entropy.0"] - -sum(x * math.log(x) for x in p)) < 1e-9
    sizes = []
    for png in ("usage.png", "transitions.png", "usage_over_training.png"):
        data = (run_dir / "routing" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        sizes.append(struct.unpack(">II", data[16:24]))  # IHDR: width, height
    # The analysis cell shows all three figures: one image (evcxr keeps one per cell), stacked.
    executed = json.loads((run_dir / "executed.ipynb").read_text())
    cell = next(c for c in executed["cells"] if "show_pngs(&pngs)" in "".join(c["source"]))
    images = [o["data"]["image/png"] for o in cell["outputs"] if "image/png" in o.get("data", {})]
    assert len(images) == 1, f"{len(images)} images in the routing cell"
    shown = struct.unpack(">II", base64.b64decode(images[0])[16:24])
    assert shown == (max(w for w, _ in sizes), sum(h for _, h in sizes) + 12 * 2), (shown, sizes)


def check_tree(run_dir: Path, cfg: dict, stdout: str):
    """Each depth of the tree is one stack of b^d experts of width I / b^d; OLMoE export is refused."""
    from safetensors.torch import load_file
    w = load_file(str(run_dir / "model.safetensors"))
    m = cfg["model"]
    b, i, d = m["n_branches"], m["intermediate_size"], m["hidden_size"]
    for depth in range(1, m["n_tree_layers"] + 1):
        assert w[f"model.layers.0.mlp.depth{depth}.experts.gate_up_proj"].shape == (b ** depth, 2 * (i // b ** depth), d)
        assert w[f"model.layers.0.mlp.depth{depth}.experts.down_proj"].shape == (b ** depth, d, i // b ** depth)
    assert w["model.layers.0.mlp.gate.weight"].shape == (m["num_experts"], d), "one router row per edge"
    assert "Hugging Face export skipped" in stdout
    # The tree's routing metrics and figure.
    tm = json.loads((run_dir / "routing" / "tree_metrics.json").read_text())
    n, layers = m["n_tree_layers"], range(m["num_hidden_layers"])
    assert all(0 <= tm[f"tree.usage_entropy.{dd}.{l}"] <= 1 + 1e-9 for dd in range(1, n + 1) for l in layers), tm
    assert all(0 < tm[f"tree.agreement.{dd}.{l}"] <= 1 + 1e-9 for dd in range(1, n) for l in layers), tm
    assert "agreement below a shared parent" in stdout
    assert (run_dir / "routing" / "tree_usage.png").read_bytes()[:4] == b"\x89PNG"


def check_cross_layer(run_dir: Path, rows: list, cfg: dict, stdout: str):
    """The routing residual stream and the shared gate exist with their shapes, the offset gates
    started at zero and moved, their penalty is logged, and OLMoE export is refused by name."""
    from safetensors.torch import load_file
    w = load_file(str(run_dir / "model.safetensors"))
    m = cfg["model"]
    d, z, e = m["hidden_size"], m["rrs_dim"], m["num_experts"]
    assert z == 32 and w["model.embed_tokens.weight"].shape == (m["vocab_size"], d + z)
    assert w["model.shared_gate.weight"].shape == (e, z)
    assert w["model.layers.0.mlp.gate.weight"].shape == (e, z)
    assert w["model.layers.0.rrs.lin.weight"].shape == (z, d) and w["model.layers.0.rrs.norm.weight"].shape == (z,)
    offset = w["model.layers.0.mlp.gate.weight"]
    assert 0 < offset.abs().max().item() < w["model.shared_gate.weight"].abs().max().item(), "offsets start at 0 and stay small"
    penalty = [r["train.offset_penalty"] for r in rows[1:]]
    assert penalty[0] > 0 and all(x >= 0 for x in penalty)
    assert "Hugging Face export skipped: Hugging Face export refused: parameter model.layers.0.rrs" in stdout


# The sections each copy's method changes. The training step and loop are the base's in both: the
# cross-layer offset penalty is one more part of `objective`, the tree's balancing is its
# `load_balancing_loss`.
COPIES = {
    "cross-layer-experts": {"intro", "## Configuration", "## Model", "## Routing probes", "## Optimizer, precision, resume"},
    "hierarchical-experts": {"intro", "## Configuration", "## Model", "## Optimizer, precision, resume", "## Routing analysis"},
}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_a_copy_differs_from_the_base_only_where_its_method_does(name):
    """The copy-and-edit workflow: same sections in the same order; the cells that differ are the
    ones the idea needs (a base change elsewhere must reach the copy too)."""
    sys.path.insert(0, str(ROOT / "helpers" / "scripts"))
    from nbdiff import cells, changed_sections, sections  # what `bash setup.sh diff` prints
    base, copy = ROOT / "experiments" / "base-olmoe", ROOT / "experiments" / name
    headings = lambda nb: [h for h, _ in sections(cells(nb / "experiment.ipynb"))]
    assert headings(base) == headings(copy)
    diff = changed_sections(base / "experiment.ipynb", copy / "experiment.ipynb")
    assert set(diff.values()) == {"changed"}, diff
    assert set(diff) == COPIES[name], set(diff)
    out = subprocess.run(["bash", str(ROOT / "setup.sh"), "diff", str(copy), "--summary"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n = len(headings(base))
    assert f"{len(COPIES[name])} of {n} sections differ" in out.stdout and "same          ## Data" in out.stdout, out.stdout


def test_shared_experts_dense_layers_and_lflb_train_and_save(tmp_path):
    """interpretable-moes' options in one short run of the experiment's program (and the multi-device
    expert path with a map of CPU devices): the smoke test checks the parameter count against the
    formula; the LFLB bias moves and is saved with the weights; export refuses what OLMoE lacks.
    The model options come from a MOE_CONFIG file, and MOE_SET wins over it."""
    from safetensors.torch import load_file
    nb = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
    run_dir = tmp_path / "run"
    config = tmp_path / "options.toml"
    config.write_text("# interpretable-moes' options\n[model]\nn_shared_experts = 1\nn_dense_layers = 1\n"
                      "dense_intermediate_size = 96\nlflb = true\nnorm_topk_prob = true\n\n[train]\neval_every = 2\n")
    proc = run_program(nb, run_dir, MOE_PRESET="cpu", MOE_STEPS="3", MOE_CONFIG=str(config), MOE_SET=(
        "train.expert_placement=round-robin:cpu train.eval_every=3 train.sample_tokens=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["n_shared_experts"] == 1 and saved["model"]["lflb"] is True, "the file's fields"
    assert saved["train"]["eval_every"] == 3, "MOE_SET wins over the file"
    assert "smoke test ok" in proc.stdout
    assert "experts placed: Cpu Cpu" in proc.stdout, "the multi-device expert path trains (a CPU map here)"
    assert "Hugging Face export skipped: Hugging Face export refused: OLMoE has no shared experts" in proc.stdout
    weights = load_file(str(run_dir / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in weights  # the dense block
    assert "model.layers.1.mlp.shared_experts.0.up_proj.weight" in weights
    assert "model.layers.0.mlp.lflb_bias" not in weights
    bias = weights["model.layers.1.mlp.lflb_bias"]
    assert bias.shape == (8,) and bias.abs().max().item() > 0, bias  # updated after each of 3 steps
    assert bias.abs().max().item() <= 3 * 0.001 + 1e-9


@pytest.mark.parametrize("env, message", [
    ({"MOE_PRESET": "huge"}, 'unknown preset "huge"'),
    ({"MOE_STEPS": "ten"}, 'MOE_STEPS="ten" is not a valid'),
    ({"MOE_SET": "model.n_experts=4"}, "unknown field model.n_experts"),
    ({"MOE_SET": "model.num_experts_per_tok=99"}, "num_experts_per_tok 99 must be in 1..=num_experts"),
    ({"MOE_SET": "train.load_balancing_norm=switch"}, "unknown variant `switch`"),
    ({"MOE_INIT_FROM": "no/such/dir"}, "neither an existing directory nor a hub id"),
    ({"MOE_CONFIG": "no/such-run.toml"}, "MOE_CONFIG=no/such-run.toml: cannot read it"),
])
def test_bad_overrides_fail_the_config_cell_with_a_clear_message(env, message, tmp_path):
    """The first case in the kernel (the runner names the failing cell), the others in the program,
    which ends with the same message before anything is allocated."""
    nb = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
    in_kernel = env == {"MOE_PRESET": "huge"}
    proc = (run_notebook if in_kernel else run_program)(nb, tmp_path / "run", **env)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert message in out
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] is None, status
    assert not (tmp_path / "latest").exists(), "a failed run never becomes latest"
    if in_kernel:
        # Code cells: 1 dependencies, 2-4 the config types (model shape, run settings, presets and checks).
        assert "cell 5 failed" in out, "the run's settings cell (cell 5, after the config types) must be the one that fails"
        assert status["error"].startswith("cell 5 failed"), status
    assert "model built" not in out, "nothing may be allocated after a bad config"


def test_kernel_loads_libtorch_cuda(tmp_path):
    proc = run_notebook(ROOT / "tests" / "notebooks" / "deps.ipynb", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if (TORCH_LIB / "libtorch_cuda.so").exists():
        assert "CUDA library loaded" in proc.stdout


def test_a_panicking_cell_fails_the_run(tmp_path):
    proc = run_notebook(ROOT / "tests" / "notebooks" / "panics.ipynb", tmp_path / "run")
    assert proc.returncode == 1
    assert "before the panic: 42" in proc.stdout
    assert "deliberate panic for the runner test" in proc.stdout + proc.stderr
    assert "this cell must never run" not in proc.stdout


def test_an_error_returned_by_a_cell_fails_the_run(tmp_path):
    proc = run_notebook(ROOT / "tests" / "notebooks" / "errors.ipynb", tmp_path / "run")
    assert proc.returncode == 1
    assert "deliberate error for the runner test" in proc.stdout + proc.stderr
    assert "this line must never run" not in proc.stdout
