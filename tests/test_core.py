"""The fused LIF and readout ops against sparsegrad.reference: forward, both backward modes."""
import math

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from conftest import (DEVICE_DTYPES, DEVICES, TOL, assert_spikes_match, layer_membrane,
                      random_problem)

SHAPES = [  # T, B, N_in, N_out
    (1, 1, 1, 1), (1, 3, 5, 4), (7, 1, 6, 3), (12, 4, 17, 9), (30, 5, 40, 33), (5, 9, 1, 6),
]


def lif_pair(x, w, b, **kw):
    """(sparsegrad result, reference result) for the same arguments."""
    return sparsegrad.lif_layer(x, w, b, **kw), ref.lif_layer(x, w, b, **kw)


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("use_bias", [True, False])
def test_forward_spikes_exact(device, dtype, shape, rate, use_bias):
    x, w, b = random_problem(*shape, rate=rate, dtype=dtype, device=device, seed=hash((shape, rate)) % 1000)
    b = b if use_bias else None
    for backward in ("sparse", "dense"):
        (s, st), (s_ref, st_ref) = lif_pair(x, w, b, alpha=0.85, backward=backward, return_state=True)
        # events vs the reference's GEMM: spikes equal where V clears the threshold's rounding
        v = layer_membrane(x, w, b, s_ref, 0.85)
        assert_spikes_match(s, s_ref, v)
        torch.testing.assert_close(st.v, st_ref[0], **TOL[dtype])
        assert_spikes_match(st.s, st_ref[1], v[-1] if len(v) else v)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_all_silent_and_all_spiking(device):
    T, B, n_in, n_out = 6, 3, 5, 4
    x = torch.ones(T, B, n_in, dtype=torch.float64, device=device)
    w_big = torch.full((n_out, n_in), 5.0, dtype=torch.float64, device=device)
    s = sparsegrad.lif_layer(x, w_big, alpha=0.9)
    assert torch.equal(s, torch.ones_like(s))
    s = sparsegrad.lif_layer(torch.zeros_like(x), w_big, alpha=0.9)
    assert torch.equal(s, torch.zeros_like(s))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_forward_non_binary_and_non_contiguous(device, dtype):
    x, w, b = random_problem(15, 6, 20, 8, rate=0.4, binary=False, dtype=dtype, device=device)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-major strides
    w_nc = w.t().contiguous().t()
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    s, s_ref = lif_pair(x_nc, w_nc, b, alpha=0.7)
    assert_spikes_match(s, s_ref, layer_membrane(x, w, b, s_ref, 0.7))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_initial_state_and_chunking(device, dtype):
    x, w, b = random_problem(20, 4, 10, 7, rate=0.3, dtype=dtype, device=device)
    v0 = torch.rand(4, 7, dtype=dtype, device=device)
    s0 = (torch.rand(4, 7, device=device) < 0.5).to(dtype)
    s, s_ref = lif_pair(x, w, b, alpha=0.8, state=(v0, s0))
    assert_spikes_match(s, s_ref, layer_membrane(x, w, b, s_ref, 0.8, state=(v0, s0)))
    whole, state = sparsegrad.lif_layer(x, w, b, alpha=0.8, return_state=True)
    first, mid = sparsegrad.lif_layer(x[:9], w, b, alpha=0.8, return_state=True)
    second, end = sparsegrad.lif_layer(x[9:], w, b, alpha=0.8, state=mid, return_state=True)
    # the chunks' input densities differ from the whole's, so each may take the other current
    # route (events or GEMM, cpu_common.h kEventDensityMax): equal up to that rounding
    v = layer_membrane(x, w, b, whole, 0.8)
    assert_spikes_match(torch.cat([first, second]), whole, v)
    torch.testing.assert_close(end.v, state.v, **TOL[dtype])
    assert_spikes_match(end.s, state.s, v[-1])


# ----------------------------------------------------------------------------------------- gradients
def grads_of(fn, x, params, seed=0):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn(x, *params)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(total, [x] + params, allow_unused=True)


def assert_grads_close(got, want, dtype):
    for g, r in zip(got, want):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        torch.testing.assert_close(g, r, **TOL[dtype])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("b_th", [0.2, 0.6])
