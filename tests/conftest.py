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


# --- Two workers (pytest-xdist; `bash setup.sh test` runs `-n 2 --dist loadscope`) ---------------
# A kernel execution is mostly cell compiles, which use one core, so two workers fit this 2-core
# machine. Tests that share an expensive fixture (module- or session-scoped: a kernel execution, a
# program build) must run on one worker, or each worker would pay for it: they form one group, and
# the scheduler below hands out whole groups. Groups start longest first (LPT scheduling), so the
# last one to finish is a short one.
#
# Why not xdist's own `--dist loadgroup` with `xdist_group` marks: xdist 3.8 tags a test's group by
# rewriting `item._nodeid`, which pytest 9 no longer reads (nodeid comes from `item._id`), so every
# test became its own group and each worker ran the shared fixtures (seen: the 14-step W&B kernel
# run twice). Here each worker writes {test id: group} to a file the controller's scheduler reads.
LONGEST_FIRST = ["test_training", "test_data", "test_notebooks", "test_program", "test_sweep", "test_dist",
                 "test_experts", "test_memory", "test_interp", "test_parity", "test_devices", "test_bench"]
GROUPS_ENV = "MOE_TEST_GROUPS_FILE"


def pytest_configure(config):
    config.addinivalue_line("markers", "uses(fixture): the test asks for this fixture at run time (request.getfixturevalue)")
    if not hasattr(config, "workerinput") and GROUPS_ENV not in os.environ:
        # The controller, before it starts the workers (they inherit the environment).
        import tempfile
        os.environ[GROUPS_ENV] = os.path.join(tempfile.mkdtemp(prefix="moe-test-groups-"), "groups.json")


def groups_of(items) -> dict:
    """{test id: group id} for the tests that share a module- or session-scoped fixture of this
    project, directly or through other tests (union-find)."""
    parent = {}

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

    grouped = []
    for item in items:
        for key in shared_fixtures(item):
            parent[find(key)] = find(item.nodeid)
            grouped.append(item.nodeid)
    return {nodeid: "group:" + find(nodeid) for nodeid in grouped}


def pytest_collection_modifyitems(config, items):
    """Orders the files longest first; in a worker, writes the groups for the scheduler."""
    rank = {stem: i for i, stem in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.stem, len(rank)))
    path = os.environ.get(GROUPS_ENV)
    if hasattr(config, "workerinput") and path:
        import json
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(groups_of(items), f)
        os.replace(tmp, path)  # every worker writes the same map


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # a plain `pytest` without xdist needs none of this
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class GroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with this project's groups as scopes (a test outside every
        group is a scope of its own)."""

        def _split_scope(self, nodeid: str) -> str:
            if not hasattr(self, "_groups"):
                import json
                path = os.environ.get(GROUPS_ENV)
                self._groups = json.load(open(path)) if path and os.path.exists(path) else {}
            return self._groups.get(nodeid, nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return GroupScheduling(config, log)
