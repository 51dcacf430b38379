"""Convert snnTorch / SpikingJelly models to fused sparsegrad layers.

``convert(model)`` walks the module tree and replaces every ``nn.Linear`` that is directly followed
(the next sibling in registration order) by a supported spiking neuron with one
``sparsegrad.nn.LIF`` holding the same weight and bias; the neuron's slot becomes ``nn.Identity``
so the names (and state_dict keys) of the other layers do not move. Everything that cannot be
converted exactly is left in place and listed in the returned ``ConversionReport`` and in a
warning. ``SequenceModel`` runs a converted model on a whole time-major [T, B, ...] sequence.

The exact correspondences (docs/conversion.md has the derivations):

* snnTorch ``Leaky(beta, threshold, reset_mechanism="subtract")``:
  U[t] = beta*U[t-1] + I[t] - threshold*S[t-1], S[t] = H(U[t] - threshold), the reset detached.
  This is sparsegrad's model with alpha = clamp(beta, 0, 1), same threshold, same U.
* SpikingJelly ``LIFNode(tau, decay_input=False, v_reset=None)`` decays the reset:
  H[t] = a*(H[t-1] - theta*S[t-1]) + X[t] with a = 1 - 1/tau. With V = H - theta*(1 - a) this is
  sparsegrad's model with alpha = a, threshold a*theta, a constant input -theta*(1 - a)^2 and
  V[-1] = -theta*(1 - a) (``OffsetLIF``). ``IFNode(v_reset=None)`` is the case a = 1.
* Surrogates: sparsegrad uses 1/(slope*|u| + 1)^2. A neuron whose surrogate has exactly that
  derivative (snnTorch ``fast_sigmoid(slope=k)``) maps to slope=k with no notice; any other
  surrogate is mapped to the slope with the same half width at half maximum, and the report
  says so (forward spikes stay exact, gradients differ by the change of surrogate).
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import functional as F_sg
from .conversion_recurrent import is_rleaky, rleaky_rule
from .nn import LIF, RLIF, LIReadout

__all__ = ["convert", "ConversionReport", "ConvertedPair", "OffsetLIF", "SequenceModel",
           "surrogate_slope"]

# Half width at half maximum of 1/(k|u| + 1)^2 is (sqrt(2) - 1)/k.
_FAST_SIGMOID_HWHM_TIMES_SLOPE = math.sqrt(2.0) - 1.0
_DEFAULT_SLOPE = 100.0


@dataclass
class ConvertedPair:
    """One nn.Linear + neuron pair that became a sparsegrad LIF."""

    linear: str
    neuron: str
    kind: str
    alpha: float
    threshold: float
    slope: float
    notes: List[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """What ``convert`` did: converted pairs (with notes on approximations) and skipped modules."""

    converted: List[ConvertedPair] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    @property
    def exact(self) -> bool:
        """True when everything converted with exact forward and gradients and nothing was left."""
        return not self.skipped and not any(p.notes for p in self.converted)

    def __str__(self) -> str:
        lines = [f"sparsegrad.convert: {len(self.converted)} layer(s) converted, "
                 f"{len(self.skipped)} module(s) left unchanged"]
        for p in self.converted:
            lines.append(f"  converted {p.linear} + {p.neuron} ({p.kind}) -> "
                         f"{'RLIF' if p.kind == 'snntorch.RLeaky' else 'LIF'}"
                         f"(alpha={p.alpha!r}, threshold={p.threshold!r}, slope={p.slope!r})")
            lines.extend(f"    note: {n}" for n in p.notes)
        for name, reason in self.skipped:
            lines.append(f"  left unchanged {name}: {reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- surrogates

def _surrogate_derivative(fn, u: torch.Tensor):
    """(forward values, derivative) of a spike function at u, or (values, None) without grad."""
    u = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(u)
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != u.shape:
            raise TypeError("surrogate did not return a tensor of its input's shape")
        if not out.requires_grad:
            return out.detach(), None
        (grad,) = torch.autograd.grad(out.sum(), u, allow_unused=True)
    return out.detach(), (None if grad is None else grad.detach())


def surrogate_slope(fn) -> Tuple[Optional[float], Optional[str]]:
    """Map a spike function (Heaviside forward, surrogate backward) to sparsegrad's slope.

    Returns (slope, note): note is None when the derivative is exactly 1/(slope*|u|+1)^2;
    slope is None (with the reason in note) when the forward is not the Heaviside step
    H(u) = 1[u > 0] or the derivative cannot be matched at all.
    """
    # A grid dense near 0 (where surrogates live) and wide enough for slopes down to ~0.1.
    grid = torch.cat([-torch.logspace(-6, 2, 200, dtype=torch.float64).flip(0),
                      torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-6, 2, 200, dtype=torch.float64)])
    try:
        values, deriv = _surrogate_derivative(fn, grid)
        _, deriv2 = _surrogate_derivative(fn, grid)
    except Exception as exc:  # an arbitrary user callable: report instead of failing
        return None, f"its spike function could not be evaluated ({type(exc).__name__}: {exc})"
    heaviside = (grid > 0).to(values.dtype)
    if not torch.equal(values, heaviside):
        return None, "its spike function is not the step H(u) = 1[u > 0] in the forward pass"
    if deriv is not None:
        # Some formulas overflow far from 0 (exp(slope*|u|)); only the centre must be finite.
        finite = torch.isfinite(deriv)
        if not bool(finite[grid.abs() <= 1.0].all()):
            deriv = None
        else:
            deriv = torch.where(finite, deriv, torch.zeros_like(deriv)).to(torch.float64)
            deriv2 = torch.nan_to_num(deriv2.to(torch.float64), nan=0.0, posinf=0.0,
                                      neginf=0.0)
    if deriv is None or deriv2 is None:
        return _DEFAULT_SLOPE, (f"its surrogate gives no usable gradient; sparsegrad's fast "
                                f"sigmoid with slope={_DEFAULT_SLOPE} is used instead")
    if not torch.equal(deriv, deriv2):
        return _DEFAULT_SLOPE, (f"its surrogate gradient is random; sparsegrad's fast sigmoid "
                                f"with slope={_DEFAULT_SLOPE} is used instead")
    # Exactly a fast sigmoid? Then g(0) = 1 and k follows from any other point.
    probe = int(torch.argmin((grid - 0.1).abs()))
    if float(deriv[grid.numel() // 2]) == 1.0 and 0.0 < float(deriv[probe]) < 1.0:
        k = (1.0 / math.sqrt(float(deriv[probe])) - 1.0) / float(grid[probe])
        k_rounded = float(f"{k:.10g}")
        expected = 1.0 / (k_rounded * grid.abs() + 1.0) ** 2
        if torch.allclose(deriv, expected, rtol=1e-5, atol=1e-7):
            return k_rounded, None
    peak = float(deriv.max())
    if not peak > 0.0:
        return _DEFAULT_SLOPE, (f"its surrogate gradient is zero everywhere; sparsegrad's fast "
                                f"sigmoid with slope={_DEFAULT_SLOPE} is used instead")
    # Half width at half maximum, measured on each side of the peak and averaged.
    centre = int(torch.argmax(deriv))
    widths = []
    below = (deriv < peak / 2).nonzero().flatten()
    right = below[below > centre]
    left = below[below < centre]
    half = peak / 2

    def crossing(i_in, i_out):
        # Linear interpolation between the last grid point above half maximum and the first below.
        d_in, d_out = float(deriv[i_in]), float(deriv[i_out])
        u_in, u_out = float(grid[i_in]), float(grid[i_out])
        return u_in + (d_in - half) * (u_out - u_in) / (d_in - d_out)

    if right.numel():
        widths.append(crossing(int(right[0]) - 1, int(right[0])) - float(grid[centre]))
    if left.numel():
        widths.append(float(grid[centre]) - crossing(int(left[-1]) + 1, int(left[-1])))
    if not widths or max(widths) <= 0.0:
        return _DEFAULT_SLOPE, (f"its surrogate gradient has no half-maximum width on "
                                f"[-100, 100]; sparsegrad's fast sigmoid with "
                                f"slope={_DEFAULT_SLOPE} is used instead")
    hwhm = sum(widths) / len(widths)
    k = float(f"{_FAST_SIGMOID_HWHM_TIMES_SLOPE / hwhm:.4g}")
    return k, (f"its surrogate is not a fast sigmoid; mapped to sparsegrad's "
               f"1/(slope*|u|+1)^2 with slope={k} (same half width at half maximum "
               f"{hwhm:.4g}, peak {peak:.4g} -> 1), so gradients differ from the original")


# --------------------------------------------------------------------------- neuron recognition

@dataclass
class _NeuronSpec:
    kind: str
    alpha: float
    threshold: float
    slope: float
    v_init: float = 0.0      # initial membrane (OffsetLIF)
    current: float = 0.0     # constant input current (OffsetLIF)
    notes: List[str] = field(default_factory=list)


def _scalar(t) -> Optional[float]:
    """A Python float from a number or a one-element tensor, else None."""
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0]) if t.numel() == 1 else None
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


def _snntorch_leaky_type():
    snn = sys.modules.get("snntorch")
    return getattr(snn, "Leaky", None) if snn is not None else None


def _spikingjelly_types():
    sj = sys.modules.get("spikingjelly.activation_based.neuron")
    if sj is None:
        return None, None
    return getattr(sj, "LIFNode", None), getattr(sj, "IFNode", None)


def _is_foreign_neuron(m: nn.Module) -> bool:
    """A spiking neuron of snnTorch or SpikingJelly (converted or reported, never ignored)."""
    mod = type(m).__module__ or ""
    if mod.startswith("snntorch"):
        snn = sys.modules.get("snntorch")
        base = getattr(snn, "SpikingNeuron", None)
        return base is not None and isinstance(m, base)
    if mod.startswith("spikingjelly.activation_based.neuron"):
        return True
    return False


def _is_stateful_step_module(m: nn.Module) -> bool:
    """A module that keeps state between calls and must see one time step per call."""
    if _is_foreign_neuron(m):
        return getattr(m, "step_mode", "s") != "m"
    base = sys.modules.get("spikingjelly.activation_based.base")
    memory = getattr(base, "MemoryModule", None) if base is not None else None
    if memory is not None and isinstance(m, memory):
        return getattr(m, "step_mode", "s") != "m"
    return False


def _leaky_spec(m) -> Tuple[Optional[_NeuronSpec], Optional[str]]:
    """(spec, None) when an snnTorch Leaky is exactly sparsegrad's LIF, else (None, reason)."""
    if getattr(m, "reset_mechanism", "subtract") != "subtract":
        return None, (f"reset_mechanism={m.reset_mechanism!r}; only 'subtract' is sparsegrad's "
                      f"model")
    if not getattr(m, "reset_delay", True):
        return None, "reset_delay=False resets in the same step; sparsegrad resets at the next step"
    for flag, why in (("inhibition", "lateral inhibition"), ("state_quant", "state quantisation"),
                      ("surrogate_disable", "surrogate_disable=True (no gradient)")):
        if getattr(m, flag, False):
            return None, f"{why} has no sparsegrad equivalent"
    for name in ("beta", "threshold", "graded_spikes_factor"):
        if isinstance(getattr(m, name, None), nn.Parameter):
            return None, f"{name} is a learnable parameter; sparsegrad's {name} is a fixed float"
    beta, threshold = _scalar(m.beta), _scalar(m.threshold)
    graded = _scalar(getattr(m, "graded_spikes_factor", 1.0))
    if beta is None:
        return None, "beta has one value per neuron; sparsegrad's alpha is one float per layer"
    if threshold is None:
        return None, "threshold has one value per neuron; sparsegrad's is one float per layer"
    if graded != 1.0:
        return None, f"graded_spikes_factor={graded} scales spikes; sparsegrad's spikes are 0/1"
    if not threshold > 0.0 or not math.isfinite(threshold):
        return None, f"threshold={threshold} is not a positive finite number"
    if math.isnan(beta):
        return None, "beta is NaN"
    slope, note = surrogate_slope(m.spike_grad)
    if slope is None:
        return None, note
    spec = _NeuronSpec("snntorch.Leaky", min(max(beta, 0.0), 1.0), threshold, slope)
    if note:
        spec.notes.append(note)
    if getattr(m, "output", False) and getattr(m, "init_hidden", False):
        spec.notes.append("output=True: the membrane potential is no longer returned, only spikes")
    return spec, None


