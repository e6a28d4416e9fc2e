"""The experiment as a program (issue: run where users run it): the notebook's cells compiled by
`bash setup.sh build`, the same losses as the notebook in the kernel; setup's choice of PyTorch
(an existing install, or the wheel the NVIDIA driver supports, with a fake nvidia-smi); and the
GPU check built against torch 2.11.0 and dry-run on this CPU, so it cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_notebooks import BRIEF, ROOT

EXPERIMENT = ROOT / "experiments" / "base-olmoe" / "experiment.ipynb"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_") or k == "MOE_SECRETS"}
    env.update(extra)
    return env


def setup_sh(*args, timeout=3600, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(ROOT / "setup.sh"), *args], cwd=ROOT, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_program_trains_exactly_as_the_notebook(tmp_path, brief_base_run):
    """The base notebook's short run in the kernel (shared with tests/test_notebooks.py) and its
    program with the same settings."""
    settings = dict(BRIEF, MOE_DEVICE="cpu")
    nb_run, proc = brief_base_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    prog_run = tmp_path / "program"
    proc = setup_sh("run", "--program", str(EXPERIMENT), MOE_RUN_DIR=str(prog_run), **settings)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The same run directory: config, metrics, checkpoints, results, weights, the HF export.
    for f in ("config.json", "metrics.jsonl", "training_results.json", "training_curves.png", "model.safetensors",
              "summary.json", "hf/config.json", "routing/routing.parquet", "checkpoints/latest", "expert_usage.jsonl"):
        assert (prog_run / f).exists(), f"the program did not write {f}"
    assert (prog_run / "program.rs").read_text().startswith("//! Generated from"), "the run keeps the program's source"
    assert "step    20 |" in (prog_run / "program.log").read_text(), "the run keeps the program's output"
    assert json.loads((prog_run / "config.json").read_text()) == json.loads((nb_run / "config.json").read_text())
    # Same numbers, step by step, as the notebook in the kernel (same libtorch, same code): every
    # logged value but the clocks (times, tokens/s, MFU) and the process's memory, to the bit.
    clocks = ("time", "tokens_per_s", "mfu", "memory.")
    a, b = rows(nb_run), rows(prog_run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not any(c in k for c in clocks)}
        assert keys == {k for k in rb if not any(c in k for c in clocks)}, ra["step"]
        for k in keys:
            assert rb[k] == ra[k], f"{k} at step {ra['step']}: program {rb[k]} vs notebook {ra[k]}"
            compared += 1
    for key in ("train.loss", "val.loss", "grad_norm", "interp.usage_entropy_mean", "expert_usage.0.0"):
        assert any(key in r for r in a), key
    assert [r["step"] for r in b if "train.loss" in r] == [5, 10, 15, 20]
    print(f"{compared} logged values equal between the notebook and the program")


def test_build_leaves_out_tagged_cells_and_reports_errors(tmp_path):
    tool = ROOT / "target" / "debug" / "moe-program"
    main = subprocess.run([str(tool), "generate", str(EXPERIMENT), "--skip-tag", "train"], capture_output=True, text=True, check=True).stdout
    assert "fn forward_backward" in main and "let schedule = helpers::optim::Schedule" not in main
    bad = ROOT / "experiments" / ".program-test" / "experiment.ipynb"  # beside the others: same :dep paths
    bad.parent.mkdir(exist_ok=True)
    nb = json.loads(EXPERIMENT.read_text())
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": "let x = 1;\nlet y = ;"})
    bad.write_text(json.dumps(nb))
    try:
        proc = setup_sh("build", str(bad))
    finally:
        bad.unlink()
        bad.parent.rmdir()
    assert proc.returncode != 0
    n_code = sum(c["cell_type"] == "code" for c in nb["cells"])
    assert f"code cell {n_code} (\"let x = 1;\"): does not parse as Rust at its line 2" in proc.stderr


# --- Which PyTorch setup.sh uses ------------------------------------------------------------------
def fake_nvidia_smi(tmp_path: Path, driver: str) -> Path:
    d = tmp_path / f"bin-{driver}"
    d.mkdir()
    smi = d / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n# a fake nvidia-smi: the driver version setup.sh asks for\necho '{driver}'\n")
    smi.chmod(0o755)
    return d


@pytest.mark.parametrize("driver,choice", [
    ("580.82.07", "PyPI's default wheel (CUDA 13)"),
    ("575.57.08", "PyTorch's CUDA 12.8 build"),
    ("550.163.01", "PyTorch's CUDA 12.6 build"),
    ("470.256.02", "the CPU build"),
])
def test_the_driver_decides_the_torch_wheel(tmp_path, driver, choice):
    path = f"{fake_nvidia_smi(tmp_path, driver)}:{os.environ['PATH']}"
    proc = setup_sh("torch-plan", PATH=path)
    assert proc.returncode == 0, proc.stderr
    assert f"driver {driver}" in proc.stdout and choice in proc.stdout, proc.stdout
    index = {"PyPI": None, "12.8": "cu128", "12.6": "cu126", "CPU": "cpu"}
    want = next(v for k, v in index.items() if k in choice)
    if want is None:
        assert "pip install torch==2.13.0\n" in proc.stdout.replace("\x1b[0m", "") + "\n"
    else:
        assert f"torch==2.13.0+{want} --index-url https://download.pytorch.org/whl/{want}" in proc.stdout


def test_no_driver_and_forced_index(tmp_path):
    empty = tmp_path / "nobin"
    empty.mkdir()
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    proc = setup_sh("torch-plan", PATH=path)
    assert "no NVIDIA driver" in proc.stdout
    proc = setup_sh("torch-plan", PATH=f"{fake_nvidia_smi(tmp_path, '575.1')}:{path}", MOE_TORCH_INDEX="cu126")
    assert "MOE_TORCH_INDEX=cu126" in proc.stdout and "whl/cu126" in proc.stdout
    proc = setup_sh("torch-plan", MOE_TORCH_INDEX="rocm")
    assert proc.returncode != 0 and "use pypi, cu128, cu126 or cpu" in proc.stderr


def fake_python(tmp_path: Path, site: Path) -> Path:
    """A python whose packages are `site` (a second environment), as MOE_TORCH_PYTHON names one."""
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return py


def test_an_existing_torch_is_used_or_refused(tmp_path):
    # A torch with no tch release: refused with the known pairs.
    site = tmp_path / "site-2.12"
    (site / "torch" / "lib").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("")
    (site / "torch-2.12.0.dist-info").mkdir()
    (site / "torch-2.12.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.12.0\n")
    proc = setup_sh("torch-plan", MOE_TORCH_PYTHON=str(fake_python(tmp_path, site)))
    assert proc.returncode != 0
    assert "torch 2.12.0" in proc.stderr and "torch 2.11.0 = tch 0.24.0" in proc.stderr


# --- The GPU check, prepared here and dry-run on the CPU against torch 2.11.0 ----------------------
@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    proc = setup_sh("gpu-check", "--prepare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path_factory.mktemp("gpu-check")
    proc = setup_sh("gpu-check", "--dry-run", "--out", str(out), MOE_THREADS="2")
    return proc, out


def test_the_gpu_check_folder_fits_a_device_call(gpu_check):
    folder = ROOT / "target" / "gpu-check"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "out" not in f.relative_to(folder).parts)
    print(f"GPU check folder: {size / 2**20:.1f} MiB")
    assert size <= 60 * 2**20
    for f in ("bin/base-olmoe", "bin/gpu-check", "gpu_check.py", "hf_bench.py", "data/default/tokenizer.json"):
        assert (folder / f).is_file(), f


def test_the_gpu_check_dry_run_passes_on_cpu_against_torch_2_11(gpu_check):
    proc, out = gpu_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True
    status = {c["check"]: c["status"] for c in report["checks"]}
    print(json.dumps(status, indent=1))
    # The programs ran on torch 2.11.0's libtorch, not the project's 2.13.0.
    runtime = next(c for c in report["checks"] if c["check"] == "CUDA runtime")
    assert "torch-2.11.0" in runtime["figures"]["libtorch"], runtime
    assert status["CUDA runtime"] == "skipped"
    for name in ("expert paths fp32 (grouped, sorted vs loop)", "expert paths bf16 (grouped, sorted vs loop)", "KV-cache generation", "placed experts",
                 "experiment program: bf16-mixed on cpu vs fp32 on cpu", "experiment program: experts placed round-robin:cpu,cpu vs unplaced"):
        assert status.get(name) == "pass", (name, status)
    speed = next(c for c in report["checks"] if c["check"].startswith("speed"))
    assert speed["figures"]["tokens_per_s"] > 0 and speed["figures"]["transformers_tokens_per_s"] > 0
    assert any(c["check"].startswith("memory") for c in report["checks"])
    assert (out / "gpu-check.md").read_text().startswith("# GPU check")


def test_an_existing_torch_2_11_is_taken_for_programs_not_for_the_kernel(gpu_check, tmp_path):
    py = fake_python(tmp_path, ROOT / "target" / "torch-2.11.0")  # the second environment the GPU check built against
    proc = setup_sh("torch-plan", MOE_TORCH_PYTHON=str(py))
    assert proc.returncode == 0, proc.stderr
    assert "MOE_TORCH_PYTHON: torch 2.11.0" in proc.stdout and "tch 0.24.0; nothing is downloaded" in proc.stdout
    proc = setup_sh("setup", MOE_TORCH_PYTHON=str(py))
    assert proc.returncode != 0
    assert "programs can use it (bash setup.sh run --program)" in proc.stderr and "needs torch 2.13.0" in proc.stderr
