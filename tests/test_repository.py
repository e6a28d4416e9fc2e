"""Repository rules a machine can check: stripped notebooks, ignored secrets, the Quickstart."""
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


NOTEBOOKS = sorted(set(tracked("*.ipynb")) | set(ROOT.glob("experiments/*/*.ipynb")) | set(ROOT.glob("data/*.ipynb")))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells)
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{nb.name}: cells {dirty} have outputs; clear them before committing"
    assert json.loads(nb.read_text())["metadata"]["kernelspec"]["name"] == "rust"


def kernel_display_name() -> str:
    """The display name setup.sh gives the Rust kernel it installs."""
    m = re.search(r'spec\["display_name"\] = "([^"]+)"', (ROOT / "setup.sh").read_text())
    assert m, "setup.sh no longer names the kernel"
    return m.group(1)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_notebook_is_saved_as_jupyter_saves_it(nb):
    """Opening a notebook in JupyterLab and saving it (or autosave) must not dirty git: the file is
    byte for byte what nbformat writes (sorted keys, one-space indent, a final newline), and its
    kernelspec is the one JupyterLab fills in from the installed kernel."""
    import nbformat
    text = nb.read_text()
    assert text == nbformat.writes(nbformat.reads(text, as_version=4)) + "\n", (
        f"{nb.name} is not in nbformat's form; rewrite it with nbformat.write(nbformat.read(path, 4), path)")
    spec = json.loads(text)["metadata"]["kernelspec"]
    assert spec == {"display_name": kernel_display_name(), "language": "rust", "name": "rust"}, spec


def test_every_experiment_has_a_notebook_and_a_readme():
    # Hidden folders are scratch copies a running test makes (test_program's .program-test).
    dirs = [d for d in (ROOT / "experiments").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert dirs
    for d in dirs:
        assert (d / "experiment.ipynb").is_file(), d
        assert (d / "README.md").is_file(), d


def test_secrets_env_is_ignored_and_documented():
    ignored = subprocess.run(["git", "check-ignore", "-q", "secrets.env"], cwd=ROOT)
    assert ignored.returncode == 0, "secrets.env must be git-ignored"
    example = (ROOT / "secrets.env.example").read_text()
    # Every WANDB_* / HF_* variable helpers reads is documented in the example.
    read = set()
    for src in (ROOT / "helpers" / "src").rglob("*.rs"):
        read |= set(re.findall(r'"((?:WANDB|HF)_[A-Z_]+)"', src.read_text()))
    assert {"WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "HF_TOKEN"} <= read
    for var in sorted(read - {"HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE"}):  # cache and mirror settings, not secrets
        assert re.search(rf"^#?\s*{var}=", example, re.M), f"{var} is not in secrets.env.example"


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ .*[Qq]uick ?start.*?\n```[^\n]*\n(.*?)```", readme, re.S | re.M)
    assert m, "README.md needs a Quickstart heading followed by a code block"
    cmds = [l for l in m.group(1).splitlines() if l.strip() and not l.startswith("#")]
    assert len(cmds) == 2, cmds
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def dep_lines(nb: Path) -> list[str]:
    first = next(c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
    return [l.strip() for l in "".join(first["source"]).splitlines() if l.startswith(":dep")]


@pytest.mark.parametrize("nb", sorted(ROOT.glob("experiments/*/experiment.ipynb")), ids=lambda p: p.parent.name)
def test_experiment_dependencies_match_the_prebuilt_ones(nb):
    # setup.sh compiles tests/notebooks/deps.ipynb once; an experiment with other :dep lines would
    # recompile tch inside the kernel (minutes) on its first run.
    assert dep_lines(nb) == dep_lines(ROOT / "tests" / "notebooks" / "deps.ipynb")


def test_what_the_project_cites_ships_with_it():
    # Code, notebooks and docs cite docs/*.md; notes that do not ship (reference/*.md) are never cited.
    cited, missing = set(), []
    for path in tracked("*.rs") + tracked("*.py") + tracked("*.ipynb") + tracked("*.md") + tracked("*.sh"):
        text = path.read_text(errors="replace")
        assert not re.search(r"\breference/[a-z_-]+\.md", text), f"{path.relative_to(ROOT)} cites a file that does not ship"
        for doc in re.findall(r"\bdocs/([a-z_-]+\.md)", text):
            cited.add(doc)
            if not (ROOT / "docs" / doc).is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}")
    assert not missing, missing
    assert {"olmoe.md", "performance.md", "libtorch.md"} <= cited


def test_the_python_project_is_named_not_called_the_seed():
    for path in [ROOT / "README.md", *tracked("experiments/*.ipynb"), *tracked("experiments/*/*.md")]:
        hits = re.findall(r"\b[Tt]he seed(?! of)\b[^\n]{0,30}", path.read_text())
        assert not hits, f"{path.relative_to(ROOT)}: say interpretable-moes, not {hits[:3]}"
    assert "https://github.com/bongohead/interpretable-moes" in (ROOT / "README.md").read_text()


def test_tests_sharing_a_fixture_run_on_one_worker(tmp_path):
    """The suite's scheduler (conftest.py) keeps the tests that share a module- or session-scoped
    fixture on one worker, so the fixture (a kernel execution, minutes) runs once. Run on a small
    suite with two workers: the six tests of the shared fixture on one, the free test on either."""
    import shutil
    import sys
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_shared.py").write_text(
        "import os, time, pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def shared():\n"
        "    return 'made once'\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_x(shared, i):\n"
        "    time.sleep(0.1)\n"
        "def test_free():\n"
        "    time.sleep(0.3)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MOE_TEST_GROUPS_FILE"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadscope", "--no-loadscope-reorder",
                           "-v", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    workers = {w for w, t in re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED \S+::(test_x\S*)", proc.stdout)}
    assert len(re.findall(r"PASSED \S+::test_x", proc.stdout)) == 6 and len(workers) == 1, proc.stdout[-3000:]
