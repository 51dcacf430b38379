"""NIR (Neuromorphic Intermediate Representation) import and export: from_nir, to_nir.

NIR is continuous-time; sparsegrad steps in discrete time. One discretisation is used both ways
(docs/nir.md), snnTorch's, so its exports load unchanged: forward Euler with step ``dt``,

    LIF     v[t] = a*v[t-1] + g*I[t] + c,     a = 1 - dt/tau,  g = r*dt/tau,  c = v_leak*dt/tau
    IF      v[t] = v[t-1] + r*I[t]            (the step folded into r, as Norse runs it)
    LI      v[t] = a*v[t-1] + (1-a)*(r*I[t] + v_leak)
    CubaLIF i[t] = a_syn*i[t-1] + w_in*(dt/tau_syn)*I[t],  a_syn = 1 - dt/tau_syn  (first)
            v[t] = a*v[t-1] + r*(dt/tau_mem)*i[t],         a = 1 - dt/tau_mem       (snnTorch's
            Synaptic; v_leak = 0 only)

with the reset to v_reset (= 0) at the step after the spike, S[t] = H(v[t] - v_threshold).
A node's input current I is the sum of everything its incoming edges deliver.

Requires the optional packages ``nir`` (and, for NIR's own tooling, ``nirtorch``):
``pip install sparsegrad[nir]``.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from . import nn as sg_nn

try:
    import nir
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("sparsegrad.to_nir / from_nir need the `nir` package: "
                      "pip install 'sparsegrad[nir]'") from exc

__all__ = ["to_nir", "from_nir", "NIRGraphModule", "neuron_params", "NIR_DEFAULTS"]

#: What from_nir gives every spiking layer (NIR carries no training properties). The same values
#: are what to_nir accepts without metadata=True.
NIR_DEFAULTS = {"surrogate": "fast_sigmoid", "slope": 100.0, "b_th": 0.2, "backward": "sparse"}

# An input gain within this relative distance of 1 is taken as exactly 1: snnTorch writes
# r = tau/dt in float32, so r*dt/tau comes back as 1 + up to 8.2e-8 (measured over 2,000 betas).
_GAIN_RTOL = 1e-6

_META_KEY = "sparsegrad"
_log = logging.getLogger(__name__)

# nir 1.0 defines an Identity node without exporting it at the top level.
_IDENTITY = getattr(nir, "Identity", None) or getattr(nir.ir.graph, "Identity", None) or ()


class NIRConversionError(ValueError):
    """A graph or model that NIR import / export cannot represent exactly."""


# --------------------------------------------------------------------------------------------
# The one place where NIR neuron parameters become sparsegrad's (and back).
# --------------------------------------------------------------------------------------------

def _check_dt(dt) -> None:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (0 < dt < math.inf):
        raise ValueError(f"dt must be a positive finite float, got {dt!r}")


def _neuron_shape(node_name: str, node) -> Tuple[int, ...]:
    """The per-sample shape of a neuron node: its parameters' shapes broadcast together."""
    shapes = [np.shape(getattr(node, f)) for f in _NEURON_FIELDS
              if getattr(node, f, None) is not None]
    try:
        return tuple(int(s) for s in np.broadcast_shapes(*shapes)) if shapes else ()
    except ValueError:
        raise NIRConversionError(
            f"NIR node {node_name!r} ({type(node).__name__}): its parameters' shapes {shapes} do "
            f"not broadcast together") from None


_NEURON_FIELDS = ("v_threshold", "tau", "tau_mem", "tau_syn", "r", "v_leak", "v_reset", "w_in")


def _field(node_name: str, node, field: str, shape):
    """One parameter of a neuron node: a float when every neuron has the same value (bitwise),
    else a float64 array of the node's shape."""
    arr = np.asarray(getattr(node, field), dtype=np.float64)
    if arr.size == 0:
        raise NIRConversionError(
            f"NIR node {node_name!r} ({type(node).__name__}): {field} is empty")
    if not np.all(np.isfinite(arr)):
        raise NIRConversionError(
            f"NIR node {node_name!r} ({type(node).__name__}): {field} is not finite everywhere "
            f"(min {arr.min():g}, max {arr.max():g})")
    return _collapse(np.broadcast_to(arr, shape))


def _collapse(value):
    """A float for a value that is the same for every neuron, else the float64 array."""
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)
        if flat.size == 0 or np.all(flat == flat[0]):
            return float(flat[0]) if flat.size else 0.0
        return value.copy()
    return float(value)


def _range(value) -> str:
    arr = np.asarray(value)
    return f"{arr.min():g}" if arr.size == 1 or np.all(arr == arr.flat[0]) else \
        f"values in [{arr.min():g}, {arr.max():g}]"


def _step(node_name: str, kind: str, field: str, tau, dt: float):
    """dt / tau, refused unless 0 < dt / tau <= 1 for every neuron (alpha = 1 - dt/tau >= 0)."""
    if not np.all(np.asarray(tau) > 0.0):
        raise NIRConversionError(
            f"NIR node {node_name!r} ({kind}): {field} must be > 0, got {_range(tau)}")
    step = dt / np.asarray(tau) if isinstance(tau, np.ndarray) else dt / tau
    if np.any(np.asarray(step) > 1.0):
        raise NIRConversionError(
            f"NIR node {node_name!r} ({kind}): {field} = {_range(tau)} is shorter than dt = "
            f"{dt:g} (alpha = 1 - dt/{field} < 0); pass the dt the graph was made for")
    return step


