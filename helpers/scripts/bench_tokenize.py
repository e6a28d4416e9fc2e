#!/usr/bin/env python3
"""Tokenization throughput of this project against the Python `tokenizers` binding, in one run.

    bash setup.sh bench-tokenize [FILE] [--repeats 5] [--batch-docs 1024]

FILE: parquet or JSONL with a `text` column; default: the bundled corpus cut into ~3 KB documents
(web-page sized, like FineWeb-Edu's) and written as a snappy parquet file. The same documents, the
same tokenizer (`data/default/tokenizer.json`, OLMoE), the same batches of `--batch-docs`, all
cores for both, no special tokens. Runs are interleaved (Rust, Python, Python fast, pipeline, ...)
and the median of `--repeats` is reported:
- rust: `helpers` (`data bench-tokenize`: tokenizers `encode_batch_fast`, as the shard pipeline),
- python: `tokenizers.Tokenizer.encode_batch` (the batch API), and `encode_batch_fast`,
- pipeline: the whole `data process` job (read parquet, tokenize, write shards) in tokens/s.
Only tokenization is timed for the first three (reading the file is not), after a warm-up (the Rust
side makes one untimed pass in its process; the Python tokenizer object stays warm across repeats,
so the median is a warm figure for both). Prints a table and writes
the figures as JSON (runs/bench/tokenize-<time>.json).
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data/default/tokenizer.json"


def default_corpus(dst: Path) -> Path:
    docs = []
    for line in (ROOT / "data/default/shakespeare.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        cur = ""
        for para in text.split("\n\n"):
            cur += para + "\n\n"
            if len(cur) >= 3000:
                docs.append(cur)
                cur = ""
        if cur:
            docs.append(cur)
    path = dst / "shakespeare-docs.parquet"
    pq.write_table(pa.table({"text": docs}), path, compression="snappy", row_group_size=1024)
    return path


def read_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]


def cargo_bin() -> Path:
    subprocess.run(["cargo", "build", "--quiet", "-p", "helpers", "--bin", "data"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-docs", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="where to write the figures (default runs/bench/tokenize-<time>.json)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    path = args.file or default_corpus(tmp)
    if not path.exists():
        sys.exit(f"bench-tokenize: {path} does not exist")
    texts = read_texts(path)
    n_bytes = sum(len(t.encode()) for t in texts)
    data = cargo_bin()
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts[:64], add_special_tokens=False))  # warm-up
    print(f"{path}: {len(texts)} documents, {n_bytes / 1e6:.1f} MB of text; {os.cpu_count()} cores; "
          f"Python tokenizers {tokenizers.__version__}; {args.repeats} interleaved repeats", flush=True)

    def python(fast: bool) -> dict:
        enc = tok.encode_batch_fast if fast else tok.encode_batch
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), args.batch_docs):
            n += sum(len(e.ids) for e in enc(texts[i:i + args.batch_docs], add_special_tokens=False))
        s = time.perf_counter() - t0
        return {"tokens": n, "seconds": s}

    def rust() -> dict:
        out = subprocess.run([str(data), "bench-tokenize", "--input", str(path), "--batch-docs", str(args.batch_docs)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return {"tokens": r["tokens"], "seconds": r["seconds"]}

    def pipeline(k: int) -> dict:
        out_dir = tmp / f"shards-{k}"
        t0 = time.perf_counter()
        out = subprocess.run([str(data), "process", "--input", str(path), "--out", str(out_dir), "--val-tokens", "1",
                              "--batch-docs", str(args.batch_docs)], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
        m = re.search(r"into (\d+) tokens .* in ([0-9.]+)s", out)
        return {"tokens": int(m.group(1)), "seconds": float(m.group(2)), "wall_seconds_with_startup": wall}

    runs = {"rust encode_batch_fast": [], "python encode_batch": [], "python encode_batch_fast": [], "rust pipeline (parquet -> shards)": []}
    for k in range(args.repeats):
        runs["rust encode_batch_fast"].append(rust())
        runs["python encode_batch"].append(python(False))
        runs["python encode_batch_fast"].append(python(True))
        runs["rust pipeline (parquet -> shards)"].append(pipeline(k))
    rows = {}
    for name, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        rows[name] = {"tokens": rs[0]["tokens"], "median_seconds": secs, "tokens_per_s": rs[0]["tokens"] / secs,
                      "mb_per_s": n_bytes / 1e6 / secs, "seconds": [r["seconds"] for r in rs]}
    ref = rows["python encode_batch"]["tokens_per_s"]
    print(f"\n{'':36} {'tokens/s':>12} {'MB/s':>8} {'vs python batch':>16}")
    for name, r in rows.items():
        print(f"{name:36} {r['tokens_per_s']:12,.0f} {r['mb_per_s']:8.2f} {r['tokens_per_s'] / ref:15.2f}x")
    counts = {r["tokens"] for name, r in rows.items() if "pipeline" not in name}  # the pipeline adds EOS
    if len(counts) != 1:
        print(f"warning: the implementations produced different token counts: {counts}")
    out = args.json or ROOT / "runs" / "bench" / f"tokenize-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"file": str(path), "documents": len(texts), "text_bytes": n_bytes, "cores": os.cpu_count(),
                               "python_tokenizers": tokenizers.__version__, "rust_tokenizers": "0.23.2",
                               "batch_docs": args.batch_docs, "repeats": args.repeats, "results": rows}, indent=1))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
