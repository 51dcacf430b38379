"""Norse (norse.torch 1.x) neurons and ``SequentialState`` for ``sparsegrad.convert``.

Norse cells take one time step and an explicit state, ``z, s = cell(x, s)``; called with
``s=None`` they start from their initial state (v = v_leak, i = 0) at that call.

* ``LIFBoxCell`` (no synaptic current), with v_leak = 0, v_reset = 0 and reset_value or
  reset_subtract, computes per step (dt * tau_mem_inv = a)

      v_dec = v + a * (x + v_leak - v);   z = H(v_dec - v_th)  (H(u) = 1[u > 0])
      v     = (1 - z) * v_dec + z * v_reset       (reset_value)  or  v_dec - z * v_th (subtract)

  with the reset in the same step and its gradient not detached: SpikingJelly's LIFNode
  (decay_input=True, tau = 1/a, detach_reset=False, hard reset to 0 or soft reset), which
  sparsegrad runs as ``SpikingJellyNeuron``. Two differences, both at rounding level: Norse
  multiplies by a where SpikingJelly divides by tau (the membrane may differ in the last bit), and
  SpikingJelly fires at v_dec >= v_th where Norse fires at v_dec > v_th. The surrogate is read from
  Norse's threshold function (``method="super"`` is 1/(|u| + 1)^2 whatever ``alpha``: Norse's
  SuperSpike backward does not use alpha, so it is fast_sigmoid with slope 1).
* ``LIFCell`` (synaptic current i with tau_syn), ``LICell`` / ``LIBoxCell`` (non-spiking
  readouts), ``LIFRecurrentCell`` (own input and recurrent weights, synaptic current) are kept
  and stepped with their state. LIFCell is not sparsegrad's synaptic-current neuron (alpha_syn):
  Norse's v integrates the current of the step before and resets in the same step (see
  ``_norse_lif``).
* ``SequentialState`` -> ``NorseSequence``: the same children under the same names, run over the
  whole sequence [T, B, ...]: neurons converted where they can be, other stateful cells stepped
  with their state, stateless layers folded over time. Returns (output [T, B, ...], state list)
  like SequentialState (the final state of stepped cells; None for converted neurons, which
  always start from rest).
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional

import torch
from torch import nn

__all__ = ["NorseSequence", "NORSE_RULES", "is_sequential_state", "is_norse_sequence_module",
           "uses_norse_sequence_modules"]


def _norse_threshold_surrogate(p):
    from .conversion import Unsupported, _match_closed_form
    thr = getattr(sys.modules.get("norse.torch.functional.threshold"), "threshold", None)
    if thr is None:
        raise Unsupported("norse.torch.functional.threshold is not importable")
    method, alpha = getattr(p, "method", "super"), getattr(p, "alpha", 100.0)
    if method == "heaviside":
        raise Unsupported("method='heaviside' gives no gradient")
    try:
        return _match_closed_form(lambda u: thr(u, method, alpha), fires_at_zero=False)
    except Unsupported as exc:
        raise Unsupported(f"method={method!r}: {exc}") from None


def _float(p, name) -> float:
    from .conversion import Unsupported, _scalar
    v = _scalar(getattr(p, name, None))
    if v is None or not math.isfinite(v):
        raise Unsupported(f"{name}={getattr(p, name, None)!r} is not one finite number "
                          f"(sparsegrad runs Norse's order of operations with fixed floats)")
    return v


def _norse_lif_box(m):
    from .conversion import NeuronSpec, SpikingJellyNeuron, Unsupported
    p, dt = m.p, float(getattr(m, "dt", 0.001))
    if any(isinstance(getattr(p, k, None), nn.Parameter) and getattr(p, k).requires_grad
           for k in ("tau_mem_inv", "v_th", "v_leak", "v_reset")):
        raise Unsupported("a learnable parameter: sparsegrad runs Norse's order of operations "
                          "(SpikingJellyNeuron) with fixed floats only")
    a = dt * _float(p, "tau_mem_inv")
    v_th, v_leak, v_reset = _float(p, "v_th"), _float(p, "v_leak"), _float(p, "v_reset")
    if v_leak != 0.0:
        raise Unsupported(f"v_leak={v_leak}: sparsegrad's neurons leak towards 0")
    reset_fn = getattr(getattr(p, "reset_method", None), "__name__", "reset_value")
    if reset_fn not in ("reset_value", "reset_subtract"):
        raise Unsupported(f"reset_method={reset_fn}")
    if reset_fn == "reset_value" and v_reset != 0.0:
        raise Unsupported(f"v_reset={v_reset}: the value reset converts for v_reset = 0")
    if not 0.0 < a < 1.0:
        raise Unsupported(f"dt * tau_mem_inv = {a} is not in (0, 1)")
    if not v_th > 0.0:
        raise Unsupported(f"v_th={v_th} is not positive")
    surrogate, slope = _norse_threshold_surrogate(p)
    tau = 1.0 / a
    v_res = 0.0 if reset_fn == "reset_value" else None

    def factory(b_th: float, backward: str) -> nn.Module:
        return SpikingJellyNeuron(tau=tau, decay_input=True, v_threshold=v_th, v_reset=v_res,
                                  detach_reset=False, surrogate=surrogate, slope=slope,
                                  b_th=b_th, backward=backward)

    return NeuronSpec("norse.LIFBoxCell", 1.0 - a, v_th, surrogate, slope,
                      "zero" if v_res is not None else "subtract", fusable=False,
                      factory=factory)


def _norse_lif(m):
    """LIFCell: read, but stepped. Norse computes per step v_dec = v + a(v_leak - v + i) with the
    current i of the step before, i = (1 - b) i + x after it, z = H(v_dec - v_th) and the reset
    in the same step (gradient not detached). sparsegrad's synaptic current (alpha_syn) adds x[t]
    to syn before V integrates it, and resets at the next step with S detached: the input would
    have to be delayed by one step and scaled by a, the reset moved, and the charge rounded
    otherwise, so neither spikes nor gradients would be Norse's exactly."""
    from .conversion import NeuronSpec
    p, dt = m.p, float(getattr(m, "dt", 0.001))
    a = dt * _float(p, "tau_mem_inv")
    b = dt * _float(p, "tau_syn_inv")
    surrogate, slope = _norse_threshold_surrogate(p)
    return NeuronSpec("norse.LIFCell", 1.0 - a, _float(p, "v_th"), surrogate, slope, "zero",
                      fusable=False, alpha_syn=1.0 - b,
                      pending=("its synaptic current i enters v one step late (v_dec = v + "
                               "a*(v_leak - v + i[t-1])) and it resets in the same step with the "
                               "reset's gradient; sparsegrad's alpha_syn neuron integrates "
                               "syn[t] = alpha_syn*syn[t-1] + x[t] at once and resets at the "
                               "next step (not the same spikes exactly)"))


