"""End-to-end runs of the trainer (python -m sparsegrad.train) on the built-in digits set."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sparsegrad  # noqa: F401
from sparsegrad.train import DEFAULT_SIGMA0, SpikingMLP, build_parser, main, summary_table
from sparsegrad.losses import SCHEDULES

pytest.importorskip("sklearn")

QUICK = ["--dataset", "digits", "--hidden", "64", "64", "--batch-size", "64", "--lr", "1e-2",
         "--no-progress", "--seed", "0"]


def test_short_run_beats_chance_and_logs_everything(tmp_path):
    out = tmp_path / "run"
    main(QUICK + ["--epochs", "3", "--compare-dense", "--out", str(out)])
    records = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        for key in ("epoch", "test_acc", "train_loss", "spikes_per_sample", "active_fraction",
                    "bwd_ms_sparse", "bwd_ms_dense", "grad_cosine"):
            assert r[key] is not None, key
        assert len(r["active_fraction"]) == 2
        assert all(0 < a < 1 for a in r["active_fraction"])
        assert r["bwd_ms_sparse"] > 0 and r["bwd_ms_dense"] > 0
        assert -1 <= r["grad_cosine"] <= 1
        assert r["spikes_per_sample"] > 0
    assert records[-1]["test_acc"] >= 0.6  # chance is 0.1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    for name in ("loss", "accuracy", "active_fraction", "spikes", "backward_time",
                 "grad_cosine", "summary"):
        png = out / f"{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "bwd sp ms" in (out / "summary.txt").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "digits" and config["world_size"] == 1


def test_spike_loss_lowers_spikes(tmp_path):
    # same seed and batches; a strong constant spike-count loss must cut the spikes
    common = QUICK + ["--epochs", "2", "--train-limit", "512", "--no-plots"]
    main(common + ["--out", str(tmp_path / "a")])
    main(common + ["--out", str(tmp_path / "b"), "--spike-loss", "constant", "--sigma0", "2e-3"])
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())[-1]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())[-1]
    assert b["spikes_per_sample"] < 0.7 * a["spikes_per_sample"]
    assert b["spike_loss_weight"] == pytest.approx(2e-3)
    assert b["bwd_ms_dense"] is None


def test_console_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "sparsegrad.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--dataset", "--data-dir", "--epochs", "--hidden", "--b-th", "--backward",
                 "--spike-loss", "--sigma0", "--compare-dense", "--seed", "--out"):
        assert flag in proc.stdout


def test_flags_and_defaults():
    args = build_parser().parse_args([])
    assert args.dataset == "digits" and args.hidden == [200, 200] and args.backward == "sparse"
    assert args.spike_loss == "none" and args.guard == "widen"
    assert set(DEFAULT_SIGMA0) == set(SCHEDULES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--spike-loss", "cubic"])
    with pytest.raises(SystemExit, match="epochs"):
        main(["--epochs", "0", "--no-progress"])
    with pytest.raises(SystemExit, match="b-th"):
        main(["--b-th", "-1", "--no-progress"])


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shd_train.h5"):
        main(["--dataset", "shd", "--data-dir", str(tmp_path), "--no-progress",
              "--out", str(tmp_path / "o")])


def test_model_replicas_are_independent():
    import copy
    import pickle

    model = SpikingMLP(64, [16, 16], 10)
    x = (torch.rand(20, 3, 64) < 0.1).float()
    model(x)
    clone = copy.deepcopy(model)
    assert all(l.last_stats is None for l in clone.hidden)
    restored = pickle.loads(pickle.dumps(model))
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    logits, spikes = restored(x)
    assert logits.shape == (3, 10) and len(spikes) == 2


def test_learnable_parameters_and_synaptic_current(tmp_path):
    # issue 18: per-neuron learnable alpha / threshold and the synaptic current train end to end
    out = tmp_path / "learn"
    main(QUICK + ["--epochs", "2", "--train-limit", "512", "--no-plots", "--learn-alpha",
                  "--learn-threshold", "--synaptic", "0.5", "--compare-dense", "--out", str(out)])
    r = json.loads((out / "metrics.json").read_text())[-1]
    assert r["test_acc"] >= 0.3 and r["spikes_per_sample"] > 0  # chance is 0.1
    assert -1 <= r["grad_cosine"] <= 1
    args = build_parser().parse_args(QUICK + ["--learn-alpha", "--learn-threshold",
                                              "--synaptic", "0.5"])
    from sparsegrad.train import ARCHS
    model = ARCHS["mlp"](args, 64, 10)
    names = dict(model.named_parameters())
    assert names["hidden.0.alpha"].shape == (64,) and names["hidden.1.threshold"].shape == (64,)
    assert "hidden.0.alpha_syn" not in names and model.hidden[0].alpha_syn == 0.5
    from sparsegrad.train import _check_args
    # the recurrent layer's tensor parameters have CUDA kernels: accepted on any device
    _check_args(build_parser().parse_args(["--arch", "recurrent", "--learn-alpha", "--synaptic",
                                           "0.5", "--device", "cuda"]))
