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
