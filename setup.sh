#!/usr/bin/env bash
# One command for everything: installs what is missing (idempotently), then runs what you ask.
#
#   bash setup.sh              set up only: Python env, Rust kernel, helpers build
#   bash setup.sh run [NB]     set up, then execute NB headlessly (default: the base-olmoe experiment)
#                              (MOE_RESUME=runs/<exp>/<time> continues a run from its latest checkpoint)
#   bash setup.sh run --program [NB]
#                              the same run as a compiled program (no Jupyter kernel needed)
#   bash setup.sh launch --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] [NB]
#                              the program of NB as N processes per node under torchrun (data
#                              parallel over PyTorch's c10d; docs/distributed.md)
#   bash setup.sh bench-dist [--nproc 2] [--steps 12]
#                              data-parallel throughput: N ranks vs one process on this machine
#   bash setup.sh build [NB] [--skip-tag TAG]
#                              turn NB's code cells into a Rust program (setup's build of the
#                              dependencies reused; the notebook's code at opt-level 3)
#   bash setup.sh gpu-check --prepare | --dry-run | [DIR]
#                              the GPU proof: a folder (program built against torch 2.11.0 + driver
#                              script) for a GPU machine without Rust; its CPU dry run; or run it
#   bash setup.sh torch-plan   say which PyTorch setup would use (existing install or which wheel)
#   bash setup.sh diff experiments/NAME [--summary]
#                              a copied experiment against base-olmoe, section by section and cell by cell
#   bash setup.sh generate RUN [PROMPT] [NB]
#                              sample from a saved run's latest checkpoint (NB's training cells skipped)
#   bash setup.sh wandb-sync RUN
#                              upload a run's W&B spool (WANDB_MODE=offline runs, or failed uploads)
#   bash setup.sh data download|process|info ...
#                              pretraining data: FineWeb-Edu (or any hub dataset / parquet / JSONL)
#                              into token shards (`bash setup.sh data --help`)
#   bash setup.sh bench-tokenize [FILE]
#                              tokenization throughput: this build vs the Python tokenizers binding
#   bash setup.sh bench [--presets cpu,cpu-e64] [--repeats 5]
#                              speed: the notebook's model vs transformers (step, MoE layer, MFU)
#   bash setup.sh sweep --grid model.num_hidden_layers=2,4 [--grid ...] [--preset cpu] [--steps N] [--program]
#                              one headless run per grid point (W&B: one group; --program: each point
#                              the notebook's program), then a table and loss plots in
#                              runs/sweeps/<group>/ (`bash setup.sh sweep --help`)
#   bash setup.sh test         set up, then run the whole test suite (what CI runs)
#   bash setup.sh lab          set up, then start JupyterLab with the Rust kernel
#   bash setup.sh env          print the environment exports, for `eval "$(bash setup.sh env)"`
#
# Needs: bash, git, python3 >= 3.10 with venv, a C++ compiler (g++), Rust via rustup (cargo on PATH).
# No root: everything goes into .venv/, target/ and ~/.cargo. Downloads come from PyPI and crates.io
# (and PyTorch's own index for a CUDA 12 build when the NVIDIA driver is older than 580).
#
# PyTorch: MOE_TORCH_PYTHON=/path/to/python uses the torch installed there (a pod image's) instead
# of downloading one, when tch has a release for its version (torch 2.13.0 = tch 0.26.0, torch
# 2.11.0 = tch 0.24.0, torch 2.10.0 = tch 0.23.0). Programs build against any of them; the notebooks' kernel needs 2.13.0 (the
# notebooks pin tch 0.26.0). Without it, torch 2.13.0 is installed into .venv, in the CUDA build the
# NVIDIA driver supports (nvidia-smi): CUDA 13 (PyPI's default wheel) needs driver >= 580, older
# drivers get PyTorch's cu128 (>= 570) or cu126 (>= 525) build; MOE_TORCH_INDEX=pypi|cu128|cu126|cpu
# forces one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
EVCXR_VERSION="0.22.0"
EVCXR_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/evcxr_jupyter"
# Python packages, pinned. torch 2.13.0 is what tch 0.26.0 binds; transformers is the reference
# implementation the parity tests compare against; pyarrow writes the parquet files the data tests serve.
PY_PKGS=(torch==2.13.0 transformers==5.23.0 jupyterlab==4.6.6 nbclient==0.11.0 nbformat==5.11.1 pytest==9.2.0 pytest-xdist==3.8.0 pyarrow==26.0.1)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