def test_gradients_match_reference(device, dtype, shape, backward, b_th):
    x, w, b = random_problem(*shape, rate=0.3, dtype=dtype, device=device, seed=sum(shape))
    kw = dict(alpha=0.9, b_th=b_th, slope=5.0, backward=backward)
    got = grads_of(lambda x, w, b: sparsegrad.lif_layer(x, w, b, **kw), x, [w, b])
    want = grads_of(lambda x, w, b: ref.lif_layer(x, w, b, **kw), x, [w, b])
    assert_grads_close(got, want, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gradients_through_state(device, dtype):
    """dL/dV_init and dL/dV_final (a loss on the returned membrane) both flow."""
    x, w, b = random_problem(10, 3, 8, 5, rate=0.3, dtype=dtype, device=device)
    v0 = torch.rand(3, 5, dtype=dtype, device=device)
    s0 = torch.zeros(3, 5, dtype=dtype, device=device)
    for backward in ("sparse", "dense"):
        kw = dict(alpha=0.8, slope=3.0, b_th=0.5, backward=backward, return_state=True)

        def run(impl):
            def f(x, w, b, v):
                s, st = impl(x, w, b, state=(v, s0), **kw)
                return s, st[0]
            return f
        got = grads_of(run(sparsegrad.lif_layer), x, [w, b, v0])
        want = grads_of(run(ref.lif_layer), x, [w, b, v0])
        assert_grads_close(got, want, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_sparse_with_infinite_b_th_equals_dense(device, dtype):
    x, w, b = random_problem(25, 4, 30, 12, rate=0.2, dtype=dtype, device=device)
    dense = grads_of(lambda x, w, b: sparsegrad.lif_layer(x, w, b, alpha=0.9, backward="dense"), x, [w, b])
    sparse = grads_of(lambda x, w, b: sparsegrad.lif_layer(x, w, b, alpha=0.9, b_th=math.inf), x, [w, b])
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(s, d, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_active_set_gives_exact_zeros(device):
    x = torch.zeros(8, 3, 6, dtype=torch.float64, device=device)
    w = torch.randn(4, 6, dtype=torch.float64, device=device)
    spikes, _, stats, _ = sparsegrad.functional.lif_layer_with_stats(x, w, alpha=0.9, b_th=0.1)
    assert int(stats.active_count) == 0
    got = grads_of(lambda x, w: sparsegrad.lif_layer(x, w, alpha=0.9, b_th=0.1), x, [w])
    for g in got:
        assert not torch.isnan(g).any()
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("need_dx", [True, False])
def test_both_dw_routes_agree(dtype, binary, need_dx):
    """dW, db, dV_init through input events (reverse walk) and through the lazily decayed input
    trace with closed-form db/dV (forward walk) are the same sums."""
    x, w, b = random_problem(18, 5, 14, 9, rate=0.3, binary=binary, dtype=dtype)
    out = sparsegrad.ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.4, 10.0, True)
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, _, _ = out
    g = torch.randn_like(spikes)
    gv = torch.randn_like(v_final)
    results = []
    for route in (1, 2):
        results.append(torch.ops.sparsegrad.lif_backward_sparse(
            g, gv, w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, None, None, None, 0.9,
            need_dx, True, True, True, route))
    assert torch.count_nonzero(results[0][1]) > 0
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_out", [1, 15, 16, 17, 130, 300])
@pytest.mark.parametrize("binary", [True, False])
def test_event_route_tiles(dtype, n_out, binary):
    """The event route splits output neurons into SIMD-register tiles walked in groups: any N_out
    (partial last tile, one or several groups per thread) gives the sums of the trace route, and
    the same bits with 1 or 2 threads."""
    x, w, b = random_problem(23, 3, 11, n_out, rate=0.3, binary=binary, dtype=dtype)
    out = sparsegrad.ops.lif_forward(x, w, b, None, None, None, None, 0.85, 1.0, 0.5, 10.0, True)
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, _, _ = out
    assert act_idx.numel() > 0
    g = torch.randn_like(spikes)
    gv = torch.randn_like(v_final)

    def backward(route, grad_v):
        return torch.ops.sparsegrad.lif_backward_sparse(
            g, grad_v, w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, None, None, None, 0.85,
            False, True, True, grad_v is not None, route)[1:]

    for grad_v in (None, gv):
        events, trace = backward(1, grad_v), backward(2, grad_v)
        for a, c in zip(events, trace):
            if a.numel():
                torch.testing.assert_close(a, c, **TOL[dtype])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backward(1, gv)
        torch.set_num_threads(2)
        two = backward(1, gv)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
def test_readout_matches_reference(device, dtype, reduce):
    x, w, b = random_problem(16, 5, 12, 4, rate=0.3, dtype=dtype, device=device)
    out = sparsegrad.li_readout(x, w, b, alpha=0.8, reduce=reduce)
    torch.testing.assert_close(out, ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), **TOL[dtype])
    got = grads_of(lambda x, w, b: sparsegrad.li_readout(x, w, b, alpha=0.8, reduce=reduce), x, [w, b])
    want = grads_of(lambda x, w, b: ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), x, [w, b])
    assert_grads_close(got, want, dtype)