def _snap_one(gain):
    """A gain within _GAIN_RTOL of 1 is exactly 1 (per neuron)."""
    if isinstance(gain, np.ndarray):
        return _collapse(np.where(np.abs(gain - 1.0) <= _GAIN_RTOL, 1.0, gain))
    return 1.0 if abs(gain - 1.0) <= _GAIN_RTOL else float(gain)


def _torch_param(value):
    """float -> float; a per-neuron float64 array -> a float32 tensor of the node's shape."""
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value, dtype=torch.float32)
    return value


def neuron_params(node_name: str, node, dt: float) -> dict:
    """sparsegrad's parameters for one NIR neuron node (LIF, IF, LI, CubaLIF) at step ``dt``.

    Returns {"kind": "lif" | "li", "alpha", "threshold" (lif), "alpha_syn" (lif; None but for
    CubaLIF), "gain", "shift", "shape"}: the neuron runs V[t] = alpha*V'[t-1] + gain*I[t] + shift
    with the zero reset (V' = 0 after a spike), CubaLIF with syn[t] = alpha_syn*syn[t-1] +
    gain*I[t] in place of gain*I[t] (and shift = 0); LI runs U[t] = alpha*U[t-1] +
    (1-alpha)*(gain*I[t] + shift). A value that is the same for every neuron is a float; one
    that differs is a float32 tensor of the node's ``shape`` (computed in float64, rounded
    once). v_reset != 0, a CubaLIF's v_leak != 0, a threshold <= 0 and a tau shorter than dt are
    refused with an error naming the node.
    """
    kind = type(node).__name__
    if not isinstance(node, _NEURONS):
        raise NIRConversionError(f"NIR node {node_name!r}: {kind} is not a neuron node")
    shape = _neuron_shape(node_name, node)
    get = lambda field: _field(node_name, node, field, shape)  # noqa: E731
    out = {"shape": shape}
    if isinstance(node, (nir.LIF, nir.IF, nir.CubaLIF)):
        threshold = get("v_threshold")
        if not np.all(np.asarray(threshold) > 0.0):
            raise NIRConversionError(
                f"NIR node {node_name!r} ({kind}): v_threshold must be > 0, got "
                f"{_range(threshold)}")
        if node.v_reset is not None and not np.all(np.asarray(get("v_reset")) == 0.0):
            raise NIRConversionError(
                f"NIR node {node_name!r} ({kind}): v_reset != 0 is refused: it is exact only as a "
                f"threshold shift with the membrane starting at -v_reset, and sparsegrad's layers "
                f"start from V = 0")
        out.update(kind="lif", threshold=threshold, alpha_syn=None)
    if isinstance(node, nir.IF):
        out.update(alpha=1.0, gain=get("r"), shift=0.0)
    elif isinstance(node, (nir.LIF, nir.LI)):
        step = _step(node_name, kind, "tau", get("tau"), dt)
        r, v_leak = get("r"), get("v_leak")
        if isinstance(node, nir.LI):
            # U[t] = a U + (dt/tau)(r I + v_leak) = a U + (1 - a)(r I + v_leak)
            out.update(kind="li", alpha=1.0 - step, gain=r, shift=v_leak)
        else:
            out.update(alpha=1.0 - step, gain=_snap_one(r * step), shift=v_leak * step)
    else:  # CubaLIF
        # snnTorch's Synaptic: syn[t] = a_syn syn[t-1] + w_in (dt/tau_syn) x[t], then
        # V[t] = a V'[t-1] + r (dt/tau_mem) syn[t]. With both gains on the input (syn scaled by
        # r dt/tau_mem, which only rescales syn) that is sparsegrad's alpha_syn current.
        step_syn = _step(node_name, kind, "tau_syn", get("tau_syn"), dt)
        step_mem = _step(node_name, kind, "tau_mem", get("tau_mem"), dt)
        v_leak = get("v_leak")
        if not np.all(np.asarray(v_leak) == 0.0):
            raise NIRConversionError(
                f"NIR node {node_name!r} (CubaLIF): v_leak != 0 is refused ({_range(v_leak)}): "
                f"its constant current enters the membrane, not the synaptic current, and "
                f"sparsegrad's synaptic layers take their input only through the synapse")
        gain = _snap_one(_snap_one(get("w_in") * step_syn) * _snap_one(get("r") * step_mem))
        out.update(alpha=1.0 - step_mem, alpha_syn=_collapse(1.0 - step_syn), gain=gain,
                   shift=0.0)
    for k in ("alpha", "threshold", "alpha_syn", "gain", "shift"):
        if k in out:
            out[k] = _torch_param(_collapse(out[k]) if out[k] is not None else None)
    return out


