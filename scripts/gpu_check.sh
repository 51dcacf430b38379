#!/usr/bin/env bash
# One command that builds, tests, sanitises and times sparsegrad on a GPU machine.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine, from the repository root
#   bash scripts/gpu_check.sh --cpu           # the same steps on a machine without a GPU
#   bash scripts/gpu_check.sh --cpu --no-build --quick      # what tests/test_gpu_check.py runs
#
# Steps, in order of value (each with its own timeout, all run even when one fails; nothing stops
# early; after each step summary.json / summary.txt / logs.tar.gz are rewritten with what has
# run so far, "complete": false, so a run cut off still leaves its results):
#   wheels    if .whl/*.whl exist (scripts/fetch_gpu_wheels.sh): install them with pip --target
#             into $SPARSEGRAD_WHEEL_SITE (default /tmp/site), prepend it to PYTHONPATH
#   versions  GPU, driver, CUDA, nvcc, torch, compute-sanitizer versions
#   build     python setup.py build_ext --inplace against this machine's torch: no venv, no
#             network, no build isolation, MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST = the
#             visible GPU's architecture, SPARSEGRAD_REQUIRE_CUDA=1; --cpu: SPARSEGRAD_NO_CUDA=1.
#             --no-build: only checks that the existing extension imports
#   tests     every CUDA case of the suite (scripts/pytest_gpu_select.py --gpu-select cuda,
#             nightly-marked CUDA tests included: every route of every op, tests/test_cuda_routes.py),
#             no -x, junit XML, in parallel with pytest-xdist (-n MAX_JOBS) when it is installed;
#             --cpu: the emulated CUDA kernels and the CPU cases of the device-parametrised
#             tests (--gpu-select emul)
#   bench_*   benchmarks/bench_layer.py (SHD layer 700->200, T=500, B=64: sparse, sparsegrad
#             dense, plain-PyTorch BPTT; measured / perf-model floor), bench_network.py (the SHD
#             network step 700-200-200-20 with Adam vs snnTorch), bench_peers.py (snnTorch,
#             SpikingJelly when importable), bench_sweeps.py (backward time vs b_th); peak
#             memory is torch.cuda.max_memory_allocated on the GPU
#   sanitize  last (it adds the least): compute-sanitizer memcheck over
#             scripts/gpu_sanitize.py --trim (every op, mode, route, reset, reduction and
#             dynamics in float32; one case per op family in the other dtypes: surrogates and
#             half types change arithmetic, not memory accesses), plus racecheck and synccheck
#             when a kernel in csrc/cuda uses shared memory, barriers or warp collectives. A
#             sanitizer that cannot run (unsupported device, failed first allocation) gives
#             sanitizer_ran: false and sanitizer_errors: null, never 0; a case that fails is
#             reported as sanitize_cases_failed, not as a sanitizer error. --cpu:
#             compute-sanitizer is skipped (sanitizer_ran: false) and gpu_sanitize.py runs on
#             the CPU kernels, so the op-coverage check still runs
#   summary   summary.json + summary.txt; the summary table is printed last
#
# Options:
#   --cpu        no GPU: CPU kernels + emulated CUDA kernels, benchmarks on the CPU
#   --no-build   reuse the extension already built in place (or installed)
#   --quick      tiny benchmark sizes; the tests step runs a small subset (tests/test_cuda_ops.py,
#                tests/test_cuda_registration.py, and one emulation test that needs no compiled
#                emulation); GPU targets are reported, not judged
#   --budget S   wall-clock budget in seconds for all steps (default 420 on a GPU: the whole run
#                fits in 7 minutes on 16 cores, build included; each step's timeout is cut to
#                what is left, keeping the minimum of every later step)
#   --out DIR    where results go (default: $OUT if set, else runs/gpu-check)
#
# Results (at most 8 files, no folders, so the device tool brings all of them back):
#   summary.json  device, gpu_model, torch, tests_passed, tests_failed, tests_workers,
#                 sanitizer_ran, sanitizer_errors, sanitize_cases_failed, complete,
#                 bwd_speedup_vs_pytorch_shd, step_speedup_vs_snntorch_shd,
#                 peak_mem_ratio_vs_snntorch_shd, targets, over_floor_shd, steps (status, seconds)
#   summary.txt   the table printed at the end
#   layer.json network.json peers.json sweeps.json   the benchmark JSON (benchmarks/report.py)
#   logs.tar.gz   every step's log, junit.xml, the sanitizer reports
# Exit status: 0 when every step passed (and, on a GPU at full size, the targets of DESIGN.md §7
# were met: sparse backward >= 40x plain PyTorch, step >= 20x snnTorch, peak memory <= 30 % of
# snnTorch's), 1 otherwise.
#
# Committing GPU results: benchmarks/report.py --add-gpu-run "$OUT" copies the JSON to
# benchmarks/results/gpu/<gpu model>-{summary,layer,network,peers,sweeps}.json and regenerates the
# GPU section of docs/benchmarks.md (see benchmarks/report.py).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