check_prereqs() {
  command -v python3 >/dev/null || die "python3 not found; install Python 3.10+ (Debian/Ubuntu: apt-get install python3 python3-venv, needs root)"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "python3 is $(python3 -V 2>&1); Python 3.10+ is needed"
  python3 -c 'import venv, ensurepip' 2>/dev/null || die "python3 has no venv/ensurepip module (Debian/Ubuntu: apt-get install python3-venv, needs root)"
  command -v cargo >/dev/null || die "cargo not found; install Rust with rustup (https://rustup.rs), then open a new shell"
  command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler; tch builds C++ glue (Debian/Ubuntu: apt-get install g++, needs root)"
}

# pip with patience: torch's wheel is ~0.5 GB plus ~4 GB of CUDA libraries, and a dropped connection
# must not fail a fresh setup. pip resumes a cut transfer with ranged requests (--resume-retries);
# when a whole attempt still fails, the finished wheels are in pip's cache and the next attempt only
# fetches the rest.
pip_install() {
  local attempt resume=()
  # --resume-retries is pip >= 25.1; the pip a fresh venv brings may be older (it is upgraded first).
  "$VENV/bin/python" -m pip install --help 2>/dev/null | grep -q -- --resume-retries && resume=(--resume-retries 30)
  for attempt in 1 2 3 4; do
    if "$VENV/bin/python" -m pip install --quiet --retries 10 --timeout 60 "${resume[@]}" "$@"; then
      return 0
    fi
    [ "$attempt" -lt 4 ] || break
    say "pip install failed (attempt $attempt of 4, usually the network); retrying in $((attempt * 30)) s"
    sleep $((attempt * 30))
  done
  die "pip install $* failed 4 times; check the network (PyPI reachable?) and run the command again"
}

# --- Which PyTorch ------------------------------------------------------------------------------
TORCH_PIN="2.13.0"   # what the notebooks' tch (0.26.0) binds, and what .venv gets
# torch version -> the tch release that binds it (torch-sys's TORCH_VERSION); helpers/program knows
# the same table (moe_program::TORCH_TCH) and refuses others.
tch_for_torch() {
  case "${1%%+*}" in
    2.13.0) echo 0.26.0 ;;
    2.11.0) echo 0.24.0 ;;
    2.10.0) echo 0.23.0 ;;
    *) return 1 ;;
  esac
}

# "VERSION TORCH_DIR" of the torch a python has, without importing it (importing needs its CUDA
# libraries; linking does not); "none" when it has none.
torch_of() {
  "$1" - <<'PY' 2>/dev/null || echo none
import importlib.metadata as md, importlib.util
try:
    v = md.version("torch")
    spec = importlib.util.find_spec("torch")
    print(v, spec.submodule_search_locations[0])
except Exception:
    print("none")
PY
}

# The NVIDIA driver's version from nvidia-smi, or nothing when there is none.
driver_version() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true
}

# Which build of torch TORCH_PIN to install: sets TORCH_INDEX (pypi|cu128|cu126|cpu) and TORCH_WHY.
# CUDA 13 wheels (PyPI's default torch wheel since 2.9) need driver >= 580; CUDA 12.8 builds >= 570
# (Blackwell support); CUDA 12.6 builds run on >= 525 through CUDA 12's minor-version compatibility.
choose_torch_wheel() {
  local drv major
  if [ -n "${MOE_TORCH_INDEX:-}" ]; then
    case "$MOE_TORCH_INDEX" in pypi|cu128|cu126|cpu) ;; *) die "MOE_TORCH_INDEX=$MOE_TORCH_INDEX: use pypi, cu128, cu126 or cpu" ;; esac
    TORCH_INDEX="$MOE_TORCH_INDEX"; TORCH_WHY="MOE_TORCH_INDEX=$MOE_TORCH_INDEX"; return
  fi
  drv="$(driver_version)"
  if [ -z "$drv" ]; then
    TORCH_INDEX=pypi; TORCH_WHY="no NVIDIA driver (no nvidia-smi): PyPI's default wheel (CUDA 13 build, runs on CPU)"; return
  fi
  major="${drv%%.*}"
  case "$major" in ''|*[!0-9]*) die "nvidia-smi reported driver version '$drv', which is not a number; set MOE_TORCH_INDEX=pypi|cu128|cu126|cpu" ;; esac
  if [ "$major" -ge 580 ]; then TORCH_INDEX=pypi; TORCH_WHY="NVIDIA driver $drv >= 580: PyPI's default wheel (CUDA 13)"
  elif [ "$major" -ge 570 ]; then TORCH_INDEX=cu128; TORCH_WHY="NVIDIA driver $drv < 580 (CUDA 13 needs 580): PyTorch's CUDA 12.8 build"
  elif [ "$major" -ge 525 ]; then TORCH_INDEX=cu126; TORCH_WHY="NVIDIA driver $drv < 570: PyTorch's CUDA 12.6 build"
  else TORCH_INDEX=cpu; TORCH_WHY="NVIDIA driver $drv is older than any CUDA build of torch $TORCH_PIN supports (>= 525): the CPU build; update the driver to train on the GPU"
  fi
}

