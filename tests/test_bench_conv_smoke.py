"""benchmarks/bench_conv.py runs end to end at CI size (--quick) and checks before it times.

No timing thresholds: timings here are noise. The checks are the ones the script promises: the
converted tutorial CSNN gives snnTorch's spikes and membrane, and the time-folding check ran.
"""
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

pytest.importorskip("snntorch")


def test_bench_conv_quick(tmp_path):
    import bench_conv

    threads = torch.get_num_threads()
    path = tmp_path / "conv.json"
    try:
        bench_conv.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--batchnorm", "--profile", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(path.read_text())
    for mode in ("sparse", "dense"):
        assert payload["check"][mode]["spike_mismatches"] == 0
        assert payload["check"][mode]["membrane_max_abs_diff"] < 1e-5
    assert set(payload["results"]) == {"snntorch", "sparsegrad sparse", "sparsegrad dense"}
    for r in payload["results"].values():
        assert float(r["time"]["total"]["median"]) > 0
    assert payload["folding"] and all(f["elements"] > 0 for f in payload["folding"])
    assert payload["rates"]["hidden1"] > 0
    assert payload["config"]["b_th"] == 0.2  # the published setup, not convert's "auto"
    # saved-for-backward bytes: the sparse (ConvLIF) model keeps a fraction of snnTorch's
    res = payload["results"]
    assert 0 < res["sparsegrad sparse"]["saved_bytes"] < res["snntorch"]["saved_bytes"]
    if payload["dvs"] is not None:  # SpikingJelly installed: the DVS net gives its spikes
        assert payload["dvs"]["check"]["spike_mismatches"] == 0
        dvs = payload["dvs"]["results"]
        assert 0 < dvs["sparsegrad sparse"]["saved_bytes"] < dvs["spikingjelly"]["saved_bytes"]
        prof = dvs["sparsegrad sparse"]["profile"]
        assert prof["total_ms"] > 0 and any("spike_conv2d" in o["op"] for o in prof["ops"])
        # the BatchNorm variant: SpikingJelly's multi-step BatchNorm2d, converted exactly
        bn = payload["dvs_batchnorm"]
        assert bn["config"]["batchnorm"] and bn["check"]["spike_mismatches"] == 0
        assert set(payload["batchnorm_cost"]) == {"spikingjelly", "sparsegrad sparse"}
        for c in payload["batchnorm_cost"].values():
            assert c["step_ms"] > 0 and c["step_ms_batchnorm"] > 0


def test_bench_conv_b_th_flag():
    import bench_conv

    assert bench_conv.parse_b_th("auto") == "auto"
    assert bench_conv.parse_b_th("0.5") == 0.5
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit, match="--b-th"):
            bench_conv.parse_b_th(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_conv_cuda_without_gpu():
    import bench_conv

    with pytest.raises(SystemExit, match="--device cuda: torch.cuda.is_available"):
        bench_conv.main(["--quick", "--device", "cuda"])


def test_bench_conv_ops_smoke(tmp_path):
    """benchmarks/bench_conv_ops.py runs every op at the DVS net's sizes and writes its JSON."""
    import bench_conv_ops
    out = tmp_path / "ops.json"
    rec = bench_conv_ops.main(["--repeats", "1", "--json", str(out)])
    assert set(rec["results"]) == {"L1", "L2", "L3"}
    for times in rec["results"].values():
        assert set(times) == {"forward", "backward", "pool", "unpool"}
        assert all(v > 0 for v in times.values())
    assert json.loads(out.read_text())["machine"]["cpu"]
