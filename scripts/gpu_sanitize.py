"""Call every registered sparsegrad op on small problems: both backward modes, both sparse dW
routes, every reduction, surrogate and reset, every dtype the ops accept. Run under
compute-sanitizer by scripts/gpu_check.sh (memcheck; racecheck and synccheck when a kernel uses
shared memory), so that each CUDA kernel executes at least once while the sanitizer watches.

    python scripts/gpu_sanitize.py                   # on the GPU
    python scripts/gpu_sanitize.py --device cpu      # the same calls on the CPU kernels
    python scripts/gpu_sanitize.py --trim            # only the cases that add memory coverage
    compute-sanitizer --tool memcheck python scripts/gpu_sanitize.py --trim

--trim (what gpu_check.sh runs under memcheck): surrogates change the arithmetic, not the memory
accesses, so only the default one; bfloat16 / float16 run the float32 kernels behind a
conversion, so one sparse case per op family; float64 (other kernel instantiations, 8-byte
elements) one case per op family and backward mode; float32 keeps every mode, route, reduction,
reset and dynamics, and every registered op is still called.

Cases are well-conditioned in every dtype: they test memory safety, not rounding. In a half type
a gradient beyond its range becomes inf, as in torch's own half ops (docs/cuda.md, "Known
limits"), so the half cases use a gentle surrogate slope and a weak recurrence.

It cannot rot silently: a TorchDispatchMode records every sparsegrad op that actually executes
(forward ops and the backward ops autograd calls), and the script fails (exit 2) when an op is
registered under torch.ops.sparsegrad that no case called. Add a case when you add an op.
Exit 1 when a case raised or produced non-finite values, 0 otherwise.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparsegrad  # noqa: E402
from sparsegrad import functional as sgf  # noqa: E402

NAMESPACE = "sparsegrad"
CANDIDATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DW_ROUTES = {"auto": 0, "events": 1, "active": 2}
CONV_DTYPES = (torch.float32, torch.float64)  # sparsegrad.conv takes these (see conv_pool)
SIZES = {  # (T, B, N_in, N_out); N_out not a multiple of 32, "wide" spans several blocks
    "small": dict(base=(16, 3, 48, 70), wide=(6, 2, 20, 300)),
    "tiny": dict(base=(5, 2, 9, 37), wide=(3, 1, 5, 260)),
}


class OpRecorder(TorchDispatchMode):
    """Records the sparsegrad ops that execute; optionally overrides an argument by name (the
    sparse backward's dw_route), whatever the op's signature is."""

    def __init__(self):
        super().__init__()
        self.calls = {}
        self.force = {}
        self.forced = {}  # op -> {argument: value} last applied (for the tests)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func.namespace == NAMESPACE:
            name = func.name()
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.force:
                names = [a.name for a in func._schema.arguments]
                args = list(args)
                for arg, value in self.force.items():
                    if arg in names:
                        i = names.index(arg)
                        if i < len(args):
                            args[i] = value
                        else:
                            kwargs[arg] = value
                        self.forced.setdefault(name, {})[arg] = (
                            args[i] if i < len(args) else kwargs[arg])
        return func(*args, **kwargs)


def registered_ops():
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACE + "::")}
    names |= {f"{NAMESPACE}::{n}" for n in sparsegrad.ops.registered_kernels("CPU")}
    return sorted(names)


def _kw(fn, **kw):
    """Keyword arguments fn accepts (options an older or newer API lacks are left out)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def _options(name, default):
    return tuple(getattr(sgf, name, None) or default)


class Runner:
    def __init__(self, device, size, recorder, seed=0, trim=False):
        self.device = torch.device(device)
        self.base = SIZES[size]["base"]
        self.wide = SIZES[size]["wide"]
        self.rec = recorder
        self.trim = trim
        self.gen = torch.Generator().manual_seed(seed)
        self.results = []

    # ---------------------------------------------------------------- inputs
    def rand(self, *shape, dtype, scale=1.0, requires_grad=False):
        t = (torch.randn(*shape, generator=self.gen) * scale).to(self.device, dtype)
        return t.requires_grad_(requires_grad)

    def spikes_in(self, T, B, n, dtype, rate=0.15, binary=True, requires_grad=False):
        mask = torch.rand(T, B, n, generator=self.gen) < rate
        x = mask.float() if binary else mask.float() * torch.rand(T, B, n, generator=self.gen)
        return x.to(self.device, dtype).requires_grad_(requires_grad)

    def weight(self, n_out, n_in, dtype, rate=0.15):
        scale = 2.0 / max(1.0, (rate * n_in) ** 0.5)
        return self.rand(n_out, n_in, dtype=dtype, scale=scale, requires_grad=True)

    @staticmethod
    def slope(dtype):
        """Surrogate slope: 5 in float32/64; 1 in the half types, so that no gradient nears
        float16's range (65504) through a recurrence (slope 5 of a triangle grows it to ~2e3 and
        beyond: the case would test the rounding, not the memory accesses)."""
        return 1.0 if dtype in (torch.float16, torch.bfloat16) else 5.0

    # ---------------------------------------------------------------- bookkeeping
    def run(self, name, fn, force=None):
        self.rec.force = dict(force or {})
        t0 = time.perf_counter()
        try:
            tensors = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            bad = [i for i, t in enumerate(tensors)
                   if t is not None and t.is_floating_point()
                   and not bool(torch.isfinite(t.float()).all())]
            error = f"non-finite values in output/gradient #{bad}" if bad else None
        except Exception as exc:  # collect, never stop: every case runs
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        finally:
            self.rec.force = {}
        self.results.append(dict(case=name, ok=error is None, error=error,
                                 seconds=round(time.perf_counter() - t0, 4)))
        print(f"  {'ok  ' if error is None else 'FAIL'} {name}"
              + ("" if error is None else f": {error.splitlines()[0]}"), flush=True)

    # ---------------------------------------------------------------- cases
    def lif_layer_case(self, dtype, mode, *, shape=None, binary=True, with_state=False,
                       surrogate=None, reset=None, zero_input=False):
        T, B, n_in, n_out = shape or self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype, rate=0.0 if zero_input else 0.15,
                               binary=binary, requires_grad=not binary)
            w = self.weight(n_out, n_in, dtype)
            b = self.rand(n_out, dtype=dtype, scale=0.1, requires_grad=True)
            extra = {}
            if surrogate is not None:
                extra["surrogate"] = surrogate
            if reset is not None:
                extra["reset"] = reset
            state = None
            if with_state:
                v0 = self.rand(B, n_out, dtype=dtype, scale=0.5, requires_grad=True)
                s0 = (torch.rand(B, n_out, generator=self.gen) < 0.3).to(self.device, dtype)
                state = sgf.LIFState(v0, s0)
            s, st = sparsegrad.lif_layer(x, w, b, **_kw(
                sparsegrad.lif_layer, alpha=0.9, b_th=0.4, slope=self.slope(dtype), backward=mode,
                state=state, return_state=True, **extra))
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            loss = (s * g).sum() + st.v.float().square().sum().to(dtype)
            leaves = [t for t in (x, w, b) + ((state.v,) if state else ()) if t.requires_grad]
            grads = torch.autograd.grad(loss, leaves)
            return (s, st.v) + tuple(grads)
        return fn

    def network_case(self, dtype, mode, reduce, *, surrogate=None, reset=None):
        """Two LIF layers (the second computes dx on the first's active set) and a readout."""
        T, B, n_in, n_out = self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype)
            w1, w2 = self.weight(n_out, n_in, dtype), self.weight(n_out, n_out, dtype, 0.05)
            w3 = self.weight(10, n_out, dtype, 0.05)
            b3 = self.rand(10, dtype=dtype, scale=0.1, requires_grad=True)
            extra = {k: v for k, v in (("surrogate", surrogate), ("reset", reset)) if v}
            kw = _kw(sparsegrad.lif_layer, alpha=0.9, b_th=0.4, slope=self.slope(dtype),
                     backward=mode, **extra)
            h = sparsegrad.lif_layer(sparsegrad.lif_layer(x, w1, **kw), w2, **kw)
            out = sparsegrad.li_readout(h, w3, b3, alpha=0.8, reduce=reduce)
            g = torch.randn(out.shape, generator=self.gen).to(self.device, dtype)
            grads = torch.autograd.grad((out * g).sum(), [w1, w2, w3, b3])
            return (h, out) + tuple(grads)
        return fn

    def readout_case(self, dtype, reduce):
        T, B, n_in, _ = self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype, binary=False, requires_grad=True)
            w = self.weight(7, n_in, dtype)
            b = self.rand(7, dtype=dtype, scale=0.1, requires_grad=True)
            out = sparsegrad.li_readout(x, w, b, alpha=0.8, reduce=reduce)
            g = torch.randn(out.shape, generator=self.gen).to(self.device, dtype)
            return (out,) + tuple(torch.autograd.grad((out * g).sum(), [x, w, b]))
        return fn

    def neuron_case(self, dtype, mode, surrogate=None, reset=None):
        T, B, _, _ = self.base

        def fn():
            cur = self.rand(T, B, 4, 9, dtype=dtype, scale=0.8, requires_grad=True)
            extra = {k: v for k, v in (("surrogate", surrogate), ("reset", reset)) if v}
            s = sparsegrad.lif(cur, **_kw(sparsegrad.lif, alpha=0.9, b_th=0.4,
                                          slope=self.slope(dtype), backward=mode, **extra))
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            return (s,) + tuple(torch.autograd.grad((s * g).sum(), [cur]))
        return fn

    def recurrent_case(self, dtype, mode, surrogate=None, reset=None):
        T, B, n_in, n_out = self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype)
            w = self.weight(n_out, n_in, dtype)
            r = self.weight(n_out, n_out, dtype, 0.05)
            if dtype in (torch.float16, torch.bfloat16):  # a weak recurrence: see slope()
                with torch.no_grad():
                    r.mul_(0.2)
            b = self.rand(n_out, dtype=dtype, scale=0.1, requires_grad=True)
            extra = {k: v for k, v in (("surrogate", surrogate), ("reset", reset)) if v}
            s = sparsegrad.rlif_layer(x, w, r, b, **_kw(
                sparsegrad.rlif_layer, alpha=0.9, b_th=0.4, slope=self.slope(dtype), backward=mode,
                **extra))
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            return (s,) + tuple(torch.autograd.grad((s * g).sum(), [w, r, b]))
        return fn

    def neuron_param_case(self, dtype, mode, *, syn=False, reset=None):
        """The tensor-parameter neuron op (lif_neuron_param_*): per-channel learnable alpha and
        threshold over a [T, B, 4, 9] current, optionally a learnable synaptic current."""
        T, B, _, _ = self.base

        def fn():
            cur = self.rand(T, B, 4, 9, dtype=dtype, scale=0.8, requires_grad=True)
            alpha = torch.linspace(0.7, 0.95, 4).view(4, 1).to(self.device, dtype).requires_grad_(True)
            theta = torch.linspace(0.8, 1.2, 4).view(4, 1).to(self.device, dtype).requires_grad_(True)
            leaves = [cur, alpha, theta]
            extra = {"reset": reset} if reset else {}
            if syn:
                a_syn = torch.full((), 0.6, dtype=dtype, device=self.device, requires_grad=True)
                extra["alpha_syn"] = a_syn
                leaves.append(a_syn)
            s = sparsegrad.lif(cur, alpha=alpha, threshold=theta, b_th=0.4,
                               slope=self.slope(dtype), backward=mode, **extra)
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            return (s,) + tuple(torch.autograd.grad((s * g).sum(), leaves))
        return fn

    def layer_param_case(self, dtype, mode, *, syn=False):
        """Two fused layers with per-neuron learnable alpha / threshold (and a synaptic
        current): the tensor-parameter layer path, the second layer on the first's spikes."""
        T, B, n_in, n_out = self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype)
            w1, w2 = self.weight(n_out, n_in, dtype), self.weight(n_out, n_out, dtype, 0.05)
            alpha = torch.linspace(0.8, 0.95, n_out).to(self.device, dtype).requires_grad_(True)
            theta = torch.linspace(0.9, 1.1, n_out).to(self.device, dtype).requires_grad_(True)
            leaves = [w1, w2, alpha, theta]
            kw = dict(alpha=alpha, threshold=theta, b_th=0.4, slope=self.slope(dtype), backward=mode)
            if syn:
                kw["alpha_syn"] = torch.full((n_out,), 0.5, dtype=dtype, device=self.device,
                                             requires_grad=True)
                leaves.append(kw["alpha_syn"])
            h = sparsegrad.lif_layer(sparsegrad.lif_layer(x, w1, **kw), w2, **kw)
            g = torch.randn(h.shape, generator=self.gen).to(self.device, dtype)
            return (h,) + tuple(torch.autograd.grad((h * g).sum(), leaves))
        return fn

    def recurrent_param_case(self, dtype, mode, *, syn=False, reset=None):
        """The recurrent layer with per-neuron learnable alpha / threshold (rlif_param_*), and
        optionally a learnable synaptic current (sparsegrad.ops.RLIF_PARAM_OPS)."""
        T, B, n_in, n_out = self.base

        def fn():
            x = self.spikes_in(T, B, n_in, dtype)
            w = self.weight(n_out, n_in, dtype)
            r = self.weight(n_out, n_out, dtype, 0.05)
            alpha = torch.linspace(0.8, 0.95, n_out).to(self.device, dtype).requires_grad_(True)
            theta = torch.linspace(0.9, 1.1, n_out).to(self.device, dtype).requires_grad_(True)
            leaves = [w, r, alpha, theta]
            kw = dict(alpha=alpha, threshold=theta, b_th=0.4, slope=self.slope(dtype), backward=mode)
            if reset:
                kw["reset"] = reset
            if syn:
                kw["alpha_syn"] = torch.full((n_out,), 0.5, dtype=dtype, device=self.device,
                                             requires_grad=True)
                leaves.append(kw["alpha_syn"])
            s = sparsegrad.rlif_layer(x, w, r, **kw)
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            return (s,) + tuple(torch.autograd.grad((s * g).sum(), leaves))
        return fn

    def has_kernels(self, op: str) -> bool:
        """The op has a kernel on this device (CPU_ONLY_OPS run on the CPU only)."""
        return self.device.type == "cpu" or op not in getattr(sparsegrad.ops, "CPU_ONLY_OPS", ())

    def conv_case(self, dtype, mode, *, pool="max", position="before", data_input=False):
        """ConvLIF (sparsegrad.conv): conv -> [pool] -> LIF or conv -> LIF -> pool, on spikes
        (the events route and the bit-packed saved input) or on real-valued data."""
        from sparsegrad.nn import ConvLIF
        T, B = self.base[0] // 2, self.base[1]

        def fn():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
            layer1 = ConvLIF(2, 16, 3, padding=1, pool=pool, pool_position=position, alpha=0.9,
                             b_th=0.4, slope=self.slope(dtype), backward=mode).to(self.device, dtype)
            layer2 = ConvLIF(16, 16, 3, stride=2, padding=1, pool=None, alpha=0.9, b_th=0.4,
                             slope=self.slope(dtype), backward=mode).to(self.device, dtype)
            with torch.no_grad():
                for layer in (layer1, layer2):
                    layer.weight.mul_(3.0)
            shape = (T, B, 2, 12, 12)
            if data_input:
                x = self.rand(*shape, dtype=dtype, requires_grad=True)
            else:
                x = (torch.rand(*shape, generator=self.gen) < 0.2).to(self.device, dtype)
            h = layer2(layer1(x))
            g = torch.randn(h.shape, generator=self.gen).to(self.device, dtype)
            leaves = [layer1.weight, layer1.bias, layer2.weight, layer2.bias] + (
                [x] if data_input else [])
            return (h,) + tuple(torch.autograd.grad((h * g).sum(), leaves))
        return fn


    def spikingjelly_case(self, dtype, mode, dynamics, v_reset, detach):
        """The neuron op's SpikingJelly dynamics (sj_* kernels, the reset-gradient paths)."""
        from sparsegrad.conversion import SpikingJellyNeuron
        T, B, _, _ = self.base
        tau = {"sj_if": None, "sj_lif": 3.0, "sj_lif_decay_input": 2.0}[dynamics]

        def fn():
            cur = self.rand(T, B, 4, 9, dtype=dtype, scale=0.8, requires_grad=True)
            with torch.no_grad():
                cur.add_(0.4)
            mod = SpikingJellyNeuron(tau=tau, decay_input=dynamics == "sj_lif_decay_input",
                                     v_reset=v_reset, detach_reset=detach, surrogate="sigmoid",
                                     slope=self.slope(dtype), b_th=0.4, backward=mode)
            s = mod(cur)
            g = torch.randn(s.shape, generator=self.gen).to(self.device, dtype)
            return (s,) + tuple(torch.autograd.grad((s * g).sum(), [cur]))
        return fn


