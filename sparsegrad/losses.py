"""Losses that train spiking networks to spike less.

- :class:`SpikeCountLoss`: L_sparsity = sigma(n) * spikeCount with the five schedules of Allred et
  al. (2020): constant, linear, quadratic, alternating, alternating_linear.
- :class:`ActivityRegularizer`: the upper / lower firing-rate terms used in the training code of
  Perez-Nieves & Goodman (2021).

What is counted. Both take the spike tensors of one or more layers ([T, B, N] time-major, or pass
``batch_dim=0`` for [B, T, N]). ``spikeCount`` is the number of spikes of all given layers, summed
over time and neurons and **averaged over the batch**: spikes per sample. A loss built this way does
not change when the batch size changes. A precomputed count may be passed instead of a spike tensor:
a 1-d tensor is read as per-sample counts (its mean is used), a 0-d tensor as a count that is
already per sample.

The gradient of the spike count reaches the network through the layers' own backward, so with the
sparse backward it lands only on active entries (|V - threshold| < b_th).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["SCHEDULES", "SpikeCountLoss", "ActivityRegularizer", "spikes_per_sample",
           "alternating_included"]

SCHEDULES = ("constant", "linear", "quadratic", "alternating", "alternating_linear")

SpikeInput = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(spikes: SpikeInput) -> list:
    if isinstance(spikes, torch.Tensor):
        return [spikes]
    if isinstance(spikes, (list, tuple)):
        if len(spikes) == 0:
            raise ValueError("spikes must hold at least one tensor, got an empty sequence")
        for i, s in enumerate(spikes):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"spikes[{i}] must be a torch.Tensor, got {type(s).__name__}")
        return list(spikes)
    raise TypeError("spikes must be a tensor or a list/tuple of tensors (one per layer), "
                    f"got {type(spikes).__name__}")


def spikes_per_sample(spikes: SpikeInput, batch_dim: int = 1) -> torch.Tensor:
    """Spikes per sample, summed over every given layer (a differentiable 0-d tensor).

    A spike tensor of rank >= 2 is summed and divided by its size along ``batch_dim``; a 1-d tensor
    holds per-sample counts (mean taken); a 0-d tensor is taken as a per-sample count as it is.
    """
    total = None
    for i, s in enumerate(_as_list(spikes)):
        if s.dim() == 0:
            c = s
        elif s.dim() == 1:
            if s.shape[0] == 0:
                raise ValueError(f"spikes[{i}] is an empty count tensor")
            c = s.mean()
        else:
            if not -s.dim() <= batch_dim < s.dim():
                raise ValueError(f"batch_dim={batch_dim} is out of range for spikes[{i}] of shape "
                                 f"{tuple(s.shape)}")
            # half-type spikes are counted in float32 (bfloat16 holds integers exactly only to 256)
            wide = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else None
            c = s.sum(dtype=wide) / max(s.shape[batch_dim], 1)
        if not c.is_floating_point():
            c = c.to(torch.get_default_dtype())
        total = c if total is None else total + c
    return total


def alternating_included(epoch: int, total_epochs: int) -> bool:
    """A(n) of Allred et al.: whether the spike-count term is on in epoch n (0-based).

    Deterministic form: with S(n) = sum_{k=0..n} k/(N-1), epoch n is included when S(n) passes an
    integer, i.e. floor(S(n)) > floor(S(n-1)). The included share rises linearly from 0 (first
    epoch never) to 1 (last epoch always). Exact integer arithmetic, so no round-off at integers.
    """
    n, N = int(epoch), int(total_epochs)
    if n < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if N <= 1:
        return True  # a one-epoch run: its only epoch is the last, which is always included
    tri = lambda k: k * (k + 1) // 2  # noqa: E731  (sum_{j<=k} j, so S(k) = tri(k)/(N-1))
    return tri(n) // (N - 1) > (tri(n - 1) // (N - 1) if n > 0 else 0)


class SpikeCountLoss(nn.Module):
    """Spike-count loss ``sigma(n) * spikeCount`` with an epoch schedule (Allred et al., 2020).

    Schedules (n = current epoch, may be fractional; N = total_epochs; A(n) see
    :func:`alternating_included`, evaluated at floor(n)):

    ====================  ==================================
    constant              sigma0 * count
    linear                sigma0 * (n / N) * count
    quadratic             sigma0 * (n**2 / N) * count   (as printed in the paper)
    alternating           A(n) * sigma0 * count
    alternating_linear    A(n) * sigma0 * (n / N) * count
    ====================  ==================================

    ``count`` is spikes per sample over all given layers (see the module docstring). Call as
    ``loss_fn(spikes, epoch)``, with ``spikes`` a tensor or a list of per-layer spike tensors.
    ``weight(epoch)`` returns the factor multiplying the count, for plotting.
    """

    def __init__(self, sigma0: float, schedule: str = "constant", total_epochs: int = None,
                 batch_dim: int = 1):
        super().__init__()
        if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)):
            raise TypeError(f"sigma0 must be a real number, got {type(sigma0).__name__}")
        if not math.isfinite(sigma0) or sigma0 < 0:
            raise ValueError(f"sigma0 must be finite and >= 0, got {sigma0}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant":
            if total_epochs is None:
                raise ValueError(f"schedule={schedule!r} needs total_epochs (the N of the paper)")
        if total_epochs is not None:
            if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) \
                    or total_epochs < 1:
                raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
        self.sigma0 = float(sigma0)
        self.schedule = schedule
        self.total_epochs = total_epochs
        self.batch_dim = batch_dim

    def weight(self, epoch: float) -> float:
        """The factor sigma(n) / count at (possibly fractional) epoch n."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        s, n, N = self.schedule, float(epoch), self.total_epochs
        if s == "constant":
            return self.sigma0
        if s == "linear":
            return self.sigma0 * n / N
        if s == "quadratic":
            return self.sigma0 * n * n / N
        on = alternating_included(math.floor(n), N)
        if s == "alternating":
            return self.sigma0 if on else 0.0
        return self.sigma0 * n / N if on else 0.0  # alternating_linear

    def forward(self, spikes: SpikeInput, epoch: float = 0.0) -> torch.Tensor:
        w = self.weight(epoch)
        count = spikes_per_sample(spikes, self.batch_dim)
        return count * w

    def extra_repr(self) -> str:
        return f"sigma0={self.sigma0}, schedule={self.schedule!r}, total_epochs={self.total_epochs}"


