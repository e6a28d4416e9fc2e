"""Routing analysis of an imported Hugging Face OLMoE (experiments/base-olmoe/interp-baselines.ipynb):
the exported routing is transformers' own routing of the same tokens, and the metrics are those of
the exported table."""
import json
import sys
import math
from pathlib import Path

import nbformat
import pytest

from test_notebooks import ROOT, run_notebook

NB = ROOT / "experiments" / "base-olmoe" / "interp-baselines.ipynb"
BASE = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"


def test_copied_cells_are_the_base_experiments_verbatim():
    base = {c.source for c in nbformat.read(BASE, as_version=4).cells if c.cell_type == "code"}
    cells = nbformat.read(NB, as_version=4).cells
    tagged = [c for c in cells if "from-base-olmoe" in c.metadata.get("tags", [])]
    # deps, the three config-type cells, the ten Model cells, routing probes, data
    assert len(tagged) == 16, len(tagged)
    for c in tagged:
        assert c.source in base, f"cell starting {c.source[:60]!r} differs from experiment.ipynb's; copy it again"
    sys.path.insert(0, str(ROOT / "helpers" / "scripts"))
    from nbcells import section
    assert section(cells, "## Model") == section(nbformat.read(BASE, as_version=4).cells, "## Model"), "the whole Model section is the base's"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM
    tmp = tmp_path_factory.mktemp("interp")
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=50304, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                      pad_token_id=1, eos_token_id=50279)
    model = OlmoeForCausalLM(cfg).float().eval()
    model.save_pretrained(tmp / "ckpt")
    run_dir = tmp / "run"
    proc = run_notebook(NB, run_dir, MOE_INIT_FROM=str(tmp / "ckpt"),
                        MOE_SET="train.eval_batches=2 train.micro_batch_size=2 train.seq_len=32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pyarrow.parquet as pq
    table = pq.read_table(run_dir / "routing" / "routing.parquet").to_pydict()
    return model, run_dir, table, proc.stdout


def test_exported_routing_is_transformers_routing(analysed):
    import torch
    model, run_dir, t, _ = analysed
    n_tokens, layers, k = 2 * 2 * 32, 3, 2
    assert len(t["expert"]) == n_tokens * layers * k
    rows = list(zip(*(t[c] for c in ("sequence_ix", "token_ix", "token_id", "layer_ix", "topk_ix", "expert", "weight"))))
    assert rows == sorted(rows, key=lambda r: r[:5]), "ordered by sequence, token, layer, slot"
    for seq in (0, 3):
        mine = [r for r in rows if r[0] == seq]
        ids = [r[2] for r in mine if r[3] == 0 and r[4] == 0]
        assert len(ids) == 32
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            w, idx = torch.topk(logits.float().softmax(-1), k, dim=-1)  # (T, K), OLMoE: no renormalisation
            got = [r for r in mine if r[3] == layer]
            assert [r[5] for r in got] == idx.flatten().tolist(), f"sequence {seq} layer {layer}"
            assert max(abs(r[6] - x) for r, x in zip(got, w.flatten().tolist())) < 1e-5


def test_metrics_are_those_of_the_exported_table(analysed):
    _, run_dir, t, stdout = analysed
    m = json.loads((run_dir / "routing" / "metrics.json").read_text())
    n_tokens, k = 2 * 2 * 32, 2
    chosen = {}  # (token, layer) -> set of experts
    for s, tok, layer, e in zip(t["sequence_ix"], t["token_ix"], t["layer_ix"], t["expert"]):
        chosen.setdefault((s * 32 + tok, layer), set()).add(e)
    for layer in range(3):
        counts = [sum(1 for (n, l), es in chosen.items() if l == layer and e in es) for e in range(4)]
        assert sum(counts) == n_tokens * k
        p = [c / sum(counts) for c in counts if c]
        assert abs(m[f"usage_entropy.{layer}"] + sum(x * math.log(x) for x in p)) < 1e-9
        mean = sum(counts) / 4
        assert abs(m[f"max_vio.{layer}"] - (max(counts) - mean) / mean) < 1e-9
    for layer in range(2):
        hits = sum(1 for n in range(n_tokens) if chosen[(n, layer)] & chosen[(n, layer + 1)])
        assert abs(m[f"consistency.{layer}"] - hits / n_tokens) < 1e-9
    assert "consistency.2" not in m
    assert abs(m["val.loss"] - math.log(50304)) < 0.5, "a random tiny model predicts about uniformly"
    assert "layer | usage entropy / ln E | MaxVio | consistency with next (chance 0.833)" in stdout
    for png in ("usage.png", "transitions.png"):
        assert (run_dir / "routing" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