def _spikingjelly_spec(m, is_if: bool) -> Tuple[Optional[_NeuronSpec], Optional[str]]:
    if getattr(m, "v_reset", 0.0) is not None:
        return None, (f"v_reset={m.v_reset!r} is a hard reset; only the soft reset "
                      f"(v_reset=None) is sparsegrad's model")
    if not is_if and getattr(m, "decay_input", True):
        return None, ("decay_input=True scales the input by 1/tau; only decay_input=False is "
                      "converted (the weights are carried over unchanged)")
    if getattr(m, "_neuron_precision", None) is not None:
        return None, "a custom neuron precision is set"
    theta = _scalar(getattr(m, "v_threshold", None))
    if theta is None or not theta > 0.0 or not math.isfinite(theta):
        return None, f"v_threshold={getattr(m, 'v_threshold', None)!r} is not a positive float"
    if is_if:
        a = 1.0
    else:
        tau = _scalar(getattr(m, "tau", None))
        if tau is None or not tau > 1.0:
            return None, f"tau={getattr(m, 'tau', None)!r} is not a float > 1"
        a = 1.0 - 1.0 / tau
    slope, note = surrogate_slope(m.surrogate_function)
    if slope is None:
        # SpikingJelly's step fires at u >= 0: equal to 1[u > 0] except exactly at u = 0.
        slope, note = _spikingjelly_slope(m.surrogate_function)
        if slope is None:
            return None, note
    kind = "spikingjelly.IFNode" if is_if else "spikingjelly.LIFNode"
    shift = theta * (1.0 - a)
    spec = _NeuronSpec(kind, a, a * theta, slope, v_init=-shift, current=-shift * (1.0 - a))
    if note:
        spec.notes.append(note)
    if not getattr(m, "detach_reset", False):
        spec.notes.append("detach_reset=False: SpikingJelly also backpropagates through the reset; "
                          "sparsegrad's reset is detached, so gradients differ (spikes do not)")
    return spec, None


