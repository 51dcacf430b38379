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


@pytest.mark.parametrize("kernels", [False, True])
def test_reference_equal_per_neuron_values_equal_float(kernels):
    """(kernels: the same for sparsegrad.rlif_layer, whose tensor path is other kernels)"""
    fn = __import__("sparsegrad").rlif_layer if kernels else ref.rlif_layer
    x, w, r, b = _inputs(3)
    kw = dict(b_th=0.3, slope=5.0)
    out_f = fn(x, w, r, b, alpha=0.85, threshold=0.9, **kw)
    out_t = fn(x, w, r, b, alpha=torch.full((N,), 0.85, dtype=torch.float64),
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
from conftest import assert_compile_matches_eager  # noqa: E402

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
@pytest.mark.parametrize("syn", [False, True])
def test_kernels_match_reference(surrogate, reset, backward, with_state, syn):
    x, w, r, b, params = _problem(5, ("neuron", "neuron"), "neuron" if syn else None)
    state = _state(5, syn) if with_state else None
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
@pytest.mark.parametrize("syn_kind", [None, "float", "neuron", "scalar0d"])
def test_kernels_parameter_kinds(kinds, backward, learn, reset, syn_kind):
    x, w, r, b, params = _problem(6, kinds, syn_kind)
    if not any(isinstance(v, torch.Tensor) for v in params.values()) and syn_kind is None:
        pytest.skip("float parameters: the float kernels (tests/test_recurrent.py)")
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)
    state = _state(6, syn_kind is not None)
    _compare(_run(sparsegrad.rlif_layer, x, w, r, b, params, state, learn=learn, **kw),
             _run(ref.rlif_layer, x, w, r, b, params, state, learn=learn, **kw))


@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("syn", [False, True])
def test_kernels_sparse_with_infinite_band_equals_dense(reset, syn):
    x, w, r, b, params = _problem(7, ("neuron", "neuron"), "neuron" if syn else None)
    state = _state(7, syn)
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
    # fixed tensor parameters: no traces at all
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparsegrad.rlif_layer(x, w.clone().requires_grad_(True), r, b, alpha=params["alpha"],
                              threshold=params["threshold"], b_th=0.3, slope=5.0)
    assert sum(1 for t in saved if t.is_floating_point() and t.numel() == n_active) == 1


@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_kernels_chunked_equals_one_call(reset, syn, backward):
    """Two chunks with the state carried (gradients flowing through it) equal one call."""
    x, w, r, b, params = _problem(9, ("neuron", "neuron"), "neuron" if syn else None)
    kw = dict(b_th=0.3, slope=5.0, reset=reset, backward=backward)

    def chunked(x, w, r, b, state=None, return_state=True, **p):
        first, st = sparsegrad.rlif_layer(x[:5], w, r, b, state=state, return_state=True, **p)
        second, st2 = sparsegrad.rlif_layer(x[5:], w, r, b, state=st, return_state=True, **p)
        return torch.cat([first, second]), st2

    got = _run(chunked, x, w, r, b, params, None, **kw)
    want = _run(sparsegrad.rlif_layer, x, w, r, b, params, None, **kw)
    _compare(got, want)
    assert len(got[1]) == (3 if syn else 2)


