"""sparsegrad.lif with tensor (per-neuron, per-channel, 0-d) and learnable alpha / threshold, and
the synaptic current (alpha_syn) -- issue 18.

Every surrogate x reset x backward mode, against sparsegrad.reference.lif_neuron in float64:
spikes exactly, every gradient (current, state.v, state.syn, alpha, threshold, alpha_syn) to
1e-10 relative. Also: sparse with b_th = inf equals dense, chunked sequences equal one call, float
parameters and tensor parameters holding the same values give the same bits, the CUDA kernels
(through the host emulation) give the CPU's bits, and bad inputs give clear errors.
"""
import math

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from sparsegrad.nn import LIFNeuron

SURROGATES = ["fast_sigmoid", "atan", "sigmoid", "triangle"]
RESETS = ["subtract", "zero", "none"]
SLOPES = {"fast_sigmoid": 10.0, "atan": 2.0, "sigmoid": 5.0, "triangle": 2.0}
F64 = dict(rtol=1e-10, atol=1e-12)

# (current shape, parameter kind): per-channel needs a [T, B, C, H, W] current
CASES = [((10, 3, 13), "float"), ((10, 3, 13), "scalar0d"), ((10, 3, 13), "neuron"),
         ((6, 2, 3, 2, 4), "channel"), ((6, 2, 3, 2, 4), "neuron")]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _current(shape, seed=0, dtype=torch.float64, scale=0.6):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + 0.3).to(dtype)


def _param(kind, features, base, spread, seed, dtype=torch.float64):
    """A parameter of the given kind holding values in base +- spread."""
    if kind == "float":
        return base
    if kind == "scalar0d":
        return torch.tensor(base, dtype=dtype)
    shape = features if kind == "neuron" else (features[0],) + (1,) * (len(features) - 1)
    return (base + spread * (2 * torch.rand(shape, generator=_gen(seed), dtype=torch.float64) - 1)
            ).to(dtype)


def _problem(shape, kind, syn, seed=0, dtype=torch.float64):
    feats = shape[2:]
    B = shape[1]
    params = dict(alpha=_param(kind, feats, 0.8, 0.15, seed + 1, dtype),
                  threshold=_param(kind, feats, 1.0, 0.3, seed + 2, dtype))
    if syn:
        params["alpha_syn"] = _param(kind, feats, 0.6, 0.3, seed + 3, dtype)
    state = [_current((B,) + feats, seed + 4, dtype, 0.5),
             (torch.rand((B,) + feats, generator=_gen(seed + 5)) < 0.3).to(dtype)]
    if syn:
        state.append(_current((B,) + feats, seed + 6, dtype, 0.3))
    return _current(shape, seed, dtype), params, state