# pip arguments that install TORCH_PIN in the build TORCH_INDEX names.
torch_pip_args() {
  case "$TORCH_INDEX" in
    pypi) echo "torch==$TORCH_PIN" ;;
    *) echo "torch==$TORCH_PIN+$TORCH_INDEX --index-url https://download.pytorch.org/whl/$TORCH_INDEX --extra-index-url https://pypi.org/simple" ;;
  esac
}

# Sets TORCH_VERSION, TORCH_DIR (site-packages/torch), TCH_VERSION for the torch in use:
# MOE_TORCH_PYTHON's when set, else .venv's.
resolve_torch() {
  local py="${MOE_TORCH_PYTHON:-$VENV/bin/python}" info
  if [ -n "${MOE_TORCH_PYTHON:-}" ]; then
    [ -x "$MOE_TORCH_PYTHON" ] || die "MOE_TORCH_PYTHON=$MOE_TORCH_PYTHON is not an executable python"
  fi
  info="$(torch_of "$py")"
  [ "$info" != none ] || die "$py has no torch installed; point MOE_TORCH_PYTHON at a python with torch 2.13.0, 2.11.0 or 2.10.0, or unset it"
  TORCH_VERSION="${info%% *}"; TORCH_DIR="${info#* }"
  TCH_VERSION="$(tch_for_torch "$TORCH_VERSION")" \
    || die "torch $TORCH_VERSION (from $py) has no tch release this project knows: torch 2.13.0 = tch 0.26.0, torch 2.11.0 = tch 0.24.0, torch 2.10.0 = tch 0.23.0; unset MOE_TORCH_PYTHON to let setup download torch $TORCH_PIN"
  [ -f "$TORCH_DIR/lib/libtorch_cpu.so" ] || die "$TORCH_DIR/lib has no libtorch_cpu.so; is $py's torch a complete install?"
}

# An existing PyTorch on this machine, offered before downloading one.
offer_existing_torch() {
  local py info
  for py in /opt/torch/.venv/bin/python3 /opt/conda/bin/python /usr/bin/python3 "$(command -v python3 || true)"; do
    [ -n "$py" ] && [ -x "$py" ] || continue
    info="$(torch_of "$py")"
    [ "$info" != none ] || continue
    if tch_for_torch "${info%% *}" >/dev/null; then
      say "found torch ${info%% *} at $py: MOE_TORCH_PYTHON=$py uses it instead of downloading torch $TORCH_PIN (~5 GB)"
      return
    fi
  done
}

python_env() {
  local stamp="$VENV/.setup-python" want pkgs=() info
  if [ -n "${MOE_TORCH_PYTHON:-}" ]; then
    info="$(torch_of "$MOE_TORCH_PYTHON")"
    [ "${info%% *}" != none ] && [ "$(tch_for_torch "${info%% *}" || true)" = 0.26.0 ] \
      || die "MOE_TORCH_PYTHON=$MOE_TORCH_PYTHON has torch ${info%% *}: programs can use it (bash setup.sh run --program), but the notebooks' kernel needs torch $TORCH_PIN (the notebooks pin tch 0.26.0); unset MOE_TORCH_PYTHON for notebooks"
    # .venv made by that python, seeing its packages through a .pth file (after .venv's own).
    want="existing torch: $MOE_TORCH_PYTHON $(printf '%s\n' "${PY_PKGS[@]}")"
    for p in "${PY_PKGS[@]}"; do [[ "$p" == torch==* ]] || pkgs+=("$p"); done
  else
    choose_torch_wheel
    want="$(printf '%s\n' "${PY_PKGS[@]}")"
    [ "$TORCH_INDEX" = pypi ] || want="$want torch-index=$TORCH_INDEX"
    pkgs=("${PY_PKGS[@]}")
  fi
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "python env .venv: up to date (torch $(torch_of "$VENV/bin/python" | cut -d' ' -f1), transformers, jupyterlab, nbclient, pytest)"
    return
  fi
  if [ -n "${MOE_TORCH_PYTHON:-}" ]; then
    [ -x "$VENV/bin/python" ] || { say "creating python env .venv with $MOE_TORCH_PYTHON (its torch ${info%% *} is used, not downloaded)"; "$MOE_TORCH_PYTHON" -m venv "$VENV"; }
    "$MOE_TORCH_PYTHON" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p))' \
      > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_moe_existing_torch.pth"
    say "installing ${pkgs[*]} into .venv"
    pip_install --upgrade pip
    pip_install "${pkgs[@]}"
    printf '%s' "$want" > "$stamp"
    return
  fi
  [ -x "$VENV/bin/python" ] || { offer_existing_torch; say "creating python env .venv"; python3 -m venv "$VENV"; }
  say "torch $TORCH_PIN: $TORCH_WHY"
  say "installing ${PY_PKGS[*]} into .venv (first time: ~5 GB with torch's CUDA libraries, a few minutes)"
  pip_install --upgrade pip
  if [ "$TORCH_INDEX" != pypi ]; then
    # shellcheck disable=SC2046 # word splitting of the index arguments is intended
    pip_install $(torch_pip_args)
    pkgs=(); for p in "${PY_PKGS[@]}"; do [[ "$p" == torch==* ]] || pkgs+=("$p"); done
  fi
  pip_install "${pkgs[@]}"
  printf '%s' "$want" > "$stamp"
}

