#!/usr/bin/env python3
"""Execute a notebook headlessly in the Rust (evcxr) kernel, streaming its output to the terminal.

    python helpers/scripts/run_notebook.py experiments/base-olmoe/experiment.ipynb [--out executed.ipynb]

Why not plain `jupyter execute`: it prints nothing until the end, and evcxr reports two kinds of
failure as success: a panic (unless `:preserve_vars_on_panic 0` is set), and an error returned by
`?` at the top level of a cell (it prints the error and skips the rest of the cell). This runner
- turns `:preserve_vars_on_panic 0` on for the run (in memory; the notebook file is not changed),
- appends to each code cell a line that prints a sentinel, so a cell that returned early is caught
  (the saved notebook shows the original sources),
- prints each cell's output as it arrives, so training progress is visible,
- fails (exit 1) on the first cell that errors, panics or returns early, naming the cell,
- sets MOE_RUN_DIR (runs/<experiment>/<timestamp> unless given; with MOE_RESUME, the resumed run's
  directory) and saves the executed notebook
  there, so every run keeps the exact code that produced it,
- keeps the run's `status.json` (running, finished or failed, the last step, the error) and points
  `latest` beside the run directory at the newest finished run.
`--skip-tag train` leaves out the cells tagged `train` (`bash setup.sh generate` uses it to sample
from a saved run without training). The kernel's launcher (helpers/scripts/evcxr-kernel.sh) picks
its build directory.
Environment overrides for the notebook (MOE_PRESET, MOE_STEPS, MOE_SET, ...) pass straight through.
"""
import argparse
import datetime
import os
import queue
import re
import sys
import time
from pathlib import Path

import nbformat
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

sys.path.insert(0, str(Path(__file__).parent))
from run_status import mark_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PANIC_MARKERS = ("panicked at", "Child process terminated with status")
SENTINEL = "@@run_notebook: cell completed@@"
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
            target.write(content.get("text", "").replace(SENTINEL + "\n", "").replace(SENTINEL, ""))
            target.flush()
        elif msg_type == "error":
            sys.stderr.write(plain("\n".join(content.get("traceback") or [content.get("evalue", "")])) + "\n")
        elif msg_type in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text:
                print(text, flush=True)
        return super().output(outs, msg, display_id, cell_index)


def with_sentinel(source: str) -> str:
    """Appends a statement printing SENTINEL, in the form that compiles after the cell's last line:
    after a statement or an item a plain statement; after a trailing expression `;` first (the
    expression's value is then not displayed, which only matters for headless runs)."""
    code = [l for l in source.splitlines() if l.strip() and not l.lstrip().startswith(("//", ":"))]
    if not code:
        return source
    last = code[-1].rstrip()
    sep = "\n" if last.endswith((";", "}")) else "\n;"
    return f'{source}{sep}println!("{SENTINEL}");'


def outputs_text(cell, stream: str | None = None) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and (stream is None or o.get("name") == stream))


def failure_of(cell) -> str | None:
    """Why a cell that the kernel reported as done did not complete, or None."""
    errs = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if errs:
        evalue = plain(errs[0].get("evalue", "")).strip()
        return f"{errs[0].get('ename', 'error')}: {evalue.splitlines()[0] if evalue else ''}"
    text = outputs_text(cell)
    for marker in PANIC_MARKERS:
        if marker in text:
            return "panicked: " + next(l for l in text.splitlines() if marker in l).strip()
    if SENTINEL not in text:
        err = plain(outputs_text(cell, "stderr")).strip()
        return "returned early with an error: " + (err.splitlines()[-1] if err else "(no message)")
    return None


def drain_late_output(client, cell, wait: float = 3.0) -> None:
    """Appends stream messages that arrive after the cell went idle (stopping at the sentinel)."""
    get = run_sync(client.kc.get_iopub_msg)
    deadline = time.time() + wait
    while (remaining := deadline - time.time()) > 0:
        try:
            msg = get(timeout=remaining)
        except queue.Empty:
            return
        if msg["msg_type"] != "stream":
            continue
        name, text = msg["content"].get("name", "stdout"), msg["content"].get("text", "")
        cell.outputs.append(nbformat.v4.new_output("stream", name=name, text=text))
        (sys.stdout if name == "stdout" else sys.stderr).write(text.replace(SENTINEL + "\n", ""))
        if SENTINEL in text:
            return


