"""Follow a model's own per-step forward: trace it with torch.fx and run the graph over sequences.

``sparsegrad.convert`` uses this for model classes (snnTorch's class-style tutorials, NIR- and
SpikingJelly-style nets written for one time step per call). The per-step ``forward`` is traced
with every spiking neuron (and every module that keeps state) as a leaf; the traced graph is then
run once on the whole sequence ``[T, B, ...]`` by ``SequenceForward``:

* a neuron becomes its sparsegrad sequence op (``LIFNeuron``, a fused ``LIF`` when an
  ``nn.Linear`` feeds only it, ``SpikingJellyNeuron``), or, when sparsegrad cannot compute it
  exactly, stays in place and is stepped over time with its own state;
* its state arguments are read from the graph: none (``init_hidden=True``, or no ``mem``
  argument: the neuron's own state, carried from step to step), a value re-created inside
  forward at every call (``mem = lif.init_leaky()`` / ``reset_mem()`` in the per-step forward:
  each step starts from rest, so the neuron is applied to all steps at once), or a forward input
  (the caller's loop passes the state in and out: the input is the state at t = 0);
* every other node runs over all time steps at once: layers and functions that treat samples
  independently fold time into the batch (one call on T*B samples), other functions and
  methods run under ``torch.vmap`` over time so that shape code (``x.view(batch, -1)``,
  ``x.size(0)``) reads the per-step shape; modules that are not known to treat samples
  independently (BatchNorm in training mode, unknown leaves) are stepped.

What cannot be lifted exactly raises ``ConversionError`` naming the node: a forward with its own
time loop (it cannot be traced per step, or calls a neuron more than once), Python control flow
on tensor values, a neuron state computed from other tensors.
"""
from __future__ import annotations

import importlib
import operator
import pickle
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["ConversionError", "SequenceForward", "trace_step", "convert_traced"]


class ConversionError(RuntimeError):
    """A model (or one node of its forward) that cannot be converted exactly, with the reason."""


