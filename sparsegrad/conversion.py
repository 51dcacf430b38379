"""Convert snnTorch / SpikingJelly models into sparsegrad models that run whole sequences.

``convert(model)`` turns a model written for one time step per call (snnTorch's tutorials: an
``nn.Sequential`` of ``Conv2d`` / ``MaxPool2d`` / ``Flatten`` / ``Linear`` and ``snn.Leaky``), or a
SpikingJelly multi-step model, into modules that take the whole sequence ``[T, B, ...]``:

* ``nn.Linear`` directly followed by a supported neuron -> one fused ``sparsegrad.nn.LIF`` holding
  the Linear's weight and bias (the neuron's slot becomes ``nn.Identity``, so names and
  state_dict keys of the other layers do not move);
* any other supported neuron -> ``sparsegrad.nn.LIFNeuron`` (after a convolution, a pooling
  layer, ...);
* per-step layers that treat samples independently (convolutions, pooling, Flatten, Linear,
  activations, dropout) -> ``sparsegrad.nn.TimeDistributed``, which folds time into the batch
  (its state_dict keys are the wrapped layer's);
* everything else that keeps state or mixes samples (an unsupported neuron, BatchNorm in training
  mode, an unknown module) stays in place inside ``StepByStep``, which calls it once per time step
  with its state reset at the start of the sequence, exactly as the original time loop did. The
  report (and a UserWarning) lists each such module and why.

A model class is converted by following its own per-step ``forward`` (traced with torch.fx,
sparsegrad/conversion_fx.py); a SpikingJelly multi-step model keeps its forward and gets its
neurons replaced where they are; a Norse ``SequentialState`` becomes ``NorseSequence``
(sparsegrad/conversion_norse.py). ``example_input=`` runs the original and the converted model and
raises ``ConversionError`` on a different spike.

Neurons are recognised by a rule table, one function per neuron type (``NEURON_RULES``,
``register_neuron_rule``). A rule reads the module's settings and returns a ``NeuronSpec`` (the
exact sparsegrad parameters) or raises ``Unsupported`` with the reason. Surrogate gradients are
recognised exactly (snnTorch's closures by their factory and parameter, SpikingJelly's classes by
type and ``alpha``, anything else by matching its derivative to one of sparsegrad's closed forms);
a surrogate sparsegrad does not have leaves the neuron in place, never mapped to another one.
docs/conversion.md has the correspondences and docs/surrogates.md the surrogates.
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import functional as F_sg
from . import ops
from .conversion_fx import ConversionError
from .conversion_norse import (NORSE_RULES, is_norse_cell, is_norse_sequence_module,
                               is_sequential_state, uses_norse_sequence_modules)
from .conversion_recurrent import rleaky_rule
from .nn import (LIF, RLIF, LIFNeuron, LIReadout, TimeDistributed, TimeSequential,
                 _PER_SAMPLE_LAYERS)
from .conv import ConvLIF, SpikePool2d, fuse_conv_layers  # sequence modules of issue 20

__all__ = ["convert", "ConversionError", "ConversionReport", "ConvertedPair", "NeuronSpec", "Unsupported",
           "NEURON_RULES", "register_neuron_rule", "SequenceModel", "StepByStep",
           "SpikingJellyNeuron", "surrogate_of"]


class Unsupported(Exception):
    """Raised by a neuron rule (or a surrogate test) with the reason it cannot convert exactly."""


# --------------------------------------------------------------------------- surrogates

_SURROGATE_FORMS = {
    # name -> (derivative at u, parameter from the derivative at 0 or None)
    "fast_sigmoid": lambda u, a: 1.0 / (a * u.abs() + 1.0) ** 2,
    "atan": lambda u, a: (a / 2) / (1.0 + (math.pi / 2 * a * u) ** 2),
    "sigmoid": lambda u, a: a * torch.exp(-a * u.abs()) / (1.0 + torch.exp(-a * u.abs())) ** 2,
    "triangle": lambda u, a: a * torch.clamp(1.0 - a * u.abs(), min=0.0),
}

# snnTorch's surrogate factories (snntorch.surrogate.<factory>(param) returns a closure `inner`).
_SNNTORCH_FACTORIES = {"fast_sigmoid": ("fast_sigmoid", "slope"), "atan": ("atan", "alpha"),
                       "sigmoid": ("sigmoid", "slope")}
_SNNTORCH_NOT_CONVERTED = {
    "triangular": ("snnTorch's triangular is not a triangle: its derivative is +threshold for "
                   "u < 0 and -threshold for u >= 0 (a step, negative above threshold); "
                   "sparsegrad has no such surrogate"),
    "straight_through_estimator": "the straight-through estimator (derivative 1 everywhere)",
    "heaviside": "the Heaviside 'surrogate' (derivative = the spike itself)",
    "spike_rate_escape": "the spike-rate-escape surrogate",
    "SSO": "a stochastic surrogate (random gradient)",
    "SFS": "a stochastic surrogate (random gradient)",
    "LSO": "a stochastic surrogate (random gradient)",
    "custom_surrogate": "a custom surrogate",
}
# SpikingJelly's surrogate classes (spikingjelly.activation_based.surrogate.<class>(alpha)).
_SPIKINGJELLY_CLASSES = {"ATan": "atan", "Sigmoid": "sigmoid", "PiecewiseQuadratic": "triangle"}


def _closure_vars(fn) -> Dict[str, object]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _derivative(fn, u: torch.Tensor):
    """(forward values, derivative) of a spike function at u; derivative None without a graph."""
    u = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(u)
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != u.shape:
            raise TypeError("the spike function did not return a tensor of its input's shape")
        if not out.requires_grad:
            return out.detach(), None
        (grad,) = torch.autograd.grad(out.sum(), u, allow_unused=True)
    return out.detach(), (None if grad is None else grad.detach().to(torch.float64))


def _probe_grid() -> torch.Tensor:
    pos = torch.cat([torch.logspace(-6, -2, 20, dtype=torch.float64),
                     torch.linspace(0.0125, 1.0, 80, dtype=torch.float64),
                     torch.logspace(0.05, 1.5, 30, dtype=torch.float64)])
    return torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos])


def _match_closed_form(fn, fires_at_zero: bool) -> Tuple[str, float]:
    """Which of sparsegrad's surrogates (and parameter) fn's derivative is, else Unsupported."""
    grid = _probe_grid()
    try:
        values, deriv = _derivative(fn, grid)
        _, deriv2 = _derivative(fn, grid)
    except Exception as exc:  # an arbitrary user callable: report instead of failing
        raise Unsupported(f"its spike function could not be evaluated "
                          f"({type(exc).__name__}: {exc})") from None
    step = (grid >= 0) if fires_at_zero else (grid > 0)
    if not torch.equal(values.to(torch.float64), step.to(torch.float64)):
        raise Unsupported("its spike function is not the step 1[u > 0] in the forward pass")
    if deriv is None:
        raise Unsupported("its spike function gives no gradient")
    if not torch.equal(deriv, deriv2):
        raise Unsupported("its surrogate gradient is random")
    centre = int((grid == 0).nonzero()[0])
    g0 = float(deriv[centre])
    probe = int(torch.argmin((grid - 0.1).abs()))
    candidates = [("atan", 2 * g0), ("sigmoid", 4 * g0), ("triangle", g0)]
    if g0 == 1.0 and 0.0 < float(deriv[probe]) < 1.0:
        k = (1.0 / math.sqrt(float(deriv[probe])) - 1.0) / float(grid[probe])
        candidates.insert(0, ("fast_sigmoid", float(f"{k:.12g}")))
    peak = float(deriv.abs().max())
    for name, a in candidates:
        if not (a > 0 and math.isfinite(a)):
            continue
        expected = _SURROGATE_FORMS[name](grid, a)
        if torch.allclose(deriv, expected, rtol=1e-6, atol=1e-9 * max(peak, 1e-300)):
            return name, a
    raise Unsupported("its surrogate gradient is none of sparsegrad's (fast_sigmoid, atan, "
                      "sigmoid, triangle; docs/surrogates.md)")


def surrogate_of(fn, *, fires_at_zero: bool = False) -> Tuple[str, float]:
    """(surrogate name, slope) of a spike function, exactly, or raise Unsupported.

    snnTorch's surrogate closures (``snntorch.surrogate.atan(alpha)`` & co.) are read by their
    factory and parameter, SpikingJelly's surrogate modules by class and ``alpha``; both are then
    checked against the closed form. Anything else must have the forward 1[u > 0] (1[u >= 0] with
    fires_at_zero) and a derivative equal to one of sparsegrad's closed forms.
    """
    module = getattr(fn, "__module__", "") or ""
    qualname = getattr(fn, "__qualname__", "") or ""
    if module.startswith("snntorch") and qualname.endswith("<locals>.inner"):
        factory = qualname.split(".")[0]
        if factory in _SNNTORCH_NOT_CONVERTED:
            raise Unsupported(f"surrogate.{factory} is none of sparsegrad's surrogates: "
                              f"{_SNNTORCH_NOT_CONVERTED[factory]}")
        if factory in _SNNTORCH_FACTORIES:
            name, param = _SNNTORCH_FACTORIES[factory]
            value = _closure_vars(fn).get(param)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found = _match_closed_form(fn, fires_at_zero)
                if found[0] != name or not math.isclose(found[1], float(value), rel_tol=1e-9):
                    raise Unsupported(f"surrogate.{factory}({param}={value}) does not have its "
                                      f"documented derivative")
                return name, float(value)
    if module.startswith("spikingjelly") and type(fn).__name__ in _SPIKINGJELLY_CLASSES:
        if not getattr(fn, "spiking", True):
            raise Unsupported(f"{type(fn).__name__}(spiking=False) outputs a smooth function, "
                              f"not spikes")
        name = _SPIKINGJELLY_CLASSES[type(fn).__name__]
        alpha = getattr(fn, "alpha", None)
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
            found = _match_closed_form(fn, True)
            if found[0] != name or not math.isclose(found[1], float(alpha), rel_tol=1e-9):
                raise Unsupported(f"{type(fn).__name__}(alpha={alpha}) does not have its "
                                  f"documented derivative")
            return name, float(alpha)
    return _match_closed_form(fn, fires_at_zero)


# --------------------------------------------------------------------------- neuron rules

@dataclass
class NeuronSpec:
    """The exact sparsegrad parameters of a recognised neuron."""

    kind: str                     # e.g. "snntorch.Leaky"
    alpha: float
    threshold: float
    surrogate: str
    slope: float
    reset: str = "subtract"
    return_mem: bool = False      # returns (spikes, membrane) wherever it is (snnTorch output=True)
    tuple_output: bool = False    # returns (spikes, membrane), of which a time loop passes the
    #                               spikes on (snnTorch init_hidden=False): the membrane is kept
    #                               only when the neuron is the model's last layer
    fusable: bool = True          # may merge with an nn.Linear right before it into one LIF
    notes: List[str] = field(default_factory=list)
    # builds the neuron alone from (b_th, backward) when it is not an LIFNeuron; None with
    # needs_linear: the neuron only converts together with the nn.Linear before it
    factory: Optional[Callable[[float, str], nn.Module]] = None
    # builds nn.Linear + neuron as one layer from (linear, b_th, backward) when it is not an LIF
    # (e.g. a recurrent layer); None: the fused LIF
    fused_factory: Optional[Callable[[nn.Linear, float, str], nn.Module]] = None
    needs_linear: bool = False
    # Per-neuron / learnable parameters and the synaptic current (the tensor API of
    # sparsegrad.lif / nn.LIFNeuron / nn.LIF): tensor_params holds the original's tensors under
    # sparsegrad's names (alpha = snnTorch's beta, alpha_syn = snnTorch's alpha, threshold); those
    # in `learnable` become nn.Parameters of the converted neuron holding the original's values
    # (clamped to [0, 1] in the forward, as snnTorch does), the others buffers. `pending` (a
    # reason) keeps the neuron in place and stepped.
    tensor_params: Dict[str, torch.Tensor] = field(default_factory=dict)   # e.g. per-neuron beta
    learnable: List[str] = field(default_factory=list)                     # e.g. ["alpha"]
    alpha_syn: Optional[float] = None                                      # synaptic decay
    pending: str = ""
    # the tuple an init_hidden=False call returns carries the synaptic current too (snnTorch
    # Synaptic: (spk, syn, mem)); sparsegrad's neuron returns no syn sequence
    syn_output: bool = False
    parameters: List[str] = field(default_factory=list)  # what the report says of tensor_params

    def _param_kwargs(self, shapes: Optional[Tuple[Tuple[int, ...], ...]] = None):
        """alpha / threshold / alpha_syn and learn_* keyword arguments for LIFNeuron / LIF, and
        the learnable originals to copy in; None when a tensor's shape is not in `shapes`."""
        kwargs, raw = {}, {}
        for name, value in (("alpha", self.alpha), ("threshold", self.threshold),
                            ("alpha_syn", self.alpha_syn)):
            t = self.tensor_params.get(name)
            if t is None:
                kwargs[name] = value
                continue
            t = t.detach()
            # leading size-1 dimensions broadcast against the batch in snnTorch; sparsegrad's
            # parameters broadcast against one sample
            shape = list(t.shape)
            while shape and shape[0] == 1 and len(shape) > 1:
                shape.pop(0)
            if len(shape) == 1 and shape[0] == 1:
                shape = []
            if shapes is not None and tuple(shape) not in shapes:
                return None, None
            t = t.reshape(shape)
            learn = name in self.learnable
            kwargs[f"learn_{name}"] = learn
            # the constructor checks the range; the clamp in the forward makes values outside
            # [0, 1] act as snnTorch's clamp(0, 1) does, so a learnable value is copied in after
            kwargs[name] = t.clamp(0.0, 1.0) if name != "threshold" else t
            if learn:
                raw[name] = t
        return kwargs, raw

    @staticmethod
    def _copy_learnable(module: nn.Module, raw: Dict[str, torch.Tensor]) -> nn.Module:
        with torch.no_grad():
            for name, t in raw.items():
                getattr(module, name).copy_(t)
        return module

    def neuron(self, b_th: float, backward: str) -> nn.Module:
        """The neuron alone, after any layer."""
        if self.pending:
            raise Unsupported(self.pending)
        if self.factory is not None:
            return self.factory(b_th, backward)
        if self.syn_output and self.return_mem:
            raise Unsupported("its (spk, syn, mem) output is used; sparsegrad's neuron returns "
                              "the membrane but not the synaptic current's sequence")
        kwargs, raw = self._param_kwargs()
        module = LIFNeuron(b_th=b_th, surrogate=self.surrogate, slope=self.slope,
                           reset=self.reset, backward=backward, return_mem=self.return_mem,
                           **kwargs)
        return self._copy_learnable(module, raw)

    def last_layer(self) -> "NeuronSpec":
        """The spec for the model's last layer, whose whole output is returned."""
        spec = copy.copy(self)
        spec.return_mem = self.return_mem or self.tuple_output
        return spec

    def fused(self, linear: nn.Linear, b_th: float, backward: str) -> Optional[nn.Module]:
        """nn.Linear + this neuron as one layer, or None when they cannot fuse."""
        if self.pending:
            raise Unsupported(self.pending)
        if not self.fusable or self.return_mem:
            return None
        if self.fused_factory is not None:
            return self.fused_factory(linear, b_th, backward)
        w = linear.weight
        params, raw = self._param_kwargs(((), (linear.out_features,)))
        if params is None:  # e.g. one value per channel: LIF takes [] or [out] only
            return None
        kwargs = dict(b_th=b_th, slope=self.slope, surrogate=self.surrogate, reset=self.reset,
                      backward=backward, device=w.device, dtype=w.dtype, **params)
        lif = LIF(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        with torch.no_grad():
            lif.weight.copy_(w)
            if linear.bias is not None:
                lif.bias.copy_(linear.bias)
        lif.weight.requires_grad_(w.requires_grad)
        if linear.bias is not None:
            lif.bias.requires_grad_(linear.bias.requires_grad)
        return self._copy_learnable(lif, raw)


def _scalar(t) -> Optional[float]:
    """A Python float from a number or a one-element tensor, else None."""
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0]) if t.numel() == 1 else None
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


