"""No input crashes the process (issue 13): every op (LIF layer, LIF neuron, recurrent LIF layer,
readout) over shapes with each dimension 0 and 1, and
compact tensors that do not belong together passed to the ops directly.

Each case runs in a child process, so that a crash (segmentation fault, abort) fails the test
that caused it instead of killing pytest. A case passes when the op either returns outputs of the
right shapes (finite, and zero/empty gradients where nothing can flow) or raises a Python
exception with a message; it fails on a crash, a hang or wrong shapes.

BACKENDS lists the op sets the cases run on. "cpu" is torch.ops.sparsegrad on CPU tensors, "emul"
the CUDA kernels run on the CPU by the host emulation (torch.ops.sparsegrad_emul, built by
tests/test_cuda_emul.py; the Python layers always call the CPU ops, so only the raw-op groups run
there); a backend is a name in BACKEND_SETUP, whose code runs in the child before the cases and
must bind `ops` (the op namespace) and `device`.
"""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_cuda_emul import emul  # noqa: F401  (pytest fixture: the emulation build)

BACKENDS = ["cpu", "emul"]

BACKEND_SETUP = {
    "cpu": "ops = torch.ops.sparsegrad\ndevice = 'cpu'\n",
    "emul": "torch.ops.load_library(sys.argv[3])\nops = torch.ops.sparsegrad_emul\ndevice = 'cpu'\n",
}

# Every dimension of (T, B, N_in, N_out) takes 0 and 1 with the others at small sizes (3 and 2
# keep the shapes distinct), plus all-ones and all-zeros.
BASE = (3, 2, 4, 5)
SHAPES = sorted({tuple(v if k == d else BASE[k] for k in range(4)) for d in range(4) for v in (0, 1)}
                | {(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 0, 1), (0, 1, 1, 0)})

