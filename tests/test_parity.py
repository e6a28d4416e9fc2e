"""Parity of the base-olmoe notebook's model with Hugging Face transformers' OlmoeForCausalLM, on CPU
in float32 (issue: exact OLMoE).

transformers builds small random OLMoE models and saves them; a notebook made of the experiment's own
dependency, config and model cells plus one parity cell imports each checkpoint with
`helpers::hf::load_weights`, runs a forward and backward pass and writes its results; this test
compares them with transformers' on the same inputs. Inputs avoid the padding id 1 (transformers
freezes that embedding row; the notebook, like OLMoE's own training, does not).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers" / "scripts"))
from nbcells import section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"
AUX_COEF = 0.01
CASES = {
    # id: (experts E, top-k K, norm_topk_prob, layers L)
    "E5-K2-L2": (5, 2, False, 2),
    "E3-K1-L3-norm": (3, 1, True, 3),
    "E6-K3-L2-norm": (6, 3, True, 2),
}

PARITY_CELL = r'''
// Parity: import each transformers checkpoint, forward + backward, write the results.
for dir in std::env::var("MOE_PARITY_DIRS")?.split(':') {
    let dir = std::path::PathBuf::from(dir);
    let pcfg: ModelConfig = helpers::hf::model_config(&dir)?;
    let pvs = nn::VarStore::new(Device::Cpu);
    let pmodel = OlmoeForCausalLM::new(&pvs, &pcfg);
    helpers::hf::load_weights(&dir, &pvs)?;
    let io: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("inputs.safetensors"))?.into_iter().collect();
    let (x, y) = (&io["input_ids"], &io["labels"]);
    let (logits, routers) = pmodel.forward(x);
    let ce = cross_entropy(&logits, y);
    let lb = load_balancing_loss(&routers, pcfg.num_experts, pcfg.num_experts_per_tok, LoadBalancingNorm::Transformers);
    (&ce + &lb * AUX_COEF).backward();
    let mut out: Vec<(String, Tensor)> = vec![("logits".into(), logits.detach()), ("ce".into(), ce.detach()), ("lb".into(), lb.detach())];
    for (l, r) in routers.iter().enumerate() {
        out.push((format!("router_logits.{l}"), r.logits.detach()));
        out.push((format!("expert_idx.{l}"), r.expert_idx.shallow_clone()));
    }
    for (name, var) in pvs.variables() {
        let g = var.grad();
        out.push((format!("grad.{name}"), if g.defined() { g.copy() } else { var.zeros_like() })); // an expert no token chose
    }
    // The fused cross-entropy, in chunks of 7 of the 32 tokens (the last one short), on a fresh copy.
    let fvs = nn::VarStore::new(Device::Cpu);
    let fmodel = OlmoeForCausalLM::new(&fvs, &pcfg);
    helpers::hf::load_weights(&dir, &fvs)?;
    let (fh, frouters) = fmodel.hidden(x);
    let fce = fused_cross_entropy(&fmodel.head_input(&fh), &fmodel.lm_head.weight, y, 7);
    (&fce + load_balancing_loss(&frouters, pcfg.num_experts, pcfg.num_experts_per_tok, LoadBalancingNorm::Transformers) * AUX_COEF).backward();
    out.push(("fused.ce".into(), fce.detach()));
    for (name, var) in fvs.variables() {
        let g = var.grad();
        out.push((format!("fused.grad.{name}"), if g.defined() { g } else { var.zeros_like() }));
    }
    // Every expert path must agree with the default one (auto, used above): the readable
    // per-expert loop, the sorted per-expert matmuls, the grouped matmuls.
    // "placed": every expert through the multi-device path (a map of CPU devices).
    for (tag, moe_impl) in [("loop", MoeImpl::Loop), ("sorted", MoeImpl::Sorted), ("grouped", MoeImpl::Grouped), ("placed", MoeImpl::Auto)] {
        let lcfg = ModelConfig { moe_impl, ..pcfg.clone() };
        let lvs = nn::VarStore::new(Device::Cpu);
        let mut lmodel = OlmoeForCausalLM::new(&lvs, &lcfg);
        // Two shards (even and odd experts) on the CPU: the multi-device path, rows cut from the stacks at load.
        let halves: Vec<(Device, Vec<i64>)> = (0..2).map(|s| (Device::Cpu, (s..lcfg.num_experts).step_by(2).collect())).collect();
        if tag == "placed" { lmodel.place_experts(&lvs, &halves); }
        helpers::hf::load_weights(&dir, &lvs)?;
        // The grouped matmuls must really run here (not their per-expert fallback).
        assert!(tag != "grouped" || lmodel.moe_blocks()[0].experts.grouped_applies(&Tensor::zeros([1, pcfg.hidden_size], (Kind::Float, Device::Cpu))));
        let (llogits, lrouters) = lmodel.forward(x);
        (cross_entropy(&llogits, y) + load_balancing_loss(&lrouters, lcfg.num_experts, lcfg.num_experts_per_tok, LoadBalancingNorm::Transformers) * AUX_COEF).backward();
        out.push((format!("{tag}.logits"), llogits.detach()));
        let grads: Vec<(String, Tensor)> = lvs.variables().into_iter().map(|(name, var)| { let g = var.grad(); (name, if g.defined() { g } else { var.zeros_like() }) }).collect();
        for (name, g) in helpers::placement::gather(grads)? { out.push((format!("{tag}.grad.{name}"), g)); } // shards joined into stacks
    }
    // LFLB: the bias chooses, the unbiased softmax weighs. A bias equal for all experts changes
    // nothing; a large bias on expert 0 puts it in every token's top-K.
    let bcfg = ModelConfig { lflb: true, ..pcfg.clone() };
    let bvs = nn::VarStore::new(Device::Cpu);
    let bmodel = OlmoeForCausalLM::new(&bvs, &bcfg);
    helpers::hf::load_weights(&dir, &bvs)?;
    let biases: Vec<Tensor> = bmodel.moe_blocks().iter().map(|m| m.router.lflb_bias.as_ref().unwrap().shallow_clone()).collect();
    tch::no_grad(|| for b in &biases { let _ = b.shallow_clone().fill_(3.0); });
    out.push(("lflb.uniform_logits".into(), tch::no_grad(|| bmodel.forward(x).0)));
    tch::no_grad(|| for b in &biases { let _ = b.shallow_clone().zero_(); let _ = b.get(0).fill_(10.0); });
    let (blogits, brouters) = tch::no_grad(|| bmodel.forward(x));
    out.push(("lflb.expert0_logits".into(), blogits));
    for (l, r) in brouters.iter().enumerate() {
        out.push((format!("lflb.expert_idx.{l}"), r.expert_idx.shallow_clone()));
    }
    // The update rule on known counts: b += u * sign(mean(c) - c), then centring and clamping.
    let counts = Tensor::from_slice(&[6f32, 1.0, 1.0, 0.0]);
    let upd = ModelConfig { lflb: true, num_experts: 4, num_experts_per_tok: 2, ..pcfg.clone() };
    let uvs = nn::VarStore::new(Device::Cpu);
    let umodel = OlmoeForCausalLM::new(&uvs, &upd);
    let block = umodel.moe_blocks()[0];
    block.router.update_lflb_bias(&counts, 0.5, 0.0, false);
    out.push(("lflb.update_plain".into(), block.router.lflb_bias.as_ref().unwrap().copy()));
    block.router.update_lflb_bias(&counts, 0.5, 0.0, true);
    out.push(("lflb.update_centered".into(), block.router.lflb_bias.as_ref().unwrap().copy()));
    for _ in 0..4 { block.router.update_lflb_bias(&counts, 0.5, 1.2, false); }
    out.push(("lflb.update_clamped".into(), block.router.lflb_bias.as_ref().unwrap().copy()));
    // Five optimizer steps on the same batch (helpers::optim): AdamW on everything, and on a fresh
    // copy Muon for the attention projections with AdamW for the rest. Then export the AdamW model.
    let ocfg = helpers::optim::OptimConfig { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1,
        muon_lr: 0.02, muon_momentum: 0.95, muon_nesterov: true, muon_ns_steps: 5, muon_weight_decay: 0.1 };
    let five_steps = |model: &OlmoeForCausalLM, vs: &nn::VarStore, muon: bool| -> anyhow::Result<Vec<f64>> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let rule = |n: &str| if muon && n.contains("self_attn.") && n.ends_with("_proj.weight") { helpers::optim::Rule::Muon } else { helpers::optim::Rule::AdamW };
        let mut opt = helpers::optim::Optimizer::new(named.into_iter().map(|(n, t)| { let r = rule(&n); (n, t, r) }).collect(), ocfg.clone())?;
        let mut losses = Vec::new();
        for _ in 0..5 {
            opt.zero_grad();
            let (logits, routers) = model.forward(x);
            let loss = cross_entropy(&logits, y) + load_balancing_loss(&routers, model.cfg.num_experts, model.cfg.num_experts_per_tok, LoadBalancingNorm::Transformers) * AUX_COEF;
            loss.backward();
            opt.step(1.0);
            losses.push(loss.double_value(&[]));
        }
        Ok(losses)
    };
    out.push(("adamw_losses".into(), Tensor::from_slice(&five_steps(&pmodel, &pvs, false)?)));
    let mvs = nn::VarStore::new(Device::Cpu);
    let mmodel = OlmoeForCausalLM::new(&mvs, &pcfg);
    helpers::hf::load_weights(&dir, &mvs)?;
    out.push(("muon_losses".into(), Tensor::from_slice(&five_steps(&mmodel, &mvs, true)?)));
    out.push(("trained_logits".into(), tch::no_grad(|| pmodel.forward(x).0)));
    let root = helpers::project_root()?;
    helpers::hf::export(dir.join("exported"), &pvs.variables().into_iter().collect::<Vec<_>>(), &pcfg, root.join(helpers::data::DEFAULT_TOKENIZER), AUX_COEF)?;
    // The same, in shards of at most 64 KiB with an index, as a large model is exported.
    helpers::hf::export_with_shard_size(dir.join("exported-sharded"), &pvs.variables().into_iter().collect::<Vec<_>>(), &pcfg, root.join(helpers::data::DEFAULT_TOKENIZER), AUX_COEF, 64 << 10)?;
    Tensor::write_safetensors(&out, dir.join("ours.safetensors"))?;
    println!("parity: wrote {}", dir.join("ours.safetensors").display());
}
'''




def reference(case_dir: Path, experts: int, top_k: int, norm: bool, layers: int, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=experts,
                      num_experts_per_tok=top_k, norm_topk_prob=norm, max_position_embeddings=64,
                      pad_token_id=1, eos_token_id=127, router_aux_loss_coef=AUX_COEF)
    model = OlmoeForCausalLM(cfg).float()
    model.save_pretrained(case_dir)
    x = torch.randint(2, 128, (2, 16))  # no padding id (1)
    y = torch.randint(2, 128, (2, 16))
    save_file({"input_ids": x, "labels": y}, case_dir / "inputs.safetensors")
    out = model(input_ids=x, output_router_logits=True)
    ce = F.cross_entropy(out.logits.reshape(-1, 128), y.reshape(-1))
    lb = load_balancing_loss_func(out.router_logits, experts, top_k)
    (ce + AUX_COEF * lb).backward()
    ref = {"logits": out.logits.detach(), "ce": ce.detach(), "lb": lb.detach()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for l, rl in enumerate(out.router_logits):
        ref[f"router_logits.{l}"] = rl.detach()
        ref[f"expert_idx.{l}"] = torch.topk(rl.float().softmax(-1), top_k, dim=-1).indices
    for name, g in grads.items():  # stacked experts: the notebook's names and layout are transformers'
        ref[f"grad.{name}"] = g
    # Five AdamW steps with the notebook's hyper-parameters, on the same batch.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = model(input_ids=x, output_router_logits=True)
        loss = F.cross_entropy(out.logits.reshape(-1, 128), y.reshape(-1)) + AUX_COEF * load_balancing_loss_func(out.router_logits, experts, top_k)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ref["adamw_losses"] = torch.tensor(losses, dtype=torch.float64)
    # Five steps of torch.optim.Muon on the attention projections, AdamW on the rest.
    model = OlmoeForCausalLM.from_pretrained(case_dir).float()
    muon = [p for n, p in model.named_parameters() if ".self_attn." in n and n.endswith("_proj.weight")]
    rest = [p for n, p in model.named_parameters() if not (".self_attn." in n and n.endswith("_proj.weight"))]
    opts = [torch.optim.Muon(muon, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True),
            torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)]
    losses = []
    for _ in range(5):
        for o in opts:
            o.zero_grad()
        out = model(input_ids=x, output_router_logits=True)
        loss = F.cross_entropy(out.logits.reshape(-1, 128), y.reshape(-1)) + AUX_COEF * load_balancing_loss_func(out.router_logits, experts, top_k)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    ref["muon_losses"] = torch.tensor(losses, dtype=torch.float64)
    return ref


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    refs, dirs = {}, []
    for seed, (case, spec) in enumerate(CASES.items()):
        d = base / case
        d.mkdir()
        refs[case] = reference(d, *spec, seed=seed)
        dirs.append(str(d))
    src = nbformat.read(EXPERIMENT, as_version=4)
    first_code = next(c.source for c in src.cells if c.cell_type == "code")
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        first_code, section(src.cells, "## Configuration"), section(src.cells, "## Model"),
        f"const AUX_COEF: f64 = {AUX_COEF};\n" + PARITY_CELL)]
    nb_path = EXPERIMENT.parent / ".parity-test.ipynb"  # the experiment's folder: same relative :dep paths
    nbformat.write(nb, nb_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update({"MOE_PARITY_DIRS": ":".join(dirs), "MOE_RUN_DIR": str(base / "run"), "MOE_DEVICE": "cpu"})
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "helpers" / "scripts" / "run_notebook.py"), str(nb_path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        nb_path.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Runs({case: (refs[case], load_file(str(base / case / "ours.safetensors"))) for case in CASES}, base)


class Runs(dict):
    """case -> (transformers' results, the notebook's results); `base` is the directory of the cases."""

    def __init__(self, results, base):
        super().__init__(results)
        self.base = base


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_transformers(parity_runs, case):
    ref, ours = parity_runs[case]
    diff = (ours["logits"] - ref["logits"]).abs().max().item()
    print(f"{case}: logits max abs diff {diff:.2e}, relative {rel(ours['logits'], ref['logits']):.2e}")
    assert diff <= 1e-4
    layers = CASES[case][3]
    for l in range(layers):
        assert torch.equal(ours[f"expert_idx.{l}"], ref[f"expert_idx.{l}"]), f"layer {l}: different experts chosen"
        assert (ours[f"router_logits.{l}"] - ref[f"router_logits.{l}"]).abs().max().item() <= 1e-5
    for k in ("ce", "lb"):
        print(f"{case}: {k} ours {ours[k].item():.7f} transformers {ref[k].item():.7f}")
        assert abs(ours[k].item() - ref[k].item()) <= 1e-5 * abs(ref[k].item())


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_transformers(parity_runs, case):
    ref, ours = parity_runs[case]
    names = sorted(k for k in ref if k.startswith("grad."))
    assert names == sorted(k for k in ours if k.startswith("grad.")), "parameter sets differ"
    worst = max(names, key=lambda k: rel(ours[k], ref[k]))
    print(f"{case}: worst gradient {worst} relative error {rel(ours[worst], ref[worst]):.2e} over {len(names)} tensors")
    assert rel(ours[worst], ref[worst]) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_fused_cross_entropy_matches_transformers(parity_runs, case):
    """The training step's default loss (train.loss_chunk > 0): the cross-entropy and every gradient
    computed chunk by chunk from the head's input, never building the logits."""
    ref, ours = parity_runs[case]
    print(f"{case}: fused CE {ours['fused.ce'].item():.7f}, transformers {ref['ce'].item():.7f}")
    assert abs(ours["fused.ce"].item() - ref["ce"].item()) <= 1e-5 * abs(ref["ce"].item())
    names = sorted(k for k in ref if k.startswith("grad."))
    worst = max(names, key=lambda k: rel(ours[f"fused.{k}"], ref[k]))
    print(f"{case}: fused CE, worst gradient {worst} relative error {rel(ours[f'fused.{worst}'], ref[worst]):.2e}")
    assert rel(ours[f"fused.{worst}"], ref[worst]) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_five_adamw_steps_match_transformers(parity_runs, case):
    ref, ours = parity_runs[case]
    worst = ((ours["adamw_losses"] - ref["adamw_losses"]).abs() / ref["adamw_losses"].abs()).max().item()
    print(f"{case}: losses over 5 AdamW steps ours {ours['adamw_losses'].tolist()} "
          f"transformers {ref['adamw_losses'].tolist()}; worst relative difference {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_five_muon_steps_match_torch_muon(parity_runs, case):
    ref, ours = parity_runs[case]
    worst = ((ours["muon_losses"] - ref["muon_losses"]).abs() / ref["muon_losses"].abs()).max().item()
    print(f"{case}: losses over 5 Muon+AdamW steps ours {ours['muon_losses'].tolist()} "
          f"torch {ref['muon_losses'].tolist()}; worst relative difference {worst:.2e}")
    assert ours["muon_losses"][-1] < ours["muon_losses"][0]
    assert worst <= 1e-4


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("case", CASES)
def test_export_round_trip_through_transformers(parity_runs, case, sharded, tmp_path):
    """The model trained 5 steps by the notebook's code, exported (in one file, or in 64 KiB shards
    with an index), loads in transformers with no extra code and gives the notebook's logits; the
    tokenizer loads with AutoTokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref, ours = parity_runs[case]
    exported = parity_runs.base / case / ("exported-sharded" if sharded else "exported")
    if sharded:
        index = json.loads((exported / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and not (exported / "model.safetensors").exists(), shards
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "OlmoeForCausalLM"
    x = load_file(str(parity_runs.base / case / "inputs.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=x).logits
    diff = (logits - ours["trained_logits"]).abs().max().item()
    print(f"{case}: exported model, transformers vs notebook logits max abs diff {diff:.2e}")
    assert diff <= 1e-4
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    assert tok.eos_token_id == 50279


@pytest.mark.parametrize("path", ["loop", "sorted", "grouped", "placed"])
@pytest.mark.parametrize("case", CASES)
def test_expert_paths_equal_the_default(parity_runs, case, path):
    _, ours = parity_runs[case]
    diff = (ours["logits"] - ours[f"{path}.logits"]).abs().max().item()
    grads = [k for k in ours if k.startswith("grad.")]
    worst = max(rel(ours[k], ours[f"{path}.{k}"]) for k in grads)
    print(f"{case}: {path} vs auto logits max abs diff {diff:.2e}, worst gradient relative difference {worst:.2e}")
    assert diff <= 1e-6 and worst <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_lflb_bias_chooses_but_does_not_weigh(parity_runs, case):
    _, ours = parity_runs[case]
    # Same bias on every expert: same choices, and the weights ignore the bias, so same logits.
    assert (ours["lflb.uniform_logits"] - ours["logits"]).abs().max().item() <= 1e-6
    # A large bias on expert 0: every token sends one of its K slots there.
    for l in range(CASES[case][3]):
        assert (ours[f"lflb.expert_idx.{l}"] == 0).any(dim=-1).all()
    assert not torch.allclose(ours["lflb.expert0_logits"], ours["logits"])


def test_lflb_update_rule(parity_runs):
    _, ours = next(iter(parity_runs.values()))
    # counts (6, 1, 1, 0), mean 2: sign(mean - c) = (-1, +1, +1, +1), rate 0.5.
    assert ours["lflb.update_plain"].tolist() == [-0.5, 0.5, 0.5, 0.5]
    # Centred update: delta - mean(delta) = (-0.75, 0.25, 0.25, 0.25), added to the above.
    assert ours["lflb.update_centered"].tolist() == [-1.25, 0.75, 0.75, 0.75]
    # Four more plain updates, clamped at 1.2 each time.
    assert ours["lflb.update_clamped"].tolist() == pytest.approx([-1.2, 1.2, 1.2, 1.2])
