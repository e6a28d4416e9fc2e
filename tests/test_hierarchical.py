"""The hierarchical-experts copy (experiments/hierarchical-experts): the tree's paths against trees
worked out by hand, its router against interpretable-moes' forward (re-stated below in torch from
its hierarchical-moe notebook), and its balancing term on a case worked by hand. The expert paths
(loop, sorted, grouped, placed) are held equal by the parametrised tests/test_experts.py, training,
resume and memory by the other parametrised tests.

One notebook made of the copy's dependency, config and Model cells plus a test cell runs in the real
kernel.
"""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "helpers" / "scripts"))
from nbcells import section  # noqa: E402

NOTEBOOK = ROOT / "experiments" / "hierarchical-experts" / "experiment.ipynb"

TEST_CELL = r'''
let paths: Vec<_> = [(2, 3), (3, 2)].iter().map(|&(b, n)| tree_paths(b, n)).collect();
println!("@@paths {}", serde_json::to_string(&paths)?);
// The router of a b = 3, n = 2 tree (12 experts, 9 leaf paths), K = 2, on random tokens.
let cfg = ModelConfig { hidden_size: 16, num_experts: 12, num_experts_per_tok: 2, n_branches: 3, n_tree_layers: 2, intermediate_size: 18, ..ModelConfig::cpu() };
cfg.validate()?;
tch::manual_seed(3);
let vs = nn::VarStore::new(Device::Cpu);
let router = Router::new(&vs.root(), &cfg);
let x = Tensor::randn([10, 16], (Kind::Float, Device::Cpu));
let r = tch::no_grad(|| router.forward(&x));
let dense = Tensor::zeros([10, 12], (Kind::Float, Device::Cpu)).scatter_add(1, &r.expert_idx, &r.weights); // (N, E)
Tensor::write_safetensors(&[("gate", router.gate.weight.detach()), ("x", x), ("expert_idx", r.expert_idx.shallow_clone()),
    ("weights", r.weights.shallow_clone()), ("counts", r.counts.shallow_clone()), ("dense", dense)], std::env::var("MOE_TREE_OUT")?)?;
// Balancing on one node (b = 2, n = 1) worked by hand: branch probabilities (3/4, 1/4), slots (3, 1).
let hand = RouterOut { logits: Tensor::from_slice(&[3f32.ln(), 0.0]).view([1, 2]), expert_idx: Tensor::zeros([1, 1], (Kind::Int64, Device::Cpu)),
    counts: Tensor::from_slice(&[3f32, 1.0]), weights: Tensor::ones([1, 1], (Kind::Float, Device::Cpu)), n_branches: 2 };
let balanced = RouterOut { logits: Tensor::zeros([4, 6], (Kind::Float, Device::Cpu)), expert_idx: Tensor::zeros([4, 1], (Kind::Int64, Device::Cpu)),
    counts: Tensor::from_slice(&[2f32, 2.0, 1.0, 1.0, 0.0, 0.0]), weights: Tensor::ones([4, 1], (Kind::Float, Device::Cpu)), n_branches: 2 };
println!("@@balance {} {}", load_balancing_loss(&[hand], 0, 0, LoadBalancingNorm::Megablocks).double_value(&[]),
         load_balancing_loss(&[balanced], 0, 0, LoadBalancingNorm::Megablocks).double_value(&[]));
'''