def _snntorch_params(m, names=("beta", "threshold")):
    """(floats, tensor_params, learnable, notes) of an snnTorch neuron's beta / threshold (/ alpha).

    snnTorch keeps each as a tensor (a buffer, or an nn.Parameter with learn_*=True) and clamps
    beta and alpha to [0, 1] in every forward (not at init): a float is read where the value is
    one number and not learnable; a learnable or per-neuron value goes to tensor_params under
    sparsegrad's name (beta -> alpha, alpha -> alpha_syn), learnable ones listed."""
    sg_name = {"beta": "alpha", "alpha": "alpha_syn", "threshold": "threshold"}
    floats, tensors, learnable, notes = {}, {}, [], []
    for name, sg in ((n, sg_name[n]) for n in names):
        value = getattr(m, name, None)
        learn = isinstance(value, nn.Parameter) and value.requires_grad
        f = _scalar(value)
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        if isinstance(value, torch.Tensor) and value.numel() and \
                not bool(torch.isfinite(value.detach()).all()):
            raise Unsupported(f"{name} has values that are not finite")
        if name == "threshold" and isinstance(value, torch.Tensor) and value.numel() and \
                not bool((value.detach() > 0).all()):
            raise Unsupported(f"threshold has values <= 0 (sparsegrad's threshold is > 0)")
        if learn or f is None:
            tensors[sg] = value
            what = "learnable" if learn else "fixed"
            per = f"per neuron, shape {list(value.shape)}" if f is None else "one value"
            notes.append(f"{name} -> sparsegrad's {sg}: {what}, {per}")
            if learn:
                learnable.append(sg)
        floats[name] = f
    return floats, tensors, learnable, notes