SJ_CASES = [("sj_lif_decay_input", 0.0, False), ("sj_lif", None, True), ("sj_if", 0.3, False),
            ("sj_if", None, False)]


def accepted_dtypes(requested):
    """The dtypes the ops take, probed on the CPU kernels (a rejection there is not a GPU error;
    a dtype the CPU takes must then work on the device)."""
    ok, refused = [], {}
    for dtype in requested:
        try:
            x = (torch.rand(3, 2, 5) < 0.3).to(dtype)
            w = torch.randn(4, 5).to(dtype).requires_grad_(True)
            sparsegrad.lif_layer(x, w, alpha=0.9).sum().backward()
            ok.append(dtype)
        except Exception as exc:
            refused[str(dtype).replace("torch.", "")] = f"{type(exc).__name__}: {exc}"[:200]
    return ok, refused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="limit to these dtypes (default: every one the ops accept)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    p.add_argument("--trim", action="store_true",
                   help="only the cases that add memory coverage (see the module docstring)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: --device cuda but no GPU is visible", file=sys.stderr)
        return 1
    wanted = CANDIDATE_DTYPES if args.dtypes is None else tuple(getattr(torch, d) for d in args.dtypes)
    dtypes, refused = accepted_dtypes(wanted)
    surrogates = _options("SURROGATES", ("fast_sigmoid",))
    resets = _options("RESETS", ("subtract",))
    reductions = tuple(getattr(sparsegrad.ops, "REDUCTIONS", ("max", "sum", "mean", "none")))
    print(f"gpu_sanitize: device {device}, dtypes {[str(d) for d in dtypes]} (refused by the ops: "
          f"{sorted(refused) or 'none'}), surrogates {surrogates}, resets {resets}", flush=True)

    rec = OpRecorder()
    r = Runner(device, args.size, rec, trim=args.trim)
    with rec:
        for dtype in dtypes:
            dn = str(dtype).replace("torch.", "")
            if args.trim and dtype != torch.float32:
                trimmed_cases(r, dtype, dn, resets, reductions)
                continue
            if args.trim:
                surrogates = surrogates[:1]
            for mode in ("sparse", "dense"):
                routes = ("auto", "events", "active") if mode == "sparse" else ("auto",)
                for route in routes:
                    force = {"dw_route": DW_ROUTES[route]} if route != "auto" else None
                    tag = f"{dn} {mode}" + (f" dw_route={route}" if force else "")
                    r.run(f"lif_layer {tag}", r.lif_layer_case(dtype, mode), force)
                    r.run(f"network+readout(max) {tag}", r.network_case(dtype, mode, "max"), force)
                r.run(f"lif_layer {dn} {mode} real input + initial state",
                      r.lif_layer_case(dtype, mode, binary=False, with_state=True))
                r.run(f"lif_layer {dn} {mode} wide", r.lif_layer_case(dtype, mode, shape=r.wide))
                r.run(f"lif_layer {dn} {mode} zero input",
                      r.lif_layer_case(dtype, mode, zero_input=True))
                for reduce in reductions:
                    if reduce != "max":
                        r.run(f"network+readout({reduce}) {dn} {mode}",
                              r.network_case(dtype, mode, reduce))
                for surrogate in surrogates:
                    for reset in resets:
                        if (surrogate, reset) == (surrogates[0], resets[0]):
                            continue  # the default: run above
                        r.run(f"lif_layer {dn} {mode} {surrogate}/{reset}",
                              r.lif_layer_case(dtype, mode, surrogate=surrogate, reset=reset))
                for reset in resets[1:]:  # other resets through a producer, with a state
                    r.run(f"network+readout(max) {dn} {mode} reset={reset}",
                          r.network_case(dtype, mode, "max", reset=reset))
                    r.run(f"lif_layer {dn} {mode} reset={reset} real input + initial state",
                          r.lif_layer_case(dtype, mode, binary=False, with_state=True,
                                           reset=reset))
                    if mode == "sparse":  # the events route, forced (the only one with rst_bits)
                        r.run(f"network+readout(max) {dn} {mode} reset={reset} dw_route=events",
                              r.network_case(dtype, mode, "max", reset=reset),
                              {"dw_route": DW_ROUTES["events"]})
                if hasattr(sparsegrad, "lif"):
                    for surrogate in surrogates:
                        for reset in resets:
                            r.run(f"lif (neuron) {dn} {mode} {surrogate}/{reset}",
                                  r.neuron_case(dtype, mode, surrogate, reset))
                if hasattr(sparsegrad, "rlif_layer"):
                    for surrogate in surrogates:
                        for reset in resets:
                            r.run(f"rlif_layer {dn} {mode} {surrogate}/{reset}",
                                  r.recurrent_case(dtype, mode, surrogate, reset))
                for reset in resets:
                    r.run(f"lif (neuron, tensor params) {dn} {mode} reset={reset}",
                          r.neuron_param_case(dtype, mode, reset=reset))
                r.run(f"lif (neuron, tensor params + alpha_syn) {dn} {mode}",
                      r.neuron_param_case(dtype, mode, syn=True))
                r.run(f"lif_layer x2 (tensor params) {dn} {mode}", r.layer_param_case(dtype, mode))
                r.run(f"lif_layer x2 (tensor params + alpha_syn) {dn} {mode}",
                      r.layer_param_case(dtype, mode, syn=True))
                if r.has_kernels("rlif_param_forward"):
                    for reset in resets:
                        r.run(f"rlif_layer (tensor params) {dn} {mode} reset={reset}",
                              r.recurrent_param_case(dtype, mode, reset=reset))
                    r.run(f"rlif_layer (tensor params + alpha_syn) {dn} {mode}",
                          r.recurrent_param_case(dtype, mode, syn=True))
                if dtype in CONV_DTYPES:
                    for pool, position in (("max", "before"), ("avg", "before"), ("max", "after")):
                        r.run(f"ConvLIF x2 {dn} {mode} pool={pool} {position}",
                              r.conv_case(dtype, mode, pool=pool, position=position))
                    r.run(f"ConvLIF x2 {dn} {mode} data input",
                          r.conv_case(dtype, mode, data_input=True))
                for dynamics, v_reset, detach in SJ_CASES:
                    r.run(f"spikingjelly neuron {dn} {mode} {dynamics} v_reset={v_reset} "
                          f"detach={detach}", r.spikingjelly_case(dtype, mode, dynamics, v_reset, detach))
            for reduce in reductions:
                r.run(f"li_readout {dn} {reduce} real input", r.readout_case(dtype, reduce))

    registered = registered_ops()
    # ops with a CPU kernel only (sparsegrad.ops.CPU_ONLY_OPS) run ATen on other devices
    cpu_only = ([f"{NAMESPACE}::{n}" for n in getattr(sparsegrad.ops, "CPU_ONLY_OPS", ())]
                if device.type != "cpu" else [])
    missing = [op for op in registered if op not in rec.calls and op not in cpu_only]
    failed = [c for c in r.results if not c["ok"]]
    report = dict(device=str(device), size=args.size, trim=args.trim, dtypes=[str(d) for d in dtypes],
                  dtypes_refused=refused, surrogates=list(surrogates), resets=list(resets),
                  ops_registered=registered, ops_called=rec.calls, ops_not_called=missing,
                  ops_cpu_only=cpu_only,
                  cases=len(r.results), cases_failed=len(failed), results=r.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"gpu_sanitize: {len(r.results)} cases, {len(failed)} failed; ops called: "
          + ", ".join(f"{k.split('::')[1]} x{v}" for k, v in sorted(rec.calls.items())))
    if torch.float32 not in dtypes:
        print("gpu_sanitize: ERROR: the ops refuse float32 on the CPU: "
              f"{refused.get('float32')}", file=sys.stderr)
        return 1
    if missing:
        print("gpu_sanitize: ERROR: registered ops that no case called: "
              + ", ".join(missing) + ". Add a case for them to scripts/gpu_sanitize.py.",
              file=sys.stderr)
        return 2
    return 1 if failed else 0