def _run(fn, current, params, state, learn=True, return_mem=True, **kw):
    """Outputs and the gradients w.r.t. every leaf for fixed random cotangents."""
    cur = current.clone().requires_grad_(True)
    leaves = {"current": cur}
    p = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            value = value.clone().requires_grad_(learn)
            if learn:
                leaves[name] = value
        p[name] = value
    st = [state[0].clone().requires_grad_(True), state[1]] + \
        ([state[2].clone().requires_grad_(True)] if len(state) > 2 else [])
    leaves["v_init"] = st[0]
    if len(st) > 2:
        leaves["syn_init"] = st[2]
    out = fn(cur, state=tuple(st), return_state=True, return_mem=return_mem, **p, **kw)
    spikes, mem, fin = (out[0], out[1], out[2]) if return_mem else (out[0], None, out[1])
    v_final = fin[0]
    syn_final = fin[2] if len(fin) > 2 else None
    g = _gen(7)
    loss = (spikes * torch.randn(spikes.shape, generator=g, dtype=torch.float64).to(cur.dtype)).sum()
    loss = loss + (v_final * torch.randn(v_final.shape, generator=g, dtype=torch.float64)
                   .to(cur.dtype)).sum()
    if mem is not None:
        loss = loss + 0.1 * (mem * torch.randn(mem.shape, generator=g, dtype=torch.float64)
                             .to(cur.dtype)).sum()
    if syn_final is not None:
        loss = loss + (syn_final * torch.randn(syn_final.shape, generator=g, dtype=torch.float64)
                       .to(cur.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    outs = dict(spikes=spikes.detach(), v_final=v_final.detach())
    if mem is not None:
        outs["mem"] = mem.detach()
    if syn_final is not None:
        outs["syn_final"] = syn_final.detach()
    return outs, dict(zip(leaves.keys(), grads))


def _compare(got, want, tol=F64, exact_spikes=True):
    (out_k, g_k), (out_r, g_r) = got, want
    assert out_k.keys() == out_r.keys()
    for name in out_k:
        if name == "spikes" and exact_spikes:
            assert torch.equal(out_k[name], out_r[name]), "spikes differ"
        else:
            torch.testing.assert_close(out_k[name], out_r[name], **tol, msg=name)
    assert g_k.keys() == g_r.keys()
    for name in g_k:
        if g_r[name] is None:
            assert g_k[name] is None or not g_k[name].abs().sum(), name
            continue
        assert g_k[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(g_k[name], g_r[name], **tol, msg=f"d/d{name}")


@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("return_mem", [False, True], ids=["spk", "mem"])
@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{len(s)}d-{k}" for s, k in CASES])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_matches_reference(surrogate, reset, backward, shape, kind, return_mem, syn):
    current, params, state = _problem(shape, kind, syn)
    kw = dict(b_th=0.3, surrogate=surrogate, slope=SLOPES[surrogate], reset=reset,
              backward=backward)
    got = _run(sparsegrad.lif, current, params, state, return_mem=return_mem, **kw)
    want = _run(ref.lif_neuron, current, params, state, return_mem=return_mem, **kw)
    _compare(got, want)
    assert got[0]["spikes"].sum() > 0  # the problem exercises the reset


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("reset", RESETS)
def test_fixed_tensor_parameters(reset, learn):
    # tensors that do not require grad: no traces, the same results as learnable ones
    current, params, state = _problem((9, 2, 11), "neuron", True, seed=3)
    kw = dict(b_th=0.25, slope=8.0, reset=reset)
    got = _run(sparsegrad.lif, current, params, state, learn=learn, return_mem=False, **kw)
    want = _run(ref.lif_neuron, current, params, state, learn=learn, return_mem=False, **kw)
    _compare(got, want)


@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("reset", RESETS)
def test_sparse_with_infinite_band_equals_dense(reset, syn):
    current, params, state = _problem((12, 3, 17), "neuron", syn, seed=5)
    kw = dict(slope=6.0, reset=reset, surrogate="atan")
    sparse = _run(sparsegrad.lif, current, params, state, return_mem=False, backward="sparse",
                  b_th=math.inf, **kw)
    dense = _run(sparsegrad.lif, current, params, state, return_mem=False, backward="dense",
                 b_th=0.1, **kw)
    _compare(sparse, dense)


def test_float_and_tensor_parameters_same_bits():
    # the tensor-parameter kernels and the float kernels compute the same arithmetic
    current = _current((11, 3, 19), seed=9, dtype=torch.float32)
    for backward in ("sparse", "dense"):
        for reset in RESETS:
            kw = dict(reset=reset, backward=backward, b_th=0.3, slope=7.0)
            a = current.clone().requires_grad_(True)
            b = current.clone().requires_grad_(True)
            s_f, m_f = sparsegrad.lif(a, alpha=0.85, threshold=0.9, return_mem=True, **kw)
            s_t, m_t = sparsegrad.lif(b, alpha=torch.full((19,), 0.85),
                                      threshold=torch.tensor(0.9), return_mem=True, **kw)
            assert torch.equal(s_f, s_t) and torch.equal(m_f, m_t)
            gs = torch.randn(s_f.shape, generator=_gen(1))
            (s_f * gs).sum().backward()
            (s_t * gs).sum().backward()
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("reset", RESETS)
def test_chunked_equals_one_call(reset, syn, backward):
    current, params, _ = _problem((14, 2, 9), "neuron", syn, seed=11)
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    cur = current.clone().requires_grad_(True)
    whole, st_whole = sparsegrad.lif(cur, return_state=True, **leaves, **kw)
    g = torch.randn(whole.shape, generator=_gen(2), dtype=torch.float64)
    loss = (whole * g).sum() + st_whole.v.sum()
    grads_whole = torch.autograd.grad(loss, [cur] + list(leaves.values()))

    cur2 = current.clone().requires_grad_(True)
    leaves2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    parts, state = [], None
    for lo, hi in ((0, 5), (5, 6), (6, 14)):
        out, state = sparsegrad.lif(cur2[lo:hi], state=state, return_state=True, **leaves2, **kw)
        parts.append(out)
        assert (state.syn is not None) == syn and len(state) == (3 if syn else 2)
    chunked = torch.cat(parts)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(state.v, st_whole.v, **F64)
    if syn:
        torch.testing.assert_close(state.syn, st_whole.syn, **F64)
    loss2 = (chunked * g).sum() + state.v.sum()
    grads_chunked = torch.autograd.grad(loss2, [cur2] + list(leaves2.values()))
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, **F64)


def test_float32_and_half_types():
    current, params, state = _problem((10, 2, 16), "neuron", True, seed=13, dtype=torch.float32)
    kw = dict(b_th=0.3, slope=5.0)
    got = _run(sparsegrad.lif, current, params, state, return_mem=False, **kw)
    want = _run(ref.lif_neuron, current, params, state, return_mem=False, **kw)
    _compare(got, want, tol=dict(rtol=1e-4, atol=1e-5), exact_spikes=False)
    for dtype in (torch.bfloat16, torch.float16):
        c = current.to(dtype).requires_grad_(True)
        a = params["alpha"].clone().requires_grad_(True)
        spikes, st = sparsegrad.lif(c, alpha=a, threshold=params["threshold"],
                                    alpha_syn=params["alpha_syn"], return_state=True, **kw)
        assert spikes.dtype == dtype and st.v.dtype == dtype and st.syn.dtype == dtype
        spikes.float().sum().backward()
        assert c.grad.dtype == dtype and a.grad.dtype == torch.float32
        assert torch.isfinite(a.grad).all()


def test_saves_no_dense_tensor_in_sparse_mode():
    T, B, N = 20, 4, 64
    current = _current((T, B, N), seed=17, dtype=torch.float32, scale=0.3)
    alpha = torch.full((N,), 0.9, requires_grad=True)
    threshold = torch.full((N,), 1.0, requires_grad=True)
    alpha_syn = torch.full((N,), 0.5, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sparsegrad.lif(current.requires_grad_(True), alpha=alpha, threshold=threshold,
                             alpha_syn=alpha_syn)
    assert not any(t.numel() >= T * B * N and t.is_floating_point() for t in saved)
    out.sum().backward()
    assert alpha.grad is not None and threshold.grad is not None and alpha_syn.grad is not None


def test_zero_sizes():
    a = torch.full((0,), 0.9, requires_grad=True)
    cur = torch.zeros(5, 2, 0, requires_grad=True)
    spikes = sparsegrad.lif(cur, alpha=a, threshold=1.0, alpha_syn=0.5)
    assert spikes.shape == (5, 2, 0)
    spikes.sum().backward()
    assert a.grad.shape == (0,)
    alpha = torch.full((4,), 0.9, requires_grad=True)
    cur = torch.randn(6, 0, 4, requires_grad=True)  # no batch
    spikes, st = sparsegrad.lif(cur, alpha=alpha, alpha_syn=0.5, return_state=True)
    (spikes.sum() + st.syn.sum()).backward()
    assert torch.equal(alpha.grad, torch.zeros(4))


def test_bad_inputs():
    cur = torch.randn(5, 2, 3, 4)
    with pytest.raises(ValueError, match="alpha of shape \\[3\\] does not broadcast"):
        sparsegrad.lif(cur, alpha=torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="threshold of shape"):
        sparsegrad.lif(cur, alpha=0.9, threshold=torch.ones(1, 3, 1, 1))
    with pytest.raises(TypeError, match="alpha must be a float or a floating-point tensor"):
        sparsegrad.lif(cur, alpha=torch.ones(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="alpha_syn must be in"):
        sparsegrad.lif(cur, alpha=0.9, alpha_syn=1.5)
    with pytest.raises(ValueError, match="state.syn is given but alpha_syn is None"):
        sparsegrad.lif(cur, alpha=torch.tensor(0.9), state=(torch.zeros(2, 3, 4),
                                                            torch.zeros(2, 3, 4),
                                                            torch.zeros(2, 3, 4)))
    with pytest.raises(ValueError, match="state.syn must have shape"):
        sparsegrad.lif(cur, alpha=0.9, alpha_syn=0.5, state=(torch.zeros(2, 3, 4),
                                                             torch.zeros(2, 3, 4),
                                                             torch.zeros(2, 4)))
    # the raw op names the argument
    c = torch.randn(4, 2, 3)
    with pytest.raises(RuntimeError, match="alpha.*one value per neuron"):
        sparsegrad.ops.lif_neuron_param_forward(c, None, None, None, torch.ones(2), torch.ones(3),
                                                None, 0.2, 5.0, True)
    with pytest.raises(RuntimeError, match="syn_init.*alpha_syn is None"):
        sparsegrad.ops.lif_neuron_param_forward(c, None, None, torch.zeros(2, 3), torch.ones(3),
                                                torch.ones(3), None, 0.2, 5.0, True)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def test_module_learnable_parameters():
    m = LIFNeuron(alpha=torch.full((3, 1, 1), 0.9), threshold=1.0, learn_alpha=True,
                  learn_threshold=True, alpha_syn=0.5, learn_alpha_syn=True)
    assert set(m.state_dict()) == {"alpha", "threshold", "alpha_syn"}
    assert isinstance(m.alpha, torch.nn.Parameter) and m.alpha.shape == (3, 1, 1)
    assert m.threshold.shape == () and m.alpha_syn.shape == ()
    x = _current((6, 2, 3, 4, 4), seed=3, dtype=torch.float32)
    out = m(x)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    # the same as the functional op with the clamped values
    want = sparsegrad.lif(x, alpha=m.alpha.detach().clamp(0, 1), threshold=m.threshold.detach(),
                          alpha_syn=m.alpha_syn.detach().clamp(0, 1))
    assert torch.equal(out, want)
    m2 = LIFNeuron(alpha=torch.full((3, 1, 1), 0.5), learn_alpha=True, learn_threshold=True, alpha_syn=0.3,
                   learn_alpha_syn=True)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), out)


def test_module_clamps_alpha():
    m = LIFNeuron(alpha=0.9, learn_alpha=True)
    with torch.no_grad():
        m.alpha.fill_(1.7)
    x = _current((5, 2, 7), seed=4)
    assert torch.equal(m(x), sparsegrad.lif(x, alpha=1.0))
    with torch.no_grad():
        m.alpha.fill_(-0.2)
    assert torch.equal(m(x), sparsegrad.lif(x, alpha=0.0))


def test_module_fixed_parameters_are_buffers_or_floats():
    m = LIFNeuron(alpha=0.9, threshold=1.0)
    assert list(m.parameters()) == [] and m.state_dict() == {}
    per = LIFNeuron(alpha=torch.linspace(0.5, 0.9, 5))
    assert list(per.parameters()) == [] and set(per.state_dict()) == {"alpha"}
    x = _current((4, 2, 5), seed=6)
    assert torch.equal(per(x), sparsegrad.lif(x, alpha=torch.linspace(0.5, 0.9, 5)))
    with pytest.raises(ValueError, match="alpha must be in"):
        LIFNeuron(alpha=1.2, learn_alpha=True)
    with pytest.raises(ValueError, match="learn_alpha_syn=True needs alpha_syn"):
        LIFNeuron(alpha=0.9, learn_alpha_syn=True)


def test_module_state_with_syn():
    m = LIFNeuron(alpha=0.8, alpha_syn=0.6)
    x = _current((8, 2, 5), seed=8)
    whole, st = m(x, return_state=True)
    first, mid = m(x[:3], return_state=True)
    second, end = m(x[3:], state=mid, return_state=True)
    assert torch.equal(torch.cat([first, second]), whole)
    torch.testing.assert_close(end.syn, st.syn, **F64)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels, run through the host emulation (tests/test_cuda_emul.py builds it)
# ---------------------------------------------------------------------------------------------
from test_cuda_emul import emul, launch  # noqa: E402,F401  (fixtures)


def _raw_inputs(T, B, N, syn, dtype, seed=0):
    g = _gen(seed)
    cur = (torch.randn(T, B, N, generator=g, dtype=torch.float64) * 0.6 + 0.3).to(dtype)
    alpha = (0.6 + 0.35 * torch.rand(N, generator=g, dtype=torch.float64)).to(dtype)
    thr = (0.7 + 0.6 * torch.rand(N, generator=g, dtype=torch.float64)).to(dtype)
    a_syn = (0.3 + 0.6 * torch.rand(N, generator=g, dtype=torch.float64)).to(dtype) if syn else None
    v0 = (torch.randn(B, N, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    s0 = (torch.rand(B, N, generator=g) < 0.3).to(dtype)
    syn0 = (torch.randn(B, N, generator=g, dtype=torch.float64) * 0.3).to(dtype) if syn else None
    return cur, alpha, thr, a_syn, v0, s0, syn0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("return_mem", [False, True])
@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("reset", RESETS)
def test_emulated_cuda_equals_cpu(emul, launch, reset, sparse, syn, return_mem, dtype):
    T, B, N = 9, 3, 45
    cur, alpha, thr, a_syn, v0, s0, syn0 = _raw_inputs(T, B, N, syn, dtype, seed=21)
    args = (cur, v0, s0, syn0, alpha, thr, a_syn, 0.3, 4.0, sparse, "sigmoid", reset, return_mem,
            True, True, syn)
    cpu_ops = torch.ops.sparsegrad
    want = cpu_ops.lif_neuron_param_forward(*args)
    for order in ("forward", "shuffled"):
        launch(order=order, threads=32, seed=3)
        got = emul.lif_neuron_param_forward(*args)
        for name, a, b in zip(["spikes", "v_final", "syn_final", "act_cnt", "act_idx", "act_sg",
                               "act_p", "act_q", "act_u", "tan_last", "rst_bits", "mem", "stats"],
                              got, want):
            assert a.shape == b.shape and torch.equal(a, b), name
    (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
     rst_bits, mem, stats) = want
    g = _gen(5)
    gs = torch.randn(T, B, N, generator=g, dtype=torch.float64).to(dtype)
    gv = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    gsyn = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype) if syn else None
    gm = torch.randn(T, B, N, generator=g, dtype=torch.float64).to(dtype) if return_mem else None
    bargs = (gs, gv, gsyn, gm, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
             rst_bits if reset == "zero" else None, alpha, a_syn, sparse, (not sparse) or return_mem,
             True, syn, True, True, syn)
    want_g = cpu_ops.lif_neuron_param_backward(*bargs)
    for order in ("reverse", "shuffled"):
        launch(order=order, threads=64, seed=4)
        got_g = emul.lif_neuron_param_backward(*bargs)
        for name, a, b in zip(["grad_current", "dv", "dsyn", "d_alpha", "d_threshold",
                               "d_alpha_syn"], got_g, want_g):
            assert a.shape == b.shape and torch.equal(a, b), name
    assert want_g[3].abs().sum() > 0 and want_g[0].abs().sum() > 0


def test_emulated_float_op_unchanged(emul):
    # the float op goes through the same CUDA kernels with one-value parameter views
    cur, *_ = _raw_inputs(8, 2, 40, False, torch.float64, seed=2)
    for reset in RESETS:
        for sparse in (True, False):
            args = (cur, None, None, 0.85, 0.9, 0.3, 4.0, sparse, "atan", reset, True)
            want = torch.ops.sparsegrad.lif_neuron_forward(*args)
            got = emul.lif_neuron_forward(*args)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The layer: lif_layer / nn.LIF with tensor parameters and a synaptic current
# ---------------------------------------------------------------------------------------------
from conftest import random_problem  # noqa: E402


def _layer_run(fn, x, w, b, params, state, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    p = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
         for k, v in params.items()}
    st = tuple(t.clone().requires_grad_(t.is_floating_point() and i != 1)
               for i, t in enumerate(state)) if state is not None else None
    out, fin = fn(*leaves, state=st, return_state=True, **p, **kw)
    g = _gen(3)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (fin[0] * torch.randn(fin[0].shape, generator=g, dtype=torch.float64)).sum()
    if len(fin) > 2:
        loss = loss + fin[2].sum()
    inputs = leaves + [v for v in p.values() if isinstance(v, torch.Tensor)] + \
        ([st[0]] + ([st[2]] if len(st) > 2 else []) if st is not None else [])
    return out, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("kind", ["neuron", "scalar0d"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
def test_layer_matches_reference(reset, backward, kind, syn):
    T, B, n_in, n_out = 12, 3, 25, 14
    x, w, b = random_problem(T, B, n_in, n_out, dtype=torch.float64, seed=4,
                             binary=reset != "none")
    params = dict(alpha=_param(kind, (n_out,), 0.8, 0.15, 1), threshold=_param(kind, (n_out,), 1.0,
                                                                                 0.3, 2))
    if syn:
        params["alpha_syn"] = _param(kind, (n_out,), 0.5, 0.3, 3)
    state = [_current((B, n_out), 5, scale=0.5), (torch.rand(B, n_out, generator=_gen(6)) < 0.3)
             .double()] + ([_current((B, n_out), 7, scale=0.3)] if syn else [])
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)
    out_k, g_k = _layer_run(sparsegrad.lif_layer, x, w, b, params, state, **kw)
    out_r, g_r = _layer_run(ref.lif_layer, x, w, b, params, state, **kw)
    assert torch.equal(out_k, out_r) and out_k.sum() > 0
    for a, r in zip(g_k, g_r):
        torch.testing.assert_close(a, r, **F64)


def _stack_run(mod, x, w1, b1, w2, b2, p1, p2, w3=None, readout_alpha=None, hook=None, **kw):
    """Two stacked layers (and optionally a readout), each with its own parameters; the loss
    reads both layers' spikes' effect only through the last output. Returns the output, the
    gradients of every leaf and the first layer's spikes."""
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    ps = [{k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
           for k, v in p.items()} for p in (p1, p2)]
    h1 = mod.lif_layer(leaves[0], leaves[1], leaves[2], **ps[0], **kw)
    if hook is not None:
        h1.register_hook(hook)
    out = mod.lif_layer(h1, leaves[3], leaves[4], **ps[1], **kw)
    if w3 is not None:
        w3 = w3.clone().requires_grad_(True)
        ra = readout_alpha.clone().requires_grad_(True)
        leaves += [w3, ra]
        out = mod.li_readout(out, w3, alpha=ra, reduce="sum")
    g = torch.randn(out.shape, generator=_gen(11), dtype=torch.float64)
    inputs = leaves + [v for p in ps for v in p.values() if isinstance(v, torch.Tensor)]
    return out, torch.autograd.grad((out * g).sum(), inputs), h1


def _stack_problem(kinds, syn, seed=20):
    T, B, n_in, n_mid, n_out = 14, 3, 23, 17, 11
    x, w1, b1 = random_problem(T, B, n_in, n_mid, dtype=torch.float64, seed=seed, rate=0.3)
    h, w2, b2 = random_problem(T, B, n_mid, n_out, dtype=torch.float64, seed=seed + 1, rate=0.3)
    params = []
    for i, kind in enumerate(kinds):
        n = (n_mid, n_out)[i]
        p = dict(alpha=_param(kind, (n,), 0.8, 0.15, seed + 2 + 3 * i),
                 threshold=_param(kind, (n,), 0.8, 0.2, seed + 3 + 3 * i))
        if syn and kind != "float":
            p["alpha_syn"] = _param(kind, (n,), 0.5, 0.3, seed + 4 + 3 * i)
        params.append(p)
    return x, w1, b1, w2, b2, params


STACKS = [("neuron", "neuron"), ("float", "neuron"), ("neuron", "float"), ("scalar0d", "neuron")]


@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("kinds", STACKS, ids=["-".join(k) for k in STACKS])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_stacked_layers_match_reference(reset, backward, kinds, syn):
    # the second layer gets the first one's spikes: in sparse mode it computes dx only at the
    # first layer's active set (the tensor layer as a producer and as a consumer)
    x, w1, b1, w2, b2, (p1, p2) = _stack_problem(kinds, syn)
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)
    dx_seen = []
    out_k, g_k, h1 = _stack_run(sparsegrad, x, w1, b1, w2, b2, p1, p2, hook=dx_seen.append, **kw)
    out_r, g_r, h1_r = _stack_run(ref, x, w1, b1, w2, b2, p1, p2, **kw)
    assert torch.equal(out_k, out_r) and 0 < h1.mean() < 0.5 and out_k.sum() > 0
    for a, r in zip(g_k, g_r):
        torch.testing.assert_close(a, r, **F64)
    assert all(t.abs().sum() > 0 for t in g_k[5:])  # the parameters get gradient
    (dx,) = dx_seen
    if backward == "sparse":  # dx only at the producer's active set
        _, _, stats, _ = sparsegrad.functional.lif_layer_with_stats(
            x, w1, b1, **p1, **kw)
        assert 0 < int((dx != 0).sum()) <= int(stats.active_count) < dx.numel() // 2
    else:
        assert int((dx != 0).sum()) > dx.numel() // 2


@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
def test_stacked_layers_and_tensor_readout_match_reference(syn):
    x, w1, b1, w2, b2, (p1, p2) = _stack_problem(("neuron", "neuron"), syn, seed=40)
    w3 = torch.randn(5, w2.shape[0], generator=_gen(41), dtype=torch.float64)
    ra = _param("neuron", (5,), 0.8, 0.15, 42)
    kw = dict(b_th=0.3, slope=5.0)
    out_k, g_k, _ = _stack_run(sparsegrad, x, w1, b1, w2, b2, p1, p2, w3, ra, **kw)
    out_r, g_r, _ = _stack_run(ref, x, w1, b1, w2, b2, p1, p2, w3, ra, **kw)
    torch.testing.assert_close(out_k, out_r, **F64)
    for a, r in zip(g_k, g_r):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("reset", RESETS)
def test_stacked_sparse_with_infinite_band_equals_dense(reset, syn):
    x, w1, b1, w2, b2, (p1, p2) = _stack_problem(("neuron", "scalar0d"), syn, seed=60)
    kw = dict(slope=5.0, reset=reset)
    out_s, g_s, _ = _stack_run(sparsegrad, x, w1, b1, w2, b2, p1, p2, b_th=math.inf,
                               backward="sparse", **kw)
    out_d, g_d, _ = _stack_run(sparsegrad, x, w1, b1, w2, b2, p1, p2, backward="dense", **kw)
    assert torch.equal(out_s, out_d)
    for a, r in zip(g_s, g_d):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_layer_non_finite_input_like_the_reference(bad):
    # the current by events (alpha-0 readout kernel): a non-finite row stays in its step
    x, w, b = random_problem(9, 2, 12, 6, dtype=torch.float64, seed=9)
    x[3, 0, 5] = bad
    w[:, 5] = 1.0
    kw = dict(alpha=torch.full((6,), 0.9), threshold=torch.full((6,), 0.8), alpha_syn=None)
    s = sparsegrad.lif_layer(x, w, b, **kw)
    s_ref = ref.lif_layer(x, w, b, **kw)
    assert torch.equal(s, s_ref)
    assert (s[3:, 0] == (1.0 if bad > 0 else 0.0)).all() and s[:, 1].sum() > 0


def test_layer_module_learnable():
    layer = sparsegrad.nn.LIF(20, 8, alpha=torch.full((8,), 0.9), learn_alpha=True,
                              learn_threshold=True, alpha_syn=0.5, learn_alpha_syn=True)
    assert set(layer.state_dict()) == {"weight", "bias", "alpha", "threshold", "alpha_syn"}
    x, _, _ = random_problem(10, 4, 20, 8, dtype=torch.float32, seed=1)
    out = layer(x)
    (out.sum() + layer(x, return_state=True)[1].syn.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(ValueError, match="shape \\[\\] or \\[out_features\\]"):
        sparsegrad.nn.LIF(20, 8, alpha=torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="shape \\[\\] or \\[N_out\\]"):
        sparsegrad.lif_layer(x, layer.weight, alpha=torch.full((2, 8), 0.9))


def test_layer_saved_bytes_at_most_8_percent_of_dense_bptt():
    # the SHD layer (tests/test_memory.py) with learnable per-neuron alpha and threshold
    from test_memory import nbytes, saved_tensors, shd_like
    x, w, b = shd_like()
    alpha = torch.full((w.shape[0],), 0.95, requires_grad=True)
    threshold = torch.full((w.shape[0],), 1.0, requires_grad=True)
    out, saved = saved_tensors(lambda: sparsegrad.lif_layer(x, w, b, alpha=alpha,
                                                            threshold=threshold))
    assert 0.002 < out.mean() < 0.05
    _, saved_ref = saved_tensors(lambda: ref.lif_layer(x, w, b, alpha=alpha, threshold=threshold))
    keep = (w, alpha, threshold)
    sparse_bytes = nbytes([t for t in saved if not any(t is k for k in keep)])
    ref_bytes = nbytes([t for t in saved_ref if not any(t is k for k in keep)])
    assert sparse_bytes <= 0.08 * ref_bytes, (sparse_bytes, ref_bytes)
    out.sum().backward()
    assert alpha.grad.abs().sum() > 0 and threshold.grad.abs().sum() > 0


@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
@pytest.mark.parametrize("kind", ["neuron", "scalar0d"])
def test_readout_tensor_alpha_matches_reference(kind, reduce):
    x, w, b = random_problem(11, 3, 16, 5, dtype=torch.float64, seed=8)
    alpha = _param(kind, (5,), 0.8, 0.15, 9)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, alpha)]
        out = fn(*leaves[:3], alpha=leaves[3], reduce=reduce)
        g = torch.randn(out.shape, generator=_gen(2), dtype=torch.float64)
        return out, torch.autograd.grad((out * g).sum(), leaves)

    out_k, g_k = run(sparsegrad.li_readout)
    out_r, g_r = run(ref.li_readout)
    torch.testing.assert_close(out_k, out_r, **F64)
    for a, r in zip(g_k, g_r):
        torch.testing.assert_close(a, r, **F64)


def test_readout_module_learn_alpha():
    m = sparsegrad.nn.LIReadout(16, 5, alpha=torch.full((5,), 0.9), learn_alpha=True)
    assert set(m.state_dict()) == {"weight", "bias", "alpha"}
    x, _, _ = random_problem(8, 2, 16, 5, dtype=torch.float32, seed=3)
    m(x).sum().backward()
    assert m.alpha.grad is not None and m.alpha.grad.abs().sum() > 0
    fixed = sparsegrad.nn.LIReadout(16, 5, alpha=0.9)
    assert isinstance(fixed.alpha, float)  # the float kernels, as before


def test_recurrent_layer_takes_tensor_parameters():
    # the recurrent layer's own tests: tests/test_rlif_params.py
    layer = sparsegrad.nn.RLIF(4, 3, learn_alpha=True, alpha_syn=0.5)
    x, _, _ = random_problem(5, 2, 4, 3, dtype=torch.float32)
    out, st = layer(x, return_state=True)
    assert st.syn is not None
    out.sum().backward()
    assert layer.alpha.grad is not None


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_opcheck_param_ops(reset, sparse):
    cur, alpha, thr, a_syn, v0, s0, syn0 = _raw_inputs(6, 3, 7, True, torch.float64, seed=1)
    ops = torch.ops.sparsegrad
    for grad in (False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (cur, alpha, thr, a_syn)]
        args = (leaves[0], v0, s0, syn0, leaves[1], leaves[2], leaves[3], 0.5, 4.0, sparse,
                "fast_sigmoid", reset, False, True, True, True)
        torch.library.opcheck(ops.lif_neuron_param_forward.default, args)
    out = ops.lif_neuron_param_forward(cur, v0, s0, syn0, alpha, thr, a_syn, 0.5, 4.0, sparse,
                                       "fast_sigmoid", reset, False, True, True, True)
    g = torch.randn_like(out[0])
    torch.library.opcheck(ops.lif_neuron_param_backward.default, (
        g, torch.randn_like(out[1]), torch.randn_like(out[2]), None, *out[3:10],
        out[10] if reset == "zero" else None, alpha, a_syn, sparse, not sparse, True, True,
        True, True, True))


def _layer_inputs(T, B, n_in, n_out, x_kind, syn, dtype, seed=0):
    """x (binary spikes, sparse real values, or dense real values: the GEMM route) and the
    neuron's inputs for n_out neurons."""
    g = _gen(seed)
    mask = torch.rand(T, B, n_in, generator=g) < (0.9 if x_kind == "dense" else 0.1)
    vals = torch.randn(T, B, n_in, generator=g, dtype=torch.float64)
    x = (mask.double() if x_kind == "binary" else mask * vals).to(dtype)
    w = (torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    b = (torch.randn(n_out, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    _, alpha, thr, a_syn, v0, s0, syn0 = _raw_inputs(T, B, n_out, syn, dtype, seed=seed + 1)
    return x, w, b, alpha, thr, a_syn, v0, s0, syn0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_kind", ["binary", "values", "dense"])
@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("reset", RESETS)
def test_fused_layer_op_equals_current_then_neuron(reset, sparse, syn, x_kind, dtype):
    """lif_param_forward (the CPU's fused tensor-parameter layer) gives the bits of the two-op
    path CUDA takes: li_readout_forward's current (alpha 0, the same event sums) and then
    lif_neuron_param_forward; its stats count x's nonzeros."""
    T, B, n_in, n_out = 7, 3, 37, 45
    x, w, b, alpha, thr, a_syn, v0, s0, syn0 = _layer_inputs(T, B, n_in, n_out, x_kind, syn,
                                                            dtype, seed=5)
    ops = torch.ops.sparsegrad
    fused = ops.lif_param_forward(x, w, b, v0, s0, syn0, alpha, thr, a_syn, 0.4, 4.0, sparse,
                                  "atan", reset, True, True, True, syn)
    current, _, ev_cnt, ev_idx, ev_val = ops.li_readout_forward(x, w, b, None, None, 0.0, "none")
    two = ops.lif_neuron_param_forward(current, v0, s0, syn0, alpha, thr, a_syn, 0.4, 4.0,
                                       sparse, "atan", reset, True, True, True, syn)
    for k, (a, r) in enumerate(zip(fused[:12], two[:12])):
        assert a.shape == r.shape and torch.equal(a, r), f"output {k}"
    assert torch.equal(fused[12][:2], two[12][:2])
    assert int(fused[12][2]) == int((x != 0).sum())
    for a, r in zip(fused[13:], (ev_cnt, ev_idx, ev_val)):
        assert torch.equal(a, r)
    assert float(fused[0].mean()) > 0.01  # the comparison saw spikes


def test_fused_layer_op_checks_its_arguments():
    x, w, b, alpha, thr, a_syn, v0, s0, syn0 = _layer_inputs(4, 2, 6, 5, "binary", True,
                                                            torch.float32)
    op = torch.ops.sparsegrad.lif_param_forward

    def call(**kw):
        a = dict(x=x, weight=w, bias=b, v_init=v0, s_init=s0, syn_init=syn0, alpha=alpha,
                 threshold=thr, alpha_syn=a_syn)
        a.update(kw)
        return op(*a.values(), 0.4, 4.0, True, "atan", "subtract", False, True, True, True)

    call()
    with pytest.raises(RuntimeError, match="lif_param_forward.*weight"):
        call(weight=w[:, :5])
    with pytest.raises(RuntimeError, match="lif_param_forward.*alpha"):
        call(alpha=alpha[:4])
    with pytest.raises(RuntimeError, match="lif_param_forward.*v_init"):
        call(v_init=v0[:1])
    with pytest.raises(RuntimeError, match="lif_param_forward.*syn_init"):
        call(alpha_syn=None)
    with pytest.raises(RuntimeError, match="lif_param_forward.*bias"):
        call(bias=b.double())


@pytest.mark.parametrize("sparse", [True, False])
def test_opcheck_fused_layer_op(sparse):
    x, w, b, alpha, thr, a_syn, v0, s0, syn0 = _layer_inputs(5, 2, 6, 7, "values", True,
                                                            torch.float64, seed=3)
    args = (x, w, b, v0, s0, syn0, alpha, thr, a_syn, 0.5, 4.0, sparse, "fast_sigmoid",
            "subtract", False, True, True, True)
    torch.library.opcheck(torch.ops.sparsegrad.lif_param_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_benchmark_smoke():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_neuron_params
    rec = bench_neuron_params.main(["--steps-t", "8", "--batch", "2", "--repeats", "1",
                                    "--warmup", "0"])
    assert set(rec["ratios"]) == {"learn_speedup_vs_snntorch", "learn_vs_fixed",
                                  "syn_speedup_vs_snntorch", "syn_vs_fixed"}
