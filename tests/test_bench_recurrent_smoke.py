"""benchmarks/bench_recurrent.py runs end to end at CI size (--quick) and writes what
docs/benchmarks.md's "Recurrent layers" section reports. No timing thresholds: timings here are noise."""
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

QUICK = ["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"]


def test_bench_recurrent_quick(tmp_path):
    import bench_recurrent

    threads = torch.get_num_threads()
    path = tmp_path / "recurrent.json"
    try:
        bench_recurrent.main(QUICK + ["--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    with open(path) as f:
        data = json.load(f)
    assert data["script"] == "bench_recurrent"
    assert [r["label"] for r in data["results"]] == ["layer", "network"]
    for res in data["results"]:
        methods = res["methods"]
        assert {"pytorch", "sparsegrad_dense", "sparsegrad_sparse"} <= set(methods)
        # correctness was checked against sparsegrad.reference before timing
        assert set(res["correctness"]) == set(methods)
        sparse, dense = methods["sparsegrad_sparse"], methods["pytorch"]
        assert 0 < sparse["saved_bytes"] < 0.5 * dense["saved_bytes"]
        for row in methods.values():
            assert row["times"]["total"]["median"] > 0 and row["peak_bytes"] is not None
    layer = data["results"][0]
    assert 0 < layer["methods"]["sparsegrad_sparse"]["active_fraction"] < 1
    want = {"sparse backward >= 15x plain-PyTorch BPTT backward",
            "sparse saved bytes <= 10% of plain PyTorch's",
            "(1-thread CPU time) sparse backward >= 15x plain-PyTorch BPTT backward"}
    if "snntorch" not in data["skipped"]:
        want |= {"sparse training step (fwd+bwd) >= 10x snnTorch RLeaky's",
                 "(1-thread CPU time) sparse training step >= 10x snnTorch RLeaky's"}
    assert set(data["checks"]) == want
    for res in data["results"]:
        for row in res["methods"].values():
            assert row["cpu_ms"]["backward"] > 0


def test_bench_recurrent_quick_learnable_parameters(tmp_path):
    """--learn: every method with learnable per-neuron alpha and threshold, their gradients
    checked against the reference before timing."""
    import bench_recurrent

    threads = torch.get_num_threads()
    path = tmp_path / "recurrent_learn.json"
    try:
        bench_recurrent.main(QUICK + ["--configs", "layer", "--learn", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
        bench_recurrent.LEARN = False
    with open(path) as f:
        data = json.load(f)
    (res,) = data["results"]
    assert res["learn"] is True and set(res["correctness"]) == set(res["methods"])
    assert 0 < res["methods"]["sparsegrad_sparse"]["saved_bytes"] < \
        0.5 * res["methods"]["pytorch"]["saved_bytes"]