export_env() {
  # What cargo (torch-sys) and the kernel need to find libtorch.
  export VIRTUAL_ENV="$VENV"
  export PATH="$VENV/bin:$PATH"
  export LIBTORCH_USE_PYTORCH=1
  local info
  info="$(torch_of "$VENV/bin/python")"
  [ "$info" != none ] || die ".venv has no torch; remove .venv and run bash setup.sh again"
  TORCH_LIB="${info#* }/lib"
  export TORCH_LIB
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export JUPYTER_PATH="$VENV/share/jupyter"
}

rust_kernel() {
  if rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    say "rust-src: installed"
  else
    say "adding rustup component rust-src (evcxr needs it)"
    rustup component add rust-src
  fi
  if [ -x "$EVCXR_BIN" ] && cargo install --list | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
    say "evcxr_jupyter $EVCXR_VERSION: installed"
  else
    say "building evcxr_jupyter $EVCXR_VERSION with --locked (first time: ~6 min on 2 cores)"
    CARGO_NET_RETRY="${CARGO_NET_RETRY:-10}" cargo install --quiet --locked evcxr_jupyter --version "$EVCXR_VERSION"
  fi
  # Register the kernel inside .venv, with the environment libtorch needs. Checked every time
  # (cheap), because evcxr's --install writes kernel.json without our env. evcxr writes into a
  # scratch folder and the spec is replaced atomically, only when it changes: a kernel starting
  # meanwhile (another setup.sh command, a second test worker) never reads a half-written or
  # env-less kernel.json.
  local kdir="$VENV/share/jupyter/kernels/rust" scratch
  scratch="$(mktemp -d)"
  JUPYTER_PATH="$scratch" "$EVCXR_BIN" --install >/dev/null
  "$VENV/bin/python" - "$scratch/kernels/rust" "$kdir" "$VENV" "$TORCH_LIB" "$ROOT/helpers/scripts/evcxr-kernel.sh" "$EVCXR_BIN" <<'PY'
import filecmp, json, os, shutil, sys
src, kdir, venv, torch_lib, launcher, evcxr = sys.argv[1:]
spec = json.load(open(os.path.join(src, "kernel.json")))
spec["display_name"] = "Rust (MoE research kernel)"
# The launcher gives each running kernel its own, persistent build directory.
spec["argv"] = ["bash", launcher, "--control_file", "{connection_file}"]
spec["env"] = {
    "VIRTUAL_ENV": venv,
    "PATH": f"{venv}/bin:${{PATH}}",
    "LIBTORCH_USE_PYTORCH": "1",
    "LD_LIBRARY_PATH": torch_lib,
    "EVCXR_JUPYTER": evcxr,
}
text = json.dumps(spec, indent=2)
path = os.path.join(kdir, "kernel.json")
os.makedirs(kdir, exist_ok=True)
for f in os.listdir(src):  # logos, version.txt, the notebook extension
    a, b = os.path.join(src, f), os.path.join(kdir, f)
    if f != "kernel.json" and not (os.path.exists(b) and filecmp.cmp(a, b, shallow=False)):
        shutil.copy(a, b)
if not os.path.exists(path) or open(path).read() != text:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
PY
  rm -rf "$scratch"
  say "rust kernel registered in .venv (LD_LIBRARY_PATH=torch/lib, LIBTORCH_USE_PYTORCH=1)"
}

# The optimisation level of a notebook's own cells in the kernel (evcxr compiles every cell, with
# all the items defined above it, as the crate `ctx`). A cell's work is libtorch calls, whose speed
# does not depend on it, while its compile time does: the base notebook's 20-step run took 132 s at
# level 0 and 165 s at evcxr's default 2 (cells such as the model's 3 s instead of 10 s), with the
# same losses and tokens/s. Dependencies (tch, helpers, tokenizers) stay at evcxr's level 2.
# MOE_CELL_OPT_LEVEL=2 bash setup.sh for cells with heavy loops of Rust of their own.
kernel_cell_profile() {
  local level="${MOE_CELL_OPT_LEVEL:-0}" dir="$ROOT/target/evcxr-kernels/.cargo"
  [[ "$level" =~ ^[0-3sz]$ ]] || die "MOE_CELL_OPT_LEVEL=$level: use 0, 1, 2, 3, s or z"
  local text="# Written by setup.sh (MOE_CELL_OPT_LEVEL): the kernel compiles notebook cells (crate ctx) at
# this level; cargo reads this file from every kernel build slot below it.
[profile.dev.package.ctx]
opt-level = $([[ "$level" =~ ^[0-3]$ ]] && echo "$level" || echo "\"$level\"")
"
  mkdir -p "$dir"
  [ "$(cat "$dir/config.toml" 2>/dev/null)" = "${text%$'\n'}" ] || printf '%s' "$text" > "$dir/config.toml"
}