MODE=gpu BUILD=1 QUICK=0 BUDGET="" OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --no-build) BUILD=0 ;;
    --quick|--small) QUICK=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUT_DIR="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-$ROOT/runs/gpu-check}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
for f in summary.json summary.txt layer.json network.json peers.json sweeps.json logs.tar.gz; do
  rm -f "$OUT_DIR/$f"
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sparsegrad-gpu-check.XXXXXX")" || exit 1
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"

export PY="${PYTHON:-python3}"
export JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$ROOT:$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# SPARSEGRAD_GPU_CHECK_DRY_RUN=1: plan and syntax-check every step's command (GPU mode included)
# without running any, as if a GPU of compute capability 9.0 were visible; for the test suite.
DRY_RUN="${SPARSEGRAD_GPU_CHECK_DRY_RUN:-}"
export ROOT WORK OUT_DIR MODE QUICK

if [ "$MODE" = gpu ]; then DEV=cuda; else DEV=cpu; fi
if [ -z "$BUDGET" ]; then
  if [ "$MODE" = gpu ]; then BUDGET=420; elif [ "$QUICK" = 1 ]; then BUDGET=900; else BUDGET=2400; fi
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY_RESERVE=15

# Per-step timeouts: "max min" seconds (a step starts only if its min still fits the budget).
declare -A TMAX TMIN
plan() { TMAX[$1]=$2; TMIN[$1]=$3; }
if [ "$MODE" = gpu ]; then
  # 420 s in all: build ~3 min (one nvcc translation unit, one architecture), the tests ~1.5 min
  # on 16 workers, ~25 s per benchmark, then what is left for the sanitizer
  plan wheels 40 5;   plan versions 30 5;   plan build 200 60;  plan tests 100 30
  plan bench_layer 40 15; plan bench_network 40 15; plan bench_peers 35 15; plan bench_sweeps 30 10
  plan sanitize_memcheck 90 20; plan sanitize_racecheck 40 15; plan sanitize_synccheck 30 15
else
  plan wheels 60 5;   plan versions 60 10;  plan build 900 60;  plan tests 900 30
  plan sanitize 300 20
  plan bench_layer 400 20; plan bench_network 600 20; plan bench_peers 400 20; plan bench_sweeps 600 20