@pytest.mark.parametrize("syn", [False, True])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_kernels_float32(syn, backward):
    x, w, r, b, params = _problem(10, ("neuron", "scalar0d"), "neuron" if syn else None)
    f32 = lambda t: t.float() if isinstance(t, torch.Tensor) else t  # noqa: E731
    x, w, r, b = map(f32, (x, w, r, b))
    params = {k: f32(v) for k, v in params.items()}
    state = [t.float() for t in _state(10, syn)]
    kw = dict(b_th=0.3, slope=5.0, backward=backward)
    out_k, fin_k, g_k = _run(sparsegrad.rlif_layer, x, w, r, b, params, state, **kw)
    out_r, fin_r, g_r = _run(ref.rlif_layer, x, w, r, b, params, state, **kw)
    assert out_k.dtype == torch.float32 and out_k.sum() > 0
    # (float32 sums in another order could flip a spike right at the threshold; none lies that
    # close in this problem, so the spikes are equal and the gradients close)
    assert torch.equal(out_k, out_r)
    for a, r_ in zip(fin_k, fin_r):
        torch.testing.assert_close(a, r_.detach(), rtol=1e-5, atol=1e-6)
    for name in g_r:
        torch.testing.assert_close(g_k[name], g_r[name], rtol=1e-4,
                                   atol=1e-5 * float(g_r[name].abs().max()), msg=name)


def test_kernels_half_types_run_in_float32():
    x, w, r, b, params = _problem(11, ("neuron", "neuron"), "neuron")
    out = sparsegrad.rlif_layer(x.bfloat16(), w.bfloat16(), r.bfloat16(), b.bfloat16(),
                                alpha=params["alpha"].float(), threshold=params["threshold"].float(),
                                alpha_syn=params["alpha_syn"].float(), b_th=0.3, slope=5.0)
    assert out.dtype == torch.bfloat16 and out.shape == (T, B, N)


def test_kernels_zero_batch_and_zero_steps():
    x, w, r, b, params = _problem(13, ("neuron", "neuron"), "neuron")
    a = params["alpha"].clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    out, st = sparsegrad.rlif_layer(x[:, :0], wl, r, b, alpha=a, threshold=params["threshold"],
                                    alpha_syn=params["alpha_syn"], return_state=True)
    assert out.shape == (T, 0, N) and st.syn.shape == (0, N)
    out.sum().backward()
    assert torch.equal(a.grad, torch.zeros(N, dtype=torch.float64))
    assert torch.equal(wl.grad, torch.zeros_like(w))
    with pytest.raises(ValueError, match="at least one time step"):
        sparsegrad.rlif_layer(x[:0], w, r, b, alpha=a, threshold=params["threshold"])