build_helpers() {
  local t0=$SECONDS rebuilt
  say "helpers: checking the build (first time: tch's C++ glue, ~3 min)"
  local log="$ROOT/target/.setup-build.json"
  mkdir -p "$ROOT/target"
  cargo build -p helpers --message-format=json-render-diagnostics > "$log" \
    || die "building helpers failed (see the errors above)"
  rebuilt=$(grep -c '"fresh":false' "$log" || true)
  if [ "$rebuilt" = 0 ]; then say "helpers: up to date"; else say "helpers: built $rebuilt crates ($((SECONDS - t0))s)"; fi
  kernel_cell_profile
  # Warm the kernel's build directory with the notebooks' dependencies, so the first notebook run
  # does not spend minutes compiling tch inside the kernel.
  local warm="$ROOT/target/evcxr-kernels/0/target"
  if [ -d "$warm" ] && [ -f "$ROOT/target/.kernel-warm" ] && [ ! Cargo.lock -nt "$ROOT/target/.kernel-warm" ]; then
    say "notebook dependencies: already compiled for the rust kernel"
  else
    say "compiling the notebook dependencies in the rust kernel (first time: ~3 min)"
    MOE_RUN_DIR="$ROOT/target/kernel-warmup" "$VENV/bin/python" helpers/scripts/run_notebook.py tests/notebooks/deps.ipynb >/dev/null \
      || die "the rust kernel could not build the notebook dependencies; see: bash setup.sh run tests/notebooks/deps.ipynb"
    touch "$ROOT/target/.kernel-warm"
  fi
}

setup() {
  local t0=$SECONDS
  check_prereqs
  python_env
  export_env
  rust_kernel
  build_helpers
  say "ready ($((SECONDS - t0))s)"
}

# --- Programs: a notebook compiled (helpers/program) ---------------------------------------------
# What building a program needs: cargo, a C++ compiler and a torch (MOE_TORCH_PYTHON's, else .venv's);
# no Jupyter, no evcxr.
program_setup() {
  check_prereqs
  [ -n "${MOE_TORCH_PYTHON:-}" ] || python_env
  resolve_torch
  say "programs link torch $TORCH_VERSION from $TORCH_DIR (tch $TCH_VERSION)"
  cargo build --quiet -p moe-program || die "building helpers/program failed (see the errors above)"
}

# build_program NOTEBOOK [--skip-tag TAG ...]: the program's binary path on stdout (progress on stderr).
# The program is built in the project's target/ with setup's profile (helpers/program), so for the
# torch setup installed it uses setup's environment for torch-sys (LIBTORCH_USE_PYTORCH through
# .venv): torch-sys's build script reruns when those variables change, and everything above it with
# it. Another torch is found through LIBTORCH (headers and libraries of that torch directory), not by
# importing torch, so a torch whose CUDA libraries are absent here still links.
build_program() {
  local nb="$1"; shift
  [ -f "$nb" ] || die "notebook $nb does not exist"
  local how=(env -u LIBTORCH_USE_PYTORCH LIBTORCH="$TORCH_DIR" LIBTORCH_CXX11_ABI=1)
  if [ -x "$VENV/bin/python" ] && [ "$(torch_of "$VENV/bin/python")" = "$TORCH_VERSION $TORCH_DIR" ]; then
    how=(env -u LIBTORCH -u LIBTORCH_CXX11_ABI VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1)
  fi
  "${how[@]}" "$ROOT/target/debug/moe-program" build "$nb" --torch "$TORCH_VERSION" "$@" | tail -n1
  [ "${PIPESTATUS[0]}" = 0 ] || die "building the program of $nb failed (see above)"
}

