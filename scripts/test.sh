#!/usr/bin/env bash
# Fresh machine -> test results:  bash scripts/test.sh   (extra pytest arguments are passed on)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SPARSEGRAD_VENV:-.venv}/bin/activate"
python -m pytest -q -ra "$@"
