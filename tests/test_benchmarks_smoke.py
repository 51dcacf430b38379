"""The benchmark scripts run end to end at CI size (--quick), so they cannot rot.

Each script's main(argv) is imported and run once into a temporary folder; the tests then check
that the JSON holds what the report needs and what the scripts promise (correctness checked
before timing, sane activity, the sparse path saving less than dense), and that report.py turns
it into plots, tables and a docs section. No timing thresholds: timings here are noise.
"""
import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import common  # noqa: E402

# One thread: CI-sized problems are too small to share, and a busy machine makes OpenMP waits
# dominate them.
QUICK = ["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import bench_layer
    import bench_network
    import bench_peers
    import bench_sweeps

    out = tmp_path_factory.mktemp("bench")
    payloads = {}
    threads = torch.get_num_threads()  # --threads 1 below sets it process-wide
    for name, module, extra in (("layer", bench_layer, []),
                                ("network", bench_network, ["--settings", "shd"]),
                                ("peers", bench_peers, []),
                                ("sweeps", bench_sweeps, [])):
        path = out / f"{name}.json"
        payloads[name] = module.main(QUICK + extra + ["--json", str(path)])
        assert path.exists()
    torch.set_num_threads(threads)
    return out, payloads


def _load(out, name):
    with open(out / f"{name}.json") as f:
        return json.load(f)


def test_layer_json(results):
    out, _ = results
    data = _load(out, "layer")
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["torch_threads"] >= 1
    labels = {r["label"] for r in data["results"]}
    assert labels == {"fmnist 784->200", "shd 700->200", "shd 200->200"}
    for res in data["results"]:
        # sparsegrad.reference as written is timed up to --reference-max-batch (64)
        assert set(res["methods"]) == {"pytorch", "sparsegrad_dense", "sparsegrad_sparse",
                                       "reference"}
        assert res["correctness"]["sparse"]["spike_mismatches"] == 0
        assert res["correctness"]["pytorch"]["spike_mismatches"] == 0
        ref, dense, sparse = (res["methods"][m] for m in
                              ("pytorch", "sparsegrad_dense", "sparsegrad_sparse"))
        # same spikes, by all of them
        assert dense["spike_mismatches_vs_pytorch"] == 0
        assert res["methods"]["reference"]["spike_mismatches_vs_pytorch"] == 0
        assert sparse["spike_rate"] == pytest.approx(ref["spike_rate"])
        assert 0.002 < sparse["spike_rate"] < 0.1  # calibrated to a sparse firing regime
        assert 0.0 < sparse["active_fraction"] < 1.0 == dense["active_fraction"]
        assert sparse["saved_bytes"] < ref["saved_bytes"]
        assert dense["saved_bytes"] > 0
        for m in (ref, dense, sparse):
            for phase in ("forward", "backward", "total"):
                assert m["times"][phase]["n"] == 1 and m["times"][phase]["median"] > 0
        assert math.isfinite(res["ratios"]["bwd_pytorch_over_sparse"])
        assert math.isfinite(res["ratios"]["bwd_reference_over_sparse"])


def test_network_json(results):
    out, _ = results
    data = _load(out, "network")
    (res,) = data["results"]
    assert res["label"] == "shd"
    assert set(res["correctness"]) == {"pytorch", "sparsegrad_dense", "sparsegrad_sparse",
                                       "snntorch"}
    sparse = res["methods"]["sparsegrad_sparse"]
    assert all(0 < a < 1 for a in sparse["active_fractions"])
    assert sparse["saved_bytes"] < res["methods"]["pytorch"]["saved_bytes"]
    assert res["ratios"]["sparsegrad_sparse"]["step_over_sparse"] == 1.0
    assert data["checks"] == {}  # the target is judged at full size only, never in CI


def test_peers_json(results):
    out, _ = results
    data = _load(out, "peers")
    for res in data["results"]:
        names = set(res["methods"]) | set(res["skipped"])
        assert {"pytorch", "sparsegrad_sparse", "snntorch", "spikingjelly",
                "norse"} <= names
        # snnTorch is the same model: its spikes must agree exactly on the check problem
        assert res["peer_checks"]["snntorch"]["spike_mismatches"] == 0
        assert res["peer_checks"]["snntorch"]["dW_max_rel_error_vs_reference_dense"] < 1e-3
        for peer, c in res["peer_checks"].items():
            assert c["entries"] > 0 and c["spikes_sparsegrad"] > 0


def test_sweeps_json(results):
    import bench_sweeps

    out, _ = results
    data = _load(out, "sweeps")
    assert {p["sweep"] for p in data["points"]} == {"b_th", "hidden", "steps", "batch"}
    bth = sorted((p for p in data["points"] if p["sweep"] == "b_th"), key=lambda p: p["value"])
    actives = [p["active_entries"] for p in bth]
    assert actives == sorted(actives) and actives[0] < actives[-1]  # wider band, more active
    hidden = sorted((p for p in data["points"] if p["sweep"] == "hidden"),
                    key=lambda p: p["value"])
    assert [p["hidden"] for p in hidden] == bench_sweeps.QUICK_SWEEPS["hidden"]
    assert "r2" in data["fits"]["all"]


def test_report_makes_plots_tables_and_docs(results, tmp_path):
    out, _ = results
    import report

    doc = tmp_path / "bench.md"
    doc.write_text(f"intro\n{report.BEGIN}\nSTALE-SECTION\n{report.END}\noutro\n")
    written = report.main(["--results", str(out), "--docs", str(doc)])
    for name in ("layer", "network", "peers", "sweeps"):
        png = out / f"{name}.png"
        assert str(png) in written and png.stat().st_size > 10_000
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "STALE-SECTION" not in text
    layer = _load(out, "layer")
    med = layer["results"][0]["methods"]["pytorch"]["times"]["backward"]["median"]
    assert report.ms({"median": med, "iqr": 0}).split(" ")[0] in text  # tables match the JSON
    assert (out / "results.md").read_text().count("|") > 100


def test_missing_peer_is_skipped_not_a_crash(monkeypatch, tmp_path):
    import bench_peers

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's setting
    real = bench_peers.peer_version
    monkeypatch.setattr(bench_peers, "peer_version",
                        lambda name: (None, "ModuleNotFoundError: test") if name == "norse"
                        else real(name))
    data = bench_peers.main(QUICK + ["--peers", "norse", "--json", str(tmp_path / "p.json")])
    for res in data["results"]:
        assert res["skipped"] == {"norse": "ModuleNotFoundError: test"}
        assert "norse" not in res["methods"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_request_without_gpu_is_a_clear_error(monkeypatch):
    import bench_layer

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(SystemExit, match="cuda"):
        bench_layer.main(QUICK + ["--device", "cuda"])


def test_summary_and_saved_bytes_helpers():
    s = common.summarize([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["median"] == pytest.approx(3.0) and s["min"] == pytest.approx(1.0)
    assert s["q1"] == pytest.approx(2.0) and s["q3"] == pytest.approx(4.0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    _, nbytes, n = common.saved_bytes(lambda: (x @ w.t()).sum(), exclude=[w])
    assert nbytes == x.numel() * 4 and n == 1  # x saved for dW; the parameter is excluded
    with pytest.raises(ValueError, match="rate"):
        common.spike_input(2, 2, 2, 1.5, generator=torch.Generator())