def _snntorch_common(m) -> None:
    if not getattr(m, "reset_delay", True):
        raise Unsupported("reset_delay=False resets in the same step; sparsegrad resets at the "
                          "next step")
    for flag, why in (("inhibition", "lateral inhibition"), ("state_quant", "state quantisation"),
                      ("surrogate_disable", "surrogate_disable=True (no gradient)")):
        if getattr(m, flag, False):
            raise Unsupported(f"{why} has no sparsegrad equivalent")
    if isinstance(getattr(m, "graded_spikes_factor", None), nn.Parameter):
        raise Unsupported("graded_spikes_factor is a learnable parameter; sparsegrad's spikes "
                          "are 0/1")
    graded = _scalar(getattr(m, "graded_spikes_factor", 1.0))
    if graded != 1.0:
        raise Unsupported(f"graded_spikes_factor={graded} scales spikes; sparsegrad's spikes are "
                          f"0/1")


def _snntorch_leaky(m) -> NeuronSpec:
    """snnTorch Leaky (reset_delay=True): V[t] = clamp(beta)V[t-1] + I[t] - reset term, as lif()."""
    _snntorch_common(m)
    reset = getattr(m, "reset_mechanism", "subtract")
    if reset not in ("subtract", "zero", "none"):
        raise Unsupported(f"reset_mechanism={reset!r}")
    floats, tensors, learnable, notes = _snntorch_params(m)
    beta, threshold = floats["beta"], floats["threshold"]
    if threshold is not None and (not threshold > 0.0 or not math.isfinite(threshold)):
        raise Unsupported(f"threshold={threshold} is not a positive finite number")
    if beta is not None and math.isnan(beta):
        raise Unsupported("beta is NaN")
    surrogate, slope = surrogate_of(m.spike_grad)
    # snnTorch returns (spk, mem) when output=True, or with init_hidden=False (the time loop
    # then usually passes spk on and keeps mem for the next call).
    init_hidden = bool(getattr(m, "init_hidden", False))
    # beta is clamped to [0, 1] in snnTorch's forward; its float32 value is kept bit for bit
    # (a tensor beta: clamped in sparsegrad's forward too).
    # (NaN in the report where the value is per neuron: the tensor is in tensor_params)
    return NeuronSpec("snntorch.Leaky", math.nan if beta is None else min(max(beta, 0.0), 1.0),
                      math.nan if threshold is None else threshold, surrogate, slope,
                      reset, return_mem=init_hidden and bool(getattr(m, "output", False)),
                      tuple_output=not init_hidden, tensor_params=tensors, learnable=learnable,
                      parameters=notes)


def _snntorch_synaptic(m) -> NeuronSpec:
    """snnTorch Synaptic (reset_delay=True): per step, with reset = H(mem[t-1] - threshold)
    detached, syn = clamp(alpha)syn + I; mem = clamp(beta)mem + syn - reset*threshold
    (subtract) or without the reset term (none): DESIGN 3c's synaptic current, sparsegrad's
    alpha = clamp(beta), alpha_syn = clamp(alpha). reset_mechanism="zero" is another model:
    snnTorch sets the whole new membrane (input included) to 0 after a spike and keeps syn
    (mem[t] = (1 - reset)(beta mem[t-1] + syn[t])), where sparsegrad's zero reset keeps the new
    input (alpha (1 - S) V + syn)."""
    _snntorch_common(m)
    reset = getattr(m, "reset_mechanism", "subtract")
    if reset == "zero":
        raise Unsupported("reset_mechanism='zero': snnTorch's Synaptic zeroes the whole new "
                          "membrane (input included) after a spike, sparsegrad's zero reset "
                          "keeps the step's input")
    if reset not in ("subtract", "none"):
        raise Unsupported(f"reset_mechanism={reset!r}")
    floats, tensors, learnable, notes = _snntorch_params(m, ("alpha", "beta", "threshold"))
    threshold = floats["threshold"]
    if threshold is not None and (not threshold > 0.0 or not math.isfinite(threshold)):
        raise Unsupported(f"threshold={threshold} is not a positive finite number")
    for name in ("alpha", "beta"):
        if floats[name] is not None and math.isnan(floats[name]):
            raise Unsupported(f"{name} is NaN")
    surrogate, slope = surrogate_of(m.spike_grad)
    clamp = (lambda v: math.nan if v is None else min(max(v, 0.0), 1.0))
    init_hidden = bool(getattr(m, "init_hidden", False))
    return NeuronSpec("snntorch.Synaptic", clamp(floats["beta"]),
                      math.nan if threshold is None else threshold, surrogate, slope, reset,
                      return_mem=init_hidden and bool(getattr(m, "output", False)),
                      tuple_output=not init_hidden, tensor_params=tensors, learnable=learnable,
                      alpha_syn=clamp(floats["alpha"]), parameters=notes, syn_output=True)


