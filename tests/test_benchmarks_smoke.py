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
        # measured time over the performance model's floor, at the counts measured
        counts = res["floors"]["counts"]
        assert counts["nnz"] == sparse["input_nonzeros"]
        assert counts["active"] == sparse["active_entries"]
        assert counts["need_dx"] == res["problem"]["second_layer"]
        for key, v in res["over_floor"].items():
            mode, phase = key.split("_")
            assert v == pytest.approx(res["methods"][f"sparsegrad_{mode}"]["times"][phase]["median"]
                                      / res["floors"][mode][phase])


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
    assert all(p["floor_sparse_backward_ms"] > 0 and p["over_floor"]["sparse_backward"] > 0
               for p in data["points"])
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


# ----------------------------------------------------------------------------- perf model

def test_perf_model_docs_table_is_generated_from_the_model():
    import perf_model

    doc = open(os.path.join(os.path.dirname(BENCH), "docs", "cuda.md")).read()
    block = doc.split(perf_model.BEGIN, 1)[1].split(perf_model.END, 1)[0]
    assert block == "\n" + perf_model.markdown(), (
        "docs/cuda.md's performance table is stale: run python benchmarks/perf_model.py "
        "--docs docs/cuda.md")


def test_perf_model_floors_are_consistent():
    import perf_model as pm

    shd, large = pm.SHD, pm.LARGE
    assert shd.n_nnz == round(0.02 * 500 * 64 * 700) and shd.n_active == round(0.04 * 500 * 64 * 200)
    for layer in (shd, large):
        rows = dict(pm.table_rows(layer))
        assert all(c.floor_s > 0 and c.total_bytes > 0 and c.total_flops > 0 for c in rows.values())
        assert set(rows) >= {"lif_forward, sparse", "lif_forward, dense", "lif_backward_sparse",
                             "lif_backward_dense", "li_readout_forward (max)",
                             "li_readout_backward (max)", "lif (neuron op) forward",
                             "lif (neuron op) backward", "rlif_forward, sparse",
                             "rlif_backward_sparse"}
        # the sparse backward does less than the dense one; dx adds work; recurrence adds work
        assert rows["lif_backward_sparse"].floor_s < rows["lif_backward_dense"].floor_s
        assert (rows["lif_backward_sparse"].floor_s
                < rows["lif_backward_sparse, dx on producer set"].floor_s)
        assert rows["rlif_backward_sparse"].total_flops > rows["lif_backward_sparse"].total_flops
    small = pm.lif_backward_sparse(shd)
    big = pm.lif_backward_sparse(large)
    assert big.floor_s > 100 * small.floor_s
    # the dense input dominates the forward: read once, 4 bytes an entry
    assert pm.lif_forward(shd).bytes["x (dense input)"] == 500 * 64 * 700 * 4
    # a sector-granular gather never reads more than the dense tensor, nor less than its share
    assert pm.gathered_bytes(1000, 1.0) == 4000 and pm.gathered_bytes(1000, 0.0) == 0
    assert 0.04 * 4000 < pm.gathered_bytes(1000, 0.04) < 4000
    f = pm.layer_floors(500, 64, 700, 200, nnz=shd.n_nnz, active=shd.n_active,
                        spikes=shd.n_spikes)
    assert f["sparse"]["backward"] == pytest.approx(1e3 * small.floor_s)
    assert math.isnan(pm.over_floor(float("inf"), 1.0)) and pm.over_floor(2.0, 0.5) == 4.0


# ----------------------------------------------------------------------------- GPU report

def test_report_gpu_section(results, tmp_path):
    """A synthetic GPU run (the quick CPU JSON filed under a GPU model name) makes a GPU section;
    without one the section says nothing was measured. Nothing here is a committed result."""
    import shutil

    import report

    out, _ = results
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    for name in ("layer", "network"):
        shutil.copy(out / f"{name}.json", res_dir / f"{name}.json")
    doc = tmp_path / "bench.md"
    doc.write_text(f"a\n{report.BEGIN}\nX\n{report.END}\nb\n{report.GPU_BEGIN}\nOLD\n"
                   f"{report.GPU_END}\nc\n")
    report.main(["--results", str(res_dir), "--docs", str(doc), "--no-plots"])
    text = doc.read_text()
    assert report.GPU_NOT_MEASURED in text and "OLD" not in text and text.endswith("c\n")

    run = tmp_path / "run"
    run.mkdir()
    for name in ("layer", "network"):
        shutil.copy(out / f"{name}.json", run / f"{name}.json")
    summary = dict(mode="gpu", gpu_model="h100", device="NVIDIA H100 80GB HBM3", torch="2.11.0",
                   torch_cuda="13.0", driver="580.00", nvcc="13.0", python="3.12.0",
                   quick=False, total_seconds=400.0, exit_code=0, tests_passed=120,
                   tests_failed=0, tests_skipped=3, failed_tests=[], sanitizer_errors=0,
                   sanitizer={"memcheck": {"errors": 0}},
                   targets={"bwd_speedup_vs_pytorch_shd": dict(
                       label="sparse backward vs plain-PyTorch BPTT, SHD layer", value=52.0,
                       target=">= 40x", met=True)},
                   over_floor_shd={"sparse_backward": 31.0},
                   steps={"build": dict(status="pass", seconds=95.0, note="")})
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="gpu-model"):
        report.main(["--results", str(res_dir), "--add-gpu-run", str(run), "--gpu-model", "H 1"])
    written = report.main(["--results", str(res_dir), "--add-gpu-run", str(run), "--docs",
                           str(doc), "--no-plots"])
    gpu_dir = res_dir / "gpu"
    assert sorted(f.name for f in gpu_dir.iterdir()) == ["h100-layer.json", "h100-network.json",
                                                         "h100-summary.json"]
    assert str(gpu_dir / "h100-summary.json") in written
    text = doc.read_text()
    gpu_part = text.split(report.GPU_BEGIN, 1)[1].split(report.GPU_END, 1)[0]
    assert report.GPU_NOT_MEASURED not in gpu_part
    assert "NVIDIA H100 80GB HBM3" in gpu_part and "52×" in gpu_part and "**met**" in gpu_part
    assert "`gpu/h100-layer.json`" in gpu_part and "`gpu/h100-network.json`" in gpu_part
    assert "results/gpu/h100-layer.png" in gpu_part
    # a CPU run is not filed as a GPU result by mistake
    summary["mode"] = "cpu"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="not from a GPU run"):
        report.main(["--results", str(res_dir), "--add-gpu-run", str(run), "--no-plots"])


def test_docs_gpu_section_matches_committed_gpu_results():
    import report

    root = os.path.dirname(BENCH)
    doc = open(os.path.join(root, "docs", "benchmarks.md")).read()
    block = doc.split(report.GPU_BEGIN, 1)[1].split(report.GPU_END, 1)[0]
    assert block.strip() == report.gpu_md(os.path.join(BENCH, "results", "gpu")).strip(), (
        "docs/benchmarks.md's GPU section is stale: run python benchmarks/report.py --docs "
        "docs/benchmarks.md")