fi

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# run_step NAME NOTE COMMAND-STRING: runs the command with bash -c under timeout, logs it to
# $WORK/NAME.log and records status, exit code, seconds and the note in $STEPS.
PLANNED=()
run_step() {
  local name=$1 note=$2 cmd=$3
  local min=${TMIN[$name]:-10} max=${TMAX[$name]:-60} later=0 s
  local seen=0
  for s in "${PLANNED[@]}"; do
    if [ "$seen" = 1 ]; then later=$((later + ${TMIN[$s]:-10})); fi
    [ "$s" = "$name" ] && seen=1
  done
  local left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE - later))
  local t=$max
  [ "$left" -lt "$t" ] && t=$left
  local logf="$WORK/$name.log"
  if [ "$t" -lt "$min" ]; then
    log "$name: not started: ${left}s left of the ${BUDGET}s budget"
    printf '%s\tno_time\t\t0\t%s\n' "$name" "not started: budget spent" >> "$STEPS"
    return 1
  fi
  log "$name (timeout ${t}s): $cmd"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  { echo "+ $cmd"; echo; } > "$logf"
  if [ -n "$DRY_RUN" ]; then  # syntax-check the command, run nothing (tests/test_gpu_check.py)
    bash -n -c "$cmd" >> "$logf" 2>&1
    rc=$?
    printf '%s\t%s\n' "$name" "$cmd" >> "$WORK/dry-run.tsv"
  else
    timeout -k 10 "$t" bash -c "$cmd" >> "$logf" 2>&1
    rc=$?
  fi
  t1=$(date +%s.%N)
  case $rc in
    0) status=pass ;;
    124|137) status=timeout; note="timed out after ${t}s; $note" ;;
    *) status=fail ;;
  esac
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$note" >> "$STEPS"
  log "$name: $status (exit $rc, ${secs}s)"
  if [ "$status" != pass ]; then
    tail -n 25 "$logf" | sed 's/^/    | /'
  fi
  checkpoint
  return $rc
}
skip_step() {  # NAME WHY
  printf '%s\tskipped\t\t0\t%s\n' "$1" "$2" >> "$STEPS"
  log "$1: skipped ($2)"
  checkpoint
}
# The results so far, after every step (complete: false), so that a run cut off by its machine's
# time limit still leaves summary.json, summary.txt and the logs of what ran.
checkpoint() {
  [ -n "$DRY_RUN" ] && return 0
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" . 2>/dev/null
  "$PY" scripts/gpu_check_helper.py summary --steps "$STEPS" --work "$WORK" --out "$OUT_DIR" \
    --mode "$MODE" $([ "$QUICK" = 1 ] && echo --quick) --partial --planned "$(IFS=,; echo "${PLANNED[*]}")" \
    --budget "$BUDGET" >/dev/null 2>&1 || true
}

# ----------------------------------------------------------------------------- the plan
SHARED_MEM=0  # a kernel uses shared memory, barriers or warp collectives (comments stripped)
CUDA_SRC="${SPARSEGRAD_GPU_CHECK_CUDA_SRC:-csrc/cuda}"  # overridable for the test suite
CUDA_FILES=()
for f in "$CUDA_SRC"/*.cu "$CUDA_SRC"/*.cuh; do [ -f "$f" ] && CUDA_FILES+=("$f"); done
if [ ${#CUDA_FILES[@]} -gt 0 ] && sed -e 's://.*$::' -e 's:/\*.*\*/::g' "${CUDA_FILES[@]}" \
    | grep -E '__shared__|__syncthreads|__syncwarp|__shfl|__ballot|__any_sync|__all_sync|cooperative_groups' >/dev/null; then
  SHARED_MEM=1
fi
HAVE_WHEELS=0
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then HAVE_WHEELS=1; fi
[ "$HAVE_WHEELS" = 1 ] && PLANNED+=(wheels)
PLANNED+=(versions build tests bench_layer bench_network bench_peers bench_sweeps)
if [ "$MODE" = gpu ]; then
  PLANNED+=(sanitize_memcheck)
  [ "$SHARED_MEM" = 1 ] && PLANNED+=(sanitize_racecheck sanitize_synccheck)
else
  PLANNED+=(sanitize)
fi
log "mode $MODE$([ "$QUICK" = 1 ] && echo ' (quick)'), budget ${BUDGET}s, results in $OUT_DIR, steps: ${PLANNED[*]}"

# ----------------------------------------------------------------------------- wheels
if [ "$HAVE_WHEELS" = 1 ]; then
  SITE="${SPARSEGRAD_WHEEL_SITE:-/tmp/site}"
  run_step wheels "$(ls "$ROOT"/.whl/*.whl | xargs -n1 basename | tr '\n' ' ')" \
    "\"\$PY\" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '$SITE' '$ROOT'/.whl/*.whl"
  export PYTHONPATH="$ROOT:$ROOT/scripts:$SITE${PYTHONPATH#$ROOT:$ROOT/scripts}"
  # the ninja wheel installs its binary as $SITE/bin/ninja (torch's builder looks it up on PATH)
  [ -x "$SITE/bin/ninja" ] && export PATH="$SITE/bin:$PATH"
fi

