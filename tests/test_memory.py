"""`helpers::memory::estimate` against the measured peak resident memory of real training steps on
CPU, for two configurations, in a notebook made of the experiment's own deps, config and model cells
plus one test cell (issue: fast MoE ... memory: know before you launch). Every experiment notebook:
the parameters are counted from its model as built, as its Memory cell counts them."""
import pytest
import os
import re
import subprocess
import sys

import nbformat

from test_notebooks import ROOT, RUNNER

sys.path.insert(0, str(ROOT / "helpers" / "scripts"))
from nbcells import section  # noqa: E402

EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
TOLERANCE = 0.25  # |estimate - measured| / measured

MEMORY_CELL = r'''
/// `loss_chunk` > 0: the training step's fused cross-entropy; 0: logits, then cross-entropy.
fn mem_case(name: &str, cfg: &ModelConfig, b: i64, t: i64, checkpointing: bool, loss_chunk: i64) -> (f64, f64) {
    helpers::memory::reset_peak_rss().unwrap();
    let base = helpers::memory::rss_bytes().unwrap() as f64;
    let n_params: f64;
    {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = OlmoeForCausalLM::new(&vs, cfg);
        let named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        n_params = named.iter().map(|(_, t)| t.numel() as f64).sum(); // the model as built
        let mut opt = helpers::optim::Optimizer::new(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone(), helpers::optim::Rule::AdamW)).collect(),
            helpers::optim::OptimConfig { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, muon_lr: 0.0, muon_momentum: 0.95,
                                          muon_nesterov: true, muon_ns_steps: 5, muon_weight_decay: 0.0 }).unwrap();
        let x = Tensor::randint_low(2, 50000, [b, t + 1], (Kind::Int64, Device::Cpu));
        let (inp, tgt) = (x.narrow(1, 0, t), x.narrow(1, 1, t));
        for _ in 0..3 {
            opt.zero_grad();
            let (h, routers) = model.hidden(&inp);
            let head = if loss_chunk > 0 {
                fused_cross_entropy(&model.head_input(&h), &model.lm_head.weight, &tgt, loss_chunk)
            } else {
                cross_entropy(&model.head(&h), &tgt)
            };
            (head + load_balancing_loss(&routers, cfg.num_experts, cfg.num_experts_per_tok, LoadBalancingNorm::Megablocks) * 0.01).backward();
            opt.step(1.0);
        }
    }
    let measured = helpers::memory::peak_rss_bytes().unwrap() as f64 - base;
    let shape = cfg.memory_shape(); // the experiment's own account of its activations
    let train = helpers::memory::TrainShape { micro_batch: b, seq_len: t, compute_bytes: 4, master_weights: false, muon_fraction: 0.0,
        activation_checkpointing: checkpointing, loss_chunk };
    let est = helpers::memory::estimate_with_params(&shape, &train, &[("cpu".to_string(), None)], &[], Some(&[n_params])).unwrap();
    print!("{est}");
    let e = est.devices[0].peak();
    println!("@@memory {name}: estimate {:.1} MiB, measured {:.1} MiB", e / 1048576.0, measured / 1048576.0);
    (e, measured)
}
let small = ModelConfig { num_hidden_layers: 4, ..ModelConfig::cpu() };
mem_case("cpu-preset 16x128 fused CE", &small, 16, 128, false, TrainConfig::olmoe().loss_chunk);
let wide = ModelConfig { num_hidden_layers: 2, hidden_size: 256, num_experts: 32, num_experts_per_tok: 4, intermediate_size: 128, ..ModelConfig::cpu() };
mem_case("e32-k4 8x256 unfused CE", &wide, 8, 256, false, 0);
'''


@pytest.mark.parametrize("notebook", sorted((ROOT / "experiments").glob("*/experiment.ipynb")), ids=lambda p: p.parent.name)
def test_memory_estimate_matches_measured_peak(tmp_path, notebook):
    src = nbformat.read(notebook, as_version=4)
    cells = src.cells

    first = next(c.source for c in cells if c.cell_type == "code")
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (first, section(cells, "## Configuration"), section(cells, "## Model"), MEMORY_CELL)]
    path = notebook.parent / ".memory-test.ipynb"
    nbformat.write(nb, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update({"MOE_RUN_DIR": str(tmp_path / "run"), "MOE_DEVICE": "cpu"})
    try:
        proc = subprocess.run([sys.executable, str(RUNNER), str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        path.unlink()
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"@@memory (.+): estimate ([0-9.]+) MiB, measured ([0-9.]+) MiB", proc.stdout)
    assert len(found) == 2, proc.stdout[-3000:]
    for name, est, meas in found:
        err = abs(float(est) - float(meas)) / float(meas)
        print(f"{name}: estimate {est} MiB, measured {meas} MiB, error {err:.1%}")
        assert err <= TOLERANCE, (name, est, meas)