def _norse_readout(m):
    from .conversion import Unsupported
    raise Unsupported(f"{type(m).__name__} is a non-spiking leaky integrator on its own; "
                      f"sparsegrad's readout (LIReadout) includes its Linear")


def _norse_recurrent(m):
    from .conversion import Unsupported
    raise Unsupported(f"{type(m).__name__} has its own input and recurrent weights and a "
                      f"synaptic current: no sparsegrad op yet")


NORSE_RULES = {
    ("norse.torch.module.lif_box", "LIFBoxCell"): _norse_lif_box,
    ("norse.torch.module.lif", "LIFCell"): _norse_lif,
    ("norse.torch.module.lif", "LIFRecurrentCell"): _norse_recurrent,
    ("norse.torch.module.leaky_integrator", "LICell"): _norse_readout,
    ("norse.torch.module.leaky_integrator_box", "LIBoxCell"): _norse_readout,
}


def is_norse_cell(m: nn.Module) -> bool:
    """A Norse module that takes (input, state) for one step (a cell)."""
    mod = sys.modules.get("norse.torch.module.snn")
    bases = tuple(getattr(mod, n) for n in ("SNNCell", "SNNRecurrentCell")
                  if mod is not None and hasattr(mod, n))
    return bool(bases) and isinstance(m, bases)