# Worked by hand from the heap order: node i's branch c is expert b*i + c and leads to node b*i + c + 1.
HAND = {
    (2, 3): {  # 8 leaf paths, branch choices in lexicographic order
        "nodes": [[0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 1, 4], [0, 2, 5], [0, 2, 5], [0, 2, 6], [0, 2, 6]],
        "branches": [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]],
        "experts": [[0, 2, 6], [0, 2, 7], [0, 3, 8], [0, 3, 9], [1, 4, 10], [1, 4, 11], [1, 5, 12], [1, 5, 13]],
    },
    (3, 2): {  # 9 leaf paths
        "nodes": [[0, 1]] * 3 + [[0, 2]] * 3 + [[0, 3]] * 3,
        "branches": [[a, c] for a in range(3) for c in range(3)],
        "experts": [[0, 3], [0, 4], [0, 5], [1, 6], [1, 7], [1, 8], [2, 9], [2, 10], [2, 11]],
    },
}


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tree")
    src = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c.source for c in src.cells if c.cell_type == "code")
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (first, section(src.cells, "## Configuration"), section(src.cells, "## Model"), TEST_CELL)]
    path = NOTEBOOK.parent / ".tree-test.ipynb"  # the experiment's folder: the same relative :dep paths
    nbformat.write(nb, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update({"MOE_TREE_OUT": str(tmp / "tree.safetensors"), "MOE_RUN_DIR": str(tmp / "run"), "MOE_DEVICE": "cpu"})
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "helpers" / "scripts" / "run_notebook.py"), str(path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        path.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {l.split(" ", 1)[0]: l.split(" ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("@@")}
    return lines, load_file(str(tmp / "tree.safetensors"))


def test_paths_are_the_hand_worked_trees(tree_run):
    got = json.loads(tree_run[0]["@@paths"])
    for (b, n), (nodes, branches, experts) in zip([(2, 3), (3, 2)], got):
        assert nodes == HAND[(b, n)]["nodes"], (b, n)
        assert branches == HAND[(b, n)]["branches"], (b, n)
        assert experts == HAND[(b, n)]["experts"], (b, n)


def reference_routing(gate: torch.Tensor, x: torch.Tensor, b: int, n: int, k: int) -> torch.Tensor:
    """interpretable-moes' hierarchical-moe routing (its OlmoeMoe.forward and helpers/tree.py):
    each token's weight on every expert, (N, E)."""
    node_paths, branch_paths = [], []
    for seq in itertools.product(range(b), repeat=n):
        nodes = [0]
        for i in range(1, n):
            nodes.append(b * nodes[i - 1] + (seq[i - 1] + 1))
        node_paths.append(nodes)
        branch_paths.append(list(seq))
    node_paths, branch_paths = torch.tensor(node_paths), torch.tensor(branch_paths)
    expert_indices = node_paths * b + branch_paths
    n_routers, n_experts = (b ** n - 1) // (b - 1), b * (b ** n - 1) // (b - 1)
    logits = (x @ gate.T).reshape(x.shape[0], n_routers, b)
    w = torch.softmax(logits, dim=-1)[:, node_paths, branch_paths]  # (N, P, n)
    _, top = torch.topk(w.prod(dim=-1), k, dim=-1)
    selected = expert_indices[top]  # (N, K, n)
    cum = torch.gather(w.cumprod(dim=-1), 1, top.unsqueeze(-1).expand(-1, -1, n))
    one_hot = torch.nn.functional.one_hot(selected, num_classes=n_experts)
    return (one_hot * cum.unsqueeze(-1)).sum(dim=(1, 2))


def test_the_router_is_interpretable_moes_routing(tree_run):
    t = tree_run[1]
    ref = reference_routing(t["gate"].double(), t["x"].double(), b=3, n=2, k=2)
    assert torch.allclose(t["dense"].double(), ref, atol=1e-6), (t["dense"] - ref).abs().max()
    assert t["expert_idx"].shape == (10, 4), "K = 2 paths of n = 2 experts per token, path-major"
    assert (t["expert_idx"][:, [0, 2]] < 3).all() and (t["expert_idx"][:, [1, 3]] >= 3).all(), "depth 1 then depth 2 on each path"
    # Counts are (token, slot) assignments: an expert on both of a token's paths counts twice.
    assert t["counts"].sum().item() == 10 * 4
    assert torch.equal(t["counts"], torch.bincount(t["expert_idx"].flatten(), minlength=12).float())


def test_balancing_is_one_when_balanced_and_worked_by_hand_otherwise(tree_run):
    hand, balanced = map(float, tree_run[0]["@@balance"].split())
    assert abs(hand - 2 * (0.75 * 0.75 + 0.25 * 0.25)) < 1e-6, hand  # b * sum_c f_c P_c = 1.25
    assert abs(balanced - 1.0) < 1e-6, balanced  # two used nodes at 1/2 each, the unused one left out
