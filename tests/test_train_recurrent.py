"""python -m sparsegrad.train --arch recurrent: the digits demo with recurrent (RLIF) hidden layers."""
import json

import pytest
import torch

from sparsegrad.nn import RLIF
from sparsegrad.train import SpikingMLP, build_parser, main

pytest.importorskip("sklearn")

QUICK = ["--dataset", "digits", "--hidden", "64", "64", "--batch-size", "64", "--lr", "1e-2",
         "--no-progress", "--seed", "0", "--no-plots"]


def test_recurrent_model_layers():
    model = SpikingMLP(64, [16, 8], 10, recurrent=True, rec_scale=0.5)
    assert [type(m) for m in model.hidden] == [RLIF, RLIF]
    assert model.hidden[1].rec_weight.shape == (8, 8)
    logits, spikes = model((torch.rand(12, 3, 64) < 0.2).float())
    assert logits.shape == (3, 10) and [s.shape[-1] for s in spikes] == [16, 8]
    assert build_parser().parse_args(["--arch", "recurrent"]).arch == "recurrent"
    assert build_parser().parse_args([]).arch == "mlp"


def test_recurrent_arch_learns(tmp_path):
    out = tmp_path / "run"
    main(QUICK + ["--arch", "recurrent", "--epochs", "2", "--compare-dense", "--out", str(out)])
    records = json.loads((out / "metrics.json").read_text())
    assert records[-1]["test_acc"] >= 0.3  # chance is 0.1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(0 < a < 1 for a in records[-1]["active_fraction"])
    assert records[-1]["grad_cosine"] > 0.9  # sparse vs dense weight gradients
    assert json.loads((out / "config.json").read_text())["arch"] == "recurrent"


def test_recurrent_arch_with_learnable_parameters_and_synaptic_current(tmp_path):
    out = tmp_path / "run"
    main(QUICK + ["--arch", "recurrent", "--epochs", "2", "--learn-alpha", "--learn-threshold",
                  "--device", "cpu", "--out", str(out)])
    records = json.loads((out / "metrics.json").read_text())
    assert records[-1]["test_acc"] >= 0.3  # chance is 0.1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # the synaptic current trains too (this small net then fires much more: no accuracy bar)
    main(QUICK + ["--arch", "recurrent", "--epochs", "1", "--learn-alpha", "--synaptic", "0.5",
                  "--device", "cpu", "--out", str(tmp_path / "syn")])
    syn = json.loads((tmp_path / "syn" / "metrics.json").read_text())[-1]
    assert syn["spikes_per_sample"] > 0 and syn["train_loss"] < 10
    args = build_parser().parse_args(QUICK + ["--arch", "recurrent", "--learn-alpha",
                                              "--synaptic", "0.5"])
    from sparsegrad.train import ARCHS
    model = ARCHS["recurrent"](args, 64, 10)
    names = dict(model.named_parameters())
    assert names["hidden.0.alpha"].shape == (64,) and model.hidden[1].alpha_syn == 0.5
