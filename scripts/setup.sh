#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs sparsegrad with everything the demo and tests use.
# torch==2.14.1 is the CUDA 13.0 build: with nvcc at /usr/local/cuda the CUDA kernels are compiled
# too (SPARSEGRAD_REQUIRE_CUDA=1 makes a skipped CUDA build an error). Set SPARSEGRAD_TORCH to
# choose another torch (e.g. torch==2.13.0, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARSEGRAD_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "${SPARSEGRAD_TORCH:-torch==2.14.1}" numpy ninja
python -m pip install -q -r requirements-dev.txt
# Norse without its dependencies (they pull in torchvision, which replaces the CUDA torch);
# nir and nirtorch, which it imports, come from requirements-dev.txt
python -m pip install -q --no-deps norse==1.1.0
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-2}
echo "[setup] building sparsegrad (this compiles C++/CUDA kernels; a few minutes on 2 cores)"
start=$(date +%s)
python -m pip install --no-build-isolation -e ".[all]"
echo "[setup] build took $(( $(date +%s) - start )) s"
python -c "import sparsegrad; sparsegrad.show_config()"
