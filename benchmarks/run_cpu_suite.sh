#!/usr/bin/env bash
# Every CPU figure of docs/benchmarks.md, the README and docs/design.md's floors table, in one
# command: waits until the machine is quiet (1-minute load average below $MAX_LOAD, default 0.5;
# MAX_LOAD=inf skips the wait), runs each benchmark with 2 threads (torch's default here) and
# with 1, then regenerates the docs from the JSON files.
#
#     bash benchmarks/run_cpu_suite.sh            # from the repository root, ~1 hour on 2 cores
#     ONLY="network layer" bash benchmarks/run_cpu_suite.sh   # a subset: layer network peers sweeps recurrent phases
#
# Each step's command is also recorded in its JSON ("machine.command") and in the docs tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
MAX_LOAD=${MAX_LOAD:-0.5}
ONLY=${ONLY:-"layer network peers sweeps recurrent conv phases"}
R=benchmarks/results

wait_quiet() {
  [ "$MAX_LOAD" = "inf" ] && return
  while true; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN { exit !(l < m) }'; then return; fi
    echo "load average $load >= $MAX_LOAD: waiting (MAX_LOAD=inf to skip)"; sleep 30
  done
}

run() {  # run <name> <command...>
  local name=$1; shift
  case " $ONLY " in *" $name "*) ;; *) return ;; esac
  wait_quiet
  echo "== $* (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$@"
}

run layer   $PY benchmarks/bench_layer.py   --repeats 5 --json $R/layer.json
run layer   $PY benchmarks/bench_layer.py   --repeats 5 --threads 1 --batches 64 --json $R/layer-1thread.json
run network $PY benchmarks/bench_network.py --settings shd --batches 64 --repeats 5 --json $R/network-shd64.json
run network $PY benchmarks/bench_network.py --settings shd --batches 64 --repeats 5 --threads 1 --json $R/network-shd64-1thread.json
run network $PY benchmarks/bench_network.py --repeats 3 --json $R/network.json
run peers   $PY benchmarks/bench_peers.py   --repeats 3 --json $R/peers.json
run peers   $PY benchmarks/bench_peers.py   --repeats 3 --threads 1 --json $R/peers-1thread.json
run sweeps  $PY benchmarks/bench_sweeps.py  --repeats 3 --json $R/sweeps.json
run sweeps  $PY benchmarks/bench_sweeps.py  --repeats 3 --threads 1 --json $R/sweeps-1thread.json
run recurrent $PY benchmarks/bench_recurrent.py --repeats 5 --json $R/recurrent.json
run conv    $PY benchmarks/bench_conv.py    --repeats 5 --json $R/conv.json
# the same with PyTorch's 2 MB pages for large CPU tensors (docs/benchmarks.md, conv section)
run conv    env THP_MEM_ALLOC_ENABLE=1 $PY benchmarks/bench_conv.py --repeats 5 --json $R/conv-thp.json
run phases  $PY benchmarks/bench_phases.py  --repeats 7 --threads 1 --json $R/phases-1thread.json --docs docs/design.md
$PY benchmarks/report.py --results $R --docs docs/benchmarks.md
echo "done: update the prose of docs/benchmarks.md's summary and README.md's figures from the tables"
