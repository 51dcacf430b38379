"""docs/nir.md's worked example: train on digits with sparsegrad, export to NIR, reload in snnTorch.

    PYTHONPATH=. python benchmarks/nir_example.py [--epochs 5] \
        [--out benchmarks/results/nir_example.json]

Trains a 64-128-10 network (sparsegrad.nn.LIF with reset="zero", NIR's reset, and an
LIReadout whose max over time is taken in the loss) on the latency-encoded scikit-learn digits,
writes it with sparsegrad.to_nir + nir.write and reads it back with sparsegrad.from_nir (same
logits), and loads the spiking layer's file into snnTorch with
snntorch.import_nir.import_from_nir (it has no LI node): every hidden spike is compared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nir  # noqa: E402
import sparsegrad  # noqa: E402
from sparsegrad import nn as sgnn  # noqa: E402
from sparsegrad.data import load_digits  # noqa: E402


def _batches(ds, batch, shuffle, gen):
    order = torch.randperm(len(ds), generator=gen) if shuffle else torch.arange(len(ds))
    for i in range(0, len(ds), batch):
        items = [ds[int(j)] for j in order[i:i + batch]]
        x = torch.stack([torch.as_tensor(s) for s, _ in items], 1)  # [T, B, 64]
        yield x, torch.tensor([y for _, y in items])


def run_snntorch(net, x):
    """Step snnTorch's imported graph over [T, B, ...] (its hidden states reset first)."""
    from snntorch import utils as snn_utils
    snn_utils.reset(net)
    state, out = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            o, state = net(x[t], state)
            out.append(o)
    return torch.stack(out)


def main(epochs: int = 5, T: int = 50, n_test: int | None = None, seed: int = 0, out=None):
    from snntorch.import_nir import import_from_nir

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = load_digits("train", T=T), load_digits("test", T=T)
    # Everything in the model is expressible in NIR: the zero reset, sparsegrad's default
    # surrogate / b_th, and a readout without reduction (the max over time is in the loss).
    model = sgnn.TimeSequential(sgnn.LIF(64, 128, alpha=0.9, threshold=1.0, reset="zero"),
                                sgnn.LIReadout(128, 10, alpha=0.9, reduce="none"))
    with torch.no_grad():  # latency codes give one spike per pixel: start with enough drive
        model[0].weight.mul_(3.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in _batches(train, 64, True, gen):
            loss = torch.nn.functional.cross_entropy(model(x).amax(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0

    x_test, y_test = next(_batches(test, len(test) if n_test is None else n_test, False, gen))
    with torch.no_grad():
        hidden = model[0](x_test)
        logits = model(x_test).amax(0)
    acc = lambda lg: float((lg.argmax(1) == y_test).float().mean())  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        # the whole model (LIF + LI) through a file, back into sparsegrad
        full = os.path.join(tmp, "digits.nir")
        nir.write(full, sparsegrad.to_nir(model, x_test[:, :1]))
        with torch.no_grad():
            logits_back = sparsegrad.from_nir(full)(x_test).amax(0)
        # the spiking layer into snnTorch (its import_from_nir has no LI node)
        spiking = os.path.join(tmp, "digits_hidden.nir")
        nir.write(spiking, sparsegrad.to_nir(model[:1], x_test[:, :1]))
        theirs = run_snntorch(import_from_nir(nir.read(spiking)), x_test)
        with torch.no_grad():
            logits_theirs = model[1](theirs).amax(0)
        size = os.path.getsize(full)
    result = {"epochs": epochs, "T": T, "test_samples": int(y_test.numel()),
              "train_seconds": round(train_s, 1), "nir_file_bytes": size,
              "accuracy_sparsegrad": acc(logits),
              "accuracy_sparsegrad_from_file": acc(logits_back),
              "logits_identical_from_file": bool(torch.equal(logits, logits_back)),
              "accuracy_snntorch_hidden_spikes": acc(logits_theirs),
              "hidden_spikes": int(hidden.sum()),
              "hidden_spikes_differing_in_snntorch": int((hidden != theirs).sum()),
              "hidden_spikes_identical_in_snntorch": bool(torch.equal(hidden, theirs))}
    print(json.dumps(result, indent=1))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    main(epochs=a.epochs, T=a.T, out=a.out)