class SpikingJellyNeuron(nn.Module):
    """SpikingJelly's LIFNode / IFNode (multi-step) with sparsegrad's kernels, exactly.

    Takes [T, B, ...] and returns the spikes, computed in SpikingJelly's order of operations
    (charge H from the post-reset V, spike at H >= v_threshold, soft or hard reset in the same
    step), so that they equal SpikingJelly's bit for bit; the gradient is SpikingJelly's (through
    the reset too when detach_reset=False), restricted to |H - v_threshold| < b_th in sparse mode.
    tau=None is the IFNode. Every sequence starts from SpikingJelly's rest state (V = v_reset, or
    0 for the soft reset), as after functional.reset_net. last_stats as LIFNeuron's.
    """

    def __init__(self, *, tau: Optional[float], decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                 surrogate: str = "sigmoid", slope: float = 4.0, b_th: float = 0.2,
                 backward: str = "sparse"):
        super().__init__()
        for name, value in (("v_threshold", v_threshold), ("tau", tau)):
            if isinstance(value, torch.Tensor):
                raise TypeError(f"SpikingJellyNeuron takes a float {name}, got a tensor: "
                                f"per-neuron and learnable parameters exist for the leaky "
                                f"neuron only (sparsegrad.lif, nn.LIFNeuron)")
        F_sg.check_lif_args(0.5, v_threshold, b_th, slope, backward, surrogate)
        if tau is not None and not tau > 1.0:
            raise ValueError(f"tau must be > 1 (or None for IFNode), got {tau}")
        self.tau = None if tau is None else float(tau)
        self.decay_input = bool(decay_input)
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.surrogate = surrogate
        self.slope = float(slope)
        self.b_th = float(b_th)
        self.backward = backward
        self.last_stats = None

    @property
    def dynamics(self) -> str:
        if self.tau is None:
            return "sj_if"
        return "sj_lif_decay_input" if self.decay_input else "sj_lif"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise ValueError(f"input must be a [T, B, ...] tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        T, B = x.shape[:2]
        n = math.prod(x.shape[2:])
        v_init = None
        if self.v_reset is not None and self.v_reset != 0.0:
            v_init = x.new_full((B, n), self.v_reset)
        alpha = 1.0 if self.tau is None else 1.0 - 1.0 / self.tau
        out = ops.lif_neuron_forward(
            x.reshape(T, B, n), v_init, None, alpha, self.v_threshold, self.b_th, self.slope,
            self.backward == "sparse", self.surrogate,
            "subtract" if self.v_reset is None else "zero", False, self.dynamics,
            2.0 if self.tau is None else self.tau,
            0.0 if self.v_reset is None else self.v_reset, self.detach_reset)
        stats = out[-1]
        self.last_stats = F_sg.LIFStats(stats[0], stats[1], stats[2], T * B * n)
        spikes = out[0].view(x.shape)
        if self.backward == "sparse" and x.dim() == 3:
            # the backward reads dL/dspikes only at these entries: a consumer (ConvLIF's pooling,
            # a fused layer) may compute its dx only there
            F_sg.attach_active_set(spikes, out[2], out[3])
        return spikes

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["last_stats"] = None
        return state

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, decay_input={self.decay_input}, v_threshold={self.v_threshold}, "
                f"v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"surrogate={self.surrogate!r}, slope={self.slope}, b_th={self.b_th}, "
                f"backward={self.backward!r}")


def _spikingjelly_node(m) -> NeuronSpec:
    """SpikingJelly LIFNode / IFNode: the same spikes, in SpikingJelly's own order of operations."""
    is_if = type(m).__name__ == "IFNode"
    if getattr(m, "_neuron_precision", None) is not None:
        raise Unsupported("a custom neuron precision is set")
    theta = _scalar(getattr(m, "v_threshold", None))
    if theta is None or not theta > 0.0 or not math.isfinite(theta):
        raise Unsupported(f"v_threshold={getattr(m, 'v_threshold', None)!r} is not a positive "
                          f"float")
    v_reset = getattr(m, "v_reset", 0.0)
    if v_reset is not None:
        v_reset = _scalar(v_reset)
        if v_reset is None or not math.isfinite(v_reset):
            raise Unsupported(f"v_reset={m.v_reset!r} is not a float or None")
    tau = None
    if not is_if:
        tau = _scalar(getattr(m, "tau", None))
        if tau is None or not tau > 1.0:
            raise Unsupported(f"tau={getattr(m, 'tau', None)!r} is not a float > 1")
    surrogate, slope = surrogate_of(m.surrogate_function, fires_at_zero=True)
    decay_input = bool(getattr(m, "decay_input", True))
    detach_reset = bool(getattr(m, "detach_reset", False))

    def factory(b_th: float, backward: str) -> nn.Module:
        return SpikingJellyNeuron(tau=tau, decay_input=decay_input, v_threshold=theta,
                                  v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                                  slope=slope, b_th=b_th, backward=backward)

    kind = "spikingjelly.IFNode" if is_if else "spikingjelly.LIFNode"
    return NeuronSpec(kind, 1.0 if is_if else 1.0 - 1.0 / tau, theta, surrogate, slope,
                      "subtract" if v_reset is None else "zero", fusable=False, factory=factory)


def _spikingjelly_plif(m) -> NeuronSpec:
    """SpikingJelly ParametricLIFNode: a LIFNode whose 1/tau = k = sigmoid(w) is learnable.

    Its parameters are read, but it stays stepped: SpikingJelly charges H = V + (X - (V -
    V_reset)) k (decay_input=True; V - (V - V_reset) k + X without) and resets in the same step,
    which sparsegrad computes only with a fixed float tau (SpikingJellyNeuron); sparsegrad's
    learnable alpha (sparsegrad.lif) integrates alpha V + I and resets at the next step. Writing
    PLIF that way needs the input scaled by k (learnable) and another rounding of the charge, so
    neither the spikes nor w's gradient would be SpikingJelly's exactly."""
    w = getattr(m, "w", None)
    if not isinstance(w, torch.Tensor) or w.numel() != 1:
        raise Unsupported("w (the learnable 1/tau) is not one value")
    inv_tau = float(torch.sigmoid(w.detach()).reshape(-1)[0])
    theta = _scalar(getattr(m, "v_threshold", None)) or 1.0
    surrogate, slope = surrogate_of(m.surrogate_function, fires_at_zero=True)
    v_reset = getattr(m, "v_reset", 0.0)
    return NeuronSpec("spikingjelly.ParametricLIFNode", 1.0 - inv_tau, theta, surrogate, slope,
                      "subtract" if v_reset is None else "zero", fusable=False,
                      tensor_params={"alpha": w}, learnable=["alpha"],
                      pending=("its 1/tau = sigmoid(w) is learnable and SpikingJelly charges "
                               "H = V + (X - (V - V_reset))*sigmoid(w) with the reset in the same "
                               "step: sparsegrad's kernel in SpikingJelly's order takes a fixed "
                               "tau, its learnable alpha integrates alpha*V + X with the reset at "
                               "the next step (not the same spikes and gradient of w exactly)"))


def _snntorch_rleaky(m) -> NeuronSpec:
    """snnTorch RLeaky after an nn.Linear -> sparsegrad's recurrent RLIF (conversion_recurrent.py).
    A learnable or per-neuron beta / threshold becomes RLIF's tensor parameter, as for Leaky."""
    surrogate, slope = surrogate_of(m.spike_grad)
    notes: List[str] = []
    floats, tensors, learnable, param_notes = _snntorch_params(m)

    def fused(linear: nn.Linear, b_th: float, backward: str) -> nn.Module:
        params, raw = spec._param_kwargs(((), (linear.out_features,)))
        if params is None:
            raise Unsupported("beta / threshold have a shape that is neither one value nor one "
                              "per neuron; sparsegrad's RLIF takes [] or [N] tensors")
        layer, why = rleaky_rule(linear, m, b_th=b_th, backward=backward, params=params)
        if layer is None:
            raise Unsupported(why)
        notes.extend(why)
        return spec._copy_learnable(layer, raw)

    beta, threshold = floats["beta"], floats["threshold"]
    spec = NeuronSpec("snntorch.RLeaky", math.nan if beta is None else min(max(beta, 0.0), 1.0),
                      math.nan if threshold is None else threshold, surrogate, slope,
                      getattr(m, "reset_mechanism", "subtract"), notes=notes, fused_factory=fused,
                      needs_linear=True, tensor_params=tensors, learnable=learnable,
                      parameters=param_notes)
    return spec


