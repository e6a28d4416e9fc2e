"""The benchmark commands run end to end and write their figures (a tiny configuration; the
figures themselves are measurements, not asserted)."""
import json
import subprocess
import sys

from test_notebooks import ROOT


def test_moe_benchmark_writes_its_table_and_json(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "helpers/scripts/bench_moe.py"), "--presets", "cpu", "--repeats", "1",
                           "--steps", "1", "--warmup", "1", "--batch", "2", "--seq", "32", "--impls", "eager,grouped_mm", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "MoE overhead ratio" in proc.stdout and "notebook (auto)" in proc.stdout
    r = json.loads(out.read_text())["results"]["cpu"]
    assert set(r["train_step"]) == {"rust", "rust:plain-ce", "hf:eager", "hf:grouped_mm"}
    assert all(v["tokens_per_s"] > 0 and 0 < v["mfu"] for v in r["train_step"].values())
    assert r["moe_overhead_ratio"] > 0 and r["fastest_transformers"] in ("eager", "grouped_mm")


def test_tokenization_benchmark_compares_with_python(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20}) + "\n"
                              for i in range(200)))
    out = tmp_path / "tok.json"
    proc = subprocess.run([sys.executable, str(ROOT / "helpers/scripts/bench_tokenize.py"), str(corpus), "--repeats", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0 and "vs python batch" in proc.stdout
    assert "different token counts" not in proc.stdout, "Rust and Python must produce the same tokens"
    res = json.loads(out.read_text())["results"]
    assert res["rust encode_batch_fast"]["tokens"] == res["python encode_batch"]["tokens"] > 0
