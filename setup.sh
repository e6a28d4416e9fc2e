#!/usr/bin/env bash
# One command for everything: installs what is missing (idempotently), then runs what you ask.
#
#   bash setup.sh              set up only: Python env, Rust kernel, helpers build
#   bash setup.sh run [NB]     set up, then execute NB headlessly (default: the base-olmoe experiment)
#                              (MOE_RESUME=runs/<exp>/<time> continues a run from its latest checkpoint)
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
#   bash setup.sh sweep --grid model.num_hidden_layers=2,4 [--grid ...] [--preset cpu] [--steps N]
#                              one headless run per grid point (W&B: one group), then a table and
#                              loss plots in runs/sweeps/<group>/ (`bash setup.sh sweep --help`)
#   bash setup.sh test         set up, then run the whole test suite (what CI runs)
#   bash setup.sh lab          set up, then start JupyterLab with the Rust kernel
#   bash setup.sh env          print the environment exports, for `eval "$(bash setup.sh env)"`
#
# Needs: bash, git, python3 >= 3.10 with venv, a C++ compiler (g++), Rust via rustup (cargo on PATH).
# No root: everything goes into .venv/, target/ and ~/.cargo. Downloads come only from PyPI and
# crates.io. On a GPU pod the same wheel brings the CUDA libraries; only an NVIDIA driver is needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
EVCXR_VERSION="0.22.0"
EVCXR_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/evcxr_jupyter"
# Python packages, pinned. torch 2.13.0 is what tch 0.26.0 binds; transformers is the reference
# implementation the parity tests compare against; pyarrow writes the parquet files the data tests serve.
PY_PKGS=(torch==2.13.0 transformers==5.23.0 jupyterlab==4.6.6 nbclient==0.11.0 nbformat==5.11.1 pytest==9.2.0 pyarrow==26.0.1)

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

python_env() {
  local stamp="$VENV/.setup-python" want
  want="$(printf '%s\n' "${PY_PKGS[@]}")"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "python env .venv: up to date (torch 2.13.0, transformers, jupyterlab, nbclient, pytest)"
    return
  fi
  [ -x "$VENV/bin/python" ] || { say "creating python env .venv"; python3 -m venv "$VENV"; }
  say "installing ${PY_PKGS[*]} into .venv (first time: ~5 GB with torch's CUDA libraries, a few minutes)"
  pip_install --upgrade pip
  pip_install "${PY_PKGS[@]}"
  printf '%s' "$want" > "$stamp"
}

export_env() {
  # What cargo (torch-sys) and the kernel need to find libtorch.
  export VIRTUAL_ENV="$VENV"
  export PATH="$VENV/bin:$PATH"
  export LIBTORCH_USE_PYTORCH=1
  TORCH_LIB="$VENV/lib/python$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/torch/lib"
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
  # Register the kernel inside .venv, with the environment libtorch needs. Rewritten every time
  # (cheap), because evcxr rewrites kernel.json without our env when its version changes.
  local kdir="$VENV/share/jupyter/kernels/rust"
  JUPYTER_PATH="$VENV/share/jupyter" "$EVCXR_BIN" --install >/dev/null
  "$VENV/bin/python" - "$kdir/kernel.json" "$VENV" "$TORCH_LIB" "$ROOT/helpers/scripts/evcxr-kernel.sh" "$EVCXR_BIN" <<'PY'
import json, sys
path, venv, torch_lib, launcher, evcxr = sys.argv[1:]
spec = json.load(open(path))
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
json.dump(spec, open(path, "w"), indent=2)
PY
  say "rust kernel registered in .venv (LD_LIBRARY_PATH=torch/lib, LIBTORCH_USE_PYTORCH=1)"
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

cmd="${1:-setup}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup ;;
  run)
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
  bench-tokenize)
    setup
    exec "$VENV/bin/python" helpers/scripts/bench_tokenize.py "$@" ;;
  sweep)
    setup
    exec cargo run --quiet -p helpers --bin sweep -- "$@" ;;
  test)
    setup
    say "cargo test (helpers)"
    cargo test --quiet --workspace
    say "pytest (notebooks executed in the rust kernel, repository rules)"
    exec "$VENV/bin/python" -m pytest -v tests/ "$@" ;;
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
    die "unknown command '$cmd'; use one of: setup, run [NOTEBOOK], generate RUN [PROMPT], wandb-sync RUN, data ..., bench, bench-tokenize [FILE], sweep --grid ..., test, lab, env" ;;
esac