def drop_sentinel(cell) -> None:
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and SENTINEL in o.get("text", ""):
            o["text"] = o["text"].replace(SENTINEL + "\n", "").replace(SENTINEL, "")
    cell["outputs"] = [o for o in cell.get("outputs", []) if not (o.get("output_type") == "stream" and not o.get("text"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--out", type=Path, help="where to write the executed notebook (default: <run dir>/executed.ipynb)")
    ap.add_argument("--timeout", type=int, default=-1, help="per-cell timeout in seconds (default: none)")
    ap.add_argument("--skip-tag", action="append", default=[], metavar="TAG",
                    help="do not execute code cells tagged TAG (cell metadata 'tags'); repeatable")
    args = ap.parse_args()

    nb_path = args.notebook.resolve()
    if not nb_path.is_file():
        print(f"error: notebook {args.notebook} does not exist", file=sys.stderr)
        return 2
    experiment = nb_path.parent.name
    resume = os.environ.get("MOE_RESUME", "").strip()
    if resume and not os.environ.get("MOE_RUN_DIR"):
        # Continue in the resumed run's directory: a run directory, or <run>/checkpoints/step-N.
        r = Path(resume).resolve()
        os.environ["MOE_RUN_DIR"] = str(r.parents[1] if (r / "state.json").is_file() else r)
    if not os.environ.get("MOE_RUN_DIR"):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        os.environ["MOE_RUN_DIR"] = str(ROOT / "runs" / experiment / stamp)
    run_dir = Path(os.environ["MOE_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)

    shown = str(nb_path.relative_to(ROOT) if nb_path.is_relative_to(ROOT) else nb_path)
    marking = not args.skip_tag  # a training run (generate's sampling leaves the run's status alone)
    if marking:
        mark_run(run_dir, "running", shown)
    nb = nbformat.read(nb_path, as_version=4)
    setup = nbformat.v4.new_code_cell(":preserve_vars_on_panic 0")
    setup.metadata["tags"] = ["injected-by-run_notebook"]
    nb.cells.insert(0, setup)

    skipped = [i for i, c in enumerate(nb.cells)
               if c.cell_type == "code" and set(c.metadata.get("tags", [])) & set(args.skip_tag)]
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and i not in skipped]
    originals = {i: nb.cells[i].source for i in code_cells}
    client = StreamingClient(
        nb,
        timeout=None if args.timeout < 0 else args.timeout,
        startup_timeout=600,
        kernel_name="rust",
        resources={"metadata": {"path": str(nb_path.parent)}},
    )
    print(f"[{experiment}] executing {nb_path.relative_to(ROOT) if nb_path.is_relative_to(ROOT) else nb_path}"
          f" in the rust kernel; run dir {run_dir}", flush=True)
    t0 = time.time()
    status, failure = 0, None
    with client.setup_kernel():
        for n, i in enumerate(code_cells):
            cell = nb.cells[i]
            if n > 0:
                first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith(":")), "")
                print(f"\n[{experiment}] cell {n}/{len(code_cells) - 1}: {first[:70]}", flush=True)
                cell.source = with_sentinel(cell.source)
            try:
                client.execute_cell(cell, i)
                why = failure_of(cell) if n > 0 else None
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
                why = failure_of(cell) or f"{type(e).__name__}: {plain(str(e)).strip().splitlines()[-1]}"
            cell.source = originals[i]
            if why and why.startswith("returned early"):
                # evcxr forwards the cell's output from another thread, so lines can reach the
                # client after the cell is reported done; collect them before judging the cell.
                drain_late_output(client, cell)
                why = failure_of(cell)
            drop_sentinel(cell)
            if why:
                status, failure = 1, f"cell {n} failed: {why}"
                break
    nb.cells.pop(0)
    out = args.out or run_dir / "executed.ipynb"
    if out.exists() and not args.out:  # a resumed run keeps the first run's record too
        out = run_dir / f"executed-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    took = time.time() - t0
    if marking:
        mark_run(run_dir, "failed" if status else "finished", shown, failure)
    if status:
        print(f"\n[{experiment}] FAILED after {took:.0f}s: {failure}\n  executed notebook: {out}", file=sys.stderr)
    else:
        print(f"\n[{experiment}] ok in {took:.0f}s; executed notebook: {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