# ----------------------------------------------------------------------------- versions
NO_GPU=0
if ! run_step versions "" "\"\$PY\" scripts/gpu_check_helper.py versions --mode $MODE --json \"\$WORK/versions.json\""; then
  if [ "$MODE" = gpu ]; then NO_GPU=1; fi
fi
if [ -n "$DRY_RUN" ]; then
  ARCH=9.0
elif [ "$MODE" = gpu ] && [ "$NO_GPU" = 0 ]; then
  ARCH="$("$PY" scripts/gpu_check_helper.py arch 2>/dev/null)"
fi
ARCH="${ARCH:-}"
export ARCH

# ----------------------------------------------------------------------------- build
IMPORT_CHECK="\"\$PY\" -c 'import sparsegrad, sys; sparsegrad.show_config(); i = sparsegrad.build_info(); sys.exit(0 if \"$MODE\" == \"cpu\" or i[\"cuda_kernels_registered\"] else \"sparsegrad has no CUDA kernels: rebuild without --no-build\")'"
if [ "$NO_GPU" = 1 ]; then
  skip_step build "no GPU visible (use --cpu)"
elif [ "$BUILD" = 0 ]; then
  run_step build "--no-build: the existing extension" "$IMPORT_CHECK"
elif [ "$MODE" = gpu ]; then
  run_step build "TORCH_CUDA_ARCH_LIST=${ARCH:-?} MAX_JOBS=$JOBS" \
    "rm -f sparsegrad/_C*.so && TORCH_CUDA_ARCH_LIST='$ARCH' SPARSEGRAD_REQUIRE_CUDA=1 MAX_JOBS=\$JOBS \"\$PY\" setup.py build_ext --inplace && $IMPORT_CHECK"
else
  run_step build "CPU kernels only (SPARSEGRAD_NO_CUDA=1), MAX_JOBS=$JOBS" \
    "rm -f sparsegrad/_C*.so && SPARSEGRAD_NO_CUDA=1 MAX_JOBS=\$JOBS \"\$PY\" setup.py build_ext --inplace && $IMPORT_CHECK"
fi

# ----------------------------------------------------------------------------- tests
PYTEST="\"\$PY\" -m pytest -p pytest_gpu_select -q -rfE -p no:cacheprovider --junitxml=\"\$WORK/junit.xml\" --gpu-select-log=\"\$WORK/tests-progress.tsv\""
if [ "$MODE" = gpu ]; then
  SELECT="--gpu-select cuda -m ''"   # -m '': the nightly-marked CUDA tests too
  QUICK_PATHS="tests/test_cuda_ops.py tests/test_cuda_registration.py"
  TEST_ENV="SPARSEGRAD_REQUIRE_CUDA=1 $([ "$BUILD" = 1 ] && [ -n "$ARCH" ] && echo "TORCH_CUDA_ARCH_LIST='$ARCH'")"
else
  SELECT="--gpu-select emul"
  QUICK_PATHS="tests/test_cuda_ops.py tests/test_cuda_registration.py tests/test_cuda_emul.py::test_emul_compiles_the_same_kernel_source_as_nvcc"
  TEST_ENV=""
fi
# pytest-xdist (on the GPU image): one worker per core; the CUDA tests share the one GPU
XDIST="" WORKERS=1
if [ -n "$DRY_RUN" ] && [ "$MODE" = gpu ]; then
  XDIST="-n $JOBS" WORKERS=$JOBS
elif [ -z "$DRY_RUN" ] && "$PY" -c 'import xdist' >/dev/null 2>&1 && [ "$JOBS" -gt 1 ]; then
  XDIST="-n $JOBS" WORKERS=$JOBS
fi
echo "$WORKERS" > "$WORK/tests-workers.txt"
if [ "$NO_GPU" = 1 ]; then
  skip_step tests "no GPU visible"
elif [ "$QUICK" = 1 ]; then
  run_step tests "quick subset: $QUICK_PATHS; $WORKERS worker(s)" "$TEST_ENV $PYTEST $XDIST $SELECT $QUICK_PATHS"
else
  run_step tests "$SELECT; $WORKERS worker(s)" "$TEST_ENV $PYTEST $XDIST $SELECT tests"
fi