class _Net(torch.nn.Module):
    def __init__(self, lif, readout, backward, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = torch.nn.Parameter((torch.randn(24, 30, generator=g) * 0.6).to(dtype))
        self.b1 = torch.nn.Parameter((torch.randn(24, generator=g) * 0.1).to(dtype))
        self.w2 = torch.nn.Parameter((torch.randn(16, 24, generator=g) * 0.7).to(dtype))
        self.b2 = torch.nn.Parameter((torch.randn(16, generator=g) * 0.1).to(dtype))
        self.w3 = torch.nn.Parameter((torch.randn(5, 16, generator=g) * 0.5).to(dtype))
        self.b3 = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
        self.lif, self.readout, self.backward = lif, readout, backward

    def forward(self, x):
        kw = dict(alpha=0.9, b_th=0.4, slope=10.0, backward=self.backward)
        h1 = self.lif(x, self.w1, self.b1, **kw)
        h2 = self.lif(h1, self.w2, self.b2, **kw)
        return self.readout(h2, self.w3, self.b3, alpha=0.85, reduce="max")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_three_layer_network_gradients(device, dtype, backward):
    """LIF -> LIF -> LIReadout: same parameter gradients as the reference network. In sparse mode
    the hidden layers pass dx only on the producer's active set, which must not change anything."""
    x, _, _ = random_problem(40, 6, 30, 1, rate=0.25, dtype=dtype, device=device, seed=3)
    labels = torch.randint(0, 5, (6,), device=device)
    grads = []
    for lif, readout in ((sparsegrad.lif_layer, sparsegrad.li_readout), (ref.lif_layer, ref.li_readout)):
        net = _Net(lif, readout, backward, dtype).to(device)
        loss = torch.nn.functional.cross_entropy(net(x), labels)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    assert any(torch.count_nonzero(g) > 0 for g in grads[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_dx_restricted_to_producer_active_set():
    """With the producer's active set known, dx equals the full dx on that set, zero elsewhere."""
    x, w1, b1 = random_problem(20, 4, 10, 12, rate=0.3)
    w2 = torch.randn(6, 12, dtype=torch.float64)
    h, _, _, (cnt, idx) = sparsegrad.functional.lif_layer_with_stats(x, w1, b1, alpha=0.9, b_th=0.2)
    h_full = h.detach().clone().requires_grad_(True)  # no producer attached: full dx
    h_restricted = h.detach().clone().requires_grad_(True)
    g = torch.randn(20, 4, 6, dtype=torch.float64)
    # a wide consumer b_th makes the restricted dx clearly the cheaper choice of the kernel
    full, = torch.autograd.grad(sparsegrad.lif_layer(h_full, w2, alpha=0.9, b_th=10.0), h_full, g)
    out = sparsegrad.functional.lif_layer_with_stats(h_restricted, w2, alpha=0.9, b_th=10.0, producer=(cnt, idx))[0]
    restricted, = torch.autograd.grad(out, h_restricted, g)
    mask = torch.zeros(4, 20, 12, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(4 * 20), cnt.long())
    mask.view(-1, 12)[rows, idx.long()] = True
    mask = mask.transpose(0, 1)
    torch.testing.assert_close(restricted[mask], full[mask], rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(restricted[~mask]) == 0



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_out", [1, 17, 130, 300])
@pytest.mark.parametrize("route", [1, 2])
def test_restricted_dx_both_routes(dtype, n_out, route):
    """dx on the producer's active set (computed inside the tiled walk on the events route, by
    the reverse walk otherwise) equals the full dx there, is zero elsewhere, and has the same
    bits with 1 or 2 threads."""
    x, w1, b1 = random_problem(21, 3, 10, 12, rate=0.3, dtype=dtype)
    h, _, _, (cnt, idx) = sparsegrad.functional.lif_layer_with_stats(x, w1, b1, alpha=0.9, b_th=0.2)
    h = h.detach()
    w2 = torch.randn(n_out, 12, dtype=dtype)
    out = sparsegrad.ops.lif_forward(h, w2, None, None, None, cnt, idx, 0.85, 1.0, 10.0, 10.0, True)
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, _, _ = out
    g = torch.randn_like(spikes)

    def dx(prev):
        return torch.ops.sparsegrad.lif_backward_sparse(
            g, None, w2, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, *prev, None, 0.85,
            True, True, True, False, route)[0]

    full, restricted = dx((None, None)), dx((cnt, idx))
    mask = torch.zeros(3, 21, 12, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(3 * 21), cnt.long())
    mask.view(-1, 12)[rows, idx.long()] = True
    mask = mask.transpose(0, 1)
    torch.testing.assert_close(restricted[mask], full[mask], **TOL[dtype])
    assert torch.count_nonzero(restricted[~mask]) == 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dx((cnt, idx))
        torch.set_num_threads(2)
        assert torch.equal(one, dx((cnt, idx)))
    finally:
        torch.set_num_threads(threads)

def test_stats_and_active_set_layout():
    x, w, b = random_problem(9, 3, 7, 5, rate=0.4)
    out = sparsegrad.ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.3, 10.0, True)
    spikes, _, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst_bits, stats = out
    assert rst_bits.numel() == 0  # only reset="zero" keeps the reset spikes
    act_ptr = torch.cat([act_cnt.new_zeros(1, dtype=torch.int64), act_cnt.cumsum(0)])
    assert stats.tolist() == [int(spikes.sum()), act_idx.numel(), int(torch.count_nonzero(x))]
    assert ev_val.numel() == 0  # binary input
    # recompute V with the reference and check the active set entry by entry
    v = torch.zeros(3, 5, dtype=torch.float64)
    s = torch.zeros_like(v)
    cur = torch.nn.functional.linear(x, w, b)
    for t in range(9):
        v = 0.9 * v + cur[t] - s
        s = (v > 1).double()
        for bb in range(3):
            r = bb * 9 + t
            js = act_idx[act_ptr[r]:act_ptr[r + 1]].tolist()
            assert js == [j for j in range(5) if abs(v[bb, j] - 1) < 0.3]
            want = ref.surrogate_grad(v[bb, js] - 1, 10.0)
            torch.testing.assert_close(act_sg[act_ptr[r]:act_ptr[r + 1]], want)


# ------------------------------------------------------------------------------------ nn modules
def test_modules_match_functional_and_linear_state_dict():
    lin = torch.nn.Linear(10, 6)
    lif = sparsegrad.nn.LIF(10, 6, alpha=0.8)
    lif.load_state_dict(lin.state_dict())
    x = (torch.rand(12, 4, 10) < 0.3).float()
    assert torch.equal(lif(x), sparsegrad.lif_layer(x, lin.weight, lin.bias, alpha=0.8))
    assert lif.last_stats.numel == 12 * 4 * 6
    assert 0.0 <= lif.last_stats.active_fraction <= 1.0
    lif_bf = sparsegrad.nn.LIF(10, 6, alpha=0.8, batch_first=True)
    lif_bf.load_state_dict(lin.state_dict())
    assert torch.equal(lif_bf(x.transpose(0, 1)).transpose(0, 1), lif(x))
    ro = sparsegrad.nn.LIReadout(6, 3, alpha=0.7, reduce="mean")
    assert ro(lif(x)).shape == (4, 3)


# ---------------------------------------------------------------------------- validation messages
@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(threshold=0.0), "threshold"),
    (dict(b_th=0.0), "b_th"), (dict(b_th=-1.0), "b_th"), (dict(slope=0.0), "slope"),
    (dict(backward="fast"), "backward"), (dict(alpha=float("nan")), "alpha"),
])
def test_invalid_hyperparameters(kwargs, match):
    x, w, b = random_problem(3, 2, 4, 3)
    args = dict(alpha=0.9)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sparsegrad.lif_layer(x, w, b, **args)