class ActivityRegularizer(nn.Module):
    """Upper and lower firing-rate terms (the regulariser of Perez-Nieves & Goodman's code).

    For one layer of N neurons, per sample b, with c[b, j] = spikes of neuron j over the sequence:

        upper[b] = lambda_upper * relu(mean_j c[b, j] - f_upper) ** p_upper
        lower[b] = lambda_lower / N * sum_j relu(f_lower - c[b, j]) ** 2

    and the loss is the batch mean of upper + lower, summed over the given layers. The upper term
    caps the mean spike count per neuron; the lower term pushes silent neurons to fire.
    Defaults are the paper's (lambda_upper 0.06, f_upper 1 spike per neuron per sample, p 1;
    lambda_lower 100, f_lower 1e-3).
    """

    def __init__(self, lambda_upper: float = 0.06, f_upper: float = 1.0, p_upper: float = 1.0,
                 lambda_lower: float = 100.0, f_lower: float = 1e-3, batch_dim: int = 1):
        super().__init__()
        for name, v in (("lambda_upper", lambda_upper), ("f_upper", f_upper),
                        ("p_upper", p_upper), ("lambda_lower", lambda_lower),
                        ("f_lower", f_lower)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if p_upper <= 0:
            raise ValueError(f"p_upper must be > 0, got {p_upper}")
        self.lambda_upper = float(lambda_upper)
        self.f_upper = float(f_upper)
        self.p_upper = float(p_upper)
        self.lambda_lower = float(lambda_lower)
        self.f_lower = float(f_lower)
        self.batch_dim = batch_dim

    def forward(self, spikes: SpikeInput) -> torch.Tensor:
        total = None
        for i, s in enumerate(_as_list(spikes)):
            if s.dim() != 3:
                raise ValueError(f"spikes[{i}] must be a [T, B, N] spike tensor, "
                                 f"got shape {tuple(s.shape)}")
            time_dim = 0 if self.batch_dim in (1, -2) else 1
            counts = s.sum(dim=time_dim)  # [B, N]
            upper = torch.clamp(counts.mean(dim=1) - self.f_upper, min=0.0) ** self.p_upper
            lower = (torch.clamp(self.f_lower - counts, min=0.0) ** 2).mean(dim=1)
            term = (self.lambda_upper * upper + self.lambda_lower * lower).mean()
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return (f"lambda_upper={self.lambda_upper}, f_upper={self.f_upper}, "
                f"p_upper={self.p_upper}, lambda_lower={self.lambda_lower}, "
                f"f_lower={self.f_lower}")
