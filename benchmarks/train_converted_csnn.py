"""Does the converted tutorial CSNN train like the original? Loss curves side by side.

snnTorch tutorial 6's CSNN (atan surrogate, slope 2; nn.Sequential with init_hidden=True), trained
with Adam (lr 1e-2, the tutorial's) and snnTorch's ce_rate_loss on the same batches from the same
initial weights, as:

* snntorch          the original, stepped over time as the tutorial does
* convert default   sparsegrad.convert(net): backward="sparse", b_th="auto" (4.04 for atan(2))
* convert b_th=0.2  the previous default, which keeps 36 % of atan(2)'s mass
* b_th=0.2 + guard  the same with sparsegrad.guard.DeadNetworkGuard(converted) (policy "widen")
* convert dense     backward="dense"

Data: scikit-learn's 8x8 digits upsampled to 28x28, rate-coded (Bernoulli per step, fixed seed),
T=10, batch 32, 8 fixed batches cycled. Writes benchmarks/results/train_converted_csnn.json and
.png; prints the loss every 10 steps. CPU, seconds per variant.

    python benchmarks/train_converted_csnn.py [--steps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsegrad
from sparsegrad.guard import DeadNetworkGuard

HERE = os.path.dirname(os.path.abspath(__file__))


def tutorial_csnn(snn, beta=0.5):
    return nn.Sequential(
        nn.Conv2d(1, 12, 5), nn.MaxPool2d(2), snn.Leaky(beta=beta, init_hidden=True),
        nn.Conv2d(12, 64, 5), nn.MaxPool2d(2), snn.Leaky(beta=beta, init_hidden=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=beta, init_hidden=True, output=True))


def batches(T, batch, n_batches, seed=0):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: batch * n_batches]
    big = F.interpolate(images[idx, None], size=(28, 28), mode="bilinear", align_corners=False)
    out = []
    for b in range(n_batches):
        x = big[b * batch:(b + 1) * batch]
        spikes = (torch.rand((T,) + tuple(x.shape), generator=g) < x).float()
        out.append((spikes, labels[idx[b * batch:(b + 1) * batch]]))
    return out


def train(model, run, data, steps, loss_fn, guard=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x, y = data[step % len(data)]
        spk, _ = run(model, x)
        loss = loss_fn(spk, y)
        if guard is not None:
            guard.update()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, time.perf_counter() - t0


def main():
    import snntorch as snn
    import snntorch.functional as SF
    from snntorch import utils

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    original = tutorial_csnn(snn)
    data = batches(args.T, args.batch, 8)
    loss_fn = SF.ce_rate_loss()

    def run_snntorch(net, x):
        utils.reset(net)
        spk, mem = [], []
        for t in range(x.shape[0]):
            s, m = net(x[t])
            spk.append(s)
            mem.append(m)
        return torch.stack(spk), torch.stack(mem)

    def run_converted(net, x):
        return net(x)

    variants = {}
    # the original itself: snnTorch resets neurons through a class-level list that copies miss;
    # the conversions below are made (from copies) before it trains
    variants["snntorch"] = (original, run_snntorch, None)
    variants["convert default"] = (sparsegrad.convert(original), run_converted, None)
    with_02 = sparsegrad.convert(original, b_th=0.2)
    variants["convert b_th=0.2"] = (with_02, run_converted, None)
    guarded = sparsegrad.convert(original, b_th=0.2)
    variants["b_th=0.2 + guard"] = (guarded, run_converted,
                                    DeadNetworkGuard(guarded, warn=False))
    variants["convert dense"] = (sparsegrad.convert(original, backward="dense"), run_converted,
                                 None)
    results = {}
    for name, (model, run, guard) in variants.items():
        losses, secs = train(model, run, data, args.steps, loss_fn, guard)
        results[name] = dict(loss=losses, seconds=secs)
        print(f"{name:18s} " + " ".join(f"{losses[i]:.3f}" for i in
                                        range(0, args.steps, 10)) +
              f"  last {losses[-1]:.3f}  ({secs:.1f} s)", flush=True)
    b_ths = sorted({float(m.b_th) for m in variants["convert default"][0].modules()
                    if hasattr(m, "b_th")})
    meta = dict(steps=args.steps, T=args.T, batch=args.batch, lr=1e-2, surrogate="atan(2)",
                auto_b_th=b_ths, loadavg=open("/proc/loadavg").read().split()[:3],
                guard_final_b_th=[float(layer.b_th) for layer in variants["b_th=0.2 + guard"][2].layers])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "train_converted_csnn.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {path}; {meta}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results.items():
            ax.plot(r["loss"], label=name)
        ax.set_xlabel("Adam step")
        ax.set_ylabel("ce_rate_loss")
        ax.set_title("tutorial CSNN (atan, slope 2): original vs converted")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.replace(".json", ".png"), dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