def _spikingjelly_slope(fn):
    """surrogate_slope for a step that fires at u >= 0 (SpikingJelly's convention)."""
    def shifted(u):
        # 1[u >= 0] and 1[u > 0] differ only at 0; evaluate away from it.
        return fn(u - (u == 0).to(u.dtype) * 1e-300)
    slope, note = surrogate_slope(shifted)
    return slope, note


def _neuron_spec(m) -> Tuple[Optional[_NeuronSpec], Optional[str]]:
    leaky = _snntorch_leaky_type()
    if leaky is not None and type(m) is leaky:
        return _leaky_spec(m)
    sj_lif, sj_if = _spikingjelly_types()
    if sj_lif is not None and type(m) is sj_lif:
        return _spikingjelly_spec(m, is_if=False)
    if sj_if is not None and type(m) is sj_if:
        return _spikingjelly_spec(m, is_if=True)
    return None, f"{type(m).__module__}.{type(m).__name__} is not a supported neuron"


# --------------------------------------------------------------------------- the converted layer

class OffsetLIF(LIF):
    """sparsegrad LIF with a constant input current and a non-zero initial membrane.

    V[t] = alpha*V[t-1] + x[t] @ W.T + b + current - threshold*S[t-1], V[-1] = v_init: the exact
    image of SpikingJelly's soft-reset LIF (see the module docstring). With current = v_init = 0
    it is the plain LIF. ``weight`` and ``bias`` stay those of the original nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 v_init: float = 0.0, current: float = 0.0, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.v_init = float(v_init)
        self.current = float(current)

    def _initial_state(self, x_tm: torch.Tensor):
        if self.v_init == 0.0:
            return None
        v0 = x_tm.new_full((x_tm.shape[1], self.out_features), self.v_init)
        return (v0, torch.zeros_like(v0))

    def _input_bias(self):
        if self.current == 0.0:
            return self.bias
        if self.bias is None:
            return self.weight.new_full((self.out_features,), self.current)
        return self.bias + self.current

    def extra_repr(self) -> str:
        return super().extra_repr() + f", v_init={self.v_init}, current={self.current}"


def _make_lif(linear: nn.Linear, spec: _NeuronSpec, b_th: float, backward: str) -> LIF:
    w = linear.weight
    kwargs = dict(alpha=spec.alpha, threshold=spec.threshold, b_th=b_th, slope=spec.slope,
                  backward=backward, device=w.device, dtype=w.dtype)
    has_bias = linear.bias is not None
    if spec.v_init != 0.0 or spec.current != 0.0:
        lif = OffsetLIF(linear.in_features, linear.out_features, has_bias,
                        v_init=spec.v_init, current=spec.current, **kwargs)
    else:
        lif = LIF(linear.in_features, linear.out_features, has_bias, **kwargs)
    with torch.no_grad():
        lif.weight.copy_(w)
        if has_bias:
            lif.bias.copy_(linear.bias)
    lif.weight.requires_grad_(w.requires_grad)
    if has_bias:
        lif.bias.requires_grad_(linear.bias.requires_grad)
    return lif


# --------------------------------------------------------------------------- the walk

def _convert_children(parent: nn.Module, prefix: str, b_th: float, backward: str,
                      report: ConversionReport) -> None:
    children = list(parent.named_children())
    consumed = set()
    for i, (name, child) in enumerate(children):
        full = f"{prefix}{name}"
        if isinstance(child, (LIF, RLIF, LIReadout)):
            continue
        if type(child) is nn.Linear and i + 1 < len(children):
            next_name, neuron = children[i + 1]
            if _is_foreign_neuron(neuron):
                layer = None
                if is_rleaky(neuron):  # recurrent: sparsegrad/conversion_recurrent.py
                    layer, why = rleaky_rule(child, neuron, b_th=b_th, backward=backward)
                    spec, reason = (None, why) if layer is None else (_NeuronSpec(
                        "snntorch.RLeaky", layer.alpha, layer.threshold, layer.slope, notes=why), None)
                else:
                    spec, reason = _neuron_spec(neuron)
                if spec is None:
                    report.skipped.append((f"{prefix}{next_name}", reason))
                    consumed.add(next_name)
                    continue
                setattr(parent, name, layer if layer is not None else _make_lif(child, spec, b_th, backward))
                setattr(parent, next_name, nn.Identity())
                consumed.add(next_name)
                report.converted.append(ConvertedPair(
                    full, f"{prefix}{next_name}", spec.kind, spec.alpha, spec.threshold,
                    spec.slope, spec.notes))
                continue
        if name in consumed:
            continue
        if _is_foreign_neuron(child):
            spec, reason = _neuron_spec(child)
            report.skipped.append((full, reason if spec is None else
                                   "not directly preceded by an nn.Linear sibling"))
            continue
        _convert_children(child, f"{full}.", b_th, backward, report)


def _copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that tolerates the non-leaf state tensors neurons keep after a forward call."""
    memo = {}
    for m in model.modules():
        for value in list(vars(m).values()) + list(m._buffers.values()):
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def convert(model: nn.Module, *, b_th: float = 0.2, backward: str = "sparse",
            inplace: bool = False, return_report: bool = False):
    """Replace each nn.Linear directly followed by an snnTorch/SpikingJelly neuron by a fused LIF.

    model: any nn.Module. Pairs are siblings in registration order (nn.Sequential order, or the
    order attributes were assigned in __init__). Supported neurons: snnTorch ``Leaky`` with
    reset_mechanism="subtract" (any surrogate), SpikingJelly ``LIFNode(decay_input=False,
    v_reset=None)`` and ``IFNode(v_reset=None)``; snnTorch ``RLeaky(all_to_all=True,
    linear_features=N)`` becomes a recurrent ``RLIF`` (sparsegrad/conversion_recurrent.py). b_th and backward are given to every new LIF.
    inplace=False (default) converts a deep copy and leaves ``model`` untouched.

    Returns the converted model, or (model, ConversionReport) with return_report=True. Neurons left
    unchanged and surrogates that were approximated are also announced with a UserWarning.
    Run the result on [T, B, ...] sequences with ``SequenceModel``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    F_sg.check_lif_args(0.5, 1.0, b_th, 1.0, backward)
    if not inplace:
        model = _copy_model(model)
    report = ConversionReport()
    if _is_foreign_neuron(model):
        spec, reason = _neuron_spec(model)
        report.skipped.append(("(root)", reason if spec is None else
                               "a bare neuron without an nn.Linear in front"))
    else:
        _convert_children(model, "", float(b_th), backward, report)
    if not report.exact:
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return (model, report) if return_report else model


# --------------------------------------------------------------------------- running sequences

def _layers(module: nn.Module) -> List[nn.Module]:
    """The chain of layers in call order: containers' children in registration order."""
    children = list(module.children())
    is_container = isinstance(module, nn.Sequential) or _is_user_container(module)
    if not children or not is_container:
        return [module]
    out = []
    for child in children:
        out.extend(_layers(child))
    return out


