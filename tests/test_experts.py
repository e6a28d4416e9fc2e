"""The expert written once (issue: the model a researcher edits once): every expert of the base
notebook's model, the dense layers, the shared experts and each routed-expert path (the readable
loop, one expert at a time, the grouped matmuls, experts placed in two shards), calls the one
function `expert`. Edit that function in a copy of the Model section, SiLU to GELU as a researcher
would, and every path must change and still agree with the others.

A notebook made of the experiment's dependency, config and Model cells plus one cell that runs every
path on the same weights and inputs is executed twice in the real kernel: as it is, and edited.
"""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers" / "scripts"))
from nbcells import section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
SILU = "let h = gate.silu() * up;"
GELU = "let h = gate.gelu(\"none\") * up;"
PATHS = ["loop", "sorted", "grouped", "placed"]

PATHS_CELL = r'''
// One dense layer, then MoE layers with a shared expert; every routed path on the same weights.
let cfg = ModelConfig { vocab_size: 128, hidden_size: 64, num_hidden_layers: 3, num_attention_heads: 4, num_experts: 6,
    num_experts_per_tok: 2, intermediate_size: 32, n_shared_experts: 1, n_dense_layers: 1, dense_intermediate_size: 48,
    max_position_embeddings: 64, ..ModelConfig::cpu() };
tch::manual_seed(7);
let tokens = Tensor::randint_low(2, 128, [2, 16], (Kind::Int64, Device::Cpu));
let rows = Tensor::randn([32, 64], (Kind::Float, Device::Cpu)); // rows for the experts alone
let mut out: Vec<(String, Tensor)> = Vec::new();
for (tag, imp) in [("loop", MoeImpl::Loop), ("sorted", MoeImpl::Sorted), ("grouped", MoeImpl::Grouped), ("placed", MoeImpl::Auto)] {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = OlmoeForCausalLM::new(&vs, &ModelConfig { moe_impl: imp, ..cfg.clone() });
    if tag == "placed" {
        model.place_experts(&vs, &[(Device::Cpu, vec![0, 2, 4]), (Device::Cpu, vec![1, 3, 5])]);
    }
    let (logits, routers) = model.forward(&tokens);
    let routers: Vec<RouterOut> = routers.iter().map(|r| r.detached()).collect();
    logits.sum(Kind::Float).backward();
    out.push((format!("{tag}.logits"), logits.detach()));
    let grads: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(n, _)| n.contains(".experts")).map(|(n, t)| (n, t.grad())).collect();
    for (n, g) in helpers::placement::gather(grads)? { out.push((format!("{tag}.grad.{n}"), g)); }
    let moe = model.moe_blocks()[0];
    tch::no_grad(|| {
        let r = &routers[0]; // the first MoE layer's routing of the 32 tokens, for 32 rows of our own
        out.push((format!("{tag}.experts"), moe.experts.forward(&rows, &r.weights, &r.expert_idx, &r.counts, imp)));
        if tag == "loop" {
            out.push(("shared".into(), moe.shared_experts[0].forward(&rows)));
            if let FeedForward::Dense(mlp) = &model.layers[0].mlp { out.push(("dense".into(), mlp.forward(&rows))); }
        }
    });
}
Tensor::write_safetensors(&out, std::env::var("MOE_EXPERTS_OUT")?)?;
println!("paths: wrote {} tensors", out.len());
'''


NOTEBOOKS = sorted((ROOT / "experiments").glob("*/experiment.ipynb"))


def run_paths(tmp: Path, notebook: Path, name: str, edit=None) -> dict:
    src = nbformat.read(notebook, as_version=4)
    first_code = next(c.source for c in src.cells if c.cell_type == "code")
    model = section(src.cells, "## Model")
    if edit:
        model = edit(model)
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (first_code, section(src.cells, "## Configuration"), model, PATHS_CELL)]
    nb_path = notebook.parent / f".experts-test-{name}.ipynb"  # the experiment's folder: same relative :dep paths
    nbformat.write(nb, nb_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update({"MOE_EXPERTS_OUT": str(tmp / f"{name}.safetensors"), "MOE_RUN_DIR": str(tmp / f"run-{name}"), "MOE_DEVICE": "cpu"})
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "helpers" / "scripts" / "run_notebook.py"), str(nb_path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        nb_path.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(tmp / f"{name}.safetensors"))


def gelu(model: str) -> str:
    # The activation is written once in the Model section: one place to edit.
    assert model.count(SILU) == 1, "the SwiGLU should be written once, in `expert`"
    return model.replace(SILU, GELU)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("experts")


@pytest.fixture(scope="module")
def base_runs(tmp):
    base = section(nbformat.read(EXPERIMENT, as_version=4).cells, "## Model")
    assert base.count(".silu()") == 1, "the base model's only activation is the experts' SwiGLU"
    return run_paths(tmp, EXPERIMENT, "base", None), run_paths(tmp, EXPERIMENT, "base-gelu", gelu)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_paths_agree(out: dict, what: str):
    for path in PATHS[1:]:
        diffs = {k: max_diff(out[f"{path}.{k}"], out[f"loop.{k}"]) for k in ["logits", "experts"]}
        grads = [k[len("loop."):] for k in out if k.startswith("loop.grad.")]
        # gate_up_proj and down_proj of the two MoE layers, whole stacks (a pair per depth in the tree's copy)
        assert len(grads) >= 4 and len(grads) % 4 == 0 and all(k.endswith(("gate_up_proj", "down_proj")) for k in grads), grads
        diffs.update({k: max_diff(out[f"{path}.{k}"], out[f"loop.{k}"]) / out[f"loop.{k}"].abs().max().item() for k in grads})
        print(f"{what}: {path} vs loop {diffs}")
        assert max(diffs.values()) <= 1e-5, (what, path, diffs)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.parent.name)
def test_every_expert_path_agrees(notebook, base_runs, tmp):
    """Every experiment's model: the loop, per-expert, grouped and placed paths give the same logits,
    expert outputs and expert gradients."""
    out = base_runs[0] if notebook == EXPERIMENT else run_paths(tmp, notebook, notebook.parent.name)
    check_paths_agree(out, notebook.parent.name)


def test_after_the_edit_every_path_still_agrees(base_runs):
    check_paths_agree(base_runs[1], "SiLU -> GELU")


def test_the_edit_reaches_every_path_the_dense_layer_and_the_shared_expert(base_runs):
    before, after = base_runs
    keys = [f"{p}.{k}" for p in PATHS for k in ("logits", "experts")] + ["shared", "dense"]
    for k in keys:
        d = max_diff(before[k], after[k])
        print(f"{k}: SiLU vs GELU max abs difference {d:.3e}")
        assert d > 1e-3 * before[k].abs().max().item(), f"{k} did not change when the expert function did"