class _Seq:
    """A value with a leading time dimension (one per-step value for every step)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


# Functions that treat samples independently when their first argument is the batch: folded.
_FOLD_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.lp_pool1d,
    F.lp_pool2d, F.linear, F.interpolate, F.pad, torch.conv1d, torch.conv2d, torch.conv3d,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
}
# Methods / functions that read a tensor's shape: evaluated on one time step's value.
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
# Methods called on a neuron at trace time that re-create its state: snnTorch's init_* / reset_*.
_STATE_INIT_PREFIXES = ("init_", "reset_")


def _is_leaf(m: nn.Module) -> bool:
    from .conversion import _is_foreign_neuron, _is_stateful
    from .nn import LIF, RLIF, LIFNeuron, LIReadout, TimeDistributed
    mod = type(m).__module__ or ""
    # a library's layer is a leaf; its blocks (a SpikingJelly ResNet block) are traced into
    library_layer = mod.startswith(("spikingjelly", "norse", "snntorch")) and \
        not any(True for _ in m.children())
    from .conversion_norse import is_sequential_state
    return (_is_foreign_neuron(m) or _is_stateful(m) or library_layer or is_sequential_state(m)
            or isinstance(m, (LIF, RLIF, LIFNeuron, LIReadout, TimeDistributed)))


class _StepTracer(fx.Tracer):
    def __init__(self, probe_steps: Optional[int] = None):
        super().__init__()
        self.probe_steps = probe_steps
        self._probed = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, qualname)

    def proxy(self, node):
        if self.probe_steps is None:
            return super().proxy(node)
        if node.op == "placeholder" and self._probed is None:
            self._probed = node
            return _ProbeProxy(node, self)
        return super().proxy(node)


class _ProbeProxy(fx.Proxy):
    """A traced value whose first input's length (x.size(0), x.shape[0], len(x)) is a given
    number: a forward looping over the input's length unrolls that many steps
    (conversion_loop.py checks that two such traces lift to the same step)."""

    def _is_probed(self) -> bool:
        return True

    def size(self, *args, **kwargs):
        if self._is_probed() and (args == (0,) or kwargs == {"dim": 0}):
            return self.tracer.probe_steps
        return self.tracer.create_proxy("call_method", "size", (self,) + args, kwargs)

    @property
    def shape(self):
        proxy = self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        return _ProbeShape(proxy, self.tracer.probe_steps) if self._is_probed() else proxy

    def __len__(self):
        if self._is_probed():
            return self.tracer.probe_steps
        return super().__len__()

    def __iter__(self):  # for x_t in x: the probed input's steps
        return iter([self[k] for k in range(self.tracer.probe_steps)])


class _ProbeShape:
    def __init__(self, proxy, steps):
        self.proxy, self.steps = proxy, steps

    def __getitem__(self, i):
        return self.steps if i == 0 else self.proxy[i]

    def __getattr__(self, name):
        return getattr(self.proxy, name)


def trace_step(model: nn.Module, probe_steps: Optional[int] = None
               ) -> Tuple[fx.Graph, Dict[int, str]]:
    """(graph of model.forward for one step, {id of a state tensor re-created in forward: path}).

    probe_steps: the first input's x.size(0) / x.shape[0] / len(x) read as this number (a
    forward looping over its input's length then unrolls that many steps).
    Raises ConversionError when forward cannot be traced for one step (e.g. a time loop over the
    input's length, or control flow on tensor values)."""
    fresh: Dict[int, str] = {}
    patched = []
    for path, m in model.named_modules():
        if not _is_leaf(m) or not (type(m).__module__ or "").startswith("snntorch"):
            continue
        for name in dir(type(m)):
            if name.startswith(_STATE_INIT_PREFIXES) and callable(getattr(type(m), name, None)):
                orig = getattr(m, name)

                def wrapper(*a, _orig=orig, _path=path, **k):
                    out = _orig(*a, **k)
                    outs = out if isinstance(out, tuple) else (out,)
                    clones = tuple(o.detach().clone() if isinstance(o, torch.Tensor) else o
                                   for o in outs)
                    for c in clones:
                        if isinstance(c, torch.Tensor):
                            fresh[id(c)] = _path
                    return clones if isinstance(out, tuple) else clones[0]

                setattr(m, name, wrapper)
                patched.append((m, name))
    try:
        graph = _StepTracer(probe_steps).trace(model)
    except Exception as exc:  # fx's TraceError, TypeError from range(Proxy), ...
        raise ConversionError(
            f"{type(model).__name__}.forward cannot be traced as one time step "
            f"({type(exc).__name__}: {exc}); a forward with its own time loop over the input, or "
            f"with Python control flow on tensor values, is not lifted") from None
    finally:
        for m, name in patched:
            delattr(m, name)
    return graph, fresh


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


# --------------------------------------------------------------------------- plan

class _Plan:
    """What SequenceForward does at each node (decided once, at conversion)."""

    def __init__(self):
        self.actions: Dict[str, tuple] = {}
        self.state_inputs: set = set()      # placeholder names that are a neuron's initial state
        # a forward with its own time loop (conversion_loop.py): its inputs are taken whole (not
        # sequences); steps = the loop's number of steps, None: the first input's length
        self.loop = False
        self.steps: Optional[int] = None


def _state_kind(arg, root, fresh, neuron_path, norse=False) -> str:
    if arg is None:
        return "fresh" if norse else "internal"
    if not isinstance(arg, fx.Node):
        return "const"
    if arg.op == "placeholder":
        return "input"
    if arg.op == "get_attr":
        value = _get_attr(root, arg.target)
        if id(value) in fresh:
            return "fresh"
        if arg.target.startswith(neuron_path + "."):
            return "internal"   # the neuron's own state buffer, passed back to it
        return "const"
    raise ConversionError(
        f"node {arg.name!r} ({arg.op} {arg.target}) is passed as the state of neuron "
        f"{neuron_path!r}: a state computed inside forward from other values is not lifted")


def _conv_pool_run(neuron: fx.Node, model: nn.Module, calls: Dict[str, int]):
    """(conv node, pool nodes, ("max" | "avg", k) or None) when the neuron's input is
    conv(x) or pool(conv(x)) -- an nn.Conv2d called once whose output, like the pool's, feeds
    nothing else; the pool an nn.MaxPool2d / nn.AvgPool2d module or F.max_pool2d / F.avg_pool2d
    that ConvLIF computes exactly (conv.pool_spec) -- else None."""
    from .conv import pool_call_spec, pool_spec

    def single_use(node):
        return isinstance(node, fx.Node) and len(node.users) == 1

    src = neuron.args[0] if neuron.args else None
    if not single_use(src):
        return None
    pool, pool_nodes = None, []
    if src.op == "call_module" and not isinstance(model.get_submodule(src.target), nn.Conv2d):
        pool = pool_spec(model.get_submodule(src.target))  # stateless: may be shared
        if pool is None:
            return None
        pool_nodes, src = [src], src.args[0] if src.args else None
    elif src.op == "call_function":
        pool = pool_call_spec(src.target, src.args[1:], src.kwargs)
        if pool is None:
            return None
        pool_nodes, src = [src], src.args[0] if src.args else None
    if not single_use(src) or src.op != "call_module" or calls[src.target] != 1 or \
            src.kwargs or len(src.args) != 1 or not isinstance(src.args[0], fx.Node):
        return None
    conv = model.get_submodule(src.target)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or \
            isinstance(conv.padding, str):
        return None
    return src, pool_nodes, pool


def _fusable_conv_neuron(module) -> bool:
    """The converted neuron can run inside ConvLIF: a time-major LIFNeuron returning spikes,
    with float parameters (a per-neuron tensor would need the conv output's layout)."""
    from .conv import _fusable_neuron

    return _fusable_neuron(module) and not isinstance(getattr(module, "alpha", 0.0), torch.Tensor) \
        and not isinstance(getattr(module, "threshold", 1.0), torch.Tensor)


def convert_traced(model: nn.Module, walk, report) -> nn.Module:
    """The converted SequenceForward of a model class (walk: conversion._Walk)."""
    from .conversion import _foldable, _is_foreign_neuron, _is_stateful, _rule_for, Unsupported

    from .conversion_loop import lift_probed, lift_time_loop
    try:
        graph, fresh = trace_step(model)
        lift = lift_time_loop(graph, model, fresh)
    except ConversionError as exc:
        # a loop over the input's length (range(x.size(0))) cannot be traced as it is
        graph, fresh, lift = lift_probed(model, exc)
    carried: Dict[str, str] = {}
    plan = _Plan()
    if lift is not None:
        graph, carried, plan.steps, plan.loop = lift.graph, lift.carried, lift.steps, True
    replacements: List[Tuple[str, nn.Module]] = []   # applied once the whole plan stands
    final_report = report
    report = type(final_report)()
    nodes = list(graph.nodes)
    calls: Dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for n in nodes:
        if n.op == "call_module" and calls[n.target] > 1 and \
                _is_stateful(model.get_submodule(n.target)):
            raise ConversionError(
                f"neuron {n.target!r} is called {calls[n.target]} times in one forward: the "
                f"forward runs its own time loop (or shares one neuron between layers), which is "
                f"not lifted")
        if n.op == "call_method" and n.args and isinstance(n.args[0], fx.Node) and \
                n.args[0].op == "get_attr" and n.target in ("item", "tolist"):
            raise ConversionError(f"node {n.name!r} reads a tensor value in Python ({n.target})")

    fused_linears = set()
    for n in nodes:
        if n.op != "call_module":
            continue
        m = model.get_submodule(n.target)
        from .conversion_norse import convert_sequential_state, is_sequential_state
        if is_sequential_state(m):
            # out, state = seq(x, state): the state list is the caller's loop's, or None (rest)
            state_args = list(n.args[1:]) + list(n.kwargs.values())
            kinds = {_state_kind(a, model, fresh, n.target, True) for a in state_args} or {"fresh"}
            if kinds == {"fresh"}:
                report.folded.append(n.target)
                report.notes.append(f"{n.target}: SequentialState called without its state, so "
                                    f"each step starts from rest: applied to all steps at once")
                plan.actions[n.name] = ("fold_neuron", n.target)
            elif kinds == {"input"}:
                plan.state_inputs.update(a.name for a in state_args)
                replacements.append((n.target, convert_sequential_state(
                    m, walk, f"{n.target}.")))
                plan.actions[n.name] = ("norse_seq", n.target)
            else:
                raise ConversionError(f"SequentialState {n.target!r} gets a state that is neither "
                                      f"None nor a forward input")
            continue
        if not _is_foreign_neuron(m):
            if _is_stateful(m):
                # not a neuron (e.g. SpikingJelly's Dropout keeping one mask for all steps):
                # exact when stepped with its state
                report.stepped.append((n.target, "keeps state between time steps: stepped with "
                                                 "its state, reset at the start of a sequence"))
                plan.actions[n.name] = ("step", n.target, "internal", ())
            else:
                plan.actions[n.name] = ("module", n.target)
            continue
        state_args = list(n.args[1:]) + list(n.kwargs.values())
        from .conversion_norse import is_norse_cell
        norse = is_norse_cell(m)  # a Norse cell called without its state starts from rest
        if n.name in carried:
            # its state carried from step to step by the forward's own loop: from rest
            # ("fresh": init_leaky() before the loop), or from a value given before the loop
            kinds = {"internal" if carried[n.name] == "fresh" else "input"}
        else:
            kinds = {_state_kind(a, model, fresh, n.target, norse) for a in state_args} or \
                {"fresh" if norse else "internal"}
        positions = list(range(1, len(n.args)))
        keys = list(n.kwargs)
        if len(kinds) > 1:
            raise ConversionError(
                f"neuron {n.target!r} gets state arguments of different kinds ({sorted(kinds)})")
        kind = kinds.pop()
        if kind == "input":
            plan.state_inputs.update(a.name for a in state_args
                                     if isinstance(a, fx.Node) and a.op == "placeholder")
        rule = _rule_for(m)
        users = list(n.users)
        returns_tuple_users = any(not (u.op == "call_function" and u.target is operator.getitem
                            and u.args[1] == 0) for u in users)
        if kind in ("fresh", "const"):
            # every step starts from the same given state: the steps are independent
            why = ("its state is re-initialised inside forward at every call "
                   "(init_*/reset_*), so each step starts from rest")
            if kind == "const":
                report.skipped.append((n.target, "gets a constant state at every step; stepped"))
                plan.actions[n.name] = ("step", n.target, "const", (positions, keys))
            else:
                report.folded.append(n.target)
                report.notes.append(f"{n.target}: applied to all steps at once: {why}")
                plan.actions[n.name] = ("fold_neuron", n.target)
            continue
        try:
            if rule is None:
                raise Unsupported(f"{type(m).__module__}.{type(m).__name__} is not a supported "
                                  f"neuron")
            spec = rule(m)
        except Unsupported as exc:
            report.skipped.append((n.target, str(exc)))
            plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
            continue
        tuple_out = spec.return_mem or spec.tuple_output
        mem_used = tuple_out and returns_tuple_users
        src = n.args[0] if n.args else None
        linear = None
        if kind == "internal" and isinstance(src, fx.Node) and src.op == "call_module" and \
                len(src.users) == 1 and type(model.get_submodule(src.target)) is nn.Linear and \
                calls[src.target] == 1 and not mem_used:
            linear = src
        if linear is not None:
            lin = model.get_submodule(linear.target)
            try:
                fused = spec.fused(lin, walk.b_th_for(spec), walk.backward)
            except Unsupported as exc:
                fused = None
                if spec.needs_linear:
                    report.skipped.append((n.target, str(exc)))
                    plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
                    continue
            if fused is not None:
                from .conversion import ConvertedPair
                replacements += [(linear.target, fused), (n.target, nn.Identity())]
                fused_linears.add(linear.name)
                plan.actions[linear.name] = ("skip",)
                src_in = linear.args[0]
                if not isinstance(src_in, fx.Node):
                    raise ConversionError(f"layer {linear.target!r} gets no per-step input")
                plan.actions[n.name] = ("fused", linear.target, src_in.name, tuple_out)
                report.converted.append(ConvertedPair(
                    linear.target, n.target, spec.kind, spec.alpha, spec.threshold, spec.slope,
                    spec.surrogate, spec.reset, type(fused).__name__, list(spec.notes),
                    list(spec.parameters)))
                continue
        if spec.needs_linear:
            reason = (f"{spec.kind} converts only directly after an nn.Linear that feeds nothing "
                      f"else, with its own state")
            report.skipped.append((n.target, reason))
            plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
            continue
        if kind == "input" and spec.factory is not None:
            report.skipped.append((n.target, f"{spec.kind} with its state passed in is stepped"))
            plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
            continue
        if spec.syn_output and kind == "input":
            report.skipped.append((n.target, f"{spec.kind} with its state (syn, mem) passed in "
                                             f"is stepped"))
            plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
            continue
        conv_run = _conv_pool_run(n, model, calls) if kind == "internal" and not mem_used \
            else None
        if conv_run is not None:
            # conv -> [pool] -> neuron, only the spikes used: one ConvLIF (sparse conv
            # backward, the input saved as bits)
            from .conv import ConvLIF
            from .conversion import ConvertedPair
            try:
                module = spec.neuron(walk.b_th_for(spec), walk.backward)
            except Unsupported:
                module = None
            if module is not None and _fusable_conv_neuron(module):
                conv_node, pool_nodes, pool = conv_run
                fused = ConvLIF.from_conv(model.get_submodule(conv_node.target), neuron=module,
                                          **({} if pool is None else dict(pool=pool[0],
                                                                         pool_kernel=pool[1])))
                replacements += [(conv_node.target, fused), (n.target, nn.Identity())]
                for skipped in [conv_node] + pool_nodes:
                    plan.actions[skipped.name] = ("skip",)
                plan.actions[n.name] = ("fused", conv_node.target, conv_node.args[0].name,
                                        tuple_out)
                report.converted.append(ConvertedPair(
                    conv_node.target, n.target, spec.kind, spec.alpha, spec.threshold,
                    spec.slope, spec.surrogate, spec.reset, "ConvLIF", list(spec.notes),
                    list(spec.parameters)))
                continue
        # a neuron whose tuple carries syn (snnTorch Synaptic: (spk, syn, mem)) converts where
        # only its spikes are used; where mem or syn is used, neuron() refuses it (stepped)
        if (tuple_out and (mem_used or not spec.syn_output)) or kind == "input":
            spec = spec.last_layer()
            spec.return_mem = True
        try:
            module = spec.neuron(walk.b_th_for(spec), walk.backward)
        except Unsupported as exc:
            report.skipped.append((n.target, str(exc)))
            plan.actions[n.name] = ("step", n.target, kind, (positions, keys))
            continue
        replacements.append((n.target, module))
        from .conversion import ConvertedPair
        report.converted.append(ConvertedPair(
            None, n.target, spec.kind, spec.alpha, spec.threshold, spec.slope, spec.surrogate,
            spec.reset, type(module).__name__, list(spec.notes),
            list(spec.parameters)))
        plan.actions[n.name] = ("seq", n.target, kind, tuple_out, spec.threshold)
    for n in nodes:
        if n.op == "call_module" and n.name not in plan.actions:
            plan.actions[n.name] = ("module", n.target)
        action = plan.actions.get(n.name)
        if n.name in carried and action[0] == "step" and action[2] == "internal":
            # stepped with the state the loop carries: fed back from step to step, starting
            # from the value before the loop (init_leaky()'s empty tensor: snnTorch's rest)
            plan.actions[n.name] = ("step", action[1], "input", action[3])
    # leaves that are not neurons: converted in place where they are themselves containers of
    # neurons (e.g. a SpikingJelly block used as a leaf) are refused rather than misread
    for n in nodes:
        if plan.actions.get(n.name, ("",))[0] == "module":
            m = model.get_submodule(n.target)
            inner = [p for p, s in m.named_modules() if p and _is_stateful(s)]
            if inner:
                report.skipped.append((n.target, "a leaf module holding neurons; stepped"))
                plan.actions[n.name] = ("step", n.target, "internal", ())
            else:
                ok, why = _foldable(m)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    report.stepped.append((n.target, "BatchNorm: stepped in training mode (it "
                                                     "normalises over one step's samples), "
                                                     "folded in eval mode"))
                elif not ok:
                    report.stepped.append((n.target, why))
                else:
                    report.folded.append(n.target)
    if lift is not None:
        report.notes.append(
            f"{type(model).__name__}.forward runs its own time loop ("
            + (f"{lift.steps} steps" if lift.steps else "over its input's length")
            + f"): the steps were checked to be one body, lifted to one step (torch.fx, "
            f"{len(nodes)} nodes) and run once over all steps; the converted model takes the "
            f"original's arguments"
            + (f" (the loop reads {', '.join(lift.time_inputs)} step by step)"
               if lift.time_inputs else " (the same input at every step)"))
    else:
        report.notes.append(f"{type(model).__name__}.forward followed (torch.fx, {len(nodes)} "
                            f"nodes): run once over the whole sequence")
    for path, new in replacements:
        _set_module(model, path, new)
    for name in ("converted", "folded", "skipped", "stepped", "notes"):
        getattr(final_report, name).extend(getattr(report, name))
    return SequenceForward(model, graph, plan)


# --------------------------------------------------------------------------- running

def _fold(fn, x: torch.Tensor, rest_args, kwargs):
    T, B = x.shape[:2]
    out = fn(x.reshape((T * B,) + tuple(x.shape[2:])), *rest_args, **kwargs)
    return pytree.tree_map(lambda o: _Seq(o.reshape((T, B) + tuple(o.shape[1:])))
                           if isinstance(o, torch.Tensor) else o, out)


def _has_seq(tree) -> bool:
    return any(isinstance(a, _Seq) for a in pytree.tree_leaves(tree, is_leaf=_is_seq))


def _is_seq(a) -> bool:
    return isinstance(a, _Seq)


def _step0(tree):
    return pytree.tree_map(lambda a: a.t[0] if isinstance(a, _Seq) else a, tree, is_leaf=_is_seq)


def _vmapped(fn, args, kwargs):
    flat, spec = pytree.tree_flatten((args, kwargs), is_leaf=_is_seq)
    idx = [i for i, a in enumerate(flat) if isinstance(a, _Seq)]

    def step(*ts):
        f = list(flat)
        for i, t in zip(idx, ts):
            f[i] = t
        a, k = pytree.tree_unflatten(f, spec)
        return fn(*a, **k)

    out = torch.vmap(step, randomness="different")(*[flat[i].t for i in idx])
    return pytree.tree_map(lambda o: _Seq(o) if isinstance(o, torch.Tensor) else o, out)


def _stepped(module, args, kwargs, kind, where, reset):
    """Call a per-step module once per time step; states fed back where the caller's loop would."""
    from .conversion import _reset_state
    flat, spec = pytree.tree_flatten((args, kwargs), is_leaf=_is_seq)
    T = next(a.t.shape[0] for a in flat if isinstance(a, _Seq))
    if reset:
        _reset_state(module)
    positions, keys = where if where else ((), ())
    a_list, k_dict = list(args), dict(kwargs)
    states = [a_list[p] for p in positions] + [k_dict[k] for k in keys]
    if kind == "input":
        # the state is given per step by the caller; t = 0 value here (not a sequence)
        states = [s.t[0] if isinstance(s, _Seq) else s for s in states]
    outs = []
    for t in range(T):
        a = [x.t[t] if isinstance(x, _Seq) else x for x in a_list]
        k = {n: (v.t[t] if isinstance(v, _Seq) else v) for n, v in k_dict.items()}
        if kind == "input":
            for j, p in enumerate(positions):
                a[p] = states[j]
            for j, key in enumerate(keys):
                k[key] = states[len(positions) + j]
        out = module(*a, **k)
        if kind == "input":
            parts = out if isinstance(out, tuple) else (out,)
            n_s = len(states)
            if len(parts) == n_s + 1:
                states = list(parts[1:])
            elif len(parts) == n_s:
                states = list(parts)
            else:
                raise ConversionError(
                    f"{type(module).__name__} returns {len(parts)} values for {n_s} state "
                    f"arguments: which output is the next state is not known")
        outs.append(out)
    # stack every tensor over time, inside tuples and state NamedTuples alike
    flats = [pytree.tree_flatten(o) for o in outs]
    spec = flats[0][1]
    leaves = [_Seq(torch.stack(parts)) if isinstance(parts[0], torch.Tensor) else parts[0]
              for parts in zip(*(f[0] for f in flats))]
    return pytree.tree_unflatten(leaves, spec)


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


class _NodeRef:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __getstate__(self):
        return self.name

    def __setstate__(self, name):
        self.name = name


class _FnRef:
    """A function named by module and name (for functions that pickle cannot find by qualname)."""

    def __init__(self, fn):
        self.module, self.name = fn.__module__, fn.__name__
        if getattr(importlib.import_module(self.module), self.name, None) is not fn:
            raise pickle.PicklingError(f"cannot pickle the function {fn!r} of a traced forward")

    def resolve(self):
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args, **kwargs):  # fx checks that a call_function target is callable
        return self.resolve()(*args, **kwargs)


