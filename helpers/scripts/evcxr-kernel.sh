#!/usr/bin/env bash
# The Rust kernel's launcher (kernel.json points here; setup.sh registers it).
#
# evcxr compiles every cell in a build directory; a fresh one rebuilds tch and its C++ glue (~3 min
# on 2 cores), and two kernels must never share one. So each kernel takes the first free slot under
# target/evcxr-kernels/ and holds a lock on it while it lives: a restarted kernel finds its
# dependencies already built, and a second kernel at the same time gets its own slot.
# Set EVCXR_TMPDIR yourself to choose the directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${EVCXR_TMPDIR:-}" ]; then
  for i in $(seq 0 15); do
    d="$root/target/evcxr-kernels/$i"
    mkdir -p "$d"
    exec {lock_fd}>"$d/.lock"
    if flock -n "$lock_fd"; then
      export EVCXR_TMPDIR="$d"
      break
    fi
    exec {lock_fd}>&-
  done
  [ -n "${EVCXR_TMPDIR:-}" ] || { echo "all 16 kernel build slots under $root/target/evcxr-kernels are in use" >&2; exit 1; }
fi
# A slot never used before starts from slot 0's build (what setup compiled): a copy takes seconds,
# compiling tch and the other dependencies again takes minutes. Cargo finds the copied artifacts
# fresh (their sources and settings are the same); only the cells themselves compile.
warm="$root/target/evcxr-kernels/0/target"
if [ ! -d "$EVCXR_TMPDIR/target" ] && [ "$EVCXR_TMPDIR" != "$root/target/evcxr-kernels/0" ] && [ -d "$warm" ]; then
  cp -a "$warm" "$EVCXR_TMPDIR/.target-seed" 2>/dev/null && mv "$EVCXR_TMPDIR/.target-seed" "$EVCXR_TMPDIR/target" \
    || rm -rf "$EVCXR_TMPDIR/.target-seed"
fi
# Resolve notebook dependencies to the versions in the project's Cargo.lock (reproducible, offline-friendly).
[ -f "$EVCXR_TMPDIR/Cargo.lock" ] || cp "$root/Cargo.lock" "$EVCXR_TMPDIR/Cargo.lock" 2>/dev/null || true
exec "${EVCXR_JUPYTER:-evcxr_jupyter}" "$@"
