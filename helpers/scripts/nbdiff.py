#!/usr/bin/env python3
"""A copied experiment against the one it was copied from, section by section and cell by cell.

    bash setup.sh diff experiments/my-idea [--base experiments/base-olmoe] [--summary]

An experiment starts as a copy of base-olmoe and should change only the cells its idea needs; this
prints which sections (`## ` headings) differ, then a unified diff of each changed cell, so a base
fix that has not reached the copy, or an edit in the wrong place, shows at a glance. Standard
library only.
"""
import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def notebook_of(path: Path) -> Path:
    return path / "experiment.ipynb" if path.is_dir() else path


def cells(nb: Path) -> list[tuple[str, str]]:
    """(cell_type, source) of every cell."""
    data = json.loads(nb.read_text())
    return [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in data["cells"]]


def sections(cs: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The cells grouped under their `## ` heading (the heading cell included); "intro" before the first."""
    out = [("intro", [])]
    for kind, src in cs:
        if kind == "markdown" and src.startswith("## "):
            out.append((src.splitlines()[0], []))
        out[-1][1].append((kind, src))
    return out


def changed_sections(base: Path, copy: Path) -> dict[str, str]:
    """{heading: "changed" | "only in copy" | "only in base"} for every section that is not identical."""
    b, c = dict(sections(cells(base))), dict(sections(cells(copy)))
    out = {}
    for h in list(b) + [h for h in c if h not in b]:
        if h not in c:
            out[h] = "only in base"
        elif h not in b:
            out[h] = "only in copy"
        elif b[h] != c[h]:
            out[h] = "changed"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("copy", type=Path, help="an experiment folder or notebook")
    ap.add_argument("--base", type=Path, default=ROOT / "experiments" / "base-olmoe", help="what it was copied from")
    ap.add_argument("--summary", action="store_true", help="the table of sections only, no cell diffs")
    args = ap.parse_args()
    base, copy = notebook_of(args.base), notebook_of(args.copy)
    for nb in (base, copy):
        if not nb.is_file():
            print(f"diff: {nb} does not exist (give an experiment folder or its .ipynb)", file=sys.stderr)
            return 2
    rel = lambda p: p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p
    bs, cs = dict(sections(cells(base))), dict(sections(cells(copy)))
    changes = changed_sections(base, copy)
    print(f"{rel(copy)} against {rel(base)}: {len(changes)} of {len(set(bs) | set(cs))} sections differ")
    for h in list(bs) + [h for h in cs if h not in bs]:
        status = changes.get(h, "same")
        lines = ""
        if status == "changed":
            a = "".join(s + "\n" for _, s in bs[h]).splitlines()
            b = "".join(s + "\n" for _, s in cs[h]).splitlines()
            d = list(difflib.unified_diff(a, b, lineterm="", n=0))
            plus = sum(1 for l in d if l.startswith("+") and not l.startswith("+++"))
            minus = sum(1 for l in d if l.startswith("-") and not l.startswith("---"))
            lines = f" (+{plus} -{minus} lines)"
        print(f"  {status:13} {h}{lines}")
    if args.summary:
        return 0
    for h, status in changes.items():
        if status != "changed":
            continue
        print(f"\n=== {h}")
        b_cells, c_cells = bs[h], cs[h]
        for i in range(max(len(b_cells), len(c_cells))):
            bk, bsrc = b_cells[i] if i < len(b_cells) else ("", "")
            ck, csrc = c_cells[i] if i < len(c_cells) else ("", "")
            if bsrc == csrc:
                continue
            label = f"{h} cell {i + 1} ({ck or bk})"
            sys.stdout.writelines(l + "\n" for l in difflib.unified_diff(
                bsrc.splitlines(), csrc.splitlines(), f"{rel(base)}: {label}", f"{rel(copy)}: {label}", lineterm=""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
