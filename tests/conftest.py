"""Test-session isolation: tests need no internet, so no test may pick up a developer's real W&B
credentials (secrets.env, an exported WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes).
Tests that exercise W&B point it at a fake server on 127.0.0.1 explicitly."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["MOE_SECRETS"] = os.devnull
for var in [v for v in os.environ if v.startswith("WANDB_")]:
    del os.environ[var]
os.environ["WANDB_MODE"] = "disabled"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def brief_base_run(tmp_path_factory):
    """The base notebook's short CPU run in the kernel (test_notebooks.BRIEF), shared by
    test_notebooks.py, which checks it, and test_program.py, which runs the program with the same
    settings and compares them: one kernel execution for both."""
    from test_notebooks import BRIEF, ROOT, run_notebook
    run_dir = tmp_path_factory.mktemp("brief-base") / "run"
    return run_dir, run_notebook(ROOT / "experiments" / "base-olmoe" / "experiment.ipynb", run_dir, **BRIEF)


# --- Two workers (pytest-xdist; `bash setup.sh test` runs `-n 2 --dist loadgroup`) ---------------
# A kernel execution is mostly cell compiles, which use one core, so two workers fit this 2-core
# machine. Tests that share an expensive fixture (module- or session-scoped: a kernel execution, a
# program build) must run on one worker, or each worker would pay for it: they get one xdist group.
# Groups start longest first (LPT scheduling), so the last one to finish is a short one.
LONGEST_FIRST = ["test_training", "test_data", "test_notebooks", "test_program", "test_sweep", "test_dist",
                 "test_experts", "test_memory", "test_interp", "test_parity", "test_devices", "test_bench"]


def pytest_configure(config):
    config.addinivalue_line("markers", "uses(fixture): the test asks for this fixture at run time (request.getfixturevalue)")


def pytest_collection_modifyitems(config, items):
    """Puts the tests that share an expensive fixture in one xdist group, then orders the files
    longest first."""
    parent = {}  # union-find over test ids and "file::fixture" keys

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    def shared_fixtures(item):
        info = item._fixtureinfo
        for name, defs in info.name2fixturedefs.items():
            # Module or session scope, defined by this project (plugins' have baseid "").
            if name in item.fixturenames and defs and defs[-1].scope in ("module", "session") and defs[-1].baseid:
                yield name if defs[-1].scope == "session" else f"{item.path.stem}::{name}"
        yield from (m.args[0] for m in item.iter_markers("uses"))

    grouped = set()
    for item in items:
        for key in shared_fixtures(item):
            parent[find(key)] = find(item.nodeid)
            grouped.add(item.nodeid)
    for item in items:
        if item.nodeid in grouped:
            item.add_marker(pytest.mark.xdist_group(find(item.nodeid).replace("::", "-").replace("/", "-")))
    rank = {stem: i for i, stem in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.stem, len(rank)))