def _per_neuron(value, shape, what: str = "a parameter") -> np.ndarray:
    """A float or a tensor (per neuron, per channel, 0-d) as a float64 array of `shape`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        return np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()
    except ValueError:
        raise NIRConversionError(f"{what} of shape {list(np.shape(value))} does not broadcast "
                                 f"to the layer's shape {list(shape)}") from None


def _lif_node(name, alpha, threshold, shape, dt: float, metadata: dict, alpha_syn=None):
    """The NIR node for a sparsegrad neuron (zero reset): LIF, IF when alpha = 1, CubaLIF with
    a synaptic current (alpha_syn). alpha / threshold / alpha_syn: floats or tensors."""
    a = _per_neuron(alpha, shape, f"layer {name!r}: alpha")
    thr = _per_neuron(threshold, shape, f"layer {name!r}: threshold")
    zeros = np.zeros(shape, dtype=np.float64)
    if alpha_syn is not None:
        a_syn = _per_neuron(alpha_syn, shape, f"layer {name!r}: alpha_syn")
        if np.any(a == 1.0) or np.any(a_syn == 1.0):
            raise NIRConversionError(
                f"layer {name!r}: alpha = 1 or alpha_syn = 1 (a membrane or synaptic current "
                f"without leak) has no NIR CubaLIF equivalent (tau = dt/(1 - alpha) would be "
                f"infinite)")
        tau_mem, tau_syn = dt / (1.0 - a), dt / (1.0 - a_syn)
        # w_in = tau_syn/dt and r = tau_mem/dt make both input gains one (snnTorch's Synaptic)
        return nir.CubaLIF(tau_syn=tau_syn, tau_mem=tau_mem, r=tau_mem / dt, v_leak=zeros,
                           v_threshold=thr, v_reset=zeros.copy(), w_in=tau_syn / dt,
                           metadata=metadata)
    if np.all(a == 1.0):
        return nir.IF(r=np.ones(shape), v_threshold=thr, v_reset=zeros, metadata=metadata)
    if np.any(a == 1.0):
        raise NIRConversionError(f"layer {name!r}: alpha = 1 for some neurons and < 1 for "
                                 f"others is neither a NIR LIF nor an IF")
    tau = dt / (1.0 - a)
    # r = tau/dt makes the input gain r*dt/tau one (snnTorch's convention); float64 so that
    # 1 - dt/tau gives alpha back to well under a float32 ulp.
    return nir.LIF(tau=tau, r=tau / dt, v_leak=zeros, v_threshold=thr, v_reset=zeros.copy(),
                   metadata=metadata)


def _li_node(name, alpha, shape, dt: float, metadata: dict):
    a = _per_neuron(alpha, shape, f"layer {name!r}: alpha")
    if not np.all(a < 1.0):
        raise NIRConversionError(f"layer {name!r} (LIReadout): alpha = 1 never integrates its "
                                 f"input ((1 - alpha) = 0) and has no NIR LI equivalent")
    return nir.LI(tau=dt / (1.0 - a), r=np.ones(shape), v_leak=np.zeros(shape),
                  metadata=metadata)


# --------------------------------------------------------------------------------------------
# Small per-step modules for NIR nodes torch has no layer for
# --------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """x * scale (NIR's Scale node), the scale broadcast over each sample's shape."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale))

    def forward(self, x):
        return x * self.scale


class GainShift(nn.Module):
    """gain * x + shift: a neuron node's input gain and v_leak current, when no layer takes them."""

    def __init__(self, gain, shift):
        super().__init__()
        self.register_buffer("gain", torch.as_tensor(gain, dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))

    def forward(self, x):
        return x * self.gain + self.shift


class NIRGraphModule(nn.Module):
    """A graph that is not a chain: each unit runs on the sum of its predecessors' outputs.

    ``units`` maps names to modules (run over [T, B, ...]); ``plan`` lists (name, [inputs]) in
    execution order, the graph input named "input"; ``outputs`` names the units whose outputs
    forward returns (one tensor for one output, else a dict by output name).
    """

    def __init__(self, units: Dict[str, nn.Module], plan: List[Tuple[str, List[str]]],
                 outputs: Dict[str, List[str]]):
        super().__init__()
        self.units = nn.ModuleDict({_key(k): m for k, m in units.items()})
        src = lambda p: p if p == "input" else _key(p)  # noqa: E731
        self.plan = [(_key(k), [src(p) for p in preds]) for k, preds in plan]
        self.outputs = {name: [src(p) for p in preds] for name, preds in outputs.items()}

    def forward(self, x):
        values = {"input": x}
        for name, preds in self.plan:
            values[name] = self.units[name](_sum(values[p] for p in preds))
        outs = {name: _sum(values[p] for p in preds) for name, preds in self.outputs.items()}
        return next(iter(outs.values())) if len(outs) == 1 else outs


def _sum(tensors):
    it = iter(tensors)
    out = next(it)
    for t in it:
        out = out + t
    return out


def _key(name: str) -> str:
    # ModuleDict keys may not contain "."; "input" is reserved for the graph input.
    key = str(name).replace(".", "_")
    return "input_" if key == "input" else key


# --------------------------------------------------------------------------------------------
# from_nir
# --------------------------------------------------------------------------------------------

def _flatten_graph(graph, prefix=""):
    """Nested NIRGraph nodes inlined: (nodes, edges) with sub-graph Input/Output as pass-through."""
    nodes: Dict[str, object] = {}
    edges: List[Tuple[str, str]] = []
    entry, exit_ = {}, {}
    for key, node in graph.nodes.items():
        name = prefix + key
        if isinstance(node, nir.NIRGraph):
            sub_nodes, sub_edges = _flatten_graph(node, name + ".")
            nodes.update(sub_nodes)
            edges += sub_edges
            ins = [name + "." + k for k, n in node.nodes.items() if isinstance(n, nir.Input)]
            outs = [name + "." + k for k, n in node.nodes.items() if isinstance(n, nir.Output)]
            if len(ins) != 1 or len(outs) != 1:
                raise NIRConversionError(f"NIR sub-graph {name!r} must have one Input and one "
                                         f"Output node, has {len(ins)} and {len(outs)}")
            for k in (ins[0], outs[0]):
                nodes[k] = _PASS
            entry[name], exit_[name] = ins[0], outs[0]
        else:
            nodes[name] = node
    for src, dst in graph.edges:
        src, dst = prefix + src, prefix + dst
        edges.append((exit_.get(src, src), entry.get(dst, dst)))
    return nodes, edges


_PASS = object()  # a sub-graph's Input / Output: a wire, removed before building


def _build_nodes(graph):
    nodes, edges = _flatten_graph(graph)
    for a, b in edges:
        for k in (a, b):
            if k not in nodes:
                raise NIRConversionError(f"NIR edge ({a!r}, {b!r}) names a node {k!r} the graph "
                                         f"does not have")
    # Remove wires (sub-graph Input/Output, Identity nodes): connect their inputs to their outputs.
    for k in [k for k, n in nodes.items() if n is _PASS or isinstance(n, _IDENTITY)]:
        ins = [a for a, b in edges if b == k]
        outs = [b for a, b in edges if a == k]
        edges = [e for e in edges if k not in e] + [(a, b) for a in ins for b in outs]
        del nodes[k]
    seen = set()
    edges = [e for e in edges if not (e in seen or seen.add(e))]
    return nodes, edges


_NEURONS = (nir.LIF, nir.IF, nir.CubaLIF, nir.LI)
_DENSE = (nir.Affine, nir.Linear)


def _dense_params(name, node):
    w = torch.as_tensor(np.asarray(node.weight), dtype=torch.float32)
    if w.dim() != 2:
        raise NIRConversionError(f"NIR node {name!r} ({type(node).__name__}): weight must be 2-D "
                                 f"[out, in], got shape {tuple(w.shape)}")
    b = None
    if isinstance(node, nir.Affine) and node.bias is not None:
        b = torch.as_tensor(np.asarray(node.bias), dtype=torch.float32).reshape(-1)
        if b.numel() != w.shape[0]:
            raise NIRConversionError(f"NIR node {name!r} (Affine): bias has {b.numel()} entries "
                                     f"for {w.shape[0]} outputs")
    return w, b


def _pair(name, field, value):
    if isinstance(value, str):
        return value
    arr = np.asarray(value).astype(np.int64).reshape(-1)
    if arr.size == 1:
        return (int(arr[0]), int(arr[0]))
    if arr.size != 2:
        raise NIRConversionError(
            f"NIR node {name!r}: {field} must be one or two ints, got {value!r}")
    return (int(arr[0]), int(arr[1]))


def _layer_module(name, node) -> nn.Module:
    """The per-step torch layer for a NIR node that is not a neuron, applied over time."""
    if isinstance(node, _DENSE):
        w, b = _dense_params(name, node)
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
    elif isinstance(node, nir.Scale):
        layer = Scale(torch.as_tensor(np.asarray(node.scale), dtype=torch.float32))
    elif isinstance(node, nir.Flatten):
        # NIR's dims exclude the batch dimension; TimeDistributed hands the layer [T*B, ...].
        shift = lambda d: d + 1 if d >= 0 else d  # noqa: E731
        layer = nn.Flatten(shift(int(node.start_dim)), shift(int(node.end_dim)))
    elif isinstance(node, nir.Conv2d):
        w = torch.as_tensor(np.asarray(node.weight), dtype=torch.float32)
        padding = _pair(name, "padding", node.padding)
        stride = _pair(name, "stride", node.stride)
        if padding == "same" and stride != (1, 1):
            raise NIRConversionError(f"NIR node {name!r} (Conv2d): padding='same' with stride "
                                     f"{stride} is not defined (torch and NIR need stride 1)")
        groups = int(node.groups)
        bias = node.bias is not None
        layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                          padding=padding, dilation=_pair(name, "dilation", node.dilation),
                          groups=groups, bias=bias)
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias:
                layer.bias.copy_(torch.as_tensor(np.asarray(node.bias), dtype=torch.float32)
                                 .reshape(-1))
    elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
        kernel = _pair(name, "kernel_size", node.kernel_size)
        stride = _pair(name, "stride", node.stride)
        padding = _pair(name, "padding", node.padding)
        # divisor 1 makes avg_pool2d a sum pool (window sums, no division and multiplication).
        layer = nn.AvgPool2d(kernel, stride, padding, divisor_override=1
                             if isinstance(node, nir.SumPool2d) else None)
    else:
        raise NIRConversionError(f"NIR node {name!r}: {type(node).__name__} nodes are not "
                                 f"supported by sparsegrad.from_nir")
    return sg_nn.TimeDistributed(layer)


