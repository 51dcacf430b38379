"""Recurrent layer with tensor / learnable alpha, threshold and alpha_syn (issue 18): the
reference model (reference.rlif_layer) and the derivation of its parameter gradients in
docs/design.md ("Tensor parameters of the recurrent layer"), which the kernels are to implement.

float64 throughout; the reference's autograd is the ground truth.
"""
import itertools
import math

import pytest
import torch

from sparsegrad import reference as ref

SURROGATES = ["fast_sigmoid", "atan", "sigmoid", "triangle"]
RESETS = ["subtract", "zero", "none"]
T, B, N_IN, N = 12, 3, 9, 7


def _inputs(seed, n=N, rec_scale=0.6):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, N_IN, generator=g) < 0.4).double()
    w = torch.randn(n, N_IN, generator=g, dtype=torch.float64) * 0.7
    r = torch.randn(n, n, generator=g, dtype=torch.float64) * rec_scale
    b = torch.randn(n, generator=g, dtype=torch.float64) * 0.2
    return x, w, r, b


def _params(seed, n=N):
    g = torch.Generator().manual_seed(seed + 100)
    alpha = 0.6 + 0.35 * torch.rand(n, generator=g, dtype=torch.float64)
    theta = 0.5 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    alpha_syn = 0.3 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    return alpha, theta, alpha_syn