def trimmed_cases(r, dtype, dn, resets, reductions):
    """--trim for the dtypes other than float32: one case per op family (and backward mode for
    float64, whose kernels are their own instantiations); the half types run the float32 kernels
    behind a conversion, so their sparse cases suffice."""
    modes = ("sparse", "dense") if dtype == torch.float64 else ("sparse",)
    for mode in modes:
        r.run(f"lif_layer {dn} {mode}", r.lif_layer_case(dtype, mode))
        r.run(f"network+readout(max) {dn} {mode}", r.network_case(dtype, mode, "max"))
        r.run(f"lif (neuron) {dn} {mode}", r.neuron_case(dtype, mode))
        r.run(f"rlif_layer {dn} {mode}", r.recurrent_case(dtype, mode))
        r.run(f"spikingjelly neuron {dn} {mode}", r.spikingjelly_case(dtype, mode, *SJ_CASES[0]))
        r.run(f"lif (neuron, tensor params + alpha_syn) {dn} {mode}",
              r.neuron_param_case(dtype, mode, syn=True))
        r.run(f"lif_layer x2 (tensor params + alpha_syn) {dn} {mode}",
              r.layer_param_case(dtype, mode, syn=True))
        if r.has_kernels("rlif_param_forward"):
            r.run(f"rlif_layer (tensor params + alpha_syn) {dn} {mode}",
                  r.recurrent_param_case(dtype, mode, syn=True))
        if dtype in CONV_DTYPES:
            r.run(f"ConvLIF x2 {dn} {mode}", r.conv_case(dtype, mode))
    if dtype == torch.float64:
        for reset in resets[1:]:
            r.run(f"lif_layer {dn} sparse reset={reset} real input + initial state",
                  r.lif_layer_case(dtype, "sparse", binary=False, with_state=True, reset=reset))
            r.run(f"rlif_layer {dn} sparse reset={reset}", r.recurrent_case(dtype, "sparse", reset=reset))
        r.run(f"li_readout {dn} sum real input", r.readout_case(dtype, "sum"))


if __name__ == "__main__":
    sys.exit(main())