def test_kernels_bad_arguments():
    x, w, r, b, params = _problem(14, ("neuron", "neuron"))
    a, th = params["alpha"], params["threshold"]
    with pytest.raises(ValueError, match="alpha must be a float or a tensor of shape"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=torch.full((N + 1,), 0.9, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold must be a float or a tensor of shape"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=a, threshold=torch.ones(2, N, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha_syn must be a float or a tensor of shape"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=a, alpha_syn=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha_syn must be in"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=a, alpha_syn=1.5)
    with pytest.raises(TypeError, match="alpha must be a float or a floating-point tensor"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=torch.ones(N, dtype=torch.int64))
    with pytest.raises(ValueError, match="rec_weight must be"):
        sparsegrad.rlif_layer(x, w, r[:3], b, alpha=a, threshold=th)
    v, s, syn = _state(14, True)
    with pytest.raises(TypeError, match="no synaptic current"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=a, state=(v, s, syn))
    with pytest.raises(ValueError, match="state.syn must have shape"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=a, alpha_syn=0.5, state=(v, s, syn[:1]))
    ops = torch.ops.sparsegrad
    with pytest.raises(RuntimeError, match="alpha_syn"):
        ops.rlif_param_forward(x, w, r, b, None, None, None, None, None, a, th,
                               torch.ones(N + 2, dtype=torch.float64), 0.3, 5.0, True)
    with pytest.raises(RuntimeError, match="syn_init"):
        ops.rlif_param_forward(x, w, r, b, None, None, syn, None, None, a, th, None, 0.3, 5.0,
                               True)
    with pytest.raises(RuntimeError, match="threshold"):
        ops.rlif_param_forward(x, w, r, b, None, None, None, None, None, a, th[:2], None, 0.3,
                               5.0, True)


def test_kernels_registered_for_cuda_and_not_cpu_only():
    """The tensor-parameter recurrent ops have CUDA kernels (csrc/cuda/recurrent_host.h; their
    bodies are tested on the CPU by tests/test_rlif_param_emul.py); with a GPU, the layer on CUDA
    equals the CPU layer."""
    from sparsegrad import ops
    for name in ops.RLIF_PARAM_OPS:
        assert name not in ops.CPU_ONLY_OPS
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsegrad::{name}", "CPU")
        if sparsegrad.build_info()["cuda_compiled"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsegrad::{name}", "CUDA")
    if not torch.cuda.is_available():
        return
    x, w, r, b, params = _problem(15, ("neuron", "neuron"), "neuron")
    state = _state(15, True)
    kw = dict(b_th=0.3, slope=5.0)
    on_cpu = _run(sparsegrad.rlif_layer, x, w, r, b, params, state, **kw)
    cuda = [t.cuda() for t in (x, w, r, b)]
    on_gpu = _run(sparsegrad.rlif_layer, *cuda, {k: v.cuda() for k, v in params.items()},
                  [t.cuda() for t in state], **kw)
    assert torch.equal(on_gpu[0].cpu(), on_cpu[0])
    for name in on_cpu[2]:
        torch.testing.assert_close(on_gpu[2][name].cpu(), on_cpu[2][name], **F64, msg=name)


def test_kernels_stacked_dx_on_producer_active_set():
    """x from a sparse sparsegrad layer: dx is formed only on its active set; the gradient that
    reaches the first layer equals the reference chain's."""
    g = torch.Generator().manual_seed(16)
    x0 = (torch.rand(T, B, 11, generator=g) < 0.4).double()
    w0 = torch.randn(N_IN, 11, generator=g, dtype=torch.float64) * 0.9
    _, w, r, b, params = _problem(16, ("neuron", "neuron"), "neuron")

    def chain(fn1, fn2):
        w0l, wl, al = (t.clone().requires_grad_(True) for t in (w0, w, params["alpha"]))
        h = fn1(x0, w0l, alpha=0.8, b_th=0.3, slope=5.0)
        out = fn2(h, wl, r, b, alpha=al, threshold=params["threshold"],
                  alpha_syn=params["alpha_syn"], b_th=0.3, slope=5.0)
        gs = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
        return h, out, torch.autograd.grad((out * gs).sum(), (w0l, wl, al))

    h_k, out_k, g_k = chain(sparsegrad.lif_layer, sparsegrad.rlif_layer)
    assert sparsegrad.functional.producer_active_set(h_k)[0] is not None
    h_r, out_r, g_r = chain(ref.lif_layer, ref.rlif_layer)
    assert torch.equal(h_k, h_r) and torch.equal(out_k, out_r) and h_k.sum() > 0
    for a, r_ in zip(g_k, g_r):
        assert r_.abs().max() > 0
        torch.testing.assert_close(a, r_, **F64)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("syn", [False, True])
def test_kernels_opcheck(sparse, syn):
    x, w, r, b, params = _problem(17, ("neuron", "neuron"), "neuron")
    v0, s0, syn0 = _state(17, True)
    ops = torch.ops.sparsegrad
    a_syn, syn0 = (params["alpha_syn"], syn0) if syn else (None, None)
    for grad in (False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (x, w, r, b, params["alpha"],
                                                            params["threshold"])]
        args = (*leaves[:4], v0, s0, syn0, None, None, leaves[4], leaves[5], a_syn, 0.3, 5.0,
                sparse, "fast_sigmoid", "subtract", True)
        torch.library.opcheck(ops.rlif_param_forward.default, args)
    out = ops.rlif_param_forward(x, w, r, b, v0, s0, syn0, None, None, params["alpha"],
                                 params["threshold"], a_syn, 0.3, 5.0, sparse, "fast_sigmoid",
                                 "subtract", True)
    (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
     ev_cnt, ev_idx, ev_val, spk_bits, _stats) = out
    gs, gv = torch.randn_like(spikes), torch.randn_like(v_final)
    gsyn = torch.randn_like(v_final) if syn else None
    flags = (True,) * 6 + (syn, True)
    if sparse:
        torch.library.opcheck(ops.rlif_param_backward_sparse.default, (
            gs, gv, gsyn, w, r, s0, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
            ev_cnt, ev_idx, ev_val, spk_bits, None, None, params["alpha"], a_syn, "subtract",
            *flags))
    else:
        torch.library.opcheck(ops.rlif_param_backward_dense.default, (
            gs, gv, gsyn, x, w, r, s0, spikes, act_sg, act_p, act_q, act_u, tan_last,
            params["alpha"], a_syn, "subtract", *flags))


# ---------------------------------------------------------------------------------------------
# nn.RLIF with tensor / learnable parameters
# ---------------------------------------------------------------------------------------------
def test_module_learnable_parameters():
    layer = sparsegrad.nn.RLIF(N_IN, N, alpha=torch.full((N,), 0.9), learn_alpha=True,
                               learn_threshold=True, alpha_syn=0.5, learn_alpha_syn=True)
    assert set(layer.state_dict()) == {"weight", "bias", "rec_weight", "alpha", "threshold",
                                       "alpha_syn"}
    assert all(isinstance(getattr(layer, k), torch.nn.Parameter)
               for k in ("alpha", "threshold", "alpha_syn"))
    assert tuple(layer.alpha.shape) == (N,) and layer.threshold.dim() == 0
    x = _inputs(20)[0].float()
    out, st = layer(x, return_state=True)
    assert len(st) == 3 and st.syn.shape == (B, N)
    (out.sum() + st.v.sum() + st.syn.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "alpha_syn=Parameter[]" in repr(layer)


def test_module_matches_functional_reference_and_clamps_alpha():
    layer = sparsegrad.nn.RLIF(N_IN, N, alpha=torch.linspace(0.5, 0.95, N, dtype=torch.float64),
                               learn_alpha=True, dtype=torch.float64, threshold=0.7,
                               alpha_syn=torch.full((N,), 0.4, dtype=torch.float64))
    with torch.no_grad():
        layer.alpha[-1] = 1.3  # a learnt value above 1: used clamped, as snnTorch's beta
    x = _inputs(21)[0]
    out = layer(x)
    want = ref.rlif_layer(x, layer.weight, layer.rec_weight, layer.bias,
                          alpha=layer.alpha.clamp(0, 1), threshold=0.7,
                          alpha_syn=layer.alpha_syn, b_th=0.2, slope=100.0)
    assert torch.equal(out, want)
    out.sum().backward()
    assert layer.alpha.grad[-1] == 0  # outside [0, 1] the clamp passes no gradient


def test_module_fixed_parameters_are_buffers_or_floats():
    layer = sparsegrad.nn.RLIF(N_IN, N)
    assert isinstance(layer.alpha, float) and isinstance(layer.threshold, float)
    assert layer.alpha_syn is None
    fixed = sparsegrad.nn.RLIF(N_IN, N, threshold=torch.full((N,), 1.1), alpha_syn=0.3)
    assert "threshold" in dict(fixed.named_buffers())
    assert isinstance(fixed.alpha_syn, float)
    assert not any(n in ("alpha", "threshold", "alpha_syn") for n, _ in fixed.named_parameters())
    with pytest.raises(ValueError, match="shape \\[\\] or \\[out_features\\]"):
        sparsegrad.nn.RLIF(N_IN, N, alpha=torch.full((N + 1,), 0.9))
    with pytest.raises(ValueError, match="learn_alpha_syn=True needs alpha_syn"):
        sparsegrad.nn.RLIF(N_IN, N, learn_alpha_syn=True)
    with pytest.raises(ValueError, match="alpha must be in"):
        sparsegrad.nn.RLIF(N_IN, N, alpha=torch.full((N,), 1.5))
    import copy
    import pickle
    layer2 = copy.deepcopy(sparsegrad.nn.RLIF(N_IN, N, learn_alpha=True, alpha_syn=0.5))
    pickle.loads(pickle.dumps(layer2))


def test_module_state_with_syn_chunks():
    layer = sparsegrad.nn.RLIF(N_IN, N, alpha_syn=0.6, learn_alpha=True, dtype=torch.float64)
    x = _inputs(22)[0]
    whole, st = layer(x, return_state=True)
    first, st1 = layer(x[:4], return_state=True)
    second, st2 = layer(x[4:], state=st1, return_state=True)
    assert torch.equal(torch.cat([first, second]), whole)
    for a, b_ in zip(st, st2):
        torch.testing.assert_close(a, b_, **F64)


@pytest.mark.parametrize("syn", [False, True])
def test_kernels_saved_bytes_at_most_10_percent_of_dense_bptt(syn):
    """DESIGN.md §7's target for recurrent layers, with learnable per-neuron parameters."""
    from test_memory import nbytes, saved_tensors, shd_like
    x, w, b = shd_like()
    n = w.shape[0]
    g = torch.Generator().manual_seed(1)
    r = (torch.randn(n, n, generator=g) * 0.02).requires_grad_(True)
    alpha = torch.full((n,), 0.95, requires_grad=True)
    threshold = torch.full((n,), 1.0, requires_grad=True)
    a_syn = torch.full((n,), 0.5, requires_grad=True) if syn else None
    kw = dict(alpha=alpha, threshold=threshold, alpha_syn=a_syn)
    out, saved = saved_tensors(lambda: sparsegrad.rlif_layer(x, w, r, b, **kw))
    assert 0.002 < out.mean() < 0.05
    _, saved_ref = saved_tensors(lambda: ref.rlif_layer(x, w, r, b, **kw))
    keep = (w, r, alpha, threshold, a_syn)
    sparse_bytes = nbytes([t for t in saved if not any(t is k for k in keep)])
    ref_bytes = nbytes([t for t in saved_ref if not any(t is k for k in keep)])
    assert sparse_bytes <= 0.10 * ref_bytes, (sparse_bytes, ref_bytes)
    out.sum().backward()
    assert alpha.grad.abs().sum() > 0 and threshold.grad.abs().sum() > 0


class _LearnableRecurrentNet(torch.nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.l1 = sparsegrad.nn.LIF(20, 12, alpha=0.9, b_th=0.5, slope=5.0, backward=backward)
        self.l2 = sparsegrad.nn.RLIF(12, 12, alpha=torch.full((12,), 0.9), learn_alpha=True,
                                     learn_threshold=True, alpha_syn=0.6, learn_alpha_syn=True,
                                     b_th=0.5, slope=5.0, backward=backward)
        self.readout = sparsegrad.nn.LIReadout(12, 4, alpha=0.8)

    def forward(self, x):
        return self.readout(self.l2(self.l1(x)))


@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_kernels_compile_fullgraph_matches_eager(backward):
    torch.manual_seed(0)
    x = (torch.rand(15, 5, 20) < 0.3).float()
    labels = torch.randint(0, 4, (5,))
    model = _LearnableRecurrentNet(backward)
    with torch.no_grad():
        model.l1.weight.mul_(3.0)
        model.l2.weight.mul_(3.0)
    assert_compile_matches_eager(model, x, labels)


def test_kernels_cpu_determinism_across_thread_counts():
    x, w, r, b, params = _problem(23, ("neuron", "neuron"), "neuron")
    state = _state(23, True)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(_run(sparsegrad.rlif_layer, x, w, r, b, params, state, b_th=0.3,
                             slope=5.0))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0])
        for name in runs[0][2]:
            assert torch.equal(other[2][name], runs[0][2][name]), name
