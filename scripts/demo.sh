#!/usr/bin/env bash
# Fresh machine -> demo: train input -> LIF(200) -> LIF(200) -> readout on the built-in digits
# set with the sparse backward, timing the dense backward on the same batches. Extra arguments go
# to `python -m sparsegrad.train` (see `python -m sparsegrad.train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SPARSEGRAD_VENV:-.venv}/bin/activate"
python -m sparsegrad.train --dataset digits --compare-dense --out runs/demo "$@"