# program_run_dir NOTEBOOK BINARY: exports MOE_RUN_DIR, by default runs/<experiment>/<UTC time> (a
# resumed run's own directory with MOE_RESUME), creates it and keeps the program's source there.
program_run_dir() {
  local nb="$1" bin="$2" exp r
  exp="$(basename "$(cd "$(dirname "$nb")" && pwd)")"
  if [ -z "${MOE_RUN_DIR:-}" ] && [ -n "${MOE_RESUME:-}" ]; then
    r="$(cd "$MOE_RESUME" && pwd)"
    if [ -f "$r/state.json" ]; then MOE_RUN_DIR="$(dirname "$(dirname "$r")")"; else MOE_RUN_DIR="$r"; fi
  fi
  export MOE_RUN_DIR="${MOE_RUN_DIR:-$ROOT/runs/$exp/$(date -u +%Y%m%d-%H%M%S)}"
  mkdir -p "$MOE_RUN_DIR"
  cp "$(dirname "$bin")/../src/$(basename "$bin")/main.rs" "$MOE_RUN_DIR/program.rs" 2>/dev/null || true
}

# run_program NOTEBOOK: build, then run it as run_notebook.py runs the notebook (run directory as
# program_run_dir makes it), its output kept there as program.log.
run_program() {
  local nb="$1" bin run_dir
  bin="$(build_program "$nb")" || exit 1
  program_run_dir "$nb" "$bin"; run_dir="$MOE_RUN_DIR"
  say "running $(basename "$bin") (the program of $nb; MOE_PRESET=${MOE_PRESET:-default} MOE_STEPS=${MOE_STEPS:-default}); run dir $run_dir"
  set +e
  # The program runs in the background so that SIGTERM and SIGINT sent to this script (a container's
  # main process being stopped, a scheduler's preemption, Ctrl-C) reach it: it ends after its
  # current step with a checkpoint (helpers::stop). Its output goes through tee into program.log.
  local fifo="$run_dir/.program-output.$$" pid tee_pid rc interrupted py="${MOE_TORCH_PYTHON:-$VENV/bin/python}"
  "$py" "$ROOT/helpers/scripts/run_status.py" "$run_dir" running "$nb" || true
  mkfifo "$fifo"
  tee -a "$run_dir/program.log" < "$fifo" & tee_pid=$!
  LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" > "$fifo" 2>&1 & pid=$!
  trap 'interrupted=1; kill -TERM "$pid" 2>/dev/null' TERM
  # A background job of a script ignores SIGINT, so Ctrl-C is passed on as SIGTERM (a second one
  # ends the program at once).
  trap 'interrupted=1; kill -TERM "$pid" 2>/dev/null' INT
  while :; do interrupted=0; wait "$pid"; rc=$?; [ "$interrupted" = 1 ] || break; done
  trap - TERM INT
  wait "$tee_pid"; rm -f "$fifo"
  if [ "$rc" = 0 ]; then "$py" "$ROOT/helpers/scripts/run_status.py" "$run_dir" finished "$nb"
  else "$py" "$ROOT/helpers/scripts/run_status.py" "$run_dir" failed "$nb" "the program exited with status $rc (see program.log)"; fi
  set -e
  [ "$rc" = 0 ] && say "program finished; run dir $run_dir" || say "program FAILED (exit $rc); run dir $run_dir"
  exit "$rc"
}

# launch_program NOTEBOOK NPROC [torchrun options]: build, then run NPROC ranks of the program per
# node under torchrun (the one that comes with the PyTorch in use) with --no-python. Every rank gets
# the same MOE_RUN_DIR (on several nodes it must be a shared path); each rank's output is kept in
# <run>/ranks/, and the terminal shows rank 0's.
launch_program() {
  local nb="$1" nproc="$2" bin run_dir py; shift 2
  bin="$(build_program "$nb")" || exit 1
  program_run_dir "$nb" "$bin"; run_dir="$MOE_RUN_DIR"
  mkdir -p "$run_dir/ranks"
  py="${MOE_TORCH_PYTHON:-$VENV/bin/python}"
  local single=(--standalone)
  [[ " $* " == *" --nnodes "* ]] && single=()
  say "launching $nproc rank(s) per node of $(basename "$bin") (the program of $nb; MOE_PRESET=${MOE_PRESET:-default} MOE_STEPS=${MOE_STEPS:-default}); run dir $run_dir"
  set +e
  LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$py" -m torch.distributed.run "${single[@]}" \
    --nproc-per-node "$nproc" "$@" --log-dir "$run_dir/ranks" --tee 3 --local-ranks-filter 0 --no-python "$bin" 2>&1 \
    | tee -a "$run_dir/program.log"
  local rc="${PIPESTATUS[0]}"
  set -e
  [ "$rc" = 0 ] && say "launch finished; run dir $run_dir" || say "launch FAILED (exit $rc); every rank's output: $run_dir/ranks/"
  exit "$rc"
}