def _leaves(*ts):
    return [None if t is None else t.clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("syn", [False, True])
def test_reference_without_recurrence_is_the_lif_layer(reset, syn):
    """R = 0: the recurrent reference is the LIF layer's reference (tensor params, alpha_syn)."""
    x, w, _, b = _inputs(1)
    r = torch.zeros(N, N, dtype=torch.float64)
    alpha, theta, alpha_syn = _params(1)
    kw = dict(b_th=0.3, slope=5.0, reset=reset, return_state=True)
    a1, t1, s1, w1 = _leaves(alpha, theta, alpha_syn, w)
    out1, st1 = ref.rlif_layer(x, w1, r, b, alpha=a1, threshold=t1,
                               alpha_syn=s1 if syn else None, **kw)
    a2, t2, s2, w2 = _leaves(alpha, theta, alpha_syn, w)
    out2, st2 = ref.lif_layer(x, w2, b, alpha=a2, threshold=t2, alpha_syn=s2 if syn else None,
                              **kw)
    assert out1.sum() > 0
    assert torch.equal(out1, out2)
    assert len(st1) == (3 if syn else 2)
    for u, v in zip(st1, st2):
        assert torch.equal(u, v)
    gs = torch.randn_like(out1)
    loss1 = (out1 * gs).sum() + st1[0].sum()
    loss2 = (out2 * gs).sum() + st2[0].sum()
    leaves1 = [a1, t1, w1] + ([s1] if syn else [])
    leaves2 = [a2, t2, w2] + ([s2] if syn else [])
    for g1, g2 in zip(torch.autograd.grad(loss1, leaves1), torch.autograd.grad(loss2, leaves2)):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("syn", [False, True])
def test_reference_chunked_equals_one_call(syn):
    x, w, r, b = _inputs(2)
    alpha, theta, alpha_syn = _params(2)
    kw = dict(alpha=alpha, threshold=theta, alpha_syn=alpha_syn if syn else None, b_th=0.3,
              slope=5.0, return_state=True)
    whole, st = ref.rlif_layer(x, w, r, b, **kw)
    first, st1 = ref.rlif_layer(x[:5], w, r, b, **kw)
    second, st2 = ref.rlif_layer(x[5:], w, r, b, state=st1, **kw)
    assert whole.sum() > 0
    assert torch.equal(torch.cat([first, second]), whole)
    for u, v in zip(st, st2):
        torch.testing.assert_close(u, v, rtol=1e-13, atol=1e-13)


def test_reference_equal_per_neuron_values_equal_float():
    x, w, r, b = _inputs(3)
    kw = dict(b_th=0.3, slope=5.0)
    out_f = ref.rlif_layer(x, w, r, b, alpha=0.85, threshold=0.9, **kw)
    out_t = ref.rlif_layer(x, w, r, b, alpha=torch.full((N,), 0.85, dtype=torch.float64),
                           threshold=torch.tensor(0.9, dtype=torch.float64), **kw)
    assert out_f.sum() > 0
    assert torch.equal(out_f, out_t)


def _trace_form_grads(x, w, r, b, alpha, theta, alpha_syn, reset, backward, surrogate, seed):
    """The parameter gradients as docs/design.md derives them for the recurrent layer:
    dα = Σ δ·P + gV·P[T-1], dθ = -Σ δ·(Q + 1) - gV·Q[T-1], dα_s = Σ δ·U + gV·U[T-1] + gsyn·Rs[T-1]
    with δ[t] = σ'[t]·dL/dS[t] (dL/dS[t] the total, through the recurrence), P, Q, Rs, U the
    per-neuron forward traces (lif_math.h, math::tangent_*), and the reference's autograd
    gradients for comparison."""
    b_th, slope = 0.3, 5.0
    a, th, asyn = _leaves(alpha, theta, alpha_syn)
    syn_on = alpha_syn is not None
    current = torch.nn.functional.linear(x, w, b)
    v = torch.zeros(B, N, dtype=torch.float64)
    s = torch.zeros(B, N, dtype=torch.float64)
    syn = torch.zeros(B, N, dtype=torch.float64)
    P = torch.zeros(B, N, dtype=torch.float64)
    Q = torch.zeros_like(P)
    Rs = torch.zeros_like(P)
    U = torch.zeros_like(P)
    spikes, traces, mems = [], [], []
    mask_width = b_th if backward == "sparse" else math.inf
    for t in range(T):
        # traces from the previous step's (detached) state, before the membrane step
        keep = (1 - s.detach()) if reset == "zero" else torch.ones_like(P)
        P = keep * (alpha * P + v.detach())
        Q = (alpha * Q + s.detach()) if reset == "subtract" else torch.zeros_like(Q)
        if syn_on:
            Rs = alpha_syn * Rs + syn.detach()
            U = keep * (alpha * U) + Rs
        i_t = current[t] + torch.nn.functional.linear(s, r)
        if syn_on:
            syn = asyn * syn + i_t
            i_t = syn
        v = ref.lif_step(v, i_t, s, a, th, reset)
        s = ref.spike(v - th, slope, mask_width, surrogate)
        s.retain_grad()
        spikes.append(s)
        mems.append(v.detach())
        traces.append((P, Q, U))
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    gv = torch.randn(B, N, generator=g, dtype=torch.float64)
    gsyn = torch.randn(B, N, generator=g, dtype=torch.float64)
    loss = sum((sp * gs[t]).sum() for t, sp in enumerate(spikes)) + (v * gv).sum()
    leaves = [a, th]
    if syn_on:
        loss = loss + (syn * gsyn).sum()
        leaves.append(asyn)
    loss.backward()
    da = torch.zeros(N, dtype=torch.float64)
    dth = torch.zeros_like(da)
    das = torch.zeros_like(da)
    active = 0
    for t in range(T):
        u = mems[t] - theta
        sg = ref.surrogate_grad(u, slope, surrogate)
        if backward == "sparse":
            sg = torch.where(u.abs() < b_th, sg, torch.zeros_like(sg))
        active += int((sg != 0).sum())
        delta = sg * spikes[t].grad  # dL/dS[t] total (the loss and the recurrence)
        P, Q, U = traces[t]
        da += (delta * P).sum(0)
        dth -= (delta * (Q + 1)).sum(0)
        das += (delta * U).sum(0)
    P, Q, U = traces[-1]
    da += (gv * P).sum(0)
    dth -= (gv * Q).sum(0)
    if syn_on:
        das += (gv * U + gsyn * Rs).sum(0)
    auto = [leaf.grad for leaf in leaves]
    mine = [da, dth] + ([das] if syn_on else [])
    return mine, auto, torch.stack(spikes).sum(), active


@pytest.mark.parametrize("surrogate,reset,backward,syn",
                         list(itertools.product(SURROGATES, RESETS, ["sparse", "dense"],
                                                [False, True])))
def test_derivation_of_the_parameter_gradients(surrogate, reset, backward, syn):
    """The derivation in docs/design.md for the recurrent case: the trace form over δ (nonzero
    only at the active entries in sparse mode) equals autograd's gradient of α, θ, α_syn."""
    x, w, r, b = _inputs(4)
    alpha, theta, alpha_syn = _params(4)
    mine, auto, n_spikes, active = _trace_form_grads(
        x, w, r, b, alpha, theta, alpha_syn if syn else None, reset, backward, surrogate, 7)
    assert n_spikes > 0 and active > 0
    if backward == "sparse":
        assert active < T * B * N
    for m, a in zip(mine, auto):
        assert a.abs().max() > 0
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The kernels: sparsegrad.rlif_layer with tensor parameters against the reference
# ---------------------------------------------------------------------------------------------
import sparsegrad  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def _param(kind, base, spread, seed, n=N, dtype=torch.float64):
    """A parameter of the given kind: "float", "neuron" ([N]) or "scalar0d" ([])."""
    g = torch.Generator().manual_seed(seed + 200)
    if kind == "float":
        return base
    if kind == "scalar0d":
        return torch.tensor(base, dtype=dtype)
    return (base - spread / 2 + spread * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)


def _state(seed, syn, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 300)
    v = (torch.randn(B, N, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    s = (torch.rand(B, N, generator=g) < 0.3).to(dtype)
    out = [v, s]
    if syn:
        out.append((torch.randn(B, N, generator=g, dtype=torch.float64) * 0.3).to(dtype))
    return out


def _run(fn, x, w, r, b, params, state, learn=True, **kw):
    """Spikes, final state and the gradients of a random loss with respect to x, W, R, b, the
    tensor parameters (when learn) and the state (V, S, syn: S feeds step 0 through R)."""
    leaves = {k: t.clone().requires_grad_(True) for k, t in (("x", x), ("w", w), ("r", r),
                                                              ("b", b))}
    p = {k: (v.clone().requires_grad_(learn) if isinstance(v, torch.Tensor) else v)
         for k, v in params.items()}
    st = None
    if state is not None:
        st = [t.clone().requires_grad_(True) for t in state]
    out, fin = fn(leaves["x"], leaves["w"], leaves["r"], leaves["b"], state=st,
                  return_state=True, **p, **kw)
    g = torch.Generator().manual_seed(11)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    loss = loss + (fin[0] * torch.randn(fin[0].shape, generator=g, dtype=torch.float64)
                   .to(out.dtype)).sum()
    if len(fin) > 2:
        loss = loss + (fin[2] * torch.randn(fin[2].shape, generator=g, dtype=torch.float64)
                       .to(out.dtype)).sum()
    named = dict(leaves)
    if learn:
        named.update({k: v for k, v in p.items() if isinstance(v, torch.Tensor)})
    if st is not None:
        named["v_init"] = st[0]
        named["s_init"] = st[1]
        if len(st) > 2:
            named["syn_init"] = st[2]
    grads = torch.autograd.grad(loss, list(named.values()))
    return out, fin, dict(zip(named, grads))


def _compare(got, want, tol=F64):
    out_k, fin_k, g_k = got
    out_r, fin_r, g_r = want
    assert torch.equal(out_k, out_r)
    assert len(fin_k) == len(fin_r)
    for a, r in zip(fin_k, fin_r):
        torch.testing.assert_close(a, r.detach(), **tol)
    assert set(g_k) == set(g_r)
    for name in g_r:
        torch.testing.assert_close(g_k[name], g_r[name], **tol, msg=f"d/d{name}")


def _problem(seed, kinds, syn_kind=None):
    x, w, r, b = _inputs(seed)
    params = dict(alpha=_param(kinds[0], 0.8, 0.3, seed), threshold=_param(kinds[1], 1.0, 0.6,
                                                                          seed + 1))
    if syn_kind is not None:
        params["alpha_syn"] = _param(syn_kind, 0.5, 0.4, seed + 2)
    return x, w, r, b, params


KINDS = [("neuron", "neuron"), ("scalar0d", "neuron"), ("neuron", "float"), ("float", "scalar0d")]


@pytest.mark.parametrize("surrogate,reset,backward",
                         list(itertools.product(SURROGATES, RESETS, ["sparse", "dense"])))
@pytest.mark.parametrize("with_state", [False, True])
def test_kernels_match_reference(surrogate, reset, backward, with_state):
    x, w, r, b, params = _problem(5, ("neuron", "neuron"))
    state = _state(5, False) if with_state else None
    kw = dict(b_th=0.3, slope=5.0, surrogate=surrogate, reset=reset, backward=backward)
    got = _run(sparsegrad.rlif_layer, x, w, r, b, params, state, **kw)
    want = _run(ref.rlif_layer, x, w, r, b, params, state, **kw)
    assert want[0].sum() > 0
    assert all(g.abs().max() > 0 for g in want[2].values())
    _compare(got, want)


@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("reset", RESETS)
def test_kernels_parameter_kinds(kinds, backward, learn, reset):
    x, w, r, b, params = _problem(6, kinds)
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)
    state = _state(6, False)
    _compare(_run(sparsegrad.rlif_layer, x, w, r, b, params, state, learn=learn, **kw),
             _run(ref.rlif_layer, x, w, r, b, params, state, learn=learn, **kw))


@pytest.mark.parametrize("reset", RESETS)
def test_kernels_sparse_with_infinite_band_equals_dense(reset):
    x, w, r, b, params = _problem(7, ("neuron", "neuron"))
    state = _state(7, False)
    kw = dict(slope=5.0, reset=reset)
    sparse = _run(sparsegrad.rlif_layer, x, w, r, b, params, state, b_th=math.inf,
                  backward="sparse", **kw)
    dense = _run(sparsegrad.rlif_layer, x, w, r, b, params, state, backward="dense", **kw)
    _compare(sparse, dense)


def test_kernels_sparse_mode_is_sparse_and_keeps_traces_at_active_entries_only():
    x, w, r, b, params = _problem(8, ("neuron", "neuron"))
    a, th = (params[k].clone().requires_grad_(True) for k in ("alpha", "threshold"))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, stats, (cnt, idx) = sparsegrad.functional.rlif_layer_with_stats(
            x, w, r, b, alpha=a, threshold=th, b_th=0.3, slope=5.0)
    n_active = int(stats.active_count)
    assert 0 < n_active < T * B * N // 2 and idx.numel() == n_active
    assert saved
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= T * B * N), (t.dtype, t.shape)
    # the traces P, Q: one value per active entry
    assert sum(1 for t in saved if t.is_floating_point() and t.numel() == n_active) == 3
