"""benchmarks/bench_phases.py runs end to end at CI size and its phase timers add up: every phase
the kernels time is reported, the floors are positive, and the docs section it writes replaces
only the text between its markers. No timing thresholds."""
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_bench_phases_quick(tmp_path):
    import bench_phases

    doc = tmp_path / "design.md"
    doc.write_text("before\n<!-- phases:begin -->\nold\n<!-- phases:end -->\nafter\n")
    threads = torch.get_num_threads()
    try:
        payload = bench_phases.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                     "--json", str(tmp_path / "phases.json"), "--docs", str(doc)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "phases.json").read_text())
    assert {lay["label"] for lay in data["layers"]} == {"shd 700->200", "shd 200->200"}
    for lay in payload["layers"]:
        for name in ("fwd.scan", "fwd.rows", "bwd.deltas", "bwd.walk", "bwd.event_sums"):
            assert name in lay["phases"], (lay["label"], name)
            assert lay["floors"][name]["floor_ms"] > 0
        assert lay["info"]["nnz"] > 0 and lay["info"]["active"] > 0
    second = payload["layers"][1]
    assert second["info"]["active_prev"] > 0 and "bwd.dx_write" in second["phases"]
    for key in ("read_bytes_per_s", "nt_write_bytes_per_s", "adds_per_s_l1"):
        assert data["rates"][key] > 0
    text = doc.read_text()
    assert text.startswith("before\n<!-- phases:begin -->\n") and text.endswith("<!-- phases:end -->\nafter\n")
    assert "old" not in text and "| shd 700->200 | fwd.scan |" in text


def test_profile_timers_are_off_by_default_and_reset():
    import sparsegrad  # noqa: F401
    prof = torch.ops.sparsegrad_profile
    prof.reset()
    x = (torch.rand(10, 3, 20) < 0.2).float()
    sparsegrad.lif_layer(x, torch.randn(7, 20), alpha=0.9)
    assert int(prof.read().sum()) == 0
    prof.enable(True)
    try:
        sparsegrad.lif_layer(x, torch.randn(7, 20), alpha=0.9)
    finally:
        prof.enable(False)
    counts = prof.read()[:, 1]
    assert int(counts[list(prof.phase_names()).index("fwd.scan")]) == 1
    prof.reset()
    assert int(prof.read().sum()) == 0
