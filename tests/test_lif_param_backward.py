"""lif_param_backward (issue 18, speed): the CPU's fused backward of the tensor-parameter layer.

The neuron's reverse walk hands dL/dI to the tiled events walk row by row instead of storing it,
so every gradient must have the bits of the two-op path it replaces (lif_neuron_param_backward,
then li_readout_backward with alpha = 0), which CUDA still takes; through lif_layer the
gradients also match sparsegrad.reference to 1e-10 (float64).
"""
import math

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from test_neuron_params import F64, RESETS, _gen, _layer_inputs, _layer_run, _param, _current

ops = torch.ops.sparsegrad
OUT_NAMES = ("dx", "dw", "db", "dv", "dsyn", "d_alpha", "d_threshold", "d_alpha_syn")


def _prev_set(T, B, n_in, rate, seed):
    """A producer's active set: a CSR over rows b*T + t of input indices, ascending."""
    mask = torch.rand(B, T, n_in, generator=_gen(seed)) < rate
    cnt = mask.sum(-1).reshape(-1).to(torch.int32)
    idx = mask.reshape(B * T, n_in).nonzero()[:, 1].to(torch.int32)
    return cnt, idx


class Case:
    """A forward of the fused layer op and the backward's arguments for it."""

    def __init__(self, T=7, B=3, n_in=37, n_out=45, x_kind="binary", syn=True,
                 dtype=torch.float64, reset="subtract", sparse=True, return_mem=False,
                 need=(True, True, True), b_th=0.4, prev_rate=0.3, seed=5, bias=True,
                 grad_state=True, prev=True):
        x, w, b, alpha, thr, a_syn, v0, s0, syn0 = _layer_inputs(T, B, n_in, n_out, x_kind, syn,
                                                                dtype, seed=seed)
        need = (need[0], need[1], need[2] and syn)
        f = ops.lif_param_forward(x, w, b if bias else None, v0, s0, syn0, alpha, thr, a_syn,
                                  b_th, 4.0, sparse, "atan", reset, return_mem, *need)
        self.spikes, self.act_cnt = f[0], f[3]
        g = _gen(seed + 9)
        rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)
        self.neuron = [rnd(f[0]), rnd(f[1]) if grad_state else None,
                       rnd(f[2]) if syn and grad_state else None,
                       rnd(f[11]) if return_mem else None, *f[3:10],
                       f[10] if reset == "zero" else None, alpha, a_syn]
        self.w, self.events = w, list(f[13:16])
        self.prev = list(_prev_set(T, B, n_in, prev_rate, seed + 1)) if prev else [None, None]
        self.T, self.sparse, self.dense_traces = T, sparse, not sparse or return_mem
        self.need = need
        self.flags = dict(need_dx=prev, need_dw=True, need_db=bias, need_dv=True,
                          need_dsyn=syn)

    def fused(self, **over):
        fl = {**self.flags, **over}
        return ops.lif_param_backward(
            *self.neuron, self.w, *self.events, *self.prev, self.sparse, self.dense_traces,
            fl["need_dx"], fl["need_dw"], fl["need_db"], fl["need_dv"], fl["need_dsyn"],
            *self.need)

    def two_op(self, **over):
        fl = {**self.flags, **over}
        gc, dv, dsyn, da, dth, das = ops.lif_neuron_param_backward(
            *self.neuron, self.sparse, self.dense_traces, fl["need_dv"], fl["need_dsyn"],
            *self.need)
        dx, dw, db = ops.li_readout_backward(
            gc, self.events[0].new_empty(0, dtype=torch.long), self.w, *self.events, *self.prev,
            self.T, 0.0, "none", fl["need_dx"], fl["need_dw"], fl["need_db"])
        return dx, dw, db, dv, dsyn, da, dth, das


def assert_bits(got, want, what=""):
    for name, a, r in zip(OUT_NAMES, got, want):
        assert a.shape == r.shape and a.dtype == r.dtype, f"{what} {name}: {a.shape} vs {r.shape}"
        assert torch.equal(a, r), f"{what} {name}: max diff {(a - r).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_kind", ["binary", "values"])
