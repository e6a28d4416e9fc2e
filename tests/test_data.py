"""Pretraining data from nothing to shards to a training run (issue: data at pretraining scale),
through the data notebooks and through the command, against a fake hub on 127.0.0.1 serving a
FineWeb-Edu-shaped dataset (parquet with text, language and score columns) made here."""
import json
import os
import struct
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fake_hub import FakeHub
from test_notebooks import ROOT, run_notebook
from test_program import setup_sh

REPO = "test-org/tiny-web"


def documents() -> list[dict]:
    """~700 web-page-sized documents cut from the bundled corpus; language alternates en/fr in
    blocks of 3, score cycles 0..4."""
    docs, cur = [], ""
    for line in (ROOT / "data/default/shakespeare.jsonl").read_text().splitlines()[:12]:
        for para in json.loads(line)["text"].split("\n\n"):
            cur += para + "\n\n"
            if len(cur) > 2000:
                docs.append(cur)
                cur = ""
    return [{"text": t, "language": "en" if (i // 3) % 2 == 0 else "fr", "score": float(i % 5) + 0.5, "id": f"doc-{i}"}
            for i, t in enumerate(docs)]


def parquet_bytes(rows: list[dict], path: Path) -> bytes:
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy", row_group_size=100)
    return path.read_bytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset")
    docs = documents()
    half = len(docs) // 2
    fake = FakeHub({REPO: {
        "sample/10BT/000_00000.parquet": parquet_bytes(docs[:half], d / "a.parquet"),
        "sample/10BT/001_00000.parquet": parquet_bytes(docs[half:], d / "b.parquet"),
        "README.md": b"# tiny web\n",
    }})
    fake.docs = docs
    yield fake
    fake.close()


def hub_env(hub: FakeHub, home: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": "hf_test", "MOE_DATASET": REPO,
            "MOE_DATA_FILES": "sample/10BT/*.parquet", "MOE_DATA_MAX_FILES": "all"}


def shard_header(path: Path) -> dict:
    with open(path, "rb") as f:
        magic, version, dtype, n_tokens, n_docs, tok = struct.unpack("<8sIIQQQ", f.read(40))
    return {"magic": magic, "version": version, "dtype": dtype, "tokens": n_tokens, "docs": n_docs, "tokenizer": tok}


def test_notebooks_download_process_then_train(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    down = run_notebook(ROOT / "data" / "download.ipynb", tmp_path / "run-download", **env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "2 file(s)" in down.stdout
    assert any(p.startswith("/api/datasets/test-org/tiny-web/revision/main") for p, _, _ in hub.requests)
    assert all(a == "Bearer hf_test" for _, _, a in hub.requests), "HF_TOKEN must be sent"

    out = tmp_path / "shards"
    n_requests = len(hub.requests)
    proc = run_notebook(ROOT / "data" / "process.ipynb", tmp_path / "run-process", MOE_DATA_OUT=str(out),
                        MOE_DATA_LANGUAGE="en", MOE_DATA_MIN_SCORE="1", MOE_DATA_VAL_TOKENS="20000", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hub.requests) == n_requests, "processing finds the downloaded files without the network"
    kept = [d for d in hub.docs if d["language"] == "en" and d["score"] >= 1]
    headers = [shard_header(p) for p in [out / "val" / "val.bin", *sorted((out / "train").glob("*.bin"))]]
    assert len(headers) == 3 and all(h["magic"] == b"MOESHRD1" and h["dtype"] == 2 for h in headers)
    assert sum(h["docs"] for h in headers) == len(kept)
    assert headers[0]["tokens"] >= 20000
    assert "tokens/s" in proc.stdout and "MB of text/s" in proc.stdout

    # The experiment trains on those shards (as its program: the notebook's own cells, started in seconds).
    train = setup_sh("run", "--program", str(ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"),
                     MOE_RUN_DIR=str(tmp_path / "run-train"), MOE_PRESET="cpu", MOE_STEPS="3", MOE_DEVICE="cpu",
                     MOE_SET=f"train.data={out} model.num_hidden_layers=1 train.log_every=1 train.eval_every=3 train.sample_tokens=2")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"data: {out} (2 shard(s)" in train.stdout
    rows = [json.loads(l) for l in (tmp_path / "run-train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "val.loss" in rows[-1]


def data_command(*args, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    proc = subprocess.run(["bash", "setup.sh", "data", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:])
    print(proc.stderr[-3000:])
    return proc


def test_command_downloads_processes_skips_and_reports(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    down = data_command("download", "--dataset", REPO, "--files", "sample/10BT/*.parquet", env=env)
    assert down.returncode == 0, down.stderr
    paths = down.stdout.split()
    assert len(paths) == 2 and all(Path(p).is_file() and str(tmp_path / "hf") in p for p in paths)

    out = tmp_path / "shards"
    first = data_command("process", "--input", *paths, "--out", str(out), "--val-tokens", "5000", env=env)
    assert first.returncode == 0, first.stderr
    assert "2 input file(s), 0 already done" in first.stdout
    again = data_command("process", "--input", *paths, "--out", str(out), "--val-tokens", "5000", env=env)
    assert "2 input file(s), 2 already done" in again.stdout
    info = data_command("info", str(out), env=env)
    assert info.returncode == 0 and "train: 2 shard(s)" in info.stdout and "u16" in info.stdout

    # Bad input: a one-line error naming the file and what to do, exit 1.
    bad = data_command("process", "--input", paths[0], "--out", str(tmp_path / "x"), "--text-column", "body", env=env)
    assert bad.returncode == 1
    assert "has no column \"body\" (it has: text, language, score, id); pass the text column's name" in bad.stderr
    offline = data_command("download", "--dataset", "test-org/absent", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE=1" in offline.stderr
