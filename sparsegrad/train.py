"""Train a spiking network with the sparse backward: ``python -m sparsegrad.train``.

``--arch mlp`` (default): input -> LIF(200) -> LIF(200) -> LIReadout; ``--arch recurrent``: the
same with recurrent RLIF hidden layers; ``--arch conv``: a small LeNet-style network (Allred et
al.'s setting): conv -> LIF -> pool -> conv -> LIF -> pool -> fc -> LIF -> LIReadout. Adam,
cross-entropy on the readout's max over time,
optionally a spike-count loss (Allred et al.) and the activity regulariser. Every epoch logs test
accuracy, loss, spikes per sample, the active fraction of each layer, the backward time (sparse,
and dense on the same batches with --compare-dense) and the cosine similarity of sparse and dense
weight gradients on a fixed batch, to ``OUT/metrics.json``; PNG plots and a summary table at the
end. Under ``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel.

Defaults run the built-in digits set (no download) in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SpikingMLP", "SpikingConvNet", "ARCHS", "build_parser", "main", "run",
           "DEFAULT_SIGMA0", "DEFAULT_SLOPE"]

# sigma0 per schedule, tuned on the digits demo (docs/training.md has the table): each cuts the
# hidden spikes per sample by >= 50 % against --spike-loss none at <= 1 point of test accuracy.
DEFAULT_SIGMA0 = {
    "constant": 1e-4,
    "linear": 2e-4,
    "quadratic": 8e-6,
    "alternating": 2e-4,
    "alternating_linear": 4e-4,
}
# The same for --arch conv with its default flags (docs/training.md, "The conv network"): its
# spikes fall much faster with sigma0; constant 8e-6 is the one of 8e-6 .. 1.2e-5 that meets the
# claim on the mean of three seeds (-51 % spikes at -0.55 points), and each other schedule's mean
# weight over the run is about that of constant 8e-6.
DEFAULT_SIGMA0_CONV = {
    "constant": 8e-6,
    "linear": 1.6e-5,
    "quadratic": 8e-7,
    "alternating": 1.6e-5,
    "alternating_linear": 3.2e-5,
}
# Default --slope per surrogate: each keeps a usable gradient across the band |u| < b_th = 0.2.
DEFAULT_SLOPE = {"fast_sigmoid": 100.0, "atan": 10.0, "sigmoid": 25.0, "triangle": 5.0}
# --arch conv: the convolutions' neurons sit near threshold far less often (their inputs arrive in
# jumps), so a wider fast sigmoid (snnTorch's default slope) learns much faster there.
DEFAULT_SLOPE_CONV = {"fast_sigmoid": 25.0, "atan": 10.0, "sigmoid": 25.0, "triangle": 5.0}


class SpikingMLP(nn.Module):
    """input -> LIF(h1) -> ... -> LIF(hk) -> LIReadout; forward returns (logits, [spikes per layer]).
    recurrent=True: RLIF hidden layers (each also gets its own spikes of the previous step through
    rec_weight, initialised N(0, (rec_scale / sqrt(h))^2)).

    Weights start as N(0, (weight_scale / sqrt(fan_in))^2) so the first layers spike from the start
    (nn.Linear's uniform init leaves latency-coded input almost silent). No per-call Python state
    besides the layers' ``last_stats``, so replicas (deepcopy, DDP) stay independent.
    """

    def __init__(self, num_inputs: int, hidden: List[int], num_classes: int, *,
                 alpha: float = 0.9, alpha_out: float = 0.9, b_th: float = 0.2,
                 slope: float = 100.0, backward: str = "sparse", weight_scale: float = 3.0,
                 recurrent: bool = False, rec_scale: float = 1.0, **neuron):
        super().__init__()
        from .nn import LIF, RLIF, LIReadout

        sizes = [num_inputs] + list(hidden)
        self.hidden = nn.ModuleList(
            (RLIF if recurrent else LIF)(a, b, b_th=b_th, slope=slope, backward=backward,
                                         **_per_neuron(neuron, alpha, (b,)))
            for a, b in zip(sizes[:-1], sizes[1:]))
        self.readout = LIReadout(sizes[-1], num_classes, alpha=alpha_out, reduce="max")
        with torch.no_grad():
            for layer in list(self.hidden) + [self.readout]:
                layer.weight.normal_(0.0, weight_scale / math.sqrt(layer.in_features))
                layer.bias.zero_()
                if recurrent and layer is not self.readout:
                    layer.rec_weight.normal_(0.0, rec_scale / math.sqrt(layer.out_features))

    @property
    def spiking_layers(self) -> List[nn.Module]:
        """The layers whose spikes are counted, whose stats are logged and which the guard sees."""
        return list(self.hidden)

    def hidden_weights(self) -> List[torch.Tensor]:
        """The weights feeding each spiking layer (their gradients are compared sparse vs dense)."""
        return [layer.weight for layer in self.hidden]

    def set_backward(self, mode: str) -> None:
        for layer in self.spiking_layers:
            layer.backward = mode

    def forward(self, x):
        spikes = []
        h = x
        for layer in self.hidden:
            h = layer(h)
            spikes.append(h)
        return self.readout(h), spikes


def _learned(neuron: dict) -> bool:
    return bool(neuron.get("learn_alpha") or neuron.get("learn_threshold")
                or neuron.get("alpha_syn") is not None)


def _per_neuron(neuron: dict, alpha: float, shape) -> dict:
    """The neuron keywords of one layer: with learn_alpha / learn_threshold, alpha / threshold
    become tensors of `shape` (one learnable value per neuron, or per channel: [C, 1, 1])."""
    kw = dict(neuron, alpha=alpha)
    for name in ("alpha", "threshold"):
        if kw.pop(f"learn_{name}", False):
            kw[name] = torch.full(shape, float(kw.get(name, 1.0)))
            kw[f"learn_{name}"] = True
    if kw.get("alpha_syn") is None:
        kw.pop("alpha_syn", None)
    return kw


class SpikingConvNet(nn.Module):
    """LeNet-style spiking network on [T, B, C*H*W] image sequences (Allred et al.'s setting).

    conv(3x3) -> LIF -> maxpool(2) -> conv(3x3) -> LIF -> maxpool(2) -> fc -> LIF -> LIReadout,
    each conv -> LIF a sparsegrad.nn.ConvLIF over the whole sequence, the pooling SpikePool2d,
    the fc layer a fused sparsegrad.nn.LIF. forward returns
    (logits, [spikes of each spiking layer]).
    """

    def __init__(self, image_shape, channels: List[int], fc: int, num_classes: int, *,
                 alpha: float = 0.9, alpha_out: float = 0.9, b_th: float = 0.2,
                 surrogate: str = "fast_sigmoid", slope: float = 100.0,
                 reset: str = "subtract", backward: str = "sparse", weight_scale: float = 3.0,
                 **learn):
        super().__init__()
        from .nn import LIF, ConvLIF, LIFNeuron, LIReadout, SpikePool2d, TimeDistributed

        c_in, height, width = image_shape
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        neuron = dict(b_th=b_th, surrogate=surrogate, slope=slope, reset=reset,
                      backward=backward, **learn)
        # conv -> LIF as one ConvLIF (issue 20: sparse conv backward, compact saved state); its
        # neuron (per channel with learnable parameters) is also lif1 / lif2 (the spiking
        # layers' stats and backward mode)
        self.conv1 = ConvLIF(c_in, c1, 3, padding=1,
                             neuron=LIFNeuron(**_per_neuron(neuron, alpha, (c1, 1, 1))))
        self.lif1 = self.conv1.neuron
        self.pool1 = SpikePool2d(2)
        self.conv2 = ConvLIF(c1, c2, 3, padding=1,
                             neuron=LIFNeuron(**_per_neuron(neuron, alpha, (c2, 1, 1))))
        self.lif2 = self.conv2.neuron
        self.pool2 = SpikePool2d(2)
        self.flatten = TimeDistributed(nn.Flatten())
        fc_in = c2 * (height // 4) * (width // 4)
        self.fc = LIF(fc_in, fc, **_per_neuron(neuron, alpha, (fc,)))
        self.readout = LIReadout(fc, num_classes, alpha=alpha_out, reduce="max")
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.fc, self.readout):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, weight_scale / math.sqrt(fan_in))
                layer.bias.zero_()

    @property
    def spiking_layers(self) -> List[nn.Module]:
        return [self.lif1, self.lif2, self.fc]

    def hidden_weights(self) -> List[torch.Tensor]:
        return [self.conv1.weight, self.conv2.weight, self.fc.weight]

    def set_backward(self, mode: str) -> None:
        for layer in self.spiking_layers:
            layer.backward = mode

    def forward(self, x):
        T, B = x.shape[:2]
        h = x.reshape(T, B, *self.image_shape)
        s1 = self.conv1(h)
        s2 = self.conv2(self.pool1(s1))
        s3 = self.fc(self.flatten(self.pool2(s2)))
        return self.readout(s3), [s1, s2, s3]


def _image_shape(num_inputs: int):
    side = math.isqrt(num_inputs)
    if side * side != num_inputs or side < 4:
        raise SystemExit(f"--arch conv needs square images (N_in = side^2, side >= 4); this "
                         f"dataset has {num_inputs} inputs per step")
    return (1, side, side)


def _build_mlp(args, num_inputs, num_classes):
    return SpikingMLP(num_inputs, args.hidden, num_classes, alpha=args.alpha,
                      alpha_out=args.alpha_out, b_th=args.b_th, backward=args.backward,
                      weight_scale=args.weight_scale, **_neuron_kwargs(args))


def _build_recurrent(args, num_inputs, num_classes):
    return SpikingMLP(num_inputs, args.hidden, num_classes, alpha=args.alpha,
                      alpha_out=args.alpha_out, b_th=args.b_th, backward=args.backward,
                      weight_scale=args.weight_scale, recurrent=True, **_neuron_kwargs(args))


def _build_conv(args, num_inputs, num_classes):
    return SpikingConvNet(_image_shape(num_inputs), args.channels, args.fc, num_classes,
                          alpha=args.alpha, alpha_out=args.alpha_out, b_th=args.b_th,
                          backward=args.backward, weight_scale=args.weight_scale,
                          **_neuron_kwargs(args, "conv"))


def _neuron_kwargs(args, arch="mlp"):
    """surrogate / slope / reset of every spiking layer."""
    slopes = DEFAULT_SLOPE_CONV if arch == "conv" else DEFAULT_SLOPE
    slope = args.slope if args.slope is not None else slopes[args.surrogate]
    kw = {"slope": slope, "surrogate": args.surrogate, "reset": args.reset}
    # issue 18: per-neuron learnable alpha / threshold, synaptic current (only when asked, so
    # that the default networks stay the float-parameter ones)
    if getattr(args, "learn_alpha", False):
        kw["learn_alpha"] = True
    if getattr(args, "learn_threshold", False):
        kw["learn_threshold"] = True
    if getattr(args, "synaptic", None) is not None:
        kw["alpha_syn"] = args.synaptic
    return kw


# --arch NAME -> builder(args, num_inputs, num_classes); add an architecture by adding an entry.
ARCHS = {"mlp": _build_mlp, "recurrent": _build_recurrent, "conv": _build_conv}


def default_sigma0(arch: str, schedule: str) -> float:
    return (DEFAULT_SIGMA0_CONV if arch == "conv" else DEFAULT_SIGMA0)[schedule]


def build_parser() -> argparse.ArgumentParser:
    from .losses import SCHEDULES

    from .functional import RESETS, SURROGATES

    p = argparse.ArgumentParser(
        prog="python -m sparsegrad.train",
        description="Train a spiking network (--arch mlp: input -> LIF -> LIF -> readout; --arch "
                    "conv: conv -> LIF -> pool -> conv -> LIF -> pool -> fc -> LIF -> readout) "
                    "with sparsegrad's sparse backward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="mlp", choices=list(ARCHS),
                   help="network: mlp (hidden LIF layers), recurrent (hidden RLIF layers) or conv "
                        "(LeNet-style, square images)")
    p.add_argument("--dataset", default="digits", choices=["digits", "fmnist", "nmnist", "shd"],
                   help="digits needs no files; the others read --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset's files (see docs/training.md)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200],
                   help="hidden layer sizes (--arch mlp)")
    p.add_argument("--channels", type=int, nargs=2, default=[16, 32], metavar=("C1", "C2"),
                   help="channels of the two convolutions (--arch conv)")
    p.add_argument("--fc", type=int, default=128, help="size of the fc LIF layer (--arch conv)")
    p.add_argument("--surrogate", default="fast_sigmoid", choices=list(SURROGATES),
                   help="surrogate gradient of every spiking layer (docs/surrogates.md)")
    p.add_argument("--slope", type=float, default=None,
                   help="surrogate slope; default per surrogate (mlp / conv): "
                   + ", ".join(f"{k} {v:g} / {DEFAULT_SLOPE_CONV[k]:g}"
                               for k, v in DEFAULT_SLOPE.items()))
    p.add_argument("--reset", default="subtract", choices=list(RESETS),
                   help="membrane reset after a spike")
    p.add_argument("--b-th", type=float, default=0.2,
                   help="half-width of the active band |V - threshold| < b_th of the sparse backward")
    p.add_argument("--backward", default="sparse", choices=["sparse", "dense"])
    p.add_argument("--spike-loss", default="none", choices=("none",) + SCHEDULES,
                   help="spike-count loss schedule (Allred et al. 2020)")
    p.add_argument("--sigma0", type=float, default=None,
                   help="spike-count loss scale; default per schedule (mlp / conv): "
                   + ", ".join(f"{k} {v:g} / {DEFAULT_SIGMA0_CONV[k]:g}"
                               for k, v in DEFAULT_SIGMA0.items()))
    p.add_argument("--activity-reg", action="store_true",
                   help="add the upper/lower firing-rate regulariser of Perez-Nieves & Goodman")
    p.add_argument("--compare-dense", action="store_true",
                   help="also time the dense backward on every training batch (same weights)")
    p.add_argument("--guard", default="widen", choices=["widen", "dense", "warn", "off"],
                   help="dead-network guard policy for sparse layers with no active entries")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3,
                   help="Adam learning rate at the start (cosine decay to 2%% of it)")
    p.add_argument("--alpha", type=float, default=0.9, help="membrane decay of the LIF layers")
    p.add_argument("--alpha-out", type=float, default=0.9, help="decay of the readout")
    p.add_argument("--learn-alpha", action="store_true",
                   help="learn one membrane decay per neuron (per channel for conv neurons), "
                        "starting at --alpha, clamped to [0, 1]")
    p.add_argument("--learn-threshold", action="store_true",
                   help="learn one threshold per neuron (per channel for conv neurons), "
                        "starting at 1")
    p.add_argument("--synaptic", type=float, default=None, metavar="ALPHA_SYN",
                   help="add a synaptic current with decay ALPHA_SYN to every spiking layer "
                        "(snnTorch's Synaptic; --arch mlp / conv)")
    p.add_argument("--weight-scale", type=float, default=3.0,
                   help="init std = weight_scale / sqrt(fan_in)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training samples (quick runs, tests)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="use only the first N test samples")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default runs/<dataset>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _check_args(args) -> None:
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    if any(h < 1 for h in args.hidden):
        raise SystemExit(f"--hidden sizes must be >= 1, got {args.hidden}")
    if any(c < 1 for c in args.channels) or args.fc < 1:
        raise SystemExit(f"--channels and --fc must be >= 1, got {args.channels} and {args.fc}")
    if args.slope is not None and not (math.isfinite(args.slope) and args.slope > 0):
        raise SystemExit(f"--slope must be a finite number > 0, got {args.slope}")
    if not args.b_th > 0:
        raise SystemExit(f"--b-th must be > 0 (inf allowed), got {args.b_th}")
    if args.sigma0 is not None and not (math.isfinite(args.sigma0) and args.sigma0 >= 0):
        raise SystemExit(f"--sigma0 must be a finite number >= 0, got {args.sigma0}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")
    if args.synaptic is not None and not 0.0 <= args.synaptic <= 1.0:
        raise SystemExit(f"--synaptic must be in [0, 1], got {args.synaptic}")
    for name in ("train_limit", "test_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {v}")


class _Dist:
    """torch.distributed state when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device_arg: Optional[str]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")) \
            .startswith("cuda")
        if self.world > 1:
            import torch.distributed as dist

            backend = "nccl" if want_cuda else "gloo"
            if want_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()
        if want_cuda:
            self.device = torch.device("cuda", self.local_rank if self.world > 1 else
                                       (torch.device(device_arg).index or 0) if device_arg
                                       else 0)
        else:
            self.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: List[float]) -> List[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def _loss_terms(logits, spikes, y, epoch_f, spike_loss, activity_reg):
    ce = F.cross_entropy(logits, y)
    loss = ce
    if spike_loss is not None:
        loss = loss + spike_loss(spikes, epoch_f)
    if activity_reg is not None:
        loss = loss + activity_reg(spikes)
    return loss, ce


def _weight_grads(model) -> List[torch.Tensor]:
    # Hidden layers only: the readout has no surrogate, its gradient is the same in both modes
    # (and, being the largest, would hide the difference in a combined cosine).
    return [w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)
            for w in model.hidden_weights()]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0 if (na == 0) != (nb == 0) else 1.0
    cos = float(torch.dot(a.flatten().double(), b.flatten().double()) / (na.double() * nb.double()))
    return min(1.0, max(-1.0, cos))  # float32 gradients can land a hair outside [-1, 1]


def _timed_backward(loss, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _grad_similarity(shadow, x, y, epoch_f, spike_loss, activity_reg):
    """Cosine of sparse vs dense hidden-layer weight gradients (per layer and together)."""
    grads = {}
    for mode in ("sparse", "dense"):
        shadow.set_backward(mode)
        shadow.zero_grad(set_to_none=True)
        logits, spikes = shadow(x)
        loss, _ = _loss_terms(logits, spikes, y, epoch_f, spike_loss, activity_reg)
        loss.backward()
        grads[mode] = _weight_grads(shadow)
    shadow.set_backward("sparse")
    per_layer = [_cosine(a, b) for a, b in zip(grads["sparse"], grads["dense"])]
    total = _cosine(torch.cat([g.flatten() for g in grads["sparse"]]),
                    torch.cat([g.flatten() for g in grads["dense"]]))
    return total, per_layer


def _evaluate(model, dataset, indices, batch_size, device, collate, num_hidden):
    """(correct, count, loss sum, spikes sum per layer) on the given test indices."""
    model.eval()
    correct = count = 0
    loss_sum = 0.0
    spikes_sum = [0.0] * num_hidden
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = collate([dataset[i] for i in indices[start:start + batch_size]])
            x, y = batch[0].to(device), batch[1].to(device)
            logits, spikes = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += y.shape[0]
            for i, s in enumerate(spikes):
                spikes_sum[i] += float(s.sum())
    model.train()
    return correct, count, loss_sum, spikes_sum


def _plot(history, out_dir) -> List[str]:
    from .data._deps import require

    matplotlib = require("matplotlib", "the training plots")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the training plots")
    ep = [r["epoch"] for r in history]
    n_layers = len(history[0]["active_fraction"])
    panels = [
        ("loss", "loss", [("train loss", [r["train_loss"] for r in history]),
                          ("test cross-entropy", [r["test_loss"] for r in history])]),
        ("accuracy", "accuracy (%)", [("train", [100 * r["train_acc"] for r in history]),
                                      ("test", [100 * r["test_acc"] for r in history])]),
        ("active_fraction", "active entries (%)",
         [(f"layer {i + 1}", [100 * r["active_fraction"][i] for r in history])
          for i in range(n_layers)]),
        ("spikes", "hidden spikes per sample", [("test", [r["spikes_per_sample"] for r in history])]),
        ("backward_time", "backward time per batch (ms)",
         [(k.replace("bwd_ms_", ""), [r.get(k) for r in history])
          for k in ("bwd_ms_sparse", "bwd_ms_dense")
          if any(r.get(k) is not None for r in history)]),
        ("grad_cosine", "cosine(sparse grad, dense grad)",
         [("all hidden weights", [r["grad_cosine"] for r in history])]
         + [(f"layer {i + 1}", [r["grad_cosine_per_layer"][i] for r in history])
            for i in range(len(history[0]["grad_cosine_per_layer"]))]),
    ]
    written = []
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax_all, (name, ylabel, series) in zip(axes.flat, panels):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in (ax, ax_all):
            for label, values in series:
                xs = [e for e, v in zip(ep, values) if v is not None]
                vs = [v for v in values if v is not None]
                a.plot(xs, vs, marker="o", ms=3, label=label)
            a.set_xlabel("epoch")
            a.set_ylabel(ylabel)
            a.grid(alpha=0.3)
            if len(series) > 1:
                a.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig_all.tight_layout()
    path = os.path.join(out_dir, "summary.png")
    fig_all.savefig(path, dpi=90)
    plt.close(fig_all)
    written.append(path)
    return written


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def summary_table(history) -> str:
    """The per-epoch table printed at the end of a run."""
    head = (f"{'epoch':>5} {'loss':>7} {'train%':>7} {'test%':>6} {'spk/smp':>8} "
            f"{'active% per layer':>18} {'bwd sp ms':>9} {'bwd dn ms':>9} {'speedup':>7} "
            f"{'cos':>6}")
    lines = [head, "-" * len(head)]
    for r in history:
        act = "/".join(f"{100 * a:.2f}" for a in r["active_fraction"])
        sp, dn = r.get("bwd_ms_sparse"), r.get("bwd_ms_dense")
        ratio = dn / sp if sp and dn else None
        lines.append(f"{r['epoch']:>5} {r['train_loss']:>7.3f} {100 * r['train_acc']:>7.2f} "
                     f"{100 * r['test_acc']:>6.2f} {r['spikes_per_sample']:>8.1f} {act:>18} "
                     f"{_fmt(sp, '9.1f'):>9} {_fmt(dn, '9.1f'):>9} {_fmt(ratio, '6.2f'):>6}x "
                     f"{r['grad_cosine']:>6.4f}")
    return "\n".join(lines)


def run(args) -> List[dict]:
    """Train with parsed arguments; returns the per-epoch records (rank 0 writes them to OUT)."""
    from .data import collate_time_major, get_dataset
    from .guard import DeadNetworkGuard
    from .losses import ActivityRegularizer, SpikeCountLoss

    _check_args(args)
    dist_state = _Dist(args.device)
    device = dist_state.device
    main_proc = dist_state.main
    out_dir = args.out or os.path.join("runs", args.dataset)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    train_set = get_dataset(args.dataset, args.data_dir, "train")
    test_set = get_dataset(args.dataset, args.data_dir, "test")
    if args.train_limit is not None and args.train_limit < len(train_set):
        train_set = torch.utils.data.Subset(train_set, range(args.train_limit))
    test_indices = list(range(min(len(test_set), args.test_limit or len(test_set))))
    base = train_set.dataset if isinstance(train_set, torch.utils.data.Subset) else train_set
    num_inputs, num_classes = base.num_inputs, base.num_classes

    model = ARCHS[args.arch](args, num_inputs, num_classes).to(device)
    inner = model
    shadow = copy.deepcopy(model) if main_proc else None  # for dense timing and gradient cosine
    if dist_state.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Cosine decay of the learning rate over the run: the last epochs settle, so the final
    # accuracies of two runs can be compared to within a point.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs,
                                                           eta_min=args.lr * 0.02)

    if dist_state.active:
        sampler = torch.utils.data.distributed.DistributedSampler(
            train_set, num_replicas=dist_state.world, rank=dist_state.rank, shuffle=True,
            seed=args.seed)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size,
                                             sampler=sampler, collate_fn=collate_time_major,
                                             num_workers=args.workers)
    else:
        sampler = None
        gen = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                             generator=gen, collate_fn=collate_time_major,
                                             num_workers=args.workers)
    fixed_batch = collate_time_major([train_set[i] for i in range(min(len(train_set),
                                                                      args.batch_size))])
    fixed_batch = (fixed_batch[0].to(device), fixed_batch[1].to(device))
    my_test = test_indices[dist_state.rank::dist_state.world]

    spike_loss = None
    sigma0 = None
    if args.spike_loss != "none":
        sigma0 = args.sigma0 if args.sigma0 is not None else default_sigma0(args.arch,
                                                                            args.spike_loss)
        spike_loss = SpikeCountLoss(sigma0, args.spike_loss, total_epochs=args.epochs)
    activity_reg = ActivityRegularizer() if args.activity_reg else None
    guard = None
    if args.guard != "off" and args.backward == "sparse":
        guard = DeadNetworkGuard(inner, policy=args.guard)
    compare = args.compare_dense and args.backward == "sparse" and main_proc

    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({**vars(args), "sigma0_used": sigma0, "world_size": dist_state.world,
                       "num_inputs": num_inputs, "num_classes": num_classes,
                       "T": base.T, "train_samples": len(train_set),
                       "test_samples": len(test_indices)}, f, indent=2)
        layout = (f"conv channels {args.channels}, fc {args.fc}" if args.arch == "conv" else
                  f"hidden {args.hidden}")
        print(f"sparsegrad.train: {args.dataset} ({len(train_set)} train / {len(test_indices)} "
              f"test, T={base.T}, {num_inputs} inputs), {args.arch} {layout}, surrogate "
              f"{args.surrogate}, reset {args.reset}, backward "
              f"{args.backward} (b_th {args.b_th:g}), spike loss {args.spike_loss}"
              + (f" (sigma0 {sigma0:g})" if sigma0 is not None else "")
              + f", {dist_state.world} process(es), device {device}", flush=True)

    progress = None
    if main_proc and not args.no_progress:
        from .data._deps import require

        tqdm = require("tqdm", "the progress bar (or pass --no-progress)").tqdm
        progress = tqdm(total=args.epochs * len(loader), desc="train", unit="batch",
                        dynamic_ncols=True, file=sys.stderr)

    history: List[dict] = []
    n_hidden = len(inner.spiking_layers)
    num_batches = len(loader)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t_epoch = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "correct": 0.0, "count": 0.0, "spikes": 0.0}
        active_sum = [0.0] * n_hidden
        bwd_train, bwd_dense = [], []
        for b, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            epoch_f = epoch + b / num_batches
            logits, spikes = model(x)
            if guard is not None and guard.update():
                logits, spikes = model(x)
            loss, ce = _loss_terms(logits, spikes, y, epoch_f, spike_loss, activity_reg)
            optimizer.zero_grad(set_to_none=True)
            bwd_train.append(_timed_backward(loss, device))
            if compare:
                # Same weights, same batch, dense surrogate: time its backward (no update).
                shadow.load_state_dict(inner.state_dict())
                shadow.set_backward("dense")
                shadow.zero_grad(set_to_none=True)
                s_logits, s_spikes = shadow(x)
                s_loss, _ = _loss_terms(s_logits, s_spikes, y, epoch_f, spike_loss,
                                        activity_reg)
                bwd_dense.append(_timed_backward(s_loss, device))
                shadow.set_backward("sparse")
            optimizer.step()
            if guard is not None:
                guard.end_step()
            for i, layer in enumerate(inner.spiking_layers):
                if layer.last_stats is not None:
                    active_sum[i] += layer.last_stats.active_fraction
            sums["loss"] += float(loss.detach()) * y.shape[0]
            sums["ce"] += float(ce.detach()) * y.shape[0]
            sums["correct"] += float((logits.argmax(1) == y).sum())
            sums["count"] += y.shape[0]
            sums["spikes"] += float(sum(s.detach().sum() for s in spikes))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}")
        scheduler.step()
        train_time = time.perf_counter() - t_epoch

        keys = ["loss", "ce", "correct", "count", "spikes"]
        totals = dist_state.sum([sums[k] for k in keys] + active_sum + [float(num_batches)])
        tot = dict(zip(keys, totals[:5]))
        active = [a / totals[-1] for a in totals[5:5 + n_hidden]]
        correct, count, tloss, tspikes = _evaluate(inner, test_set, my_test, 256, device,
                                                   collate_time_major, n_hidden)
        ev = dist_state.sum([correct, count, tloss] + tspikes)
        test_count = max(ev[1], 1.0)
        record = {
            "epoch": epoch,
            "train_loss": tot["loss"] / tot["count"],
            "train_ce": tot["ce"] / tot["count"],
            "train_acc": tot["correct"] / tot["count"],
            "test_acc": ev[0] / test_count,
            "test_loss": ev[2] / test_count,
            "spikes_per_sample": sum(ev[3:]) / test_count,
            "spikes_per_sample_per_layer": [s / test_count for s in ev[3:]],
            "train_spikes_per_sample": tot["spikes"] / tot["count"],
            "active_fraction": active,
            "bwd_ms_sparse": float(np.median(bwd_train)) if args.backward == "sparse" else None,
            "bwd_ms_dense": (float(np.median(bwd_dense)) if compare else
                             float(np.median(bwd_train)) if args.backward == "dense" else None),
            "spike_loss_weight": spike_loss.weight(epoch) if spike_loss is not None else 0.0,
            "epoch_time_s": train_time,
        }
        if guard is not None:
            record["guard"] = guard.state()
        if main_proc:
            shadow.load_state_dict(inner.state_dict())
            for s_layer, layer in zip(shadow.spiking_layers, inner.spiking_layers):
                s_layer.b_th = layer.b_th
            cos, cos_layers = _grad_similarity(shadow, fixed_batch[0], fixed_batch[1], epoch,
                                               spike_loss, activity_reg)
            record["grad_cosine"] = cos
            record["grad_cosine_per_layer"] = cos_layers
            history.append(record)
            with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                json.dump(history, f, indent=1)
            msg = (f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  train "
                   f"{100 * record['train_acc']:.2f}%  test {100 * record['test_acc']:.2f}%  "
                   f"spikes/sample {record['spikes_per_sample']:.1f}  active% "
                   + "/".join(f"{100 * a:.2f}" for a in active)
                   + f"  bwd sparse {_fmt(record['bwd_ms_sparse'], '.1f')} ms"
                   + f" dense {_fmt(record['bwd_ms_dense'], '.1f')} ms"
                   + f"  cos {cos:.4f}  ({train_time:.1f}s)")
            if progress is not None:
                progress.write(msg)
            else:
                print(msg, flush=True)
    if progress is not None:
        progress.close()
    if main_proc:
        table = summary_table(history)
        with open(os.path.join(out_dir, "summary.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
        if not args.no_plots:
            paths = _plot(history, out_dir)
            print(f"wrote {os.path.join(out_dir, 'metrics.json')} and {len(paths)} plots "
                  f"in {out_dir}")
    dist_state.close()
    return history


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