def test_invalid_tensors():
    x, w, b = random_problem(3, 2, 4, 3)
    cases = [
        ((x[0], w, b), "x"), ((x, w[0], b), "weight"), ((x, w[:, :3], b), "weight"),
        ((x, w, b[:2]), "bias"), ((x.long(), w, b), "x"), ((x.to(torch.complex64), w, b), "x"),
        ((x, w.float(), b), "weight"), ((x, w, b.float()), "bias"), ((x, w, b.reshape(3, 1)), "bias"),
    ]
    for args, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            sparsegrad.lif_layer(*args, alpha=0.9)
    with pytest.raises((ValueError, TypeError), match="state"):
        sparsegrad.lif_layer(x, w, b, alpha=0.9, state=(torch.zeros(2, 4, dtype=x.dtype),) * 2)
    with pytest.raises(ValueError, match="reduce"):
        sparsegrad.li_readout(x, w, b, alpha=0.9, reduce="median")
    with pytest.raises((ValueError, TypeError), match="alpha"):
        sparsegrad.li_readout(x, w, b, alpha=2.0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight"):
            sparsegrad.lif_layer(x, w.cuda(), b, alpha=0.9)


def test_invalid_inputs_to_raw_ops_are_caught_in_cpp():
    x, w, b = random_problem(3, 2, 4, 3)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.sparsegrad.lif_forward(x, w[:, :2], b, None, None, None, None, 0.9, 1.0, 0.2, 100.0, True)
    with pytest.raises(RuntimeError, match="alpha"):
        torch.ops.sparsegrad.lif_forward(x, w, b, None, None, None, None, 1.9, 1.0, 0.2, 100.0, True)
    with pytest.raises(RuntimeError, match="reduce"):
        torch.ops.sparsegrad.li_readout_forward(x, w, b, None, None, 0.9, "median")
    with pytest.raises(RuntimeError, match="x"):
        torch.ops.sparsegrad.lif_forward(x.long(), w, b, None, None, None, None, 0.9, 1.0, 0.2, 100.0, True)


def test_module_constructor_validation():
    with pytest.raises(ValueError, match="in_features"):
        sparsegrad.nn.LIF(0, 3)
    with pytest.raises(ValueError, match="backward"):
        sparsegrad.nn.LIF(3, 3, backward="nope")
    with pytest.raises(ValueError, match="reduce"):
        sparsegrad.nn.LIReadout(3, 3, reduce="nope")
    with pytest.raises(ValueError, match="input"):
        sparsegrad.nn.LIF(3, 3)(torch.zeros(4, 3))


def test_build_info():
    info = sparsegrad.build_info()
    assert info["version"] == sparsegrad.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert all(sparsegrad.ops.registered_kernels("CPU").values())


@pytest.mark.parametrize("device", DEVICES)
def test_dense_backwards_refuse_x_with_other_time_and_batch(device):
    """An x of shape [B, T, N_in] (the same numel as [T, B, N_in]) must not pass a view into a
    silently wrong dW: every backward op that takes x checks its T and B against grad_spikes."""
    T, B, n_in, n = 5, 3, 4, 6
    x, w, b = random_problem(T, B, n_in, n, device=device)
    r = torch.zeros(n, n, dtype=x.dtype, device=device)
    g = torch.randn(T, B, n, dtype=x.dtype, device=device)
    sg = torch.rand(T, B, n, dtype=x.dtype, device=device)
    bad = x.transpose(0, 1).contiguous()  # [B, T, N_in]
    ops = torch.ops.sparsegrad
    with pytest.raises(RuntimeError, match="lif_backward_dense: argument 'x'"):
        ops.lif_backward_dense(g, None, bad, w, sg, None, 0.9, True, True, True, True)
    with pytest.raises(RuntimeError, match="rlif_backward_dense: argument 'x'"):
        ops.rlif_backward_dense(g, None, bad, w, r, None, (sg > 0.5).to(x.dtype), sg, 0.9, "subtract",
                                True, True, True, True, True, True)
    ops.lif_backward_dense(g, None, x, w, sg, None, 0.9, True, True, True, True)  # the right x passes