@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
def test_equals_two_op_path(reset, sparse, syn, x_kind, dtype):
    c = Case(x_kind=x_kind, syn=syn, dtype=dtype, reset=reset, sparse=sparse)
    got = c.fused()
    assert_bits(got, c.two_op())
    assert got[0].abs().sum() > 0 and got[5].abs().sum() > 0 and c.spikes.mean() > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [
    dict(return_mem=True), dict(return_mem=True, sparse=False), dict(need=(False, False, False)),
    dict(need=(True, False, False)), dict(need=(False, True, False), reset="zero"),
    dict(bias=False), dict(prev=False), dict(grad_state=False), dict(T=1), dict(B=1),
    dict(T=1, B=1, n_in=3, n_out=2), dict(b_th=1e-9), dict(b_th=math.inf), dict(n_out=200),
    dict(n_out=1), dict(n_in=1), dict(x_kind="dense"), dict(prev_rate=0.0),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_equals_two_op_path_edge_cases(case, dtype):
    c = Case(dtype=dtype, **case)
    assert_bits(c.fused(), c.two_op())
    if case.get("b_th") == 1e-9:  # no active entry
        assert int(c.act_cnt.sum()) == 0


def test_outputs_not_asked_are_empty_and_the_rest_unchanged():
    c = Case()
    full = c.fused()
    for flag, k in (("need_dx", 0), ("need_dw", 1), ("need_db", 2), ("need_dv", 3),
                    ("need_dsyn", 4)):
        part = c.fused(**{flag: False})
        assert part[k].numel() == 0
        assert all(torch.equal(a, r) for i, (a, r) in enumerate(zip(part, full)) if i != k)
    none = c.fused(need_dx=False, need_dw=False, need_db=False)
    assert all(torch.equal(a, r) for a, r in zip(none[3:], full[3:]))


def test_zero_steps_and_zero_neurons():
    for T, n_out in ((0, 5), (4, 0)):
        c = Case(T=T, n_out=n_out, syn=True)
        got = c.fused()
        assert got[0].shape == (T, 3, 37) and got[1].shape == (n_out, 37)
        assert not got[1].any() and not got[2].any() and not got[0].any()
        if T == 0:  # V_final is V_init, syn_final is syn_init
            assert torch.equal(got[3], c.neuron[1]) and torch.equal(got[4], c.neuron[2])
        else:
            assert_bits(got, c.two_op())


def test_non_contiguous_inputs():
    c = Case(dtype=torch.float64)
    want = c.fused()
    nc = lambda t: t if t is None else t.t().contiguous().t() if t.dim() == 2 else \
        torch.stack([t, t], -1)[..., 0] if t.is_floating_point() else t
    c.neuron = [nc(t) for t in c.neuron]
    c.w = nc(c.w)
    assert not c.w.is_contiguous() and not c.neuron[0].is_contiguous()
    assert_bits(c.fused(), want)


@pytest.mark.parametrize("sparse", [True, False])
def test_thread_count_independent(sparse):
    c = Case(T=20, B=5, n_in=60, n_out=300, sparse=sparse, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = c.fused()
        torch.set_num_threads(2)
        two = c.fused()
    finally:
        torch.set_num_threads(threads)
    assert_bits(one, two)


def test_bad_arguments():
    c = Case()
    n = c.neuron

    def call(neuron=None, w=None, events=None, prev=None, need_dx=True):
        return ops.lif_param_backward(
            *(neuron or n), c.w if w is None else w, *(events or c.events), *(prev or c.prev),
            True, False, need_dx, True, True, True, True, True, True, True)

    call()
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'weight'.*N_out"):
        call(w=c.w[:-1])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'weight'"):
        call(w=c.w.float())
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'ev_cnt'"):
        call(events=[c.events[0][:-1], *c.events[1:]])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'ev_idx'"):
        call(events=[c.events[0], c.events[1] + 100, c.events[2]])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'prev_idx'"):
        call(prev=[c.prev[0], c.prev[1] + 100])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'need_dx'.*producer"):
        call(prev=[None, None])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'alpha'"):
        call(neuron=n[:12] + [n[12][:-1]] + n[13:])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'act_p'"):
        call(neuron=n[:7] + [n[7][:-1]] + n[8:])
    with pytest.raises(RuntimeError, match="lif_param_backward: argument 'act_cnt'"):
        call(neuron=n[:4] + [n[4][:-1]] + n[5:])


@pytest.mark.parametrize("sparse", [True, False])
def test_opcheck(sparse):
    c = Case(T=5, B=2, n_in=6, n_out=7, x_kind="values", sparse=sparse)
    args = (*c.neuron, c.w, *c.events, *c.prev, c.sparse, c.dense_traces, True, True, True,
            True, True, *c.need)
    torch.library.opcheck(ops.lif_param_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# Through lif_layer (which takes lif_param_backward on the CPU) against the reference.
def _params(kind, n, syn, seed):
    p = dict(alpha=_param(kind, (n,), 0.8, 0.15, seed), threshold=_param(kind, (n,), 1.0, 0.3,
                                                                          seed + 1))
    if syn:
        p["alpha_syn"] = _param(kind, (n,), 0.5, 0.3, seed + 2)
    return p


@pytest.mark.parametrize("case", [dict(T=1), dict(B=1), dict(b_th=1e-9), dict(b_th=math.inf),
                                  dict(bias=False), dict(learn=False)],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("kind", ["neuron", "scalar0d"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_layer_matches_reference(backward, kind, syn, case):
    T, B, n_in, n_out = case.get("T", 9), case.get("B", 3), 21, 13
    x, w, b, *_ = _layer_inputs(T, B, n_in, n_out, "binary", syn, torch.float64, seed=8)
    p = _params(kind, n_out, syn, 1)
    state = [_current((B, n_out), 5, scale=0.5),
             (torch.rand(B, n_out, generator=_gen(6)) < 0.3).double()] + \
        ([_current((B, n_out), 7, scale=0.3)] if syn else [])
    kw = dict(b_th=case.get("b_th", 0.3), slope=5.0, backward=backward)
    learn = case.get("learn", True)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        ps = {k: v.clone().requires_grad_(learn) for k, v in p.items()}
        st = (state[0].clone().requires_grad_(True), state[1], *state[2:])
        bias = leaves[2] if case.get("bias", True) else None
        out, fin = fn(leaves[0], leaves[1], bias, state=st, return_state=True, **ps, **kw)
        g = _gen(3)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
            (fin[0] * torch.randn(fin[0].shape, generator=g, dtype=torch.float64)).sum()
        inputs = leaves[:2] + ([leaves[2]] if bias is not None else []) + [st[0]] + \
            ([v for v in ps.values()] if learn else [])
        return out, torch.autograd.grad(loss, inputs)

    out_k, g_k = run(sparsegrad.lif_layer)
    out_r, g_r = run(ref.lif_layer)
    assert torch.equal(out_k, out_r)
    for a, r in zip(g_k, g_r):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_stacked_layers_empty_and_full_producer_set(rate):
    # the second layer's dx on the first layer's active set: empty (b_th tiny) or every entry
    # (b_th = inf), against the reference
    T, B, n_in, n_mid, n_out = 8, 2, 15, 12, 9
    x, w1, b1, *_ = _layer_inputs(T, B, n_in, n_mid, "binary", True, torch.float64, seed=30)
    w2 = torch.randn(n_out, n_mid, generator=_gen(31), dtype=torch.float64)
    b2 = torch.zeros(n_out, dtype=torch.float64)
    p1, p2 = _params("neuron", n_mid, True, 32), _params("neuron", n_out, False, 35)
    b_th = 1e-9 if rate == 0.0 else math.inf

    def run(mod):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
        ps = [{k: v.clone().requires_grad_(True) for k, v in p.items()} for p in (p1, p2)]
        h = mod.lif_layer(leaves[0], leaves[1], leaves[2], **ps[0], b_th=b_th, slope=5.0)
        out = mod.lif_layer(h, leaves[3], leaves[4], **ps[1], b_th=math.inf, slope=5.0)
        g = torch.randn(out.shape, generator=_gen(36), dtype=torch.float64)
        return torch.autograd.grad((out * g).sum(), leaves + [v for p in ps for v in p.values()])

    for a, r in zip(run(sparsegrad), run(ref)):
        torch.testing.assert_close(a, r, **F64)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("x_grad", [False, True])
def test_layer_backward_route(x_grad):
    # fused on the CPU where dx is not wanted or has a producer; two ops where dx is wanted
    # everywhere (no producer: dx = dL/dI W needs dL/dI whole)
    x, w, b, *_ = _layer_inputs(6, 2, 10, 7, "binary", False, torch.float64, seed=2)
    p = _params("neuron", 7, False, 1)
    for stacked in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        leaves[0].requires_grad_(x_grad)
        inp = leaves[0]
        if stacked:
            inp = sparsegrad.lif_layer(inp, torch.randn(10, 10, generator=_gen(4),
                                                        dtype=torch.float64), None,
                                       **_params("neuron", 10, False, 5), slope=5.0)
        out = sparsegrad.lif_layer(inp, leaves[1], leaves[2], **p, slope=5.0)
        log = _OpLog()
        with log:
            out.sum().backward()
        fused = "sparsegrad::lif_param_backward" in log.names
        two = "sparsegrad::lif_neuron_param_backward" in log.names
        if stacked:  # the second layer has a producer, the first one no dx unless x_grad
            assert fused and two == x_grad
        else:
            assert fused != x_grad and two == x_grad



class _TensorParamNet(torch.nn.Module):
    """Two tensor-parameter LIF layers (learnable per-neuron alpha / threshold, then a learnable
    synaptic current) and a readout."""

    def __init__(self, backward):
        super().__init__()
        from sparsegrad.nn import LIF, LIReadout
        self.l1 = LIF(20, 16, alpha=torch.linspace(0.8, 0.95, 16), learn_alpha=True,
                      threshold=torch.linspace(0.9, 1.1, 16), learn_threshold=True, b_th=0.4,
                      slope=5.0, backward=backward)
        self.l2 = LIF(16, 12, alpha=0.9, alpha_syn=torch.full((12,), 0.6), learn_alpha_syn=True,
                      b_th=0.4, slope=5.0, backward=backward)
        self.readout = LIReadout(12, 4, alpha=0.8)

    def forward(self, x):
        return self.readout(self.l2(self.l1(x)))


@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_tensor_parameter_layers_compile_fullgraph_matches_eager(backward):
    """torch.compile(fullgraph=True) of tensor-parameter lif_layer networks (the autograd
    Function returns the input events, whose data-dependent sizes must reach the graph's
    outputs; it failed with PendingUnbackedSymbolNotFound before)."""
    from conftest import assert_compile_matches_eager
    torch.manual_seed(0)
    x = (torch.rand(15, 5, 20) < 0.3).float()
    labels = torch.randint(0, 4, (5,))
    model = _TensorParamNet(backward)
    with torch.no_grad():
        model.l1.weight.mul_(3.0)
        model.l2.weight.mul_(3.0)
    assert_compile_matches_eager(model, x, labels)
