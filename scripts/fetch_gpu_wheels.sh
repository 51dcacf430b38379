#!/usr/bin/env bash
# Download the pure-Python wheels scripts/gpu_check.sh installs on a GPU machine that has no
# network: the peers it benchmarks against (snnTorch, SpikingJelly) and ninja (parallel builds).
# Run here, where PyPI is reachable; the GPU machine gets the folder beside the tree.
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]          # DEST defaults to .whl in the repo root
#
# Environment: SNNTORCH_VERSION (default 1.0.0), SPIKINGJELLY_VERSION (default 2.0.0; 0.0.0.0.14
# is the last release with the cupy backend), FETCH_NINJA=0 to leave ninja out.
#
# The wheels are for CPython 3.12 on manylinux x86_64 (the GPU machine's Python), downloaded
# with --no-deps: gpu_check.sh installs them with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# so every import they need must already be on the GPU machine or be one of these wheels.
# snnTorch 1.0.0 needs only torch and numpy; SpikingJelly 2.x also imports loguru (fetched
# here). Never commit the wheels: keep the folder out of git with
#   echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
# (an ignored folder travels to the device machine only when named in the run's `carry`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"

PURE=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform any -d "$DEST")

fetch() {  # NAME==VERSION: download it, say so; a missing one is reported, not fatal
  if "$PY" -m pip download -q "${PURE[@]}" "$1"; then
    echo "fetched $1"
  else
    echo "could not fetch $1 as a wheel for Python 3.12 (gpu_check.sh reports it as skipped)" >&2
  fi
}

fetch "snntorch==${SNNTORCH_VERSION:-1.0.0}"
fetch "spikingjelly==${SPIKINGJELLY_VERSION:-2.0.0}"
case "${SPIKINGJELLY_VERSION:-2.0.0}" in
  0.*) ;;                        # the 0.0.0.0.x releases do not use loguru
  *) fetch "loguru==0.7.3" ;;    # SpikingJelly >= 2 imports it at import time
esac
if [ "${FETCH_NINJA:-1}" = 1 ]; then
  fetch "ninja==1.13.2"          # torch's extension builder runs compiles in parallel only with it
fi

# Only wheels that install anywhere: pure Python, or manylinux x86_64 for ninja's binary.
ls -l "$DEST"/*.whl
total=$(du -sk "$DEST" | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, ${total} KiB in $DEST (the device run's carry limit is 64 MiB)"
if git -C "$ROOT" check-ignore -q "$DEST" 2>/dev/null; then
  echo "$DEST is ignored by git: name it in the device run's carry (carry: [\".whl\"])."
else
  echo "NOTE: $DEST is not ignored by git; do not commit it. Keep it out with:"
  echo "  echo '/.whl/' >> \"\$(git -C '$ROOT' rev-parse --git-common-dir)/info/exclude\""
fi
