"""Lift a forward that runs its own time loop (snnTorch's tutorial style) to one step.

snnTorch's tutorials and examples write the time loop inside ``forward``::

    def forward(self, x):
        mem1 = self.lif1.init_leaky(); mem2 = self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for step in range(num_steps):
            cur1 = self.fc1(x[step])
            spk1, mem1 = self.lif1(cur1, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2); mem2_rec.append(mem2)
        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)

torch.fx unrolls such a loop (``num_steps`` is a Python int when traced): the graph holds the loop
body K times. ``lift_time_loop`` checks that it is K copies of one body that differ only where
a step should differ, and rebuilds the graph of one step, which conversion_fx then runs over
the whole sequence. Checked, node by node, for every step k >= 1 against step 0:

* the same operation on the same arguments, where an argument is a node of the same step, a
  value computed before the loop, or a constant;
* ``x[k]`` (``x[:, k]``, ...: an integer that is the step number, indexing a value from before
  the loop) reads step k of a sequence: the lifted step reads ``x`` along that dimension;
* a neuron's state argument is the neuron's own state output of step k - 1 (``mem1`` above;
  snnTorch's ``spk`` / ``syn`` / ``mem``, Norse's ``state``), and at step 0 a value from before
  the loop (``init_leaky()``: rest; or a tensor, None): the neuron carries its state over time;
* after the loop, a list of one value from every step in order (``torch.stack(spk2_rec)``,
  ``torch.cat``, the list itself) becomes that value's sequence, and a value of the last step
  (``return spk2, mem2``) the sequence's last step.

Anything else raises ``ConversionError`` naming the node: data flowing from one step to the next
outside the neurons (an accumulator ``acc = acc + spk``, a recurrent connection written in
forward), the step number used in arithmetic, a value of an earlier step used after the loop,
neurons called different numbers of times, a body that differs between steps.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .conversion_fx import ConversionError

__all__ = ["LoopLift", "lift_time_loop", "time_steps", "step_values", "last_step"]


def time_steps(x, dim: int, steps: int):
    """Marker of a lifted graph: x's steps along dim (the loop's x[step]); run by SequenceForward."""
    raise RuntimeError("time_steps is evaluated by sparsegrad.conversion_fx.SequenceForward")


def step_values(v, steps: int):
    """Marker: the list of v's per-step values (the loop's recorded list)."""
    raise RuntimeError("step_values is evaluated by sparsegrad.conversion_fx.SequenceForward")


def last_step(v, steps: int):
    """Marker: v's value at the last step (a loop variable read after the loop)."""
    raise RuntimeError("last_step is evaluated by sparsegrad.conversion_fx.SequenceForward")


LOOP_FUNCTIONS = (time_steps, step_values, last_step)


@dataclass
class LoopLift:
    """The graph of one step of a forward's own time loop."""

    graph: fx.Graph
    steps: int                                  # K, the loop's number of steps when traced
    # neuron call node (in `graph`) -> "fresh" (state from init_*()/reset_*() before the loop:
    # rest) or "value" (another value from before the loop: the state at step 0)
    carried: Dict[str, str] = field(default_factory=dict)
    time_inputs: List[str] = field(default_factory=list)   # sequences read per step (x[step])


def _state_params(m: nn.Module) -> List[str]:
    """The names of a neuron's state arguments after its input (snnTorch: mem / spk, syn, mem)."""
    try:
        params = list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return []
    return params[1:]


def _first_state_is_spike(m: nn.Module) -> bool:
    """snnTorch RLeaky / RSynaptic take their own spikes back: state arguments (spk, ...) are
    their outputs (spk, ...) in order; other neurons return (spk, *states)."""
    names = _state_params(m)
    return bool(names) and names[0] == "spk"