# ----------------------------------------------------------------------------- benchmarks
if [ "$QUICK" = 1 ]; then
  COMMON="--device $DEV --quick --repeats 1 --warmup 0 --threads 1"
  LAYER="--configs shd"; NETWORK="--settings shd"; PEERS="--configs shd"; SWEEPS="--sweeps b_th"
elif [ "$MODE" = gpu ]; then
  COMMON="--device cuda"
  LAYER="--configs shd --batches 64 --reference-max-batch 0 --repeats 10 --warmup 2"
  NETWORK="--settings shd --batches 64 --repeats 5 --warmup 2"
  PEERS="--configs shd --batches 64 --repeats 5 --warmup 2"
  SWEEPS="--sweeps b_th --repeats 5 --warmup 1"
else
  COMMON="--device cpu"
  LAYER="--configs shd --batches 64 --reference-max-batch 0 --repeats 5 --warmup 1"
  NETWORK="--settings shd --batches 64 --repeats 3 --warmup 1"
  PEERS="--configs shd --batches 64 --repeats 3 --warmup 1"
  SWEEPS="--sweeps b_th --repeats 3 --warmup 1"
fi
for b in layer network peers sweeps; do
  case $b in layer) A=$LAYER ;; network) A=$NETWORK ;; peers) A=$PEERS ;; sweeps) A=$SWEEPS ;; esac
  if [ "$NO_GPU" = 1 ]; then
    skip_step "bench_$b" "no GPU visible"
  else
    run_step "bench_$b" "$A" "\"\$PY\" benchmarks/bench_$b.py $COMMON $A --json \"\$OUT_DIR/$b.json\""
  fi
done

# ----------------------------------------------------------------------------- sanitize
SAN_SIZE=small SAN_DTYPES=""
[ "$QUICK" = 1 ] && SAN_SIZE=tiny SAN_DTYPES="--dtypes float32"
SAN_CASES="\"\$PY\" scripts/gpu_sanitize.py --size $SAN_SIZE $SAN_DTYPES --json \"\$WORK/sanitize-cases.json\""
TRIM="--trim"  # under a sanitizer: only the cases that add memory coverage
if [ "$MODE" = gpu ]; then
  if [ "$NO_GPU" = 1 ]; then
    skip_step sanitize_memcheck "no GPU visible"
  else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a cached neighbour.
    run_step sanitize_memcheck "PYTORCH_NO_CUDA_MEMORY_CACHING=1" \
      "PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"\$PY\" scripts/gpu_check_helper.py sanitize --tool memcheck --json \"\$WORK/sanitizer-memcheck.json\" -- $SAN_CASES $TRIM"
    if [ "$SHARED_MEM" = 1 ]; then
      for tool in racecheck synccheck; do
        run_step "sanitize_$tool" "sparsegrad kernels only (--kernel-name kns=sparsegrad)" \
          "\"\$PY\" scripts/gpu_check_helper.py sanitize --tool $tool --kernel-filter sparsegrad --json \"\$WORK/sanitizer-$tool.json\" -- \"\$PY\" scripts/gpu_sanitize.py --size $SAN_SIZE $SAN_DTYPES $TRIM"
      done
    else
      skip_step sanitize_race_sync "no __shared__/__syncthreads/warp collectives in csrc/cuda"
    fi
  fi
else
  run_step sanitize "compute-sanitizer skipped (--cpu); op coverage on the CPU kernels" \
    "$SAN_CASES --device cpu"
fi

# ----------------------------------------------------------------------------- summary
if [ -n "$DRY_RUN" ]; then
  cp "$WORK/dry-run.tsv" "$OUT_DIR/dry-run.tsv"
  column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
  exit 0
fi
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" . 2>/dev/null || log "could not write logs.tar.gz"
"$PY" scripts/gpu_check_helper.py summary --steps "$STEPS" --work "$WORK" --out "$OUT_DIR" \
  --mode "$MODE" $([ "$QUICK" = 1 ] && echo --quick) --budget "$BUDGET"
RC=$?
if [ ! -s "$OUT_DIR/summary.json" ]; then  # the summary itself failed: still say what ran
  echo "== gpu_check: the summary could not be written; steps:"
  column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
  echo "RESULT: FAIL (exit 1)"
  exit 1
fi
exit $RC