def _meta(node) -> dict:
    meta = getattr(node, "metadata", None) or {}
    out = meta.get(_META_KEY, {}) if isinstance(meta, dict) else {}
    clean = {}
    for k, v in (out.items() if isinstance(out, dict) else ()):
        if isinstance(v, np.ndarray):
            v = v.item() if v.size == 1 else v
        if isinstance(v, bytes):
            v = v.decode()
        clean[k] = v.item() if isinstance(v, np.generic) else v
    return clean


def from_nir(graph_or_path, dt: float = 1e-4, *, surrogate: str = NIR_DEFAULTS["surrogate"],
             slope: float = NIR_DEFAULTS["slope"], b_th: float = NIR_DEFAULTS["b_th"],
             backward: str = NIR_DEFAULTS["backward"], use_metadata: bool = True) -> nn.Module:
    """A sparsegrad model computing what a NIR graph means, over [T, B, ...] inputs.

    ``graph_or_path``: a nir.NIRGraph or the path of a file nir.write wrote. ``dt``: the Euler
    step of the discretisation (docs/nir.md): snnTorch's exports use 1e-4 (the default), Norse's
    1e-3. NIR carries no training properties, so every spiking layer gets ``surrogate``,
    ``slope``, ``b_th`` and ``backward`` (by default fast_sigmoid, slope 100, b_th 0.2, sparse:
    sparsegrad's defaults) and NIR's reset to v_reset = 0 (reset="zero"); with use_metadata=True,
    the properties to_nir(..., metadata=True) stored in a node override these for that node.

    A chain of nodes becomes a sparsegrad.nn.TimeSequential; an Affine / Linear feeding one
    neuron node alone is fused into it (nn.LIF, or nn.LIReadout(reduce="none") for LI), a LIF
    whose output returns into itself through an Affine / Linear becomes nn.RLIF. A CubaLIF is an
    nn.LIF / nn.LIFNeuron with alpha_syn. A parameter that differs across a node's neurons
    becomes a float32 tensor buffer of the layer (not learnable: NIR does not say), one that is
    the same for all a float. Other graphs
    (fan-out, skip connections) become a NIRGraphModule that sums each node's inputs.
    Raises NIRConversionError naming the node for anything it cannot run exactly.
    """
    if isinstance(graph_or_path, nir.NIRNode):
        graph = graph_or_path
    else:
        # (no type check: nir 1.0.8 infers a grouped Conv2d's input channels wrongly)
        graph = nir.read(graph_or_path, type_check=False)
    if not isinstance(graph, nir.NIRGraph):
        graph = nir.NIRGraph.from_list(graph)
    _check_dt(dt)
    dt = float(dt)
    props = {"surrogate": surrogate, "slope": float(slope), "b_th": float(b_th),
             "backward": backward}
    nodes, edges = _build_nodes(graph)
    inputs = [k for k, n in nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1:
        raise NIRConversionError(f"the graph must have exactly one Input node, has {inputs}")
    if not outputs:
        raise NIRConversionError("the graph has no Output node")
    preds = {k: [a for a, b in edges if b == k] for k in nodes}
    succs = {k: [b for a, b in edges if a == k] for k in nodes}

    # Recurrent pairs: a neuron N and a dense node D with N -> D -> N and nothing else on D.
    recurrent: Dict[str, str] = {}
    for d, node in nodes.items():
        if isinstance(node, _DENSE) and len(preds[d]) == 1 and succs[d] == preds[d]:
            n = preds[d][0]
            if isinstance(nodes[n], _NEURONS):
                if isinstance(nodes[n], nir.LI):
                    raise NIRConversionError(f"NIR node {n!r} (LI) with a recurrent connection "
                                             f"through {d!r} is not supported")
                if n in recurrent:
                    raise NIRConversionError(f"NIR node {n!r} has two recurrent connections "
                                             f"({recurrent[n]!r}, {d!r})")
                recurrent[n] = d
    absorbed = set(recurrent.values())

    # Units: every remaining node except Input/Output, dense nodes fused into the neuron they feed.
    units: Dict[str, nn.Module] = {}
    unit_preds: Dict[str, List[str]] = {}
    for k, node in nodes.items():
        if isinstance(node, nir.Input) or isinstance(node, nir.Output) or k in absorbed:
            continue
        if isinstance(node, _NEURONS):
            ff = [p for p in preds[k] if p != recurrent.get(k)]
            fused = None
            if (len(ff) == 1 and isinstance(nodes[ff[0]], _DENSE) and succs[ff[0]] == [k]):
                fused = ff[0]
                absorbed.add(fused)
            units[k] = _neuron_module(k, node, nodes, fused, recurrent.get(k), dt, props,
                                      _meta(node) if use_metadata else {})
            unit_preds[k] = preds[fused] if fused is not None else ff
        else:
            units[k] = _layer_module(k, node)
            unit_preds[k] = preds[k]
    for k in list(units):
        if k in absorbed:  # a dense node met before the neuron that fused it
            del units[k], unit_preds[k]
    # Unit predecessors skip fused dense nodes already (they are replaced by their inputs).
    inp = inputs[0]
    out_preds = {o: preds[o] for o in outputs}
    for o, ps in out_preds.items():
        if not ps:
            raise NIRConversionError(f"NIR Output node {o!r} has no incoming edge")

    # Execution order (Kahn); a cycle that is not a recognised recurrent pair is refused.
    order, done = [], {inp}
    pending = dict(unit_preds)
    while pending:
        ready = [k for k, ps in pending.items() if all(p in done for p in ps)]
        if not ready:
            raise NIRConversionError(
                f"the graph has a cycle sparsegrad cannot run through node(s) {sorted(pending)}: "
                f"only a LIF / IF whose output returns into it through one Affine / Linear is "
                f"supported (as nn.RLIF)")
        for k in ready:
            for p in pending[k]:
                if p not in units and p != inp:
                    raise NIRConversionError(f"NIR node {k!r} takes input from {p!r}, which is "
                                             f"not a node sparsegrad can run")
            order.append(k)
            done.add(k)
            del pending[k]
    for o, ps in out_preds.items():
        for p in ps:
            if p not in units and p != inp:
                raise NIRConversionError(f"NIR Output {o!r} reads {p!r}, which is fused into a "
                                         f"neuron or cannot run")
    _log.info("sparsegrad.from_nir: dt=%g, spiking layers get reset='zero', surrogate=%r, "
              "slope=%g, b_th=%g, backward=%r (NIR carries none of these)%s", dt, surrogate,
              float(slope), float(b_th), backward,
              "; node metadata['sparsegrad'] overrides them" if use_metadata else "")
    chain = (len(outputs) == 1 and all(len(unit_preds[k]) == 1 for k in order)
             and [unit_preds[k][0] for k in order] == [inp] + order[:-1]
             and out_preds[outputs[0]] == [order[-1] if order else inp])
    if chain:
        return sg_nn.TimeSequential(OrderedDict((_key(k), units[k]) for k in order))
    rename = lambda p: "input" if p == inp else p  # noqa: E731
    plan = [(k, [rename(p) for p in unit_preds[k]]) for k in order]
    return NIRGraphModule({k: units[k] for k in order}, plan,
                          {o: [rename(p) for p in ps] for o, ps in out_preds.items()})


def _neuron_module(name, node, nodes, fused, rec, dt, props, meta) -> nn.Module:
    p = neuron_params(name, node, dt)
    gain, shift = p["gain"], p["shift"]
    size = int(np.prod(p["shape"])) if p["shape"] else None
    kind = type(node).__name__

    def dense(d):
        """The fused dense node's (W, b), its outputs checked against the neuron's size."""
        w, b = _dense_params(d, nodes[d])
        if size is not None and w.shape[0] != size:
            raise NIRConversionError(f"NIR node {d!r} has {w.shape[0]} outputs but the neuron "
                                     f"node {name!r} ({kind}) it feeds has shape {p['shape']}")
        return w, b

    def row(value):
        """A fused layer's parameter: a float, or a per-neuron tensor as [N_out]."""
        return value.reshape(-1) if isinstance(value, torch.Tensor) else value

    if p["kind"] == "li":
        if fused is not None:
            w, b = dense(fused)
        else:
            if size is None:
                raise NIRConversionError(f"NIR node {name!r} (LI): cannot tell its size")
            w, b = torch.eye(size), None
        if len(p["shape"]) > 1:
            raise NIRConversionError(f"NIR node {name!r} (LI): only 1-D LI layers map to "
                                     f"nn.LIReadout, got shape {p['shape']}")
        w, b = _gain_shift(w, b, gain, shift)
        reduce = meta.get("reduce", "none")
        mod = sg_nn.LIReadout(w.shape[1], w.shape[0], bias=b is not None, alpha=row(p["alpha"]),
                              reduce=reduce)
        _set_linear(mod, w, b)
        return mod
    kw = dict(props)
    for k in ("surrogate", "slope", "b_th", "backward", "reset"):
        if k in meta:
            kw[k] = meta[k]
    kw.setdefault("reset", "zero")
    args = dict(alpha=p["alpha"], threshold=p["threshold"], **kw)
    if p["alpha_syn"] is not None:
        args["alpha_syn"] = p["alpha_syn"]
    if rec is not None:
        # nn.RLIF takes per-neuron alpha / threshold / alpha_syn ([N_out]); the recurrent input
        # enters the synaptic current of a CubaLIF as its other inputs do
        for k in ("alpha", "threshold", "alpha_syn"):
            if k in args:
                args[k] = row(args[k])
        if fused is not None:
            w, b = dense(fused)
        else:
            if size is None or len(p["shape"]) != 1:
                raise NIRConversionError(f"NIR node {name!r}: a recurrent neuron layer must be "
                                         f"1-D, got shape {p['shape']}")
            w, b = torch.eye(size), None  # x @ I.T is exact
        r, rb = _dense_params(rec, nodes[rec])
        if r.shape[0] != r.shape[1] or r.shape[0] != w.shape[0]:
            raise NIRConversionError(f"NIR node {rec!r}: a recurrent weight must be "
                                     f"[{w.shape[0]}, {w.shape[0]}], got {tuple(r.shape)}")
        w, b = _gain_shift(w, b, gain, shift)
        r, rb = _gain_shift(r, rb, gain, 0.0)
        mod = sg_nn.RLIF(w.shape[1], w.shape[0], bias=b is not None, rec_bias=rb is not None,
                         **args)
        _set_linear(mod, w, b)
        with torch.no_grad():
            mod.rec_weight.copy_(r)
            if rb is not None:
                mod.rec_bias.copy_(rb)
        return mod
    if fused is not None:
        w, b = _gain_shift(*dense(fused), gain, shift)
        for k in ("alpha", "threshold", "alpha_syn"):
            if k in args:
                args[k] = row(args[k])
        mod = sg_nn.LIF(w.shape[1], w.shape[0], bias=b is not None, **args)
        _set_linear(mod, w, b)
        return mod
    neuron = sg_nn.LIFNeuron(**args)
    if _equals(gain, 1.0) and _equals(shift, 0.0):
        return neuron
    return sg_nn.TimeSequential(OrderedDict(
        [("input_gain", sg_nn.TimeDistributed(GainShift(gain, shift))), ("neuron", neuron)]))


def _equals(value, const) -> bool:
    return bool(torch.all(torch.as_tensor(value) == const))


def _gain_shift(w, b, gain, shift):
    """gain*(W x + b) + shift as a new (W, b); untouched when gain = 1 and shift = 0 (exact).

    gain and shift are floats or per-output-neuron tensors (neuron_params')."""
    if not _equals(gain, 1.0):
        g = torch.as_tensor(gain, dtype=w.dtype).reshape(-1)
        w = w * g.reshape(-1, 1)
        b = b * g if b is not None else None
    if not _equals(shift, 0.0):
        c = torch.as_tensor(shift, dtype=w.dtype).reshape(-1)
        b = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)) + c
    return w, b