def lift_time_loop(graph: fx.Graph, model: nn.Module, fresh: Dict[int, str]) -> Optional[LoopLift]:
    """The one-step graph of a forward that unrolled its own time loop, None when no stateful
    module is called more than once; ConversionError when the unrolled steps are not one body."""
    from .conversion import _is_stateful
    from .conversion_fx import _get_attr

    nodes = list(graph.nodes)
    calls: Dict[str, List[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module" and _is_stateful(model.get_submodule(n.target)):
            calls.setdefault(n.target, []).append(n)
    counts = {t: len(c) for t, c in calls.items()}
    if not counts or max(counts.values()) < 2:
        return None
    if len(set(counts.values())) > 1:
        raise ConversionError(
            f"the forward calls its neurons different numbers of times "
            f"({', '.join(f'{t}: {c}' for t, c in counts.items())}): not one time loop over all "
            f"of them (a neuron shared between layers, or called outside the loop)")
    K = next(iter(counts.values()))
    core = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    pos = {n: i for i, n in enumerate(core)}
    first = min(calls.values(), key=lambda c: pos[c[0]])
    p = [pos[c] for c in first]
    L = p[1] - p[0]
    if any(b - a != L for a, b in zip(p, p[1:])):
        raise ConversionError(f"the steps of the forward's own time loop are not the same "
                              f"operations (neuron {first[0].target!r} is called at uneven "
                              f"intervals): not lifted")

    def sig(n):
        return (n.op, n.target)

    s = p[0]
    while s > 0 and all(sig(core[s - 1 + k * L]) == sig(core[s - 1]) for k in range(1, K)):
        s -= 1
    if s + K * L > len(core):
        raise ConversionError("the forward's own time loop could not be delimited: not lifted")
    where: Dict[fx.Node, Tuple[int, int]] = {}
    for k in range(K):
        for i in range(L):
            where[core[s + k * L + i]] = (k, i)
    body = core[s:s + L]

    def describe(n):
        return f"node {n.name!r} ({n.op} {n.target})"

    carried_arg: Dict[Tuple[int, int], int] = {}   # (body index, leaf) -> body index it comes from
    time_index: Dict[Tuple[int, int], None] = {}   # (body index, leaf): the step number
    for k in range(1, K):
        for i in range(L):
            a, b = body[i], core[s + k * L + i]
            if sig(a) != sig(b):
                raise ConversionError(f"step {k} of the forward's own time loop differs from "
                                      f"step 0 at {describe(b)} (step 0: {describe(a)}): "
                                      f"not lifted")
            fa, spa = _flat(a)
            fb, spb = _flat(b)
            if spa != spb:
                raise ConversionError(f"step {k} of the forward's own time loop calls "
                                      f"{describe(b)} with other arguments than step 0: not "
                                      f"lifted")
            for leaf, (la, lb) in enumerate(zip(fa, fb)):
                if isinstance(lb, fx.Node) and lb in where:
                    kb, jb = where[lb]
                    if kb == k:
                        if not (isinstance(la, fx.Node) and where.get(la) == (0, jb)):
                            raise ConversionError(f"step {k} of the loop differs from step 0 at "
                                                  f"{describe(b)}: not lifted")
                        continue
                    if kb == k - 1:
                        if isinstance(la, fx.Node) and la in where:
                            raise ConversionError(f"{describe(b)} reads {lb.name!r} of the step "
                                                  f"before, but step 0 reads a value of its own "
                                                  f"step: not lifted")
                        if carried_arg.setdefault((i, leaf), jb) != jb:
                            raise ConversionError(f"{describe(b)} reads another value of the "
                                                  f"step before at each step: not lifted")
                        continue
                    raise ConversionError(f"{describe(b)} reads {lb.name!r} of step {kb} at step "
                                          f"{k}: a value from two or more steps before is not "
                                          f"lifted")
                if isinstance(la, fx.Node) and la in where:
                    raise ConversionError(f"step {k} of the loop differs from step 0 at "
                                          f"{describe(b)}: not lifted")
                if isinstance(la, fx.Node) or isinstance(lb, fx.Node):
                    if la is lb:
                        continue
                    if isinstance(la, fx.Node) and isinstance(lb, fx.Node) and \
                            la.op == lb.op == "get_attr":
                        va, vb = _get_attr(model, la.target), _get_attr(model, lb.target)
                        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and \
                                va.shape == vb.shape and va.dtype == vb.dtype and \
                                torch.equal(va, vb) and id(va) not in fresh:
                            continue
                    raise ConversionError(f"step {k} of the loop reads another value than step 0 "
                                          f"at {describe(b)}: not lifted")
                if type(la) is int and type(lb) is int and lb - la == k:
                    if la != 0:
                        raise ConversionError(f"{describe(b)} uses the step number plus "
                                              f"{la}: only x[step] is lifted")
                    time_index[(i, leaf)] = None
                    continue
                if type(la) is not type(lb) or la != lb:
                    raise ConversionError(f"{describe(b)} uses a constant that changes from step "
                                          f"to step ({la!r} at step 0, {lb!r} at step {k}): only "
                                          f"the step number as an index, x[step], is lifted")

    # Carried values must be a neuron's own state; the step number only an index into a value
    # from before the loop.
    carried_nodes: Dict[int, str] = {}
    for (i, leaf), j in carried_arg.items():
        n = body[i]
        src = body[j]
        m = model.get_submodule(n.target) if n.op == "call_module" else None
        if m is None or not _is_stateful(m) or leaf == 0:
            raise ConversionError(
                f"{describe(n)} reads {src.name!r} of the step before: data flows from one step "
                f"to the next outside the neurons (an accumulator such as acc = acc + spk, or a "
                f"recurrent connection written in forward), which is not lifted; record the "
                f"per-step values and combine them after the loop (torch.stack(...).sum(0)), or "
                f"use a recurrent neuron (snn.RLeaky)")
        owner, index = src, None
        if src.op == "call_function" and src.target is operator.getitem and \
                isinstance(src.args[1], int):
            owner, index = src.args[0], src.args[1]
        if owner is not n or len(_flat(n)[0]) != len(n.args) + len(n.kwargs):
            raise ConversionError(f"neuron {n.target!r} gets {src.name!r} of the step before as "
                                  f"its state, which is not its own output: not lifted")
        if leaf < len(n.args):
            q = leaf - 1
        else:
            names = _state_params(m)
            key = list(n.kwargs)[leaf - len(n.args)]
            q = names.index(key) if key in names else -2
        want = q if _first_state_is_spike(m) else q + 1
        if index is None:
            index = 0
        if index != want:
            raise ConversionError(f"neuron {n.target!r} gets output {index} of its previous step "
                                  f"as state argument {q + 1}: not its own state carried over")
        carried_nodes[i] = n.target
    for (i, leaf) in time_index:
        n = body[i]
        leaves, _ = _flat(n)
        src = leaves[0]
        idx = n.args[1] if len(n.args) == 2 else None
        ok = n.op == "call_function" and n.target is operator.getitem and \
            isinstance(src, fx.Node) and src not in where
        if ok and isinstance(idx, tuple):
            dim = next((d for d, e in enumerate(idx) if type(e) is int), None)
            ok = dim is not None and leaf == 1 + dim and \
                all(e == slice(None) for e in idx[:dim])
        elif ok:
            ok = leaf == 1
        if not ok:
            raise ConversionError(f"{describe(n)} uses the step number other than as an index "
                                  f"into a value from before the loop (x[step]): not lifted")

    # Uses after the loop: every step's value in order (a recorded list), or the last step's.
    after = core[s + K * L:] + [n for n in nodes if n.op == "output"]
    for n in after:
        for leaf in _flat(n)[0]:
            if isinstance(leaf, fx.Node) and leaf in where:
                k, j = where[leaf]
                if k != K - 1:
                    lists = _step_lists(n, where, K)
                    if not any(leaf in lst for lst in lists):
                        raise ConversionError(f"{describe(n)} after the loop reads "
                                              f"{leaf.name!r} of step {k}: only a list of every "
                                              f"step's value (spk_rec) or the last step's value "
                                              f"is lifted")

    # The one-step graph.
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n.op in ("placeholder", "get_attr"):
            env[n] = new.node_copy(n, lambda a: env[a])
    cache: Dict[Tuple[str, fx.Node], fx.Node] = {}

    def marker(fn, node, *extra):
        key = (fn.__name__, node) + extra
        if key not in cache:
            cache[key] = new.call_function(fn, (env[node],) + extra + (K,))
        return cache[key]

    def after_arg(a):
        if isinstance(a, (list, tuple)) and len(a) == K and \
                all(isinstance(e, fx.Node) and where.get(e, (None,))[0] == k
                    for k, e in enumerate(a)) and len({where[e][1] for e in a}) == 1:
            return marker(step_values, body[where[a[0]][1]])
        if isinstance(a, (list, tuple)):
            return type(a)(after_arg(e) for e in a)
        if isinstance(a, dict):
            return {key: after_arg(v) for key, v in a.items()}
        if isinstance(a, slice):
            return slice(after_arg(a.start), after_arg(a.stop), after_arg(a.step))
        if isinstance(a, fx.Node):
            if a in where:
                return marker(last_step, body[where[a][1]])
            return env[a]
        return a

    for n in core[:s]:
        env[n] = new.node_copy(n, lambda a: env[a])
    time_inputs = []
    for i, n in enumerate(body):
        idx_leaf = [leaf for (bi, leaf) in time_index if bi == i]
        if idx_leaf:
            src, index = n.args[0], n.args[1]
            dim = 0 if not isinstance(index, tuple) else idx_leaf[0] - 1
            seq = new.call_function(time_steps, (env[src], dim, K))
            time_inputs.append(src.name)
            rest = index[dim + 1:] if isinstance(index, tuple) else ()
            if rest:
                seq = new.call_function(operator.getitem,
                                        (seq, (slice(None),) * dim + tuple(rest)))
            env[n] = seq
            continue
        env[n] = new.node_copy(n, lambda a: env[a])
    for n in core[s + K * L:]:
        a, k = after_arg((n.args, n.kwargs))
        env[n] = new.create_node(n.op, n.target, tuple(a), dict(k), name=n.name)
    out = next(n for n in nodes if n.op == "output")
    new.output(after_arg(out.args[0]))
    # drop what only fed the next step (the neurons' state outputs): unused getitems
    changed = True
    while changed:
        changed = False
        for n in reversed(list(new.nodes)):
            if n.op == "call_function" and n.target is operator.getitem and not n.users:
                new.erase_node(n)
                changed = True
    new.lint()
    carried = {}
    for i, target in carried_nodes.items():
        n = body[i]
        states = [a for a in list(n.args[1:]) + list(n.kwargs.values())]
        fresh_init = all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr" and
                                       id(_get_attr(model, a.target)) in fresh) for a in states)
        carried[env[n].name] = "fresh" if fresh_init else "value"
    return LoopLift(new, K, carried, sorted(set(time_inputs)))