# The torch 2.11.0 the GPU check links (the build on the GPU machine this project may be lent):
# MOE_TORCH_PYTHON's when it has 2.11.0, else target/torch-2.11.0: PyPI's wheel without the ~3 GB
# of CUDA libraries, only the two that libtorch_cpu.so itself needs (the CUDA runtime and CUPTI, at
# the versions torch 2.11.0 requires), where its RPATH looks for them. That links, and runs on a CPU.
# Sets TORCH_VERSION, TORCH_DIR, TCH_VERSION.
GPU_CHECK_TORCH="2.11.0"
GPU_CHECK_PKGS=(torch==2.11.0 "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*")
gpu_check_torch() {
  if [ -n "${MOE_TORCH_PYTHON:-}" ]; then
    resolve_torch
    [ "${TORCH_VERSION%%+*}" = "$GPU_CHECK_TORCH" ] || die "the GPU check is built against torch $GPU_CHECK_TORCH (the GPU machine's); MOE_TORCH_PYTHON has $TORCH_VERSION: unset it"
    return
  fi
  local dir="$ROOT/target/torch-$GPU_CHECK_TORCH"
  if [ ! -f "$dir/.complete" ] || [ "$(cat "$dir/.complete")" != "${GPU_CHECK_PKGS[*]}" ]; then
    say "installing ${GPU_CHECK_PKGS[*]} (the GPU machine's torch, without most CUDA libraries) into $dir (~0.6 GB download)"
    rm -rf "$dir"
    "$VENV/bin/python" -m pip install --quiet --retries 10 --timeout 60 --no-deps --target "$dir" "${GPU_CHECK_PKGS[@]}" \
      || die "pip could not install ${GPU_CHECK_PKGS[*]} into $dir"
    printf '%s' "${GPU_CHECK_PKGS[*]}" > "$dir/.complete"
  fi
  TORCH_VERSION="$GPU_CHECK_TORCH"; TORCH_DIR="$dir/torch"; TCH_VERSION="$(tch_for_torch "$TORCH_VERSION")"
}