def is_norse_sequence_module(m: nn.Module) -> bool:
    """A Norse module that takes the whole sequence [T, B, ...] itself (LIF, LI, Lift, ...)."""
    snn = sys.modules.get("norse.torch.module.snn")
    lift = sys.modules.get("norse.torch.module.lift")
    bases = tuple(getattr(mod, n) for mod, names in ((snn, ("SNN", "SNNRecurrent")),
                                                     (lift, ("Lift",)))
                  if mod is not None for n in names if hasattr(mod, n))
    return bool(bases) and isinstance(m, bases)


def uses_norse_sequence_modules(model: nn.Module) -> bool:
    return any(is_norse_sequence_module(m) for m in model.modules())


def is_sequential_state(m: nn.Module) -> bool:
    mod = sys.modules.get("norse.torch.module.sequential")
    cls = getattr(mod, "SequentialState", None) if mod is not None else None
    return cls is not None and isinstance(m, cls)


class NorseSequence(nn.Module):
    """A converted Norse ``SequentialState``: (x [T, B, ...], state list or None) -> (out, state).

    Children keep their names ("0", "1", ...) and state_dict keys. ``stateful`` marks the cells
    that take a state: converted neurons (sparsegrad modules taking the whole sequence, from
    rest) or original cells stepped with their state (state[i] at t = 0, then their own).
    """

    def __init__(self, seq: nn.Module, converted: List[bool]):
        super().__init__()
        for name, child in seq.named_children():
            self.add_module(name, child)
        self.stateful = [bool(s) for s in seq.stateful_layers]
        self.converted = list(converted)

    def __getitem__(self, index: int) -> nn.Module:
        return list(self.children())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x: torch.Tensor, state: Optional[list] = None):
        from .conversion import _foldable
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"NorseSequence takes a sequence [T, B, ...], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        layers = list(self.children())
        state = [None] * len(layers) if state is None else list(state)
        if len(state) != len(layers):
            raise ValueError(f"state must be a list of {len(layers)} entries, got {len(state)}")
        for i, layer in enumerate(layers):
            if self.converted[i]:
                if state[i] is not None:
                    raise ValueError(f"state[{i}]: layer {i} was converted to a sparsegrad neuron "
                                     f"that starts from rest; pass None for it")
                x = layer(x)
            elif self.stateful[i]:
                s, outs = state[i], []
                for t in range(x.shape[0]):
                    z, s = layer(x[t], s)
                    outs.append(z)
                x, state[i] = torch.stack(outs), s
            elif _foldable(layer)[0]:
                T, B = x.shape[:2]
                y = layer(x.reshape((T * B,) + tuple(x.shape[2:])))
                x = y.reshape((T, B) + tuple(y.shape[1:]))
            else:
                x = torch.stack([layer(x_t) for x_t in x.unbind(0)])
        return x, state


def convert_sequential_state(seq: nn.Module, walk, prefix: str = "") -> NorseSequence:
    """Convert each child of a SequentialState (walk: conversion._Walk)."""
    if getattr(seq, "return_hidden", False):
        from .conversion_fx import ConversionError
        raise ConversionError("SequentialState(return_hidden=True) is not converted")
    converted = []
    for i, (name, child) in enumerate(list(seq.named_children())):
        full = f"{prefix}{name}"
        if seq.stateful_layers[i]:
            new, _ = walk.neuron(full, child, None)
            ok = new is not child and not type(new).__name__ == "StepByStep"
            if not ok:
                new = child  # stepped here with its state, not by StepByStep
            setattr(seq, name, new)
            converted.append(ok)
        else:
            converted.append(False)
            ok, why = _foldable_or(child)
            if ok:
                walk.report.folded.append(full)
            else:
                walk.report.stepped.append((full, why))
    return NorseSequence(seq, converted)


def _foldable_or(m):
    from .conversion import _foldable
    return _foldable(m)
