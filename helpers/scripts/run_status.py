#!/usr/bin/env python3
"""A run directory's status, kept by the headless runners (run_notebook.py, `setup.sh run --program`):

    python helpers/scripts/run_status.py RUN_DIR running|finished|failed NOTEBOOK [ERROR]

`<run>/status.json` says running, finished or failed, with the last step metrics.jsonl recorded and
the error; a finished run becomes `latest` beside it (a symlink), so the newest finished run of an
experiment is `runs/<experiment>/latest`.
"""
import datetime
import json
import os
import sys
from pathlib import Path


def last_step(run_dir: Path) -> int | None:
    """The last step metrics.jsonl records (None before the first row)."""
    step = None
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if line.endswith("}"):
                step = json.loads(line).get("step", step)
    except (OSError, ValueError):
        pass
    return step


def mark_run(run_dir: Path, status: str, notebook: str, error: str | None = None) -> None:
    """`<run>/status.json`: running, finished or failed, with the last step and the error; a
    finished run becomes `<runs>/latest` (a symlink beside it), so the newest finished run of an
    experiment is `runs/<experiment>/latest`."""
    info = {"status": status, "step": last_step(run_dir), "notebook": notebook,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if error:
        info["error"] = error
    tmp = run_dir / f".status.json.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, run_dir / "status.json")
    if status == "finished":
        link, tmp_link = run_dir.parent / "latest", run_dir.parent / f".latest.{os.getpid()}"
        if not link.exists() or link.is_symlink():
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(run_dir.name)
            os.replace(tmp_link, link)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[2] not in ("running", "finished", "failed"):
        sys.exit(__doc__)
    mark_run(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) == 5 else None)
