#!/usr/bin/env python3
"""Execute a notebook headlessly in the Rust (evcxr) kernel, streaming its output to the terminal.

    python helpers/scripts/run_notebook.py experiments/base-olmoe/experiment.ipynb [--out executed.ipynb]

Why not plain `jupyter execute`: it prints nothing until the end, and evcxr reports a panicking cell
as a success unless `:preserve_vars_on_panic 0` is set. This runner
- turns that setting on for the run (in memory; the notebook file is not changed),
- prints each cell's output as it arrives, so training progress is visible,
- fails (exit 1) on the first cell that errors or panics, naming the cell,
- sets MOE_RUN_DIR (runs/<experiment>/<timestamp> unless given) and saves the executed notebook
  there, so every run keeps the exact code that produced it.
The kernel's launcher (helpers/scripts/evcxr-kernel.sh) picks its build directory.
Environment overrides for the notebook (MOE_PRESET, MOE_STEPS, MOE_SET, ...) pass straight through.
"""
import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[2]
PANIC_MARKERS = ("panicked at", "Child process terminated with status")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """evcxr colours compiler errors character by character; terminals and logs want plain text."""
    return ANSI.sub("", text)


class StreamingClient(NotebookClient):
    """NotebookClient that echoes stream and error outputs as they arrive."""

    def output(self, outs, msg, display_id, cell_index):
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        if msg_type == "stream":
            target = sys.stdout if content.get("name") == "stdout" else sys.stderr
            target.write(content.get("text", ""))
            target.flush()
        elif msg_type == "error":
            sys.stderr.write(plain("\n".join(content.get("traceback") or [content.get("evalue", "")])) + "\n")
        elif msg_type in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text:
                print(text, flush=True)
        return super().output(outs, msg, display_id, cell_index)


def cell_failed_silently(cell) -> str | None:
    """A panic that evcxr still reported as success leaves its message in the outputs."""
    for out in cell.get("outputs", []):
        text = out.get("text", "") if out.get("output_type") == "stream" else ""
        for marker in PANIC_MARKERS:
            if marker in text:
                return text.strip().splitlines()[-1] if text.strip() else marker
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--out", type=Path, help="where to write the executed notebook (default: <run dir>/executed.ipynb)")
    ap.add_argument("--timeout", type=int, default=-1, help="per-cell timeout in seconds (default: none)")
    args = ap.parse_args()

    nb_path = args.notebook.resolve()
    if not nb_path.is_file():
        print(f"error: notebook {args.notebook} does not exist", file=sys.stderr)
        return 2
    experiment = nb_path.parent.name
    if not os.environ.get("MOE_RUN_DIR"):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        os.environ["MOE_RUN_DIR"] = str(ROOT / "runs" / experiment / stamp)
    run_dir = Path(os.environ["MOE_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)

    nb = nbformat.read(nb_path, as_version=4)
    setup = nbformat.v4.new_code_cell(":preserve_vars_on_panic 0")
    setup.metadata["tags"] = ["injected-by-run_notebook"]
    nb.cells.insert(0, setup)

    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    client = StreamingClient(
        nb,
        timeout=None if args.timeout < 0 else args.timeout,
        startup_timeout=600,
        kernel_name="rust",
        resources={"metadata": {"path": str(nb_path.parent)}},
    )

    def on_cell_start(cell, cell_index, **_):
        if cell_index == 0 or cell_index not in code_cells:
            return
        n = code_cells.index(cell_index)
        first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith(":")), "")
        print(f"\n[{experiment}] cell {n}/{len(code_cells) - 1}: {first[:70]}", flush=True)

    client.on_cell_start = on_cell_start
    print(f"[{experiment}] executing {nb_path.relative_to(ROOT) if nb_path.is_relative_to(ROOT) else nb_path}"
          f" in the rust kernel; run dir {run_dir}", flush=True)
    t0 = time.time()
    status, failure = 0, None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        status, failure = 1, type(e).__name__
        for i in code_cells:
            errs = [o for o in nb.cells[i].get("outputs", []) if o.get("output_type") == "error"]
            if errs:
                ename, evalue = errs[0].get("ename", ""), plain(errs[0].get("evalue", "")).strip()
                failure = f"cell {code_cells.index(i)} failed: {ename}: {evalue.splitlines()[0] if evalue else ''}"
                break
    if status == 0:
        for i in code_cells:
            why = cell_failed_silently(nb.cells[i])
            if why:
                status, failure = 1, f"cell {code_cells.index(i)} panicked: {why}"
                break
    nb.cells.pop(0)
    out = args.out or run_dir / "executed.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    took = time.time() - t0
    if status:
        print(f"\n[{experiment}] FAILED after {took:.0f}s: {failure}\n  executed notebook: {out}", file=sys.stderr)
    else:
        print(f"\n[{experiment}] ok in {took:.0f}s; executed notebook: {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