def _flat(n: fx.Node):
    """A node's argument leaves (None and slices are leaves) and their structure."""
    return pytree.tree_flatten((n.args, n.kwargs), is_leaf=lambda a: a is None or
                               isinstance(a, slice))


def _step_lists(n: fx.Node, where, K) -> List[List[fx.Node]]:
    """The lists among n's arguments that hold one value of every step, in order."""
    found = []

    def walk(a):
        if isinstance(a, (list, tuple)):
            if len(a) == K and all(isinstance(e, fx.Node) and where.get(e, (None,))[0] == k
                                   for k, e in enumerate(a)) and len({where[e][1] for e in a}) == 1:
                found.append(list(a))
            else:
                for e in a:
                    walk(e)
        elif isinstance(a, dict):
            for v in a.values():
                walk(v)

    walk((n.args, n.kwargs))
    return found


_PROBES = (3, 4)


def _graph_key(graph: fx.Graph, model: nn.Module):
    """The graph with node names as positions and tensor constants as their shapes, for
    comparing two traces; the loop markers' step counts left out."""
    from .conversion_fx import _get_attr
    index = {n: i for i, n in enumerate(graph.nodes)}
    key = []
    for n in graph.nodes:
        args = (n.args[:-1], n.kwargs) if n.target in LOOP_FUNCTIONS else (n.args, n.kwargs)
        args = pytree.tree_map(lambda a: ("node", index[a]) if isinstance(a, fx.Node) else a,
                               args)
        target = n.target
        if n.op == "get_attr":
            value = _get_attr(model, n.target)
            if isinstance(value, torch.Tensor):
                target = ("tensor", tuple(value.shape), value.dtype)
        key.append((n.op, target, repr(args)))
    return key