def _is_user_container(module: nn.Module) -> bool:
    """A user-defined model class (its children are the layers), as opposed to a library layer."""
    mod = type(module).__module__ or ""
    return not mod.startswith(("torch.", "snntorch", "spikingjelly", "sparsegrad"))


class SequenceModel(nn.Module):
    """Run a (converted) model on a whole time-major sequence x [T, B, ...].

    The model's layers are taken in registration order (an nn.Sequential, or a model class whose
    forward calls its layers in the order they were assigned, as in snnTorch's tutorials). Each
    layer then runs the way the snnTorch time loop would have run it:

    * sparsegrad LIF / LIReadout and multi-step SpikingJelly modules take the whole sequence;
    * stateless layers (nn.Linear, convolutions, dropout, activations, ...) are applied to all
      T*B samples at once, which is the same as once per time step;
    * neurons that were not converted (and other single-step stateful modules) run one step at a
      time with their state reset at the start of the sequence; if they return (spike, mem) the
      spikes are passed on.

    Returns the last layer's output stacked over time, [T, B, ...] (what ``torch.stack`` of the
    per-step outputs of the original loop gives), unless that layer reduces over time itself.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a time-major tensor [T, B, ...], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        for layer in _layers(self.model):
            x = _run_layer(layer, x)
        return x


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, (LIF, RLIF, LIReadout, nn.Identity)):
        return layer(x)
    if _is_stateful_step_module(layer):
        if hasattr(layer, "reset_mem"):
            layer.reset_mem()
        elif hasattr(layer, "reset"):
            layer.reset()
        y = torch.stack([_first(layer(x[t])) for t in range(x.shape[0])])
        # snnTorch emits float32 spikes whatever the input dtype; 0/1 converts exactly.
        return y.to(x.dtype) if y.is_floating_point() and x.is_floating_point() else y
    if getattr(layer, "step_mode", None) == "m":
        if hasattr(layer, "reset"):
            layer.reset()
        return _first(layer(x))
    T, B = x.shape[0], x.shape[1]
    y = _first(layer(x.reshape(T * B, *x.shape[2:])))
    return y.reshape(T, B, *y.shape[1:])