cmd="${1:-setup}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup ;;
  run)
    if [ "${1:-}" = --program ]; then
      shift
      program_setup
      run_program "${1:-experiments/base-olmoe/experiment.ipynb}"
    fi
    setup
    nb="${1:-experiments/base-olmoe/experiment.ipynb}"
    [ -f "$nb" ] || die "notebook $nb does not exist"
    say "running $nb (MOE_PRESET=${MOE_PRESET:-default} MOE_STEPS=${MOE_STEPS:-default})"
    exec "$VENV/bin/python" helpers/scripts/run_notebook.py "$nb" ;;
  generate)
    [ -n "${1:-}" ] || die "usage: bash setup.sh generate RUN_DIR|CHECKPOINT_DIR [PROMPT] [NOTEBOOK]"
    [ -e "$1" ] || die "$1 does not exist; pass a run directory (runs/<experiment>/<time>) or one of its checkpoints"
    run_dir="$(cd "$1" && pwd)"
    [ -f "$run_dir/state.json" ] && run_dir="$(dirname "$(dirname "$run_dir")")"
    exp="$(basename "$(dirname "$run_dir")")"
    nb="${3:-experiments/$exp/experiment.ipynb}"
    [ -f "$nb" ] || nb=experiments/base-olmoe/experiment.ipynb
    setup
    out="$(mktemp -d)/generate.ipynb"
    say "generating from $1 with $nb (training cells skipped; executed notebook: $out)"
    MOE_RESUME="$1" MOE_PROMPT="${2:-}" exec "$VENV/bin/python" helpers/scripts/run_notebook.py "$nb" --skip-tag train --out "$out" ;;
  wandb-sync)
    [ -n "${1:-}" ] || die "usage: bash setup.sh wandb-sync RUN_DIR"
    [ -d "$1" ] || die "$1 is not a directory; pass a run directory (runs/<experiment>/<time>)"
    setup
    exec cargo run --quiet -p helpers --bin wandb-sync -- "$1" ;;
  data)
    setup >&2
    exec cargo run --quiet -p helpers --bin data -- "$@" ;;
  bench)
    setup
    exec "$VENV/bin/python" helpers/scripts/bench_moe.py "$@" ;;
  bench-dist)
    setup
    exec "$VENV/bin/python" helpers/scripts/bench_dist.py "$@" ;;
  bench-tokenize)
    setup
    exec "$VENV/bin/python" helpers/scripts/bench_tokenize.py "$@" ;;
  sweep)
    setup
    exec cargo run --quiet -p helpers --bin sweep -- "$@" ;;
  test)
    setup
    say "cargo test (helpers)"
    # Unit and integration tests; the binaries' empty test harnesses and the (absent) doc tests
    # would each be one more ~100 MB link for nothing.
    cargo test --quiet --workspace --lib --test '*'
    # Two workers by default (MOE_TEST_WORKERS=0 runs in one process): a kernel execution is mostly
    # cell compiles on one core. Tests that share a fixture stay on one worker (tests/conftest.py).
    say "pytest (notebooks executed in the rust kernel, repository rules; ${MOE_TEST_WORKERS:-2} workers)"
    # A passing test's tmp_path is deleted when it ends (run directories with checkpoints: ~7 GB in all
    # otherwise, on machines whose disk may be small); a failing test's stays for inspection.
    exec "$VENV/bin/python" -m pytest -v -n "${MOE_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder \
      -o tmp_path_retention_policy=failed \
      --durations=30 tests/ "$@" ;;
  launch)
    nb="experiments/base-olmoe/experiment.ipynb"; nproc=""; targs=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --nproc) nproc="${2:-}"; shift 2 ;;
        --nnodes|--node-rank|--rdzv-endpoint|--rdzv-id|--rdzv-backend|--master-addr|--master-port) targs+=("$1" "${2:-}"); shift 2 ;;
        --*) die "launch: unknown option $1 (use --nproc N, and for several nodes --nnodes --node-rank --rdzv-endpoint)" ;;
        *) nb="$1"; shift ;;
      esac
    done
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "usage: bash setup.sh launch --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] [NOTEBOOK]"
    program_setup
    launch_program "$nb" "$nproc" "${targs[@]}" ;;
  build)
    nb="experiments/base-olmoe/experiment.ipynb"
    if [ $# -gt 0 ] && [[ "$1" != --* ]]; then nb="$1"; shift; fi
    program_setup
    bin="$(build_program "$nb" "$@")" || exit 1
    say "built $bin; run it from the project (LD_LIBRARY_PATH=$TORCH_DIR/lib), or: bash setup.sh run --program $nb" ;;
  diff)
    [ -n "${1:-}" ] || die "usage: bash setup.sh diff experiments/<name> [--base experiments/base-olmoe] [--summary]"
    exec python3 helpers/scripts/nbdiff.py "$@" ;;
  torch-plan)
    check_prereqs
    if [ -n "${MOE_TORCH_PYTHON:-}" ]; then
      resolve_torch
      say "MOE_TORCH_PYTHON: torch $TORCH_VERSION at $TORCH_DIR, tch $TCH_VERSION; nothing is downloaded"
    else
      choose_torch_wheel
      say "torch $TORCH_PIN: $TORCH_WHY"
      say "pip install $(torch_pip_args)"
      offer_existing_torch
    fi ;;
  gpu-check)
    case "${1:-}" in
      --prepare)
        shift
        check_prereqs
        [ -n "${MOE_TORCH_PYTHON:-}" ] || python_env
        gpu_check_torch
        say "GPU check: programs against torch $TORCH_VERSION ($TORCH_DIR, tch $TCH_VERSION)"
        cargo build --quiet -p moe-program || die "building helpers/program failed"
        exec "$VENV/bin/python" helpers/scripts/gpu_check.py prepare --torch "$TORCH_VERSION" --torch-dir "$TORCH_DIR" "$@" ;;
      --dry-run)
        shift
        check_prereqs
        python_env
        gpu_check_torch
        [ -x "$ROOT/target/gpu-check/gpu_check.py" ] || [ -f "$ROOT/target/gpu-check/gpu_check.py" ] \
          || die "no prepared GPU check in target/gpu-check; run: bash setup.sh gpu-check --prepare"
        # The driver's Python side (transformers) runs in .venv; the programs on torch 2.11.0's libtorch.
        exec "$VENV/bin/python" "$ROOT/target/gpu-check/gpu_check.py" run --torch-lib "$TORCH_DIR/lib" --dry-run "$@" ;;
      *)
        dir="${1:-$ROOT/target/gpu-check}"
        [ -f "$dir/gpu_check.py" ] || die "no prepared GPU check in $dir; run: bash setup.sh gpu-check --prepare"
        exec python3 "$dir/gpu_check.py" run ;;
    esac ;;
  lab)
    setup
    say "starting JupyterLab; open experiments/base-olmoe/experiment.ipynb (kernel: Rust)"
    # Pods often run as root; Jupyter refuses that without --allow-root.
    [ "$(id -u)" = 0 ] && set -- --allow-root "$@"
    exec "$VENV/bin/jupyter" lab "$@" ;;
  env)
    export_env >/dev/null
    printf 'export VIRTUAL_ENV=%q PATH=%q LIBTORCH_USE_PYTORCH=1 LD_LIBRARY_PATH=%q JUPYTER_PATH=%q\n' \
      "$VIRTUAL_ENV" "$PATH" "$LD_LIBRARY_PATH" "$JUPYTER_PATH" ;;
  *)
    die "unknown command '$cmd'; use one of: setup, run [--program] [NOTEBOOK], launch --nproc N [NOTEBOOK], build [NOTEBOOK], gpu-check --prepare|--dry-run, torch-plan, diff EXPERIMENT, generate RUN [PROMPT], wandb-sync RUN, data ..., bench, bench-tokenize [FILE], sweep --grid ..., test, lab, env" ;;
esac