_CHILD = r"""
import itertools, json, math, sys, traceback
import torch
import sparsegrad
from sparsegrad import functional as F
torch.manual_seed(0)
__SETUP__
results = []

def case(name, fn):
    print("CASE", name, flush=True)
    try:
        fn()
        results.append((name, "ok", ""))
    except AssertionError as e:
        results.append((name, "wrong", traceback.format_exc()[-800:]))
    except Exception as e:  # an error with a message is an acceptable answer
        msg = str(e).strip()
        results.append((name, "raised" if msg else "raised-empty", type(e).__name__ + ": " + msg[:300]))
    print("DONE", name, flush=True)

def finite(*ts):
    for t in ts:
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), "non-finite output"

def problem(T, B, I, O, rate=0.4):
    g = torch.Generator().manual_seed(T * 1000 + B * 100 + I * 10 + O)
    x = (torch.rand(T, B, I, generator=g) < rate).float().to(device)
    w = (torch.randn(O, I, generator=g) * 0.8).to(device)
    b = (torch.randn(O, generator=g) * 0.3).to(device)
    return x, w, b

def lif_ops(T, B, I, O):
    x, w, b = problem(T, B, I, O)
    for sparse, reset in ((True, "subtract"), (False, "subtract"), (True, "zero"), (False, "zero")):
        def run():
            out = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, sparse,
                                  "fast_sigmoid", reset)
            spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst, stats = out
            assert tuple(spikes.shape) == (T, B, O) and tuple(v_final.shape) == (B, O)
            finite(spikes, v_final, act_sg)
            gS = torch.randn(T, B, O).to(device)
            gV = torch.randn(B, O).to(device)
            rst_bits = rst if reset == "zero" else None
            if sparse:
                assert act_cnt.numel() == B * T and act_idx.numel() == act_sg.numel()
                for prev in ((None, None), (ev_cnt, ev_idx)):
                    for route in (0, 1, 2) if rst_bits is None else (0, 1):
                        dx, dw, db, dv = ops.lif_backward_sparse(
                            gS, gV, w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, prev[0], prev[1],
                            rst_bits, 0.9, True, True, True, True, route)
                        assert tuple(dx.shape) == (T, B, I) and tuple(dw.shape) == (O, I)
                        assert tuple(db.shape) == (O,) and tuple(dv.shape) == (B, O)
                        finite(dx, dw, db, dv)
            else:
                dx, dw, db, dv = ops.lif_backward_dense(gS, gV, x, w, act_sg, rst_bits, 0.9,
                                                        True, True, True, True)
                assert tuple(dx.shape) == (T, B, I) and tuple(dw.shape) == (O, I)
                assert tuple(db.shape) == (O,) and tuple(dv.shape) == (B, O)
                finite(dx, dw, db, dv)
        case(f"lif ops {(T, B, I, O)} sparse={sparse} reset={reset}", run)

def has_kernel(name):
    # the emulation declares every schema but has kernels for the CUDA ops only
    op = getattr(ops, name, None)
    return op is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")

def rlif_ops(T, B, I, O):
    if not hasattr(ops, "rlif_forward"):
        return
    x, w, b = problem(T, B, I, O)
    r = (torch.randn(O, O, generator=torch.Generator().manual_seed(7)) * 0.3).to(device)
    for sparse, reset in ((True, "subtract"), (False, "subtract"), (True, "zero"), (False, "zero")):
        def run():
            out = ops.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, sparse,
                                   "fast_sigmoid", reset)
            spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits = out[:9]
            assert tuple(spikes.shape) == (T, B, O) and tuple(v_final.shape) == (B, O)
            finite(spikes, v_final, act_sg)
            gS = torch.randn(T, B, O).to(device)
            gV = torch.randn(B, O).to(device)
            if sparse:
                for prev in ((None, None), (ev_cnt, ev_idx)):
                    grads = ops.rlif_backward_sparse(gS, gV, w, r, None, act_cnt, act_idx, act_sg, ev_cnt,
                                                     ev_idx, ev_val, spk_bits, prev[0], prev[1], 0.9, reset,
                                                     True, True, True, True, True, False)
                    assert tuple(grads[0].shape) == (T, B, I) and tuple(grads[1].shape) == (O, I)
                    assert tuple(grads[2].shape) == (O, O)
                    finite(*[g for g in grads if g is not None])
            else:
                grads = ops.rlif_backward_dense(gS, gV, x, w, r, None, spikes, act_sg, 0.9, reset,
                                                True, True, True, True, True, False)
                assert tuple(grads[0].shape) == (T, B, I) and tuple(grads[1].shape) == (O, I)
                finite(*[g for g in grads if g is not None])
        case(f"rlif ops {(T, B, I, O)} sparse={sparse} reset={reset}", run)
    if not has_kernel("rlif_param_forward"):  # tensor parameters: CPU ops only so far
        return
    a = torch.full((O,), 0.9).to(device)
    th = torch.full((O,), 1.0).to(device)
    a_syn = torch.full((O,), 0.5).to(device)
    v0, s0, syn0 = (torch.zeros(B, O).to(device) for _ in range(3))
    for sparse, reset, syn in itertools.product((True, False), ("subtract", "zero"), (False, True)):
        def run():
            asyn, syn_init = (a_syn, syn0) if syn else (None, None)
            out = ops.rlif_param_forward(x, w, r, b, v0, s0, syn_init, None, None, a, th, asyn, 0.5,
                                         5.0, sparse, "fast_sigmoid", reset, True)
            (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
             ev_cnt, ev_idx, ev_val, spk_bits, stats) = out
            assert tuple(spikes.shape) == (T, B, O) and tuple(v_final.shape) == (B, O)
            assert tuple(syn_final.shape) == ((B, O) if syn else (0,))
            finite(spikes, v_final, syn_final, act_sg, act_p, act_q, act_u, tan_last)
            gS = torch.randn(T, B, O).to(device)
            gV = torch.randn(B, O).to(device)
            gsyn = torch.randn(B, O).to(device) if syn else None
            flags = (True,) * 6 + (syn, True)
            if sparse:
                grads = ops.rlif_param_backward_sparse(
                    gS, gV, gsyn, w, r, s0, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
                    ev_cnt, ev_idx, ev_val, spk_bits, ev_cnt, ev_idx, a, asyn, reset, *flags)
            else:
                grads = ops.rlif_param_backward_dense(
                    gS, gV, gsyn, x, w, r, s0, spikes, act_sg, act_p, act_q, act_u, tan_last, a,
                    asyn, reset, *flags)
            assert tuple(grads[0].shape) == (T, B, I) and tuple(grads[1].shape) == (O, I)
            assert tuple(grads[2].shape) == (O, O) and tuple(grads[7].shape) == (B, O)
            if syn:
                assert tuple(grads[6].shape) == (B, O) and tuple(grads[9].shape) == (B, O)
            finite(*grads)
            if T == 0:  # the final state is the initial one
                assert torch.equal(grads[4], gV) and (not syn or torch.equal(grads[6], gsyn))
        case(f"rlif_param ops {(T, B, I, O)} sparse={sparse} reset={reset} syn={syn}", run)

def neuron_ops(T, B, I, O):
    # the neuron op on currents [T, B, O] and [T, B, I] (the Python layer flattens trailing dims)
    for shape in ((T, B, O), (T, B, I)):
        current = (torch.randn(*shape, generator=torch.Generator().manual_seed(5)) * 1.5).to(device)
        for sparse, reset in itertools.product((True, False), ("subtract", "zero", "none")):
            def run():
                out = ops.lif_neuron_forward(current, None, None, 0.9, 1.0, 0.5, 5.0, sparse, "atan",
                                             reset, True)
                spikes, v_final, act_cnt, act_idx, act_sg, act_rg, rst, mem, stats = out
                assert tuple(spikes.shape) == shape and tuple(v_final.shape) == shape[1:]
                finite(spikes, v_final, act_sg, mem)
                g = torch.randn(*shape).to(device)
                gv = torch.randn(*shape[1:]).to(device)
                gc, dv = ops.lif_neuron_backward(g, gv, g, act_cnt, act_idx, act_sg, None,
                                                 rst if reset == "zero" else None, 0.9, sparse, True)
                assert tuple(gc.shape) == shape and tuple(dv.shape) == shape[1:]
                finite(gc, dv)
                if T == 0:
                    assert torch.equal(dv, gv)
            case(f"lif_neuron ops {shape} sparse={sparse} reset={reset}", run)

def readout_ops(T, B, I, O):
    x, w, b = problem(T, B, I, O)
    for reduce in ("max", "sum", "mean", "none"):
        def run():
            out, argmax_t, ev_cnt, ev_idx, ev_val = ops.li_readout_forward(x, w, b, None, None, 0.8, reduce)
            want = (T, B, O) if reduce == "none" else (B, O)
            assert tuple(out.shape) == want
            finite(out)
            g = torch.randn(*want).to(device)
            for prev in ((None, None), (ev_cnt, ev_idx)):
                dx, dw, db = ops.li_readout_backward(g, argmax_t, w, ev_cnt, ev_idx, ev_val, prev[0],
                                                     prev[1], T, 0.8, reduce, True, True, True)
                assert tuple(dx.shape) == (T, B, I) and tuple(dw.shape) == (O, I) and tuple(db.shape) == (O,)
                finite(dx, dw, db)
        case(f"readout ops {(T, B, I, O)} reduce={reduce}", run)

def layers(T, B, I, O):
    x, w, b = problem(T, B, I, O)
    for backward in ("sparse", "dense"):
        def run():
            xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
            s = sparsegrad.lif_layer(xi, wi, bi, alpha=0.9, slope=5.0, b_th=0.5, backward=backward)
            assert tuple(s.shape) == (T, B, O)
            h = sparsegrad.lif_layer(s, torch.randn(3, O).to(device), alpha=0.9, backward=backward)
            (h.sum() + s.sum()).backward()
            assert xi.grad.shape == xi.shape and wi.grad.shape == wi.shape and bi.grad.shape == bi.shape
            finite(xi.grad, wi.grad, bi.grad)
            if O == 0:  # no output neurons: nothing flows back
                assert float(xi.grad.abs().sum()) == 0.0
        case(f"lif_layer {(T, B, I, O)} backward={backward}", run)
    if hasattr(F, "rlif_layer"):
        for backward in ("sparse", "dense"):
            def run():
                xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
                ri = torch.randn(O, O).to(device).mul(0.3).requires_grad_(True)
                s = F.rlif_layer(xi, wi, ri, bi, alpha=0.9, slope=5.0, b_th=0.5, backward=backward)
                assert tuple(s.shape) == (T, B, O)
                s.sum().backward()
                assert xi.grad.shape == xi.shape and wi.grad.shape == wi.shape and ri.grad.shape == ri.shape
                finite(xi.grad, wi.grad, ri.grad, bi.grad)
            case(f"rlif_layer {(T, B, I, O)} backward={backward}", run)
            def run_params():
                xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
                ri = torch.randn(O, O).to(device).mul(0.3).requires_grad_(True)
                ai = torch.full((O,), 0.9).to(device).requires_grad_(True)
                s = F.rlif_layer(xi, wi, ri, bi, alpha=ai, threshold=torch.ones(O).to(device),
                                 alpha_syn=0.5, slope=5.0, b_th=0.5, backward=backward)
                assert tuple(s.shape) == (T, B, O)
                s.sum().backward()
                assert ai.grad.shape == ai.shape and ri.grad.shape == ri.shape
                finite(xi.grad, wi.grad, ri.grad, bi.grad, ai.grad)
            case(f"rlif_layer tensor parameters {(T, B, I, O)} backward={backward}", run_params)
    for reduce in ("max", "sum", "mean", "none"):
        def run():
            xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
            out = sparsegrad.li_readout(xi, wi, bi, alpha=0.8, reduce=reduce)
            assert tuple(out.shape) == ((T, B, O) if reduce == "none" else (B, O))
            out.sum().backward()
            assert xi.grad.shape == xi.shape and wi.grad.shape == wi.shape and bi.grad.shape == bi.shape
            finite(xi.grad, wi.grad, bi.grad)
        case(f"li_readout {(T, B, I, O)} reduce={reduce}", run)
    for backward in ("sparse", "dense"):
        def run():
            ci = torch.randn(T, B, I, O).to(device).requires_grad_(True)
            s = sparsegrad.lif(ci, alpha=0.9, b_th=0.5, surrogate="atan", slope=2.0, reset="zero",
                               backward=backward)
            assert tuple(s.shape) == (T, B, I, O)
            s.sum().backward()
            assert ci.grad.shape == ci.shape
            finite(ci.grad)
        case(f"lif {(T, B, I, O)} backward={backward}", run)
    def run_modules():
        net = torch.nn.Sequential(sparsegrad.nn.LIF(I, O), sparsegrad.nn.LIReadout(O, 2)).to(device)
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        assert tuple(out.shape) == (B, 2)
        out.sum().backward()
        finite(xi.grad, *[p.grad for p in net.parameters()])
    if I > 0 and O > 0:  # the modules' constructors require at least one feature
        case(f"modules {(T, B, I, O)}", run_modules)

def inconsistent():
    T, B, I, O = 4, 3, 6, 5
    x, w, b = problem(T, B, I, O)
    out = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 2.0, 5.0, True, "fast_sigmoid", "subtract")
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst, stats = out
    assert act_idx.numel() > 2 and ev_idx.numel() > 2
    gS = torch.randn(T, B, O).to(device)

    def bwd(**kw):
        a = dict(act_cnt=act_cnt, act_idx=act_idx, act_sg=act_sg, ev_cnt=ev_cnt, ev_idx=ev_idx,
                 ev_val=ev_val, prev_cnt=None, prev_idx=None, need_dx=True, route=0)
        a.update(kw)
        return ops.lif_backward_sparse(gS, None, w, a["act_cnt"], a["act_idx"], a["act_sg"], a["ev_cnt"],
                                       a["ev_idx"], a["ev_val"], a["prev_cnt"], a["prev_idx"], None, 0.9,
                                       a["need_dx"], True, True, False, a["route"])

    def must_raise(name, fn):
        def run():
            try:
                fn()
            except RuntimeError as e:
                assert str(e).strip(), "empty error message"
                return
            raise AssertionError("accepted an inconsistent compact tensor")
        case(name, run)

    bump = lambda c, k=0, d=1: torch.cat([c[:k], c[k:k + 1] + d, c[k + 1:]])
    nz = int(act_cnt.nonzero()[0])
    big = lambda i, v: torch.cat([i[:-1], torch.tensor([v], dtype=i.dtype, device=i.device)])
    for route in (0, 1, 2):
        must_raise(f"act counts sum > idx (route {route})", lambda: bwd(act_cnt=bump(act_cnt), route=route))
        must_raise(f"act counts sum < idx (route {route})", lambda: bwd(act_cnt=bump(act_cnt, nz, -1), route=route))
        must_raise(f"negative act count (route {route})", lambda: bwd(act_cnt=bump(bump(act_cnt, 0, -int(act_cnt[0]) - 1), 1, int(act_cnt[0]) + 1), route=route))
        must_raise(f"act idx >= N_out (route {route})", lambda: bwd(act_idx=big(act_idx, O), route=route))
        must_raise(f"act idx < 0 (route {route})", lambda: bwd(act_idx=big(act_idx, -1), route=route))
        must_raise(f"act idx huge (route {route})", lambda: bwd(act_idx=big(act_idx, 2**31 - 1), route=route))
        must_raise(f"ev counts sum > idx (route {route})", lambda: bwd(ev_cnt=bump(ev_cnt), route=route))
        must_raise(f"ev idx >= N_in (route {route})", lambda: bwd(ev_idx=big(ev_idx, I), route=route))
        must_raise(f"ev idx < 0 (route {route})", lambda: bwd(ev_idx=big(ev_idx, -5), route=route))
        must_raise(f"prev idx >= N_in (route {route})", lambda: bwd(prev_cnt=ev_cnt, prev_idx=big(ev_idx, I), route=route))
        must_raise(f"prev counts sum > idx (route {route})", lambda: bwd(prev_cnt=bump(ev_cnt), prev_idx=ev_idx, route=route))
    must_raise("act counts wrong length", lambda: bwd(act_cnt=act_cnt[:-1]))
    must_raise("act counts int64", lambda: bwd(act_cnt=act_cnt.long()))
    must_raise("act_sg shorter than act_idx", lambda: bwd(act_sg=act_sg[:-1]))
    must_raise("ev_val shorter than ev_idx", lambda: bwd(ev_val=torch.ones(ev_idx.numel() - 1).to(device)))
    over = torch.zeros(B * T, dtype=torch.int32, device=device)
    over[0] = O + 1
    must_raise("act count above N_out", lambda: bwd(act_cnt=over, act_idx=torch.zeros(O + 1, dtype=torch.int32, device=device),
                                                  act_sg=torch.ones(O + 1).to(device)))
    # the readout
    o, am, rc, ri, rv = ops.li_readout_forward(x, w, b, None, None, 0.8, "max")
    g = torch.randn(B, O).to(device)
    rb = lambda **kw: ops.li_readout_backward(g, am, w, kw.get("c", rc), kw.get("i", ri), rv, kw.get("pc"), kw.get("pi"),
                                              T, 0.8, "max", True, True, True)
    must_raise("readout ev counts sum > idx", lambda: rb(c=bump(rc)))
    must_raise("readout ev idx >= N_in", lambda: rb(i=big(ri, I)))
    must_raise("readout prev idx >= N_in", lambda: rb(pc=rc, pi=big(ri, I + 3)))
    must_raise("readout prev counts wrong length", lambda: rb(pc=rc[:-1], pi=ri))
    def argmax_out_of_range():
        bad = am.clone()
        bad[0, 0] = T + 7
        bad[-1, -1] = -3
        ops.li_readout_backward(g, bad, w, rc, ri, rv, None, None, T, 0.8, "max", True, True, True)
    case("readout argmax out of range: error or ignored", argmax_out_of_range)
    # the neuron op and the recurrent layer: the same corruptions of their CSRs
    cur = torch.randn(T, B, O).to(device) + 0.8
    nf = ops.lif_neuron_forward(cur, None, None, 0.9, 1.0, 10.0, 5.0, True)
    ncnt, nidx, nsg = nf[2], nf[3], nf[4]
    nb = lambda c=ncnt, i=nidx: ops.lif_neuron_backward(gS, None, None, c, i, nsg, None, None, 0.9, True, True)
    nb()
    must_raise("neuron act counts sum > idx", lambda: nb(c=bump(ncnt)))
    must_raise("neuron act counts sum < idx", lambda: nb(c=bump(ncnt, 0, -1)))
    must_raise("neuron negative act count", lambda: nb(c=bump(bump(ncnt, 0, -int(ncnt[0]) - 1), 1, int(ncnt[0]) + 1)))
    must_raise("neuron act idx >= N", lambda: nb(i=big(nidx, O)))
    must_raise("neuron act idx < 0", lambda: nb(i=big(nidx, -1)))
    must_raise("neuron act idx huge", lambda: nb(i=big(nidx, 2**31 - 1)))
    r = (torch.randn(O, O) * 0.3).to(device)
    rf = ops.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 10.0, 5.0, True, "fast_sigmoid", "subtract")
    rcnt, ridx, rsg, recnt, reidx, reval, rbits = rf[2:9]
    def rb(c=rcnt, i=ridx, ec=recnt, ei=reidx, pc=None, pi=None):
        return ops.rlif_backward_sparse(gS, None, w, r, None, c, i, rsg, ec, ei, reval, rbits, pc, pi, 0.9,
                                        "subtract", True, True, True, True, True, True)
    rb()
    must_raise("rlif act counts sum > idx", lambda: rb(c=bump(rcnt)))
    must_raise("rlif negative act count", lambda: rb(c=bump(bump(rcnt, 0, -int(rcnt[0]) - 1), 1, int(rcnt[0]) + 1)))
    must_raise("rlif act idx >= N_out", lambda: rb(i=big(ridx, O)))
    must_raise("rlif act idx huge", lambda: rb(i=big(ridx, 2**31 - 1)))
    must_raise("rlif ev counts sum > idx", lambda: rb(ec=bump(recnt)))
    must_raise("rlif ev idx >= N_in", lambda: rb(ei=big(reidx, I)))
    must_raise("rlif ev idx < 0", lambda: rb(ei=big(reidx, -5)))
    must_raise("rlif prev idx >= N_in", lambda: rb(pc=recnt, pi=big(reidx, I)))
    must_raise("rlif prev counts sum > idx", lambda: rb(pc=bump(recnt), pi=reidx))
    if not has_kernel("rlif_param_forward"):
        return
    a, th = torch.full((O,), 0.9).to(device), torch.ones(O).to(device)
    pf = ops.rlif_param_forward(x, w, r, b, None, None, None, None, None, a, th, None, 10.0, 5.0,
                                True, "fast_sigmoid", "subtract", True)
    pcnt, pidx, psg, pp, pq, pu, ptl, pecnt, peidx, peval, pbits = pf[3:14]
    def pb(c=pcnt, i=pidx, p=pp, tl=ptl):
        return ops.rlif_param_backward_sparse(gS, None, None, w, r, None, c, i, psg, p, pq, pu, tl,
                                              pecnt, peidx, peval, pbits, None, None, a, None,
                                              "subtract", True, True, True, True, False, False,
                                              False, True)
    pb()
    must_raise("rlif_param act counts sum > idx", lambda: pb(c=bump(pcnt)))
    must_raise("rlif_param act idx >= N_out", lambda: pb(i=big(pidx, O)))
    must_raise("rlif_param act_p too short", lambda: pb(p=pp[:-1]))
    must_raise("rlif_param tan_last wrong size", lambda: pb(tl=ptl[:1]))

group = sys.argv[1]
if group == "inconsistent":
    inconsistent()
else:
    shapes = json.loads(sys.argv[2])
    for T, B, I, O in shapes:
        if group == "ops":
            lif_ops(T, B, I, O)
            neuron_ops(T, B, I, O)
            rlif_ops(T, B, I, O)
            readout_ops(T, B, I, O)
        else:
            layers(T, B, I, O)
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.fixture
def library(backend, request):
    """The shared library the child loads for `backend` ("" for the package's own ops)."""
    if backend != "emul":
        return ""
    from test_cuda_emul import _build_dir
    request.getfixturevalue("emul")  # builds (or finds) the emulation library
    return os.path.join(_build_dir(), "sparsegrad_emul.so")


def _run_child(backend, group, shapes=(), library=""):
    src = _CHILD.replace("__SETUP__", BACKEND_SETUP[backend])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", src, group, json.dumps(list(shapes)), library],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULTS "):
        started = [l[5:] for l in lines if l.startswith("CASE ")]
        done = {l[5:] for l in lines if l.startswith("DONE ")}
        crashed = [c for c in started if c not in done]
        pytest.fail(f"child process ended with code {proc.returncode} during case "
                    f"{crashed[-1] if crashed else '(before the first case)'}\n"
                    f"stderr tail:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


def _check(results, allow_raise=True):
    wrong = [(n, d) for n, status, d in results if status == "wrong" or status == "raised-empty"]
    assert not wrong, "\n\n".join(f"{n}:\n{d}" for n, d in wrong)
    if not allow_raise:
        raised = [(n, d) for n, status, d in results if status == "raised"]
        assert not raised, "\n".join(f"{n}: {d}" for n, d in raised)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_over_zero_and_one_sizes(backend, shape, library):
    results = _run_child(backend, "ops", [shape], library)
    # the raw ops accept every shape with T >= 1 (a readout reduced over zero steps has no value)
    _check(results, allow_raise=shape[0] == 0)


@pytest.mark.parametrize("backend", ["cpu"])  # the Python layers run the package's own ops
def test_layers_and_modules_over_zero_and_one_sizes(backend):
    results = _run_child(backend, "layers", SHAPES)
    # the Python API refuses T = 0 with a ValueError; every other shape must work
    _check([r for r in results if "(0," not in r[0]])
    raised = [(n, d) for n, status, d in results if status == "raised" and "(0," not in n]
    assert not raised, "\n".join(f"{n}: {d}" for n, d in raised)
    assert any(status == "ok" for _, status, _ in results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inconsistent_compact_tensors_raise(backend, library):
    results = _run_child(backend, "inconsistent", library=library)
    _check(results)
    assert len(results) > 30