def lift_probed(model: nn.Module, first_error: ConversionError):
    """(graph, fresh, LoopLift with steps None) of a forward looping over its first input's
    length (range(x.size(0)), range(x.shape[0]), len(x), for x_t in x); first_error when it is
    not one. Traced twice with that length read as 3 and 4: the two must lift to the same step,
    so the length was used only as the loop's number of steps."""
    from .conversion_fx import trace_step
    found = []
    for steps in _PROBES:
        try:
            graph, fresh = trace_step(model, probe_steps=steps)
        except ConversionError:
            raise first_error from None
        for n in reversed(list(graph.nodes)):  # x.shape read only for its length
            if n.op == "call_function" and n.target is getattr and not n.users:
                graph.erase_node(n)
        lift = lift_time_loop(graph, model, fresh)
        if lift is None or lift.steps != steps:
            raise first_error
        found.append((graph, fresh, lift))
    if _graph_key(found[0][2].graph, model) != _graph_key(found[1][2].graph, model):
        raise ConversionError(
            f"{first_error}; it loops over its input's length, but uses that length also "
            f"otherwise (the lifted steps differ with it): not lifted")
    graph, fresh, lift = found[0]
    for n in lift.graph.nodes:
        if n.target in LOOP_FUNCTIONS:
            n.args = n.args[:-1] + (None,)
    lift.steps = None
    return graph, fresh, lift