def _set_linear(mod, w, b):
    with torch.no_grad():
        mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)


# --------------------------------------------------------------------------------------------
# to_nir
# --------------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _clamped(value):
    # the value the module runs: its forward clamps a tensor alpha / alpha_syn to [0, 1]
    return sg_nn.LIFNeuron._clamped(value)


def _neuron_node(name, module, shape, dt, meta):
    """LIF / IF / CubaLIF for an nn.LIF or nn.LIFNeuron (float or tensor parameters)."""
    return _lif_node(name, _clamped(module.alpha), module.threshold, shape, dt, meta,
                     alpha_syn=_clamped(getattr(module, "alpha_syn", None)))


class _Exporter:
    def __init__(self, dt: float, metadata: bool, shapes: dict):
        self.dt = dt
        self.metadata = metadata
        self.shapes = shapes  # module -> per-sample input shape
        self.nodes: Dict[str, object] = {}
        self.edges: List[Tuple[str, str]] = []

    def _unexpressible(self, name, module, found: dict) -> dict:
        """The properties of a spiking layer NIR cannot carry: refused, or kept as metadata."""
        bad = {k: v for k, v in found.items()
               if (k == "reset" and v != "zero") or (k in NIR_DEFAULTS and v != NIR_DEFAULTS[k])
               or (k == "reduce" and v != "none")}
        if not bad:
            return {}
        if not self.metadata:
            what = ", ".join(f"{k}={v!r}" for k, v in bad.items())
            raise NIRConversionError(
                f"layer {name!r} ({type(module).__name__}): {what} cannot be expressed in NIR "
                f"(NIR's neurons reset to v_reset; NIR has no surrogate gradient, slope, b_th, "
                f"backward mode or reduction over time); pass metadata=True to store it in the "
                f"node's metadata (read back only by sparsegrad.from_nir; other tools will run "
                f"NIR's meaning)")
        return {_META_KEY: dict(bad)}

    def _spiking_props(self, name, module):
        if getattr(module, "batch_first", False):
            raise NIRConversionError(f"layer {name!r} ({type(module).__name__}): batch_first=True "
                                     f"is not supported; export the time-major model")
        return self._unexpressible(name, module, {
            "reset": module.reset, "surrogate": module.surrogate, "slope": module.slope,
            "b_th": module.b_th, "backward": module.backward})

    def add(self, name: str, node) -> str:
        if name in self.nodes:
            raise NIRConversionError(f"two NIR nodes named {name!r}")
        self.nodes[name] = node
        return name

    def dense(self, name, weight, bias):
        if bias is None:
            return self.add(name, nir.Linear(weight=_np(weight)))
        return self.add(name, nir.Affine(weight=_np(weight), bias=_np(bias)))

    def module(self, name: str, module: nn.Module, srcs: List[str]) -> List[str]:
        """Add `module` fed by the nodes `srcs`; returns the nodes carrying its output."""
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                srcs = self.module(f"{name}.{child_name}" if name else child_name, child, srcs)
            return srcs
        if isinstance(module, NIRGraphModule):
            values = {"input": srcs}
            for unit, preds in module.plan:
                ins = [s for p in preds for s in values[p]]
                values[unit] = self.module(f"{name}.{unit}" if name else unit,
                                           module.units[unit], ins)
            if len(module.outputs) != 1:
                raise NIRConversionError(f"layer {name or 'model'!r}: a NIRGraphModule with "
                                         f"several outputs cannot be exported as one model")
            return [s for p in next(iter(module.outputs.values())) for s in values[p]]
        if isinstance(module, sg_nn.TimeDistributed):
            if module.batch_first:
                raise NIRConversionError(f"layer {name!r} (TimeDistributed): batch_first=True is "
                                         f"not supported; export the time-major model")
            key = self.add(name, self.layer(name, module.module, self.shapes.get(module)))
        elif isinstance(module, (nn.Identity, nn.Dropout)):
            return srcs
        elif isinstance(module, sg_nn.LIF) and type(module) is sg_nn.LIF:
            meta = self._spiking_props(name, module)
            aff = self.dense(f"{name}.affine", module.weight, module.bias)
            self.edges += [(s, aff) for s in srcs]
            key = self.add(f"{name}.lif", _neuron_node(name, module, (module.out_features,),
                                                       self.dt, meta))
            self.edges.append((aff, key))
            return [key]
        elif isinstance(module, sg_nn.RLIF):
            meta = self._spiking_props(name, module)
            aff = self.dense(f"{name}.affine", module.weight, module.bias)
            self.edges += [(s, aff) for s in srcs]
            key = self.add(f"{name}.lif", _neuron_node(name, module, (module.out_features,),
                                                       self.dt, meta))
            rec = self.dense(f"{name}.w_rec", module.rec_weight, module.rec_bias)
            self.edges += [(aff, key), (key, rec), (rec, key)]
            return [key]
        elif isinstance(module, sg_nn.LIFNeuron):
            meta = self._spiking_props(name, module)
            if module.return_mem:
                raise NIRConversionError(f"layer {name!r} (LIFNeuron): return_mem=True returns "
                                         f"the membrane too; NIR's LIF outputs spikes only")
            shape = self.shapes.get(module)
            if shape is None:
                raise NIRConversionError(f"layer {name!r} (LIFNeuron) did not run on the sample")
            key = self.add(name, _neuron_node(name, module, shape, self.dt, meta))
        elif isinstance(module, sg_nn.LIReadout):
            if module.batch_first:
                raise NIRConversionError(f"layer {name!r} (LIReadout): batch_first=True is not "
                                         f"supported; export the time-major model")
            meta = self._unexpressible(name, module, {"reduce": module.reduce})
            aff = self.dense(f"{name}.affine", module.weight, module.bias)
            self.edges += [(s, aff) for s in srcs]
            key = self.add(f"{name}.li", _li_node(name, _clamped(module.alpha),
                                                  (module.out_features,), self.dt, meta))
            self.edges.append((aff, key))
            return [key]
        else:
            raise NIRConversionError(f"layer {name!r}: {type(module).__name__} has no NIR "
                                     f"equivalent in sparsegrad.to_nir")
        self.edges += [(s, key) for s in srcs]
        return [key]

    def layer(self, name, layer: nn.Module, in_shape):
        """The NIR node of a per-step torch layer (inside TimeDistributed)."""
        if isinstance(layer, nn.Linear):
            return (nir.Linear(weight=_np(layer.weight)) if layer.bias is None else
                    nir.Affine(weight=_np(layer.weight), bias=_np(layer.bias)))
        if isinstance(layer, Scale):
            return nir.Scale(scale=_np(layer.scale))
        if isinstance(layer, nn.Flatten):
            if in_shape is None:
                raise NIRConversionError(f"layer {name!r} (Flatten) did not run on the sample")
            nd = len(in_shape) + 1  # with the batch dimension
            start = layer.start_dim % nd
            end = layer.end_dim % nd
            if start == 0:
                raise NIRConversionError(f"layer {name!r} (Flatten): start_dim must not flatten "
                                         f"the batch dimension")
            return nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=start - 1,
                               end_dim=end - 1)
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise NIRConversionError(f"layer {name!r} (Conv2d): padding_mode="
                                         f"{layer.padding_mode!r} has no NIR equivalent")
            if in_shape is None:
                raise NIRConversionError(f"layer {name!r} (Conv2d) did not run on the sample")
            c_out = layer.out_channels
            bias = (_np(layer.bias) if layer.bias is not None
                    else np.zeros(c_out, dtype=np.float32))
            node = nir.Conv2d(input_shape=tuple(int(s) for s in in_shape[1:]),
                              weight=_np(layer.weight), stride=tuple(layer.stride),
                              padding=layer.padding if isinstance(layer.padding, str)
                              else tuple(layer.padding),
                              dilation=tuple(layer.dilation), groups=int(layer.groups), bias=bias)
            # nir 1.0.8 takes the input channels from weight.shape[1] (C_in / groups)
            node.input_type = {"input": np.array(in_shape)}
            return node
        if isinstance(layer, nn.AvgPool2d):
            pair = lambda v: np.array(v if isinstance(v, (tuple, list)) else (v, v))  # noqa: E731
            if layer.ceil_mode:
                raise NIRConversionError(f"layer {name!r} (AvgPool2d): ceil_mode=True has no NIR "
                                         f"equivalent")
            stride = layer.stride if layer.stride is not None else layer.kernel_size
            args = dict(kernel_size=pair(layer.kernel_size), stride=pair(stride),
                        padding=pair(layer.padding))
            if layer.divisor_override == 1:
                return nir.SumPool2d(**args)
            if layer.divisor_override is not None or (
                    not layer.count_include_pad and np.any(pair(layer.padding) != 0)):
                raise NIRConversionError(f"layer {name!r} (AvgPool2d): divisor_override / "
                                         f"count_include_pad=False have no NIR equivalent")
            return nir.AvgPool2d(**args)
        raise NIRConversionError(f"layer {name!r}: TimeDistributed({type(layer).__name__}) has "
                                 f"no NIR equivalent in sparsegrad.to_nir")


