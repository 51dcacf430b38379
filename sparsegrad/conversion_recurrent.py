"""The conversion rule for snnTorch's recurrent neuron: ``nn.Linear -> snn.RLeaky`` becomes one
``sparsegrad.nn.RLIF`` (used by ``sparsegrad.convert``; docs/conversion.md).

snnTorch 1.0's ``RLeaky(all_to_all=True, linear_features=N)`` computes, per step,

    mem[t] = beta*mem[t-1] + I[t] + recurrent(spk[t-1]) - reset[t]*threshold     ("subtract")
    spk[t] = H(mem[t] - threshold),   reset[t] = H(mem[t-1] - threshold) detached

with ``recurrent = nn.Linear(N, N)`` (weight R, bias b_R) applied to the previous step's spikes
(not detached: gradients flow through it) and I[t] = fc(x[t]). With a zero initial state,
reset[t] = spk[t-1], so this is sparsegrad's recurrent layer with alpha = clamp(beta, 0, 1),
weight = fc.weight, bias = fc.bias, rec_weight = R and rec_bias = b_R. ``reset_mechanism="none"`` maps to
reset="none". Its default surrogate is atan(alpha=2), i.e. sparsegrad's surrogate="atan",
slope=2. A learnable or per-neuron beta / threshold becomes RLIF's tensor parameter.
``RSynaptic`` (the same with a synaptic current, syn[t] = alpha*syn[t-1] + I[t] +
recurrent(spk[t-1]), mem[t] = beta*mem[t-1] + syn[t] - reset[t]*threshold) becomes RLIF with
alpha_syn = clamp(alpha, 0, 1). What cannot be matched exactly is refused (the pair is left as it
is and reported): reset "zero" (snnTorch zeroes the whole new membrane, input included, and
RSynaptic its synaptic current too), one-to-one or convolutional recurrence, reset_delay=False,
graded spikes, inhibition, state quantisation, and surrogates that are not exactly one of
sparsegrad's four.
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional, Tuple

import torch
from torch import nn

__all__ = ["is_rleaky", "rleaky_rule", "exact_surrogate"]


def is_rleaky(m: nn.Module) -> bool:
    snn = sys.modules.get("snntorch")
    rleaky = getattr(snn, "RLeaky", None) if snn is not None else None
    return rleaky is not None and isinstance(m, rleaky)


def _scalar(t) -> Optional[float]:
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0]) if t.numel() == 1 else None
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


def _derivative(fn, u):
    u = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(u)
        out = out[0] if isinstance(out, tuple) else out
        if not isinstance(out, torch.Tensor) or out.shape != u.shape or not out.requires_grad:
            return None, None
        (grad,) = torch.autograd.grad(out.sum(), u, allow_unused=True)
    return out.detach(), (None if grad is None else grad.detach().to(torch.float64))


def _forms(u: torch.Tensor, a: float):
    """sparsegrad's surrogates (csrc/lif_math.h) at u for slope a."""
    au = u.abs()
    e = torch.exp(-a * au)
    return {
        "fast_sigmoid": 1.0 / (a * au + 1.0) ** 2,
        "atan": (a / 2.0) / (1.0 + (math.pi / 2.0 * a * au) ** 2),
        "sigmoid": a * e / (1.0 + e) ** 2,
        "triangle": a * torch.clamp(1.0 - a * au, min=0.0),
    }