def _snntorch_rsynaptic(m) -> NeuronSpec:
    """snnTorch RSynaptic after an nn.Linear -> RLIF with a synaptic current: per step
    syn = clamp(alpha)*syn + I + recurrent(spk[t-1]), mem = clamp(beta)*mem + syn -
    reset*threshold, i.e. sparsegrad's recurrent layer with alpha_syn = clamp(alpha), alpha =
    clamp(beta) (conversion_recurrent.rleaky_rule). reset_mechanism="zero" is refused: snnTorch
    zeroes the synaptic current and the whole new membrane after a spike."""
    if getattr(m, "reset_mechanism", "subtract") == "zero":
        raise Unsupported("reset_mechanism='zero': snnTorch's RSynaptic zeroes the synaptic "
                          "current and the whole new membrane after a spike; sparsegrad's zero "
                          "reset keeps both")
    surrogate, slope = surrogate_of(m.spike_grad)
    notes: List[str] = []
    floats, tensors, learnable, param_notes = _snntorch_params(m, ("alpha", "beta", "threshold"))

    def fused(linear: nn.Linear, b_th: float, backward: str) -> nn.Module:
        params, raw = spec._param_kwargs(((), (linear.out_features,)))
        if params is None:
            raise Unsupported("alpha / beta / threshold have a shape that is neither one value "
                              "nor one per neuron; sparsegrad's RLIF takes [] or [N] tensors")
        layer, why = rleaky_rule(linear, m, b_th=b_th, backward=backward, params=params,
                                 synaptic=True)
        if layer is None:
            raise Unsupported(why)
        notes.extend(why)
        return spec._copy_learnable(layer, raw)

    clamp = (lambda v: math.nan if v is None else min(max(v, 0.0), 1.0))
    threshold = floats["threshold"]
    spec = NeuronSpec("snntorch.RSynaptic", clamp(floats["beta"]),
                      math.nan if threshold is None else threshold, surrogate, slope,
                      getattr(m, "reset_mechanism", "subtract"), notes=notes, fused_factory=fused,
                      needs_linear=True, tensor_params=tensors, learnable=learnable,
                      alpha_syn=clamp(floats["alpha"]), parameters=param_notes)
    return spec


# (module prefix, class name) -> rule. A rule returns a NeuronSpec or raises Unsupported. A neuron
# type that converts only together with the nn.Linear before it (a recurrent layer: Linear +
# RLeaky -> nn.RLIF) returns NeuronSpec(..., fused_factory=build, needs_linear=True).
NEURON_RULES: Dict[Tuple[str, str], Callable[[nn.Module], NeuronSpec]] = {
    ("snntorch", "Leaky"): _snntorch_leaky,
    ("snntorch", "RLeaky"): _snntorch_rleaky,
    ("snntorch", "RSynaptic"): _snntorch_rsynaptic,
    ("snntorch", "Synaptic"): _snntorch_synaptic,
    ("spikingjelly.activation_based.neuron", "ParametricLIFNode"): _spikingjelly_plif,
    ("spikingjelly.activation_based.neuron", "LIFNode"): _spikingjelly_node,
    ("spikingjelly.activation_based.neuron", "IFNode"): _spikingjelly_node,
}
NEURON_RULES.update(NORSE_RULES)


def register_neuron_rule(module_prefix: str, class_name: str,
                         rule: Callable[[nn.Module], NeuronSpec]) -> None:
    """Add (or replace) the rule for neurons of class `class_name` defined under `module_prefix`."""
    NEURON_RULES[(module_prefix, class_name)] = rule


def _rule_for(m: nn.Module) -> Optional[Callable[[nn.Module], NeuronSpec]]:
    mod = type(m).__module__ or ""
    for (prefix, name), rule in NEURON_RULES.items():
        if type(m).__name__ == name and mod.startswith(prefix):
            return rule
    return None


def _is_foreign_neuron(m: nn.Module) -> bool:
    """A spiking neuron of snnTorch or SpikingJelly (converted or stepped, never ignored)."""
    if _rule_for(m) is not None:
        return True
    mod = type(m).__module__ or ""
    if mod.startswith("snntorch"):
        base = getattr(sys.modules.get("snntorch"), "SpikingNeuron", None)
        return base is not None and isinstance(m, base)
    if mod.startswith("norse"):
        return is_norse_cell(m)
    return mod.startswith("spikingjelly.activation_based.neuron")


def _sj_base(name: str):
    base = sys.modules.get("spikingjelly.activation_based.base")
    return getattr(base, name, None) if base is not None else None


def _is_stateful(m: nn.Module) -> bool:
    """Keeps state between calls (a neuron, a SpikingJelly memory module)."""
    if _is_foreign_neuron(m):
        return True
    memory = _sj_base("MemoryModule")
    return memory is not None and isinstance(m, memory)


def _multi_step(m: nn.Module) -> bool:
    return getattr(m, "step_mode", "s") == "m"


# --------------------------------------------------------------------------- adapters

def _reset_state(module: nn.Module) -> None:
    for m in module.modules():
        if _is_foreign_neuron(m) and (type(m).__module__ or "").startswith("snntorch"):
            if hasattr(m, "reset_mem"):
                m.reset_mem()
        elif _is_stateful(m) and hasattr(m, "reset"):
            m.reset()


class StepByStep(nn.Module):
    """Run a module written for one time step over a sequence [T, B, ...], one call per step.

    The module's state (snnTorch ``reset_mem()``, SpikingJelly ``reset()``) is reset at the start
    of every sequence. Returns the per-step outputs stacked over time; a module returning a tuple
    (snnTorch's ``(spk, mem)``) gives a tuple of stacked tensors. This is what ``convert`` leaves
    in place of a module it cannot convert exactly: slower, but the same numbers as the original
    time loop.
    """

    def __init__(self, module: nn.Module, reason: str = ""):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.reason = reason
        self._register_load_state_dict_pre_hook(_transparent_load_hook, with_module=True)

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"StepByStep({type(self.module).__name__}) takes a [T, B, ...] "
                             f"sequence, got {getattr(x, 'shape', type(x).__name__)}")
        _reset_state(self.module)
        if is_norse_cell(self.module):  # a Norse cell's state is an argument: carry it
            state, outs = None, []
            for x_t in x.unbind(0):
                z, state = self.module(x_t, state)
                outs.append(z)
            return torch.stack(outs)
        outs = [self.module(x_t) for x_t in x.unbind(0)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs)
        # (spk, mem), or nested as snnTorch's DeltaLeaky returns: stack every tensor over time
        from torch.utils import _pytree as pytree
        flats = [pytree.tree_flatten(o) for o in outs]
        leaves = [torch.stack(parts) if isinstance(parts[0], torch.Tensor) else parts[0]
                  for parts in zip(*(f[0] for f in flats))]
        return pytree.tree_unflatten(leaves, flats[0][1])

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if args:
            return super().state_dict(*args)
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def extra_repr(self) -> str:
        return f"reason={self.reason!r}" if self.reason else ""


def _transparent_load_hook(module, state_dict, prefix, *args):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


# Per-step layers that treat every sample on its own, so that one call on T*B samples equals T
# calls on B samples (checked bit for bit in tests/test_convert.py and benchmarks/bench_conv.py):
# nn.py's list plus Dropout (Flatten / Unflatten are checked for the batch dimension first).
_FOLDABLE = _PER_SAMPLE_LAYERS + (nn.modules.dropout._DropoutNd,)


def _foldable(m: nn.Module) -> Tuple[bool, str]:
    """(True, "") when the layer may be folded over time, else (False, why it is stepped)."""
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        dim = m.start_dim if isinstance(m, nn.Flatten) else m.dim
        if dim == 0:
            return False, f"{type(m).__name__} over the batch dimension"
        return True, ""
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        if m.dim is None or m.dim == 0:
            return False, f"{type(m).__name__}(dim={m.dim}) may act across the batch"
        return True, ""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False, ("BatchNorm in training mode normalises over the samples of one call: "
                       "applied per time step, as in the original")
    if isinstance(m, _FOLDABLE):
        return True, ""
    return False, f"{type(m).__module__}.{type(m).__name__} is not known to treat samples independently"