def to_nir(model: nn.Module, sample_input: torch.Tensor, dt: float = 1e-4, *,
           metadata: bool = False) -> "nir.NIRGraph":
    """The NIR graph of a sparsegrad model (time-major, [T, B, ...] input).

    Supported: nn.Sequential / TimeSequential (nested too) of sparsegrad.nn.LIF, RLIF,
    LIFNeuron, LIReadout(reduce="none") and TimeDistributed(Linear, Conv2d, Flatten, AvgPool2d,
    sum pooling), nn.Identity / Dropout (skipped), and the NIRGraphModule from_nir builds.
    ``sample_input`` [T, B, ...] runs once to record the shapes; ``dt`` is the step of the
    discretisation (docs/nir.md): alpha -> tau = dt / (1 - alpha), r = tau / dt, v_leak = v_reset
    = 0; alpha = 1 is written as an IF node, a layer with a synaptic current (alpha_syn) as a
    CubaLIF (tau_syn = dt / (1 - alpha_syn), w_in = tau_syn / dt). Tensor parameters (per
    neuron, per channel, 0-d, learnable) are written per neuron, a tensor alpha / alpha_syn as
    the layer runs it (clamped to [0, 1]); NIR does not say which are learnable.

    NIR cannot express the subtract and none resets, the surrogate, its slope, b_th, the
    backward mode or a readout's reduction over time: a layer whose value differs from what
    from_nir assumes (reset="zero", NIR_DEFAULTS, reduce="none") is refused with an error naming
    the layer and the property, unless ``metadata=True``, which writes the node anyway and stores
    the values in its metadata["sparsegrad"] (from_nir reads them back; other tools ignore them
    and run NIR's meaning).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sample_input, torch.Tensor) or sample_input.dim() < 3:
        raise ValueError(f"sample_input must be a [T, B, ...] tensor, got "
                         f"{getattr(sample_input, 'shape', type(sample_input).__name__)}")
    _check_dt(dt)
    shapes = {}

    def record(mod, args):  # returns None: the arguments pass unchanged
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(mod, tuple(args[0].shape[2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(sample_input)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    exporter = _Exporter(float(dt), bool(metadata), shapes)
    exporter.add("input", nir.Input(input_type=np.array(sample_input.shape[2:])))
    ends = exporter.module("", model, ["input"])
    out_shape = tuple(out.shape[2:]) if isinstance(out, torch.Tensor) else None
    if out_shape is None:
        raise NIRConversionError("the model's output on sample_input is not one [T, B, ...] tensor")
    exporter.add("output", nir.Output(output_type=np.array(out_shape)))
    exporter.edges += [(e, "output") for e in ends]
    return nir.NIRGraph(nodes=exporter.nodes, edges=exporter.edges)