def exact_surrogate(fn) -> Tuple[Optional[str], Optional[float], Optional[str]]:
    """(surrogate name, slope, None) when the spike function is the Heaviside step with exactly
    one of sparsegrad's surrogates as its derivative (to float32 round-off: snnTorch evaluates
    some in float32), else (None, None, reason)."""
    grid = torch.cat([-torch.logspace(-5, 1, 120, dtype=torch.float64).flip(0),
                      torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-5, 1, 120, dtype=torch.float64)])
    try:
        values, deriv = _derivative(fn, grid)
    except Exception as exc:  # an arbitrary user callable: report instead of failing
        return None, None, f"its spike function could not be evaluated ({type(exc).__name__}: {exc})"
    if values is None or deriv is None:
        return None, None, "its spike function gives no gradient"
    if not torch.equal(values.to(torch.float64), (grid > 0).to(torch.float64)):
        return None, None, "its spike function is not the step H(u) = 1[u > 0] in the forward pass"
    peak = float(deriv[grid.numel() // 2])  # g(0): 1, a/2, a/4, a for the four forms
    if not (peak > 0 and math.isfinite(peak)):
        return None, None, "its surrogate gradient is not positive and finite at the threshold"
    for name, a in (("fast_sigmoid", None), ("atan", 2 * peak), ("sigmoid", 4 * peak),
                    ("triangle", peak)):
        if a is None:  # fast sigmoid: g(0) = 1, slope from g at a probe point
            probe = int(torch.argmin((grid - 0.1).abs()))
            d = float(deriv[probe])
            if abs(peak - 1.0) > 1e-6 or not 0.0 < d < 1.0:
                continue
            a = (1.0 / math.sqrt(d) - 1.0) / float(grid[probe])
        a = float(f"{a:.7g}")  # the user's number, not its float32 image
        want = _forms(grid, a)[name]
        if torch.allclose(deriv, want, rtol=2e-6, atol=1e-7 * max(1.0, a)):
            return name, a, None
    return None, None, ("its surrogate is none of sparsegrad's fast_sigmoid, atan, sigmoid, "
                        "triangle (exactly)")


def rleaky_rule(linear: nn.Linear, neuron: nn.Module, *, b_th: float, backward: str,
                params: Optional[dict] = None, synaptic: bool = False):
    """(RLIF, notes) for ``linear -> neuron`` when it is exactly a recurrent sparsegrad layer,
    else (None, reason). params: RLIF's alpha / threshold (/ alpha_syn, learn_*) keyword
    arguments for a learnable or per-neuron beta / threshold / alpha (conversion.NeuronSpec);
    None: they must be floats. synaptic: the neuron is an RSynaptic (its alpha is RLIF's
    alpha_syn), else an RLeaky."""
    from .nn import RLIF

    notes: List[str] = []
    if not getattr(neuron, "all_to_all", False) or not isinstance(getattr(neuron, "recurrent", None), nn.Linear):
        return None, ("its recurrence is not all_to_all with linear_features (one-to-one V or a "
                      "convolution); sparsegrad's RLIF has a full [N, N] rec_weight")
    rec = neuron.recurrent
    n = linear.out_features
    if rec.in_features != n or rec.out_features != n:
        return None, f"linear_features={rec.in_features} does not match the Linear's {n} outputs"
    reset = getattr(neuron, "reset_mechanism", "subtract")
    if reset == "zero":
        return None, (f"reset_mechanism='zero': snnTorch's {type(neuron).__name__} zeroes the "
                      f"whole new membrane "
                      "(input and recurrent current included); sparsegrad's reset='zero' "
                      "zeroes the decayed membrane only")
    if reset not in ("subtract", "none"):
        return None, f"reset_mechanism={reset!r} is not supported"
    if not getattr(neuron, "reset_delay", True):
        return None, "reset_delay=False resets in the same step; sparsegrad resets at the next step"
    for flag, why in (("inhibition", "lateral inhibition"), ("state_quant", "state quantisation"),
                      ("surrogate_disable", "surrogate_disable=True (no gradient)")):
        if getattr(neuron, flag, False):
            return None, f"{why} has no sparsegrad equivalent"
    if isinstance(getattr(neuron, "graded_spikes_factor", None), nn.Parameter):
        return None, "graded_spikes_factor is a learnable parameter; sparsegrad's spikes are 0/1"
    params = dict(params or {})
    if "alpha" not in params or not isinstance(params["alpha"], torch.Tensor):
        beta = _scalar(neuron.beta)
        if beta is None or math.isnan(beta):
            return None, "beta is NaN (or has an unsupported shape)"
        params["alpha"] = min(max(beta, 0.0), 1.0)
    if "threshold" not in params or not isinstance(params["threshold"], torch.Tensor):
        threshold = _scalar(neuron.threshold)
        if threshold is None or not (threshold > 0 and math.isfinite(threshold)):
            return None, "threshold is not one positive finite float"
        params["threshold"] = threshold
    if not synaptic:
        params.pop("alpha_syn", None)  # RLeaky has no synaptic current
        params.pop("learn_alpha_syn", None)
    elif "alpha_syn" not in params or not isinstance(params["alpha_syn"], torch.Tensor):
        alpha = _scalar(getattr(neuron, "alpha", None))
        if alpha is None or math.isnan(alpha):
            return None, "alpha (the synaptic decay) is NaN (or has an unsupported shape)"
        params["alpha_syn"] = min(max(alpha, 0.0), 1.0)
    graded = _scalar(getattr(neuron, "graded_spikes_factor", 1.0))
    if graded != 1.0:
        return None, f"graded_spikes_factor={graded} scales spikes; sparsegrad's spikes are 0/1"
    surrogate, slope, why = exact_surrogate(neuron.spike_grad)
    if surrogate is None:
        return None, why
    w = linear.weight
    layer = RLIF(linear.in_features, n, linear.bias is not None, b_th=b_th, surrogate=surrogate,
                 slope=slope, reset=reset, backward=backward, rec_bias=rec.bias is not None,
                 device=w.device, dtype=w.dtype, **params)
    # Same parameters as the pair: an optimiser sees W, b, R and the recurrent bias as before.
    for mine, theirs in ((layer.weight, w), (layer.bias, linear.bias),
                         (layer.rec_weight, rec.weight), (layer.rec_bias, rec.bias)):
        if theirs is not None:
            with torch.no_grad():
                mine.copy_(theirs)
            mine.requires_grad_(theirs.requires_grad)  # R frozen with learn_recurrent=False
    if getattr(neuron, "output", False) and getattr(neuron, "init_hidden", False):
        notes.append("output=True: the membrane potential is no longer returned, only spikes")
    return layer, notes