class SequenceForward(nn.Module):
    """A converted model class: its own per-step forward (traced), run over whole sequences.

    Holds the model's children, parameters and buffers under their own names (state_dict keys as
    the original's). forward takes the original forward's arguments with every input a sequence
    [T, B, ...], except inputs the forward passes to a neuron as its state, which are the state at
    t = 0; it returns what the original returned, stacked over time.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, plan: _Plan):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model._parameters.items():
            self.register_parameter(name, p)
        for name, b in model._buffers.items():
            self.register_buffer(name, b, persistent=name not in
                                 model._non_persistent_buffers_set)
        self._constants = {n.target: _get_attr(model, n.target) for n in graph.nodes
                           if n.op == "get_attr" and "." not in n.target and
                           n.target not in model._parameters and n.target not in model._buffers}
        self._graph = graph
        self._plan = plan
        self.original_class = type(model).__name__

    def __getstate__(self):
        # F.max_pool2d & co. are closures (torch's boolean_dispatch): pickle them by name
        state = super().__getstate__().copy()
        nodes = []
        for n in self._graph.nodes:
            target = n.target
            if n.op == "call_function" and not _picklable(target):
                target = _FnRef(target)
            args = pytree.tree_map(lambda a: _NodeRef(a.name) if isinstance(a, fx.Node) else a,
                                   (n.args, n.kwargs))
            nodes.append((n.op, n.name, target, args))
        state["_graph"] = nodes
        return state

    def __setstate__(self, state):
        graph, env = fx.Graph(), {}
        for op, name, target, args in state["_graph"]:
            if isinstance(target, _FnRef):
                target = target.resolve()
            a, k = pytree.tree_map(lambda v: env[v.name] if isinstance(v, _NodeRef) else v, args,
                                   is_leaf=lambda v: isinstance(v, _NodeRef))
            node = graph.create_node(op, target, tuple(a), dict(k), name=name)
            if node.name != name:
                raise pickle.UnpicklingError(f"node {name!r} came back as {node.name!r}")
            env[name] = node
        state["_graph"] = graph
        super().__setstate__(state)

    def _attr(self, target: str):
        if target in self._constants:
            return self._constants[target]
        return _get_attr(self, target)

    def forward(self, *args, **kwargs):
        env: Dict[str, Any] = {}
        placeholders = [n for n in self._graph.nodes if n.op == "placeholder"]
        values = list(args)
        T = None
        for i, n in enumerate(placeholders):
            if i < len(values):
                v = values[i]
            elif n.name in kwargs or n.target in kwargs:
                v = kwargs.get(n.target, kwargs.get(n.name))
            elif n.args:
                v = n.args[0]
            else:
                raise TypeError(f"missing argument {n.target!r}")
            if self._loop and isinstance(v, torch.Tensor) and "__steps__" not in env:
                # the loop's number of steps: fixed when traced, or the first input's length
                env["__steps__"] = self._plan.steps or (v.shape[0] if v.dim() else 0)
            if n.name in self._plan.state_inputs or not isinstance(v, torch.Tensor) or \
                    self._loop:  # a forward with its own loop takes its inputs whole
                env[n.name] = v
                continue
            if v.dim() < 2 or v.shape[0] == 0:
                raise ValueError(f"{self.original_class} (converted) takes sequences [T, B, ...]; "
                                 f"argument {n.target!r} has shape {tuple(v.shape)}")
            if T is not None and v.shape[0] != T:
                raise ValueError(f"sequence inputs have different lengths ({T}, {v.shape[0]})")
            T = v.shape[0]
            env[n.name] = _Seq(v)
        for n in self._graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = pytree.tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a,
                                      n.args[0])
                return pytree.tree_map(lambda a: a.t if isinstance(a, _Seq) else a, out,
                                       is_leaf=_is_seq)
            args_, kwargs_ = pytree.tree_map(
                lambda a: env[a.name] if isinstance(a, fx.Node) else a, (n.args, n.kwargs))
            env[n.name] = self._run(n, args_, kwargs_, env)
        raise RuntimeError("graph without output")

    @property
    def _loop(self) -> bool:
        return getattr(self._plan, "loop", False)

    def _per_step(self, v, env):
        """A neuron's input: a sequence; in a lifted loop, a value that is the same at every step
        (computed from an input the loop reads whole) is that value at each of its steps."""
        if isinstance(v, _Seq) or not self._loop or not isinstance(v, torch.Tensor):
            return v
        return _Seq(v.unsqueeze(0).expand((env["__steps__"],) + tuple(v.shape)))

    def _run(self, n: fx.Node, args, kwargs, env):
        if n.op == "get_attr":
            return self._attr(n.target)
        action = self._plan.actions.get(n.name)
        if action is not None and action[0] == "skip":  # computed inside a fused layer
            return None
        if n.op == "call_module":
            if action is not None and action[0] != "module" and args:
                args = (self._per_step(args[0], env),) + tuple(args[1:])
            return self._run_module(n, action, args, kwargs, env)
        fn = n.target
        from .conversion_loop import LOOP_FUNCTIONS, last_step, step_values, time_steps
        if fn in LOOP_FUNCTIONS:
            v, *extra = args
            steps = env["__steps__"]
            if fn is time_steps:
                dim = extra[0]
                if not isinstance(v, torch.Tensor) or v.dim() <= dim or v.shape[dim] < steps:
                    raise ValueError(
                        f"{self.original_class}.forward's own time loop runs {steps} steps over "
                        f"dimension {dim} of its input, which has shape "
                        f"{tuple(getattr(v, 'shape', ()))}")
                return _Seq(v.movedim(dim, 0)[:steps])
            if fn is step_values:
                return list(v.t.unbind(0)) if isinstance(v, _Seq) else [v] * steps
            return v.t[-1] if isinstance(v, _Seq) else v
        if n.op == "call_method":
            if not _has_seq((args, kwargs)):
                return getattr(args[0], fn)(*args[1:], **kwargs)
            if fn in _SHAPE_METHODS:
                a, k = _step0((args, kwargs))
                return getattr(a[0], fn)(*a[1:], **k)
            if fn in ("item", "tolist", "__bool__"):
                raise ConversionError(f"node {n.name!r} reads a per-step tensor value in Python "
                                      f"({fn}): not lifted")
            method = fn
            return _vmapped(lambda x, *a, **k: getattr(x, method)(*a, **k), args, kwargs)
        if not _has_seq((args, kwargs)):
            return fn(*args, **kwargs)
        if fn is operator.getitem and isinstance(args[0], (tuple, list)):
            return args[0][args[1]]
        if fn is getattr and isinstance(args[0], _Seq) and args[1] in _SHAPE_ATTRS:
            return getattr(args[0].t[0], args[1])
        if fn is len and isinstance(args[0], _Seq):
            return len(args[0].t[0])
        if fn in _FOLD_FUNCTIONS and args and isinstance(args[0], _Seq) and \
                not _has_seq((args[1:], kwargs)):
            return _fold(fn, args[0].t, args[1:], kwargs)
        return _vmapped(fn, args, kwargs)

    def _run_module(self, n, action, args, kwargs, env):
        from .conversion import _foldable
        kind = action[0]
        if kind == "skip":
            return None
        if kind == "fused":
            _, path, src, tuple_out = action
            # the fused layer takes the Linear's input (evaluated earlier in the graph)
            x = self._per_step(env[src], env)
            if not isinstance(x, _Seq):
                raise ConversionError(f"layer {path!r} gets no per-step input")
            out = _Seq(self.get_submodule(path)(x.t))
            return (out, None) if tuple_out else out
        m = self.get_submodule(n.target)
        if kind == "seq":
            _, path, skind, tuple_out, threshold = action
            x = args[0]
            if not isinstance(x, _Seq):
                raise ConversionError(f"neuron {path!r} gets no per-step input")
            state = None
            if skind == "input":
                mem0 = (list(args[1:]) + list(kwargs.values()))[0]
                if isinstance(mem0, torch.Tensor) and tuple(mem0.shape) == tuple(x.t.shape[1:]):
                    mem0 = mem0.to(x.t.dtype)
                    # the converted neuron's own threshold (a float, or a tensor that may be
                    # learnable): the state S at t = -1 that snnTorch's first reset reads
                    threshold = getattr(m, "threshold", threshold)
                    state = (mem0, (mem0 > threshold).to(x.t.dtype).detach())
            out = m(x.t, state=state) if state is not None else m(x.t)
            if isinstance(out, tuple):
                return tuple(_Seq(o) for o in out)
            return (_Seq(out), None) if tuple_out else _Seq(out)
        if kind == "fold_neuron":
            x = args[0]
            T, B = x.t.shape[:2]
            rest = [a.t[0] if isinstance(a, _Seq) else a for a in args[1:]]
            out = m(x.t.reshape((T * B,) + tuple(x.t.shape[2:])), *rest, **kwargs)
            return pytree.tree_map(lambda o: _Seq(o.reshape((T, B) + tuple(o.shape[1:])))
                                   if isinstance(o, torch.Tensor) else o, out)
        if kind == "norse_seq":
            x = args[0]
            state = (list(args[1:]) + list(kwargs.values()) or [None])[0]
            out, state = m(x.t, state)
            return _Seq(out), state
        if kind == "step":
            _, path, skind, where = action
            return _stepped(m, args, kwargs, skind, where, reset=skind in ("internal", "const"))
        # a layer that is not a neuron
        if not _has_seq((args, kwargs)):
            return m(*args, **kwargs)
        bn_eval = isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
        if (_foldable(m)[0] or bn_eval) and args and isinstance(args[0], _Seq) and \
                not _has_seq((args[1:], kwargs)):
            if getattr(m, "step_mode", "s") == "m":
                return _Seq(m(args[0].t))
            return _fold(m, args[0].t, args[1:], kwargs)
        return _stepped(m, args, kwargs, "internal", None, reset=False)