# --------------------------------------------------------------------------- the report

def _value(v) -> str:
    """A converted neuron's alpha / threshold in the report: a tensor parameter is NaN in the
    float fields (its own 'parameter:' line says what it became)."""
    return "tensor" if isinstance(v, float) and math.isnan(v) else repr(v)


@dataclass
class ConvertedPair:
    """One neuron that became a sparsegrad layer (with the nn.Linear it was fused with, if any)."""

    linear: Optional[str]
    neuron: str
    kind: str
    alpha: float
    threshold: float
    slope: float
    surrogate: str = "fast_sigmoid"
    reset: str = "subtract"
    to: str = "LIF"
    notes: List[str] = field(default_factory=list)
    # tensor / learnable parameters, e.g. "beta -> sparsegrad's alpha: learnable, one value"
    # (exact conversions: not notes)
    parameters: List[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """What ``convert`` did: converted neurons, time-folded layers, modules stepped in place."""

    converted: List[ConvertedPair] = field(default_factory=list)
    folded: List[str] = field(default_factory=list)        # wrapped in TimeDistributed
    # (name, reason): neurons and other stateful modules left in place (stepped over time, or
    # multi-step SpikingJelly modules run as they are)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    # (name, reason): stateless layers applied once per time step (StepByStep) rather than folded
    stepped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # False when a model class's forward could not be followed (its layers then run in
    # registration order, SequenceModel); True when it was traced; None for Sequential models
    forward_followed: Optional[bool] = None
    # what convert(..., example_input=...) compared, or "" when nothing was run
    checked: str = ""

    @property
    def exact(self) -> bool:
        """True when every neuron became a sparsegrad layer and nothing was left stepping, or
        when convert(..., example_input=...) ran both models and found the same spikes."""
        if self.checked:
            return True
        return (not self.skipped and not any(p.notes for p in self.converted)
                and self.forward_followed is not False)

    def __str__(self) -> str:
        lines = [f"sparsegrad.convert: {len(self.converted)} neuron(s) converted, "
                 f"{len(self.folded)} layer(s) folded over time, "
                 f"{len(self.skipped)} module(s) left unchanged"]
        for p in self.converted:
            src = f"{p.linear} + {p.neuron}" if p.linear else p.neuron
            lines.append(f"  converted {src} ({p.kind}) -> {p.to}(alpha={_value(p.alpha)}, "
                         f"threshold={_value(p.threshold)}, surrogate={p.surrogate!r}, "
                         f"slope={p.slope!r}, reset={p.reset!r})")
            lines.extend(f"    parameter: {n}" for n in p.parameters)
            lines.extend(f"    note: {n}" for n in p.notes)
        for name, reason in self.skipped:
            lines.append(f"  left unchanged {name}: {reason}")
        for name, reason in self.stepped:
            lines.append(f"  applied per time step {name}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.checked:
            lines.append(f"  checked: {self.checked}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the walk

class _Walk:
    def __init__(self, b_th: float, backward: str, report: ConversionReport):
        self.b_th, self.backward, self.report = b_th, backward, report
        self._warned = set()

    def b_th_for(self, spec: NeuronSpec) -> float:
        """b_th for this neuron: "auto" from its surrogate and slope; a given float is checked."""
        if self.b_th == "auto":
            return F_sg.auto_b_th(spec.surrogate, spec.slope)
        kept = F_sg.surrogate_mass_kept(spec.surrogate, spec.slope, self.b_th)
        key = (spec.surrogate, spec.slope)
        if self.backward == "sparse" and kept < F_sg.AUTO_B_TH_SHARE and key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"b_th={self.b_th} keeps {100 * kept:.1f}% of the {spec.surrogate}(slope="
                f"{spec.slope:g}) surrogate's mass (b_th='auto' keeps "
                f"{100 * F_sg.AUTO_B_TH_SHARE:.0f}%: b_th="
                f"{F_sg.auto_b_th(spec.surrogate, spec.slope):.3g}); the sparse backward may "
                f"then learn slower than the original or stall (docs/surrogates.md)",
                UserWarning, stacklevel=4)
        return self.b_th

    def neuron(self, name: str, m: nn.Module, linear: Optional[Tuple[str, nn.Linear]],
               last: bool = False):
        """(replacement for the neuron, whether the Linear was fused into it)."""
        rule = _rule_for(m)
        try:
            if rule is None:
                raise Unsupported(f"{type(m).__module__}.{type(m).__name__} is not a supported "
                                  f"neuron")
            spec = rule(m)
            if last:
                spec = spec.last_layer()
        except Unsupported as exc:
            self.report.skipped.append((name, str(exc)))
            return (m if _multi_step(m) else StepByStep(m, str(exc))), False
        if linear is not None:
            try:
                fused = spec.fused(linear[1], self.b_th_for(spec), self.backward)
            except Unsupported as exc:
                self.report.skipped.append((name, str(exc)))
                return (m if _multi_step(m) else StepByStep(m, str(exc))), False
            if fused is not None:
                self.report.converted.append(ConvertedPair(
                    linear[0], name, spec.kind, spec.alpha, spec.threshold, spec.slope,
                    spec.surrogate, spec.reset, type(fused).__name__, list(spec.notes),
                    list(spec.parameters)))
                return fused, True
        if spec.needs_linear:
            reason = (f"{spec.kind} converts only directly after an nn.Linear (its weights "
                      f"become the layer's input weights)")
            self.report.skipped.append((name, reason))
            return (m if _multi_step(m) else StepByStep(m, reason)), False
        try:
            module = spec.neuron(self.b_th_for(spec), self.backward)
        except Unsupported as exc:
            self.report.skipped.append((name, str(exc)))
            return (m if _multi_step(m) else StepByStep(m, str(exc))), False
        self.report.converted.append(ConvertedPair(
            None, name, spec.kind, spec.alpha, spec.threshold, spec.slope, spec.surrogate,
            spec.reset, type(module).__name__, list(spec.notes),
            list(spec.parameters)))
        return module, False

    def layer(self, name: str, m: nn.Module) -> nn.Module:
        """A non-neuron child: folded, recursed into, kept, or stepped."""
        if isinstance(m, (LIF, RLIF, LIReadout, LIFNeuron, TimeDistributed, StepByStep,
                          SpikingJellyNeuron, ConvLIF, SpikePool2d)):
            return m
        mod = type(m).__module__ or ""
        if mod.startswith("spikingjelly"):
            return self.spikingjelly_layer(name, m)
        if _is_stateful(m):
            self.report.skipped.append((name, "keeps state between time steps"))
            return StepByStep(m, "keeps state between time steps")
        if type(m) in (nn.Sequential, TimeSequential) or isinstance(m, nn.ModuleList):
            self.children(m, f"{name}.")
            return m
        if _is_user_container(m) and any(True for _ in m.children()):
            self.report.notes.append(
                f"{name}: {type(m).__name__}.forward is not used; its layers run in registration "
                f"order (see SequenceModel)")
            self.children(m, f"{name}.")
            return m
        ok, why = _foldable(m)
        if ok:
            self.report.folded.append(name)
            return TimeDistributed(m)
        self.report.stepped.append((name, why))
        return StepByStep(m, why)

    def spikingjelly_layer(self, name: str, m: nn.Module) -> nn.Module:
        container = sys.modules.get("spikingjelly.activation_based.layer")
        seq_to_ann = getattr(container, "SeqToANNContainer", None)
        if seq_to_ann is not None and type(m) is seq_to_ann:
            self.report.folded.append(name)
            return TimeDistributed(nn.Sequential(*m.children()))
        if _is_stateful(m):
            if _multi_step(m):  # takes the whole sequence itself
                self.report.skipped.append((name, f"{type(m).__name__} keeps state between time "
                                                  f"steps: kept as it is (multi-step, it runs "
                                                  f"the whole sequence itself)"))
                return m
            self.report.skipped.append((name, "keeps state between time steps"))
            return StepByStep(m, "keeps state between time steps")
        step = _sj_base("StepModule")
        if step is not None and isinstance(m, step) and not any(True for _ in m.children()):
            ok, why = _foldable(m)
            if ok:
                m.step_mode = "s"  # a stateless wrapper: in single-step mode, the torch layer
                self.report.folded.append(name)
                return TimeDistributed(m)
        if _multi_step(m):
            return m
        self.report.stepped.append((name, f"{type(m).__name__} is not converted"))
        return StepByStep(m, f"{type(m).__name__} is not converted")

    def children(self, parent: nn.Module, prefix: str, root: bool = False) -> None:
        children = list(parent.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            full = f"{prefix}{name}"
            if _is_foreign_neuron(child):
                new, _ = self.neuron(full, child, None, last=root and i + 1 == len(children))
                setattr(parent, name, new)
                i += 1
                continue
            if type(child) is nn.Linear and i + 1 < len(children) and \
                    _is_foreign_neuron(children[i + 1][1]):
                next_name, neuron = children[i + 1]
                new, fused = self.neuron(f"{prefix}{next_name}", neuron, (full, child),
                                         last=root and i + 2 == len(children))
                if fused:
                    setattr(parent, name, new)
                    setattr(parent, next_name, nn.Identity())
                else:
                    self.report.folded.append(full)
                    setattr(parent, name, TimeDistributed(child))
                    setattr(parent, next_name, new)
                i += 2
                continue
            setattr(parent, name, self.layer(full, child))
            i += 1


def _is_spikingjelly_model(module: nn.Module) -> bool:
    """A model class of SpikingJelly's model zoo (or any SpikingJelly module with children)."""
    mod = type(module).__module__ or ""
    return mod.startswith("spikingjelly.activation_based.model") or (
        mod.startswith("spikingjelly") and not _is_stateful(module) and
        any(_is_stateful(m) for m in module.modules()))


def _spikingjelly_multi_step(module: nn.Module) -> bool:
    """A model whose SpikingJelly modules all run in multi-step mode (its forward takes [T, B, ...]).

    Raises when some are single-step and some multi-step: no one forward fits both."""
    modes = {getattr(m, "step_mode") for m in module.modules()
             if (type(m).__module__ or "").startswith("spikingjelly") and hasattr(m, "step_mode")}
    if modes == {"s", "m"}:
        from .conversion_fx import ConversionError
        raise ConversionError(f"{type(module).__name__} mixes SpikingJelly modules in single-step "
                              f"and multi-step mode; set one mode (functional.set_step_mode)")
    return modes == {"m"}


def _convert_in_place(parent: nn.Module, walk: "_Walk", prefix: str) -> None:
    """Replace every neuron below parent where it is (a model whose forward takes sequences)."""
    for name, child in list(parent.named_children()):
        full = f"{prefix}{name}"
        if _is_foreign_neuron(child):
            new, _ = walk.neuron(full, child, None)
            setattr(parent, name, new)
        elif not isinstance(child, (LIF, RLIF, LIReadout, LIFNeuron, SpikingJellyNeuron)):
            _convert_in_place(child, walk, f"{full}.")


def _is_user_container(module: nn.Module) -> bool:
    """A user-defined model class (its children are the layers), as opposed to a library layer."""
    mod = type(module).__module__ or ""
    return not mod.startswith(("torch.", "snntorch", "spikingjelly", "sparsegrad"))


def _copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that tolerates the non-leaf state tensors neurons keep after a forward call."""
    memo = {}
    for m in model.modules():
        memories = list(getattr(m, "_memories", {}).values()) if isinstance(
            getattr(m, "_memories", None), dict) else []  # SpikingJelly's neuron state
        for value in list(vars(m).values()) + list(m._buffers.values()) + memories:
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def convert(model: nn.Module, *, b_th="auto", backward: str = "sparse",
            inplace: bool = False, return_report: bool = False, example_input=None):
    """Turn a per-step snnTorch / SpikingJelly model into sparsegrad modules that take [T, B, ...].

    model: an nn.Sequential (snnTorch's tutorial style, or SpikingJelly multi-step), or any module
    whose children are its layers in call order. Supported neurons: snnTorch ``Leaky`` (any
    surrogate sparsegrad has, resets "subtract" / "zero" / "none"), snnTorch ``RLeaky`` after an
    nn.Linear (-> the recurrent ``RLIF``, sparsegrad/conversion_recurrent.py), SpikingJelly
    ``LIFNode`` / ``IFNode``, Norse ``LIFBoxCell`` (in a ``SequentialState``); see NEURON_RULES.
    backward is given to every new layer; b_th="auto" (default) gives each neuron the smallest
    b_th keeping 95 % of its surrogate's mass (functional.auto_b_th, docs/surrogates.md: 0.19 for
    fast_sigmoid(100), 4.04 for snnTorch's default atan(2)); a number is used for all of them,
    with a UserWarning where it keeps less than 95 % of a neuron's surrogate.
    inplace=False (default) converts a deep copy.

    An nn.Sequential comes back as a ``sparsegrad.nn.TimeSequential`` (an nn.Sequential with the
    same children and state_dict keys that runs consecutive per-step layers together on chunks of
    time steps) that runs a whole sequence: ``convert(net)(x)`` with x [T, B, ...] gives what
    stacking the original's per-step outputs gives. Other modules keep their class (their own forward, a time loop, no longer applies):
    run them with ``SequenceModel``. Modules that cannot be converted exactly are left in place,
    stepped over time (StepByStep), and listed in the report and in a UserWarning.

    example_input: a sequence [T, B, ...] (recommended): the original (stepped over time as its
    tutorials do, or called once when its forward takes the sequence) and the converted model
    both run on it (in eval mode, without gradients); convert raises ConversionError if any
    spike output differs or another output differs by more than 1e-3 relative, and the report's
    ``checked`` says what was compared and the largest difference of the non-spike outputs.

    Returns the converted model, or (model, ConversionReport) with return_report=True.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(b_th, str) and b_th != "auto":
        raise ValueError(f"b_th must be 'auto' or a positive number, got {b_th!r}")
    if b_th != "auto":
        b_th = F_sg.check_lif_args(0.5, 1.0, b_th, 1.0, backward)[2]
    F_sg.check_lif_args(0.5, 1.0, 1.0, 1.0, backward)
    if example_input is not None and (not isinstance(example_input, torch.Tensor) or
                                      example_input.dim() < 2 or example_input.shape[0] == 0):
        raise ValueError(f"example_input must be a tensor [T, B, ...] with T >= 1, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    original = _copy_model(model) if example_input is not None else None
    if not inplace:
        model = _copy_model(model)
    report = ConversionReport()
    walk = _Walk(b_th, backward, report)
    if _is_foreign_neuron(model):
        model, _ = walk.neuron("(root)", model, None, last=True)
    elif uses_norse_sequence_modules(model):
        # Norse's LIF, LI, Lift, ... loop over time themselves: this model takes whole sequences
        for name, m in model.named_modules():
            if is_norse_sequence_module(m):
                report.skipped.append((name or "(root)", f"Norse {type(m).__name__} runs the whole "
                                                          f"sequence itself: kept as it is (no "
                                                          f"sparsegrad op for it yet)"))
        report.notes.append(f"{type(model).__name__} takes whole sequences (Norse sequence "
                            f"modules): kept, its own forward is used")
    elif is_sequential_state(model):
        from .conversion_norse import convert_sequential_state
        model = convert_sequential_state(model, walk)
    elif type(model) in (nn.Sequential, TimeSequential):
        walk.children(model, "", root=True)
        if type(model) is nn.Sequential:  # same object, children and keys; runs per-step layers together
            model.__class__ = TimeSequential
        if backward == "sparse":  # conv -> (pool) -> LIF as one ConvLIF (issue 20)
            fuse_conv_layers(model)
    elif _spikingjelly_multi_step(model):
        _convert_in_place(model, walk, "")
        report.notes.append(f"{type(model).__name__}: a multi-step model, its own forward takes "
                            f"the sequence; neurons replaced where they are")
    elif _is_user_container(model) or _is_spikingjelly_model(model):
        from .conversion_fx import ConversionError, convert_traced
        try:
            model = convert_traced(model, walk, report)
            report.forward_followed = True
        except ConversionError as exc:
            if not _is_user_container(model):
                raise
            walk.children(model, "", root=True)
            report.forward_followed = False
            model._sparsegrad_not_followed = str(exc)
            model.register_forward_pre_hook(_refuse_own_forward)
            report.notes.append(
                f"(root): {type(model).__name__}.forward is not followed ({exc}); its layers were "
                f"converted in place: run them with SequenceModel(converted)(x) (registration "
                f"order), not with the model's own forward, and check that with example_input=")
    else:
        model = walk.layer("(root)", model)
    if example_input is not None:
        report.checked = _check_against(original, model, example_input, report)
    if not report.exact:
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return (model, report) if return_report else model


def _refuse_own_forward(module, args):
    """Forward pre-hook of a model class converted in place whose forward was not followed: its
    own forward would feed one time step to layers that now take whole sequences."""
    raise ConversionError(
        f"{type(module).__name__}.forward was not followed by sparsegrad.convert "
        f"({getattr(module, '_sparsegrad_not_followed', '')}), so it cannot run the converted "
        f"layers. Run them in registration order with "
        f"sparsegrad.conversion.SequenceModel(converted)(x) (x: [T, B, ...]; check it first with "
        f"convert(model, example_input=x)), or write the forward so that each time step's "
        f"values flow only through the neurons (record per-step values in a list and combine "
        f"them after the loop, e.g. torch.stack(spk_rec).sum(0)), or write it with sparsegrad "
        f"modules (docs/conversion.md)")


def _takes_sequence(model: nn.Module, report: "ConversionReport", converted=None) -> bool:
    """Whether the original's forward takes the whole sequence itself (else: one step per call)."""
    lifted_loop = getattr(getattr(converted, "_plan", None), "loop", False)
    return (report.forward_followed is False or _spikingjelly_multi_step(model)
            or uses_norse_sequence_modules(model) or lifted_loop)


def _check_against(original: nn.Module, converted: nn.Module, x: torch.Tensor,
                   report: "ConversionReport") -> str:
    """Run both on x; raise ConversionError on a different spike; describe what was compared."""
    from .conversion_fx import ConversionError
    modes = [(m, m.training) for m in list(original.modules()) + list(converted.modules())]
    for m, _ in modes:
        m.training = False
    try:
        return _compare_outputs(*_run_both(original, converted, x, report))
    finally:
        for m, mode in modes:
            m.training = mode


def _run_both(original, converted, x, report):
    from .conversion_fx import ConversionError
    try:
        with torch.no_grad():
            if is_sequential_state(original) and not uses_norse_sequence_modules(original):
                state, outs = None, []
                for x_t in x.unbind(0):
                    out_t, state = original(x_t, state)
                    outs.append(out_t)
                ref, got = torch.stack(outs), converted(x)[0]
                how = "the SequentialState stepped over time with its state"
            elif _takes_sequence(original, report, converted):
                _reset_state(original)
                ref = original(x)
                got = converted(x) if report.forward_followed is not False else \
                    SequenceModel(converted)(x)
                how = "the original called once on the sequence"
            else:
                from .conversion_fx import SequenceForward
                if isinstance(converted, SequenceForward) and converted._plan.state_inputs:
                    raise ValueError("example_input: this forward takes neuron states as inputs "
                                     "(fed back by the caller's loop); convert cannot run its "
                                     "loop, so compare the outputs yourself")
                ref = StepByStep(original)(x)
                got = converted(x)
                how = "the original stepped over time"
            _reset_state(original)
    except (ConversionError, ValueError):
        raise
    except Exception as exc:
        extra = ("; its forward was not followed, so its layers ran in registration order "
                 "(SequenceModel), which this forward does not compute"
                 if report.forward_followed is False else "")
        raise ConversionError(f"running the models on example_input failed ({type(exc).__name__}: "
                              f"{exc}){extra}") from exc
    return ref, got, x, how


def _compare_outputs(ref, got, x, how) -> str:
    from .conversion_fx import ConversionError
    ref_l, got_l = _leaves(ref), _leaves(got)
    if len(ref_l) != len(got_l) or any(a.shape != b.shape for a, b in zip(ref_l, got_l)):
        raise ConversionError(
            f"the converted model's output {[tuple(t.shape) for t in got_l]} does not match the "
            f"original's {[tuple(t.shape) for t in ref_l]} on example_input")
    n_spikes, worst = 0, 0.0
    for i, (a, b) in enumerate(zip(ref_l, got_l)):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if bool(((a == 0) | (a == 1)).all()) and bool(((b == 0) | (b == 1)).all()):
            n_spikes += 1
            if diff != 0.0:
                raise ConversionError(
                    f"output {i}: {int((a != b).sum())} of {a.numel()} spikes differ from the "
                    f"original's on example_input; largest difference of the other outputs so "
                    f"far {worst:.3g}")
            continue
        worst = max(worst, diff)
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        if not diff <= 1e-3 * scale:
            raise ConversionError(f"output {i} differs from the original's by {diff:.3g} on "
                                  f"example_input (more than 1e-3 relative)")
    return (f"example_input {list(x.shape)}, in eval mode against {how}: {len(ref_l)} output "
            f"tensor(s), {n_spikes} of spikes equal; largest difference of the others "
            f"{worst:.3g}")


def _leaves(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    return []


# --------------------------------------------------------------------------- running sequences

def _layers(module: nn.Module) -> List[nn.Module]:
    """The chain of layers in call order: containers' children in registration order."""
    children = list(module.children())
    is_container = type(module) in (nn.Sequential, TimeSequential) or _is_user_container(module)
    if not children or not is_container:
        return [module]
    out = []
    for child in children:
        out.extend(_layers(child))
    return out


class SequenceModel(nn.Module):
    """Run a (converted) model on a whole time-major sequence x [T, B, ...].

    The model's layers are taken in registration order (an nn.Sequential, or a model class whose
    forward calls its layers in the order they were assigned, as in snnTorch's tutorials). Each
    layer then runs the way the original time loop ran it:

    * sparsegrad modules (LIF, LIFNeuron, LIReadout, TimeDistributed, StepByStep) and multi-step
      SpikingJelly modules take the whole sequence;
    * stateless layers that treat samples independently are applied to all T*B samples at once;
    * anything else (unconverted neurons, BatchNorm, unknown modules) runs one step at a time,
      with neuron state reset at the start of the sequence.

    A layer returning a tuple, such as (spikes, membrane), passes its first element on; the last
    layer's output is returned as it is (stacked over time).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a time-major tensor [T, B, ...], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        layers = _layers(self.model)
        for i, layer in enumerate(layers):
            x = _run_layer(layer, x)
            if isinstance(x, tuple) and i + 1 < len(layers):
                x = x[0]
        return x


def _run_layer(layer: nn.Module, x: torch.Tensor):
    from .conversion_fx import SequenceForward
    if isinstance(layer, SequenceForward):
        return layer(x)
    if isinstance(layer, (LIF, RLIF, LIReadout, LIFNeuron, TimeDistributed, StepByStep,
                          SpikingJellyNeuron, ConvLIF, SpikePool2d)):
        return layer(x)
    if _multi_step(layer):
        _reset_state(layer)
        return layer(x)
    if not _is_stateful(layer) and _foldable(layer)[0]:
        return TimeDistributed(layer)(x)
    return StepByStep(layer)(x)
