"""The recurrent LIF layer (issue 12): rlif_layer / nn.RLIF against sparsegrad.reference.rlif_layer.

Spikes must agree exactly, gradients (dx, dW, dR, db and the initial state) to 1e-10 in float64,
in dense mode (unmasked surrogate) and sparse mode (masked surrogate).
"""
import copy
import math
import pickle

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from sparsegrad.nn import LIF, RLIF
from conftest import DEVICES, TOL, assert_compile_matches_eager, assert_spikes_match, layer_membrane

SURROGATES = ["fast_sigmoid", "atan", "sigmoid", "triangle"]
RESETS = ["subtract", "zero", "none"]


def rlif_problem(T, B, n_in, n, *, rate=0.3, rec_scale=0.6, drive=1.5, dtype=torch.float64,
                 binary=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, n_in, generator=g) < rate).to(dtype)
    if not binary:
        x = x * torch.rand(T, B, n_in, generator=g).to(dtype)
    w = (torch.randn(n, n_in, generator=g) * drive / math.sqrt(rate * n_in + 1)).to(dtype)
    r = (torch.randn(n, n, generator=g) * rec_scale / math.sqrt(n)).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return x, w, r, b


def run_both(x, w, r, b, *, state=None, grad_v=True, seed=1, **kw):
    """Runs the reference and sparsegrad with the same upstream gradients; returns both sets of
    (spikes, v_final, dx, dW, dR, db, dv_init, ds_init)."""
    results = []
    for f in (ref.rlif_layer, sparsegrad.rlif_layer):
        leaves = [t.clone().requires_grad_() for t in (x, w, r, b)]
        st = None
        if state is not None:
            st = tuple(t.clone().requires_grad_() for t in state)
        spk, (v_fin, _) = f(*leaves, state=st, return_state=True, **kw)
        g = torch.Generator().manual_seed(seed)
        loss = (spk * torch.randn(spk.shape, generator=g, dtype=spk.dtype).to(spk.device)).sum()
        if grad_v:
            loss = loss + (v_fin * torch.randn(v_fin.shape, generator=g, dtype=spk.dtype)
                           .to(spk.device)).sum()
        loss.backward()
        grads = [t.grad for t in leaves] + ([t.grad for t in st] if st else [None, None])
        results.append([spk.detach(), v_fin.detach()] + grads)
    # the reference's membrane, to compare spikes off the threshold's rounding (events vs GEMM)
    thr = kw.get("threshold", 1.0)
    v = layer_membrane(x, w, b, results[0][0], kw["alpha"], thr, kw.get("reset", "subtract"),
                       state=state, rec_weight=r)
    for res in results:
        res.append((v, thr))
    return results


def assert_same(got, want, dtype=torch.float64):
    names = ["spikes", "v_final", "dx", "dW", "dR", "db", "dv_init", "ds_init"]
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        if name == "spikes":
            if len(want) > 8:
                assert_spikes_match(g, w, *want[8])
            else:
                assert torch.equal(g, w), "spikes differ"
        else:
            tol = dict(TOL[dtype])
            if dtype == torch.float32:  # round-off through the recurrence: relative to the scale
                tol["atol"] = 1e-5 * (1.0 + float(w.abs().max()))
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- against reference
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("backward,b_th", [("dense", 0.2), ("sparse", 0.3), ("sparse", math.inf)])
@pytest.mark.parametrize("device", DEVICES)
def test_rlif_matches_reference(reset, surrogate, backward, b_th, device):
    x, w, r, b = (t.to(device) for t in rlif_problem(17, 3, 11, 9, seed=len(reset) + len(surrogate)))
    g = torch.Generator().manual_seed(5)
    state = (torch.randn(3, 9, generator=g, dtype=torch.float64).to(device),
             (torch.rand(3, 9, generator=g) < 0.4).double().to(device))
    slope = 0.5 if surrogate == "triangle" else 5.0  # triangle's support is |u| < 1/slope
    kw = dict(alpha=0.9, threshold=1.0, b_th=b_th, slope=slope, surrogate=surrogate, reset=reset,
              backward=backward)
    want, got = run_both(x, w, r, b, state=state, **kw)
    assert 0.05 < want[0].mean() < 0.6  # the layer spikes
    assert_same(got, want)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 6, 5), (9, 1, 7, 1), (5, 2, 1, 3),
                                   (13, 5, 17, 11), (6, 3, 40, 33), (4, 37, 9, 7)])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_rlif_random_shapes(shape, backward, binary, device):
    x, w, r, b = (t.to(device) for t in rlif_problem(*shape, binary=binary, seed=sum(shape)))
    kw = dict(alpha=0.8, threshold=0.7, b_th=0.4, slope=4.0, backward=backward)
    for state in (None, (torch.randn(shape[1], shape[3], dtype=torch.float64).to(device),
                         (torch.rand(shape[1], shape[3]) < 0.5).double().to(device))):
        for grad_v in (False, True):
            want, got = run_both(x, w, r, b, state=state, grad_v=grad_v, **kw)
            assert_same(got, want)


def test_rlif_random_problems():
    """Random sizes, rates, decays and mask widths."""
    g = torch.Generator().manual_seed(123)
    for k in range(12):
        T, B, n_in, n = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (15, 5, 30, 40))
        rate = float(torch.rand(1, generator=g)) * 0.5
        alpha = float(torch.rand(1, generator=g))
        b_th = [0.05, 0.3, 1.0, math.inf][k % 4]
        reset = RESETS[k % 3]
        x, w, r, b = rlif_problem(T, B, n_in, n, rate=rate, rec_scale=1.5, seed=k)
        want, got = run_both(x, w, r, b, alpha=alpha, b_th=b_th, slope=3.0, reset=reset)
        assert_same(got, want)


def test_rlif_silent_and_saturated_layers():
    x, w, r, b = rlif_problem(12, 3, 10, 8)
    # silent: nothing near threshold, so every gradient is exactly zero in sparse mode
    want, got = run_both(x, w * 0, r * 0, b * 0 - 5, alpha=0.9, b_th=0.2, slope=5.0, grad_v=False)
    assert got[0].sum() == 0
    assert_same(got, want)
    for grad in got[2:6]:
        assert torch.count_nonzero(grad) == 0
    # saturated: every neuron fires every step
    want, got = run_both(x, w * 0, r * 0 + 2.0, b * 0 + 10, alpha=0.9, b_th=0.2, slope=5.0)
    assert got[0].min() == 1
    assert_same(got, want)
    want, got = run_both(x, w, r + 2.0, b + 10, alpha=0.9, backward="dense", slope=5.0)
    assert_same(got, want)


@pytest.mark.parametrize("reset", RESETS)
def test_rlif_b_th_inf_equals_dense(reset):
    x, w, r, b = rlif_problem(15, 4, 12, 10, seed=3)
    grads = []
    for backward, b_th in (("dense", 0.2), ("sparse", math.inf)):
        leaves = [t.clone().requires_grad_() for t in (x, w, r, b)]
        spk = sparsegrad.rlif_layer(*leaves, alpha=0.85, b_th=b_th, slope=5.0, reset=reset,
                                    surrogate="atan", backward=backward)
        (spk * torch.linspace(-1, 1, spk.numel(), dtype=spk.dtype).view(spk.shape)).sum().backward()
        grads.append([spk.detach()] + [t.grad for t in leaves])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rlif_float32_and_float64(dtype):
    x, w, r, b = rlif_problem(20, 4, 16, 12, dtype=dtype, seed=9)
    want, got = run_both(x, w, r, b, alpha=0.9, b_th=0.3, slope=5.0)
    assert_same(got, want, dtype)


# ------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("reset", RESETS)
def test_rlif_state_carried_across_chunks(reset):
    """Two chunks with the state passed on (gradients flowing through it) equal one long run."""
    x, w, r, b = rlif_problem(20, 3, 8, 7, seed=11)
    kw = dict(alpha=0.9, b_th=0.3, slope=5.0, reset=reset)
    out = []
    for chunks in (1, 2):
        leaves = [t.clone().requires_grad_() for t in (x, w, r, b)]
        xs = leaves[0].split(20 // chunks)
        state, spikes = None, []
        for xc in xs:
            s, state = sparsegrad.rlif_layer(xc, *leaves[1:], state=state, return_state=True, **kw)
            spikes.append(s)
        spk = torch.cat(spikes)
        (spk * torch.arange(spk.numel(), dtype=spk.dtype).view(spk.shape).sin()).sum().backward()
        out.append([spk.detach(), state.v.detach()] + [t.grad for t in leaves])
    for a, c in zip(*out):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


def test_rlif_module_state_and_layouts():
    torch.manual_seed(0)
    layer = RLIF(6, 5, alpha=0.8, slope=5.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(4)
        layer.rec_weight.mul_(2)
    x = (torch.rand(10, 3, 6) < 0.4).double()
    spk, state = layer(x, return_state=True)
    assert spk.shape == (10, 3, 5) and state.v.shape == (3, 5)
    assert layer.last_stats.numel == 150 and int(layer.last_stats.spike_count) == int(spk.sum())
    want = ref.rlif_layer(x, layer.weight, layer.rec_weight, layer.bias, alpha=0.8, slope=5.0)
    assert_spikes_match(spk, want, layer_membrane(x, layer.weight, layer.bias, want, 0.8,
                                                  rec_weight=layer.rec_weight))
    bf = copy.deepcopy(layer)
    bf.batch_first = True
    assert torch.equal(bf(x.transpose(0, 1)).transpose(0, 1), spk)
    # chunked through the module
    s1, st = layer(x[:4], return_state=True)
    s2 = layer(x[4:], state=st)
    # a chunk's input density may pick the other current route (events / GEMM) than the whole's
    assert_spikes_match(torch.cat([s1, s2]), spk, layer_membrane(
        x, layer.weight, layer.bias, spk, 0.8, rec_weight=layer.rec_weight))
    # parameters and pickling
    assert set(dict(layer.named_parameters())) == {"weight", "rec_weight", "bias"}
    assert layer.rec_weight.shape == (5, 5)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.last_stats is None and torch.equal(clone(x), spk)
    assert "surrogate='fast_sigmoid'" in repr(layer) and "reset='subtract'" in repr(layer)


# ----------------------------------------------------------------------- producer's active set
@pytest.mark.parametrize("first", ["rlif", "lif"])
@pytest.mark.parametrize("second", ["rlif", "lif"])
def test_rlif_stacked_layers_dx_on_producer_active_set(first, second):
    """A sparse layer feeding another: dx is computed only on the producer's active set, and the
    whole network's gradients still equal the reference's."""
    torch.manual_seed(0)
    x = (torch.rand(16, 3, 10) < 0.4).double()
    mods = {"rlif": lambda i, o: RLIF(i, o, alpha=0.9, slope=5.0, b_th=0.3, dtype=torch.float64),
            "lif": lambda i, o: LIF(i, o, alpha=0.9, slope=5.0, b_th=0.3, dtype=torch.float64)}
    l1, l2 = mods[first](10, 12), mods[second](12, 8)
    with torch.no_grad():
        for p in list(l1.parameters()) + list(l2.parameters()):
            p.mul_(3)

    def reference(layer, inp):
        if isinstance(layer, RLIF):
            return ref.rlif_layer(inp, layer.weight, layer.rec_weight, layer.bias, alpha=0.9,
                                  slope=5.0, b_th=0.3)
        return ref.lif_layer(inp, layer.weight, layer.bias, alpha=0.9, slope=5.0, b_th=0.3)

    grads = []
    for fwd in (lambda inp, l: l(inp), lambda inp, l: reference(l, inp)):
        for p in list(l1.parameters()) + list(l2.parameters()):
            p.grad = None
        out = fwd(fwd(x, l1), l2)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in list(l1.parameters()) + list(l2.parameters())])
    assert torch.equal(grads[0][0], grads[1][0])
    for a, c in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


# -------------------------------------------------------------------- determinism, memory, ops
def _cpu_backward(threads, backward="sparse"):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, r, b = rlif_problem(30, 16, 40, 48, rate=0.1, dtype=torch.float32, seed=4)
        leaves = [t.clone().requires_grad_() for t in (x, w, r, b)]
        spk = sparsegrad.rlif_layer(*leaves, alpha=0.9, b_th=0.4, slope=5.0, backward=backward)
        (spk * torch.linspace(-1, 1, spk.numel()).view(spk.shape)).sum().backward()
        return [spk.detach()] + [t.grad for t in leaves]
    finally:
        torch.set_num_threads(before)


def test_rlif_cpu_determinism_across_thread_counts():
    one, two = _cpu_backward(1), _cpu_backward(2)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
    for a, c in zip(_cpu_backward(2), two):  # and from run to run
        assert torch.equal(a, c)


def test_rlif_sparse_saves_no_dense_tensor():
    T, B, n_in, n = 40, 8, 50, 30
    x, w, r, b = rlif_problem(T, B, n_in, n, rate=0.05, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (w, r, b)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparsegrad.rlif_layer(x, *leaves, alpha=0.9, b_th=0.2)
    assert saved
    for t in saved:
        assert t.dim() < 3 or t.dtype == torch.int32, (t.dtype, t.shape)  # spk_bits: T*B*N/32 words
        assert not (t.is_floating_point() and t.numel() >= T * B * n)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_rlif_opcheck_forward(requires_grad):
    x, w, r, b = rlif_problem(6, 3, 5, 4, rate=0.4, seed=2)
    v0, s0 = torch.rand(3, 4, dtype=torch.float64), (torch.rand(3, 4) < 0.5).double()
    for sparse in (True, False):
        for state, kinds in (((None, None), ("atan", "zero")), ((v0, s0), ("fast_sigmoid", "subtract"))):
            leaves = [t.clone().requires_grad_(requires_grad) for t in (x, w, r, b)]
            args = (*leaves, *state, None, None, 0.9, 1.0, 0.3, 5.0, sparse, *kinds)
            torch.library.opcheck(torch.ops.sparsegrad.rlif_forward.default, args)


def test_rlif_opcheck_backward_ops():
    ops = torch.ops.sparsegrad
    x, w, r, b = rlif_problem(6, 3, 5, 4, rate=0.4, seed=2)
    s0 = (torch.rand(3, 4) < 0.5).double()
    (spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, _) = ops.rlif_forward(
        x, w, r, b, None, s0, None, None, 0.9, 1.0, 0.3, 5.0, True, "atan", "zero")
    g, gv = torch.randn_like(spikes), torch.randn_like(v_final)
    prev_cnt = torch.full((18,), 2, dtype=torch.int32)
    prev_idx = torch.tensor([0, 3] * 18, dtype=torch.int32)
    for prev in ((None, None), (prev_cnt, prev_idx)):
        torch.library.opcheck(ops.rlif_backward_sparse.default, (
            g, gv, w, r, s0, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, *prev, 0.9,
            "zero", True, True, True, True, True, True))
    torch.library.opcheck(ops.rlif_backward_sparse.default, (
        g, None, w, r, None, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, None, None,
        0.9, "subtract", False, True, False, True, False, False))
    spikes, _, _, _, sg, *_ = ops.rlif_forward(x, w, r, b, None, s0, None, None, 0.9, 1.0, 0.3,
                                                5.0, False, "atan", "zero")
    torch.library.opcheck(ops.rlif_backward_dense.default, (
        g, gv, x, w, r, s0, spikes, sg, 0.9, "zero", True, True, True, True, True, True))


class _RecurrentNet(torch.nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.l1 = RLIF(20, 16, alpha=0.9, b_th=0.5, slope=10.0, backward=backward)
        self.l2 = RLIF(16, 12, alpha=0.9, b_th=0.5, slope=10.0, backward=backward)
        self.readout = sparsegrad.nn.LIReadout(12, 4, alpha=0.8)

    def forward(self, x):
        return self.readout(self.l2(self.l1(x)))


@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_rlif_compile_fullgraph_matches_eager(backward):
    torch.manual_seed(0)
    x = (torch.rand(15, 5, 20) < 0.3).float()
    labels = torch.randint(0, 4, (5,))
    model = _RecurrentNet(backward)
    with torch.no_grad():
        model.l1.weight.mul_(3.0)
        model.l2.weight.mul_(3.0)
    assert_compile_matches_eager(model, x, labels)


def test_rlif_argument_errors():
    x, w, r, b = rlif_problem(4, 2, 5, 3)
    with pytest.raises(ValueError, match="rec_weight"):
        sparsegrad.rlif_layer(x, w, r[:2], b, alpha=0.9)
    with pytest.raises(ValueError, match="surrogate"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=0.9, surrogate="erf")
    with pytest.raises(ValueError, match="reset"):
        sparsegrad.rlif_layer(x, w, r, b, alpha=0.9, reset="soft")
    with pytest.raises(RuntimeError, match="rlif_forward: argument 'rec_weight'"):
        torch.ops.sparsegrad.rlif_forward(x, w, r[:2], b, None, None, None, None, 0.9, 1.0, 0.2,
                                          5.0, True)
    with pytest.raises(RuntimeError, match="rlif_forward: argument 'reset'"):
        torch.ops.sparsegrad.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 0.2, 5.0,
                                          True, "atan", "soft")
    with pytest.raises(ValueError):
        RLIF(3, 4, surrogate="nope")


# ------------------------------------------------------------------------------------ snnTorch
def test_rlif_spikes_equal_snntorch_rleaky():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    T, B, n_in, n = 30, 4, 12, 10
    fc = torch.nn.Linear(n_in, n).double()
    lif = snn.RLeaky(beta=0.85, linear_features=n, threshold=0.8).double()
    with torch.no_grad():
        fc.weight.mul_(3)
        lif.recurrent.weight.mul_(2)
    x = (torch.rand(T, B, n_in) < 0.3).double()
    spk, mem = lif.init_rleaky()
    out = []
    for t in range(T):
        spk, mem = lif(fc(x[t]), spk.to(x.dtype), mem)
        out.append(spk.to(x.dtype))
    want = torch.stack(out)
    got = sparsegrad.rlif_layer(x, fc.weight, lif.recurrent.weight,
                                fc.bias + lif.recurrent.bias, alpha=0.85, threshold=0.8,
                                surrogate="atan", slope=2.0)
    assert 0.05 < want.mean() < 0.6
    assert_spikes_match(got, want, layer_membrane(x, fc.weight, fc.bias + lif.recurrent.bias, want,
                                                  0.85, 0.8, rec_weight=lif.recurrent.weight), 0.8)


# --------------------------------------------------------------------------- GPU (skipped here)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _rlif_all_outputs(x, w, r, b, s0, g, gv, prev):
    ops = torch.ops.sparsegrad
    outs = []
    for reset in RESETS:
        fwd = ops.rlif_forward(x, w, r, b, None, s0, None, None, 0.9, 1.0, 0.4, 5.0, True, "atan", reset)
        outs += list(fwd)
        for p in ((None, None), prev):
            outs += list(ops.rlif_backward_sparse(g, gv, w, r, s0, *fwd[2:9], *p, 0.9, reset,
                                                  True, True, True, True, True, True))
        dense = ops.rlif_forward(x, w, r, b, None, s0, None, None, 0.9, 1.0, 0.4, 5.0, False, "atan", reset)
        outs += list(dense)
        outs += list(ops.rlif_backward_dense(g, gv, x, w, r, s0, dense[0], dense[4], 0.9, reset,
                                             True, True, True, True, True, True))
    return outs


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rlif_cuda_equals_cpu_and_determinism_two_runs(dtype):
    x, w, r, b = rlif_problem(40, 8, 64, 48, rate=0.1, dtype=dtype, seed=6)
    # weights on a grid of 1/64: every current is exact whatever the summation order (cuBLAS or
    # CPU events), so the spikes and the compact outputs must agree bit for bit across devices
    w, r, b = (torch.round(t * 64) / 64 for t in (w, r, b))
    s0 = (torch.rand(8, 48) < 0.3).to(dtype)
    g, gv = torch.randn(40, 8, 48, dtype=dtype), torch.randn(8, 48, dtype=dtype)
    mask = torch.rand(8, 40, 64) < 0.3
    prev = (mask.sum(-1).reshape(-1).to(torch.int32), mask.reshape(-1, 64).nonzero()[:, 1].to(torch.int32))
    cpu = _rlif_all_outputs(x, w, r, b, s0, g, gv, prev)
    dev = [t.cuda() for t in (x, w, r, b, s0, g, gv)]
    first = _rlif_all_outputs(*dev, tuple(t.cuda() for t in prev))
    second = _rlif_all_outputs(*dev, tuple(t.cuda() for t in prev))
    for k, (a, c, h) in enumerate(zip(first, second, cpu)):
        assert torch.equal(a, c), f"output {k} differs between two GPU runs"
        if a.is_floating_point():  # gradients: CPU and GPU sum in different orders
            tol = 1e-3 * (1.0 + float(h.abs().max())) if dtype == torch.float32 else 1e-9
            torch.testing.assert_close(a.cpu(), h, rtol=tol, atol=tol)
        else:  # compact outputs, bits, stats: identical
            assert torch.equal(a.cpu(), h), f"output {k} differs from the CPU's"


@cuda_only
def test_rlif_cuda_backward_does_not_synchronise():
    ops = torch.ops.sparsegrad
    x, w, r, b = (t.cuda() for t in rlif_problem(30, 8, 64, 32, rate=0.1, dtype=torch.float32, seed=2))
    fwd = ops.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 0.4, 5.0, True)
    dense = ops.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 0.4, 5.0, False)
    prev = (torch.full((30 * 8,), 64, dtype=torch.int32, device="cuda"),
            torch.arange(64, dtype=torch.int32, device="cuda").repeat(30 * 8))
    g = torch.randn(30, 8, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in ((None, None), prev):
            ops.rlif_backward_sparse(g, None, w, r, None, *fwd[2:9], *p, 0.9, "subtract", True, True,
                                     True, True, False, False)
        ops.rlif_backward_dense(g, None, x, w, r, None, dense[0], dense[4], 0.9, "subtract", True,
                                True, True, True, False, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------- float16 / bfloat16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_rlif_half_types_run_the_float32_kernel(dtype, backward):
    """Half-type inputs run the float32 kernel on float32 copies (csrc/low_precision.h): spikes
    equal the float32 op's on the rounded inputs, gradients up to the half type's rounding."""
    x, w, r, b = (t.to(dtype) for t in rlif_problem(20, 3, 12, 10, dtype=torch.float32, seed=4))
    outs = []
    for dt in (dtype, torch.float32):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (w, r, b)]
        spk = sparsegrad.rlif_layer(x.to(dt), *leaves, alpha=0.9, b_th=0.4, slope=5.0,
                                    backward=backward, surrogate="atan")
        assert spk.dtype == dt
        (spk.float() * torch.linspace(-1, 1, spk.numel()).view(spk.shape)).sum().backward()
        outs.append([spk.detach().float()] + [t.grad.float() for t in leaves])
    assert torch.equal(outs[0][0], outs[1][0])
    # dL/dS reaches the op rounded to the half type, and the gradients leave it rounded
    rtol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for got, want in zip(outs[0][1:], outs[1][1:]):
        assert float((got - want).norm() / want.norm()) < rtol


def test_rlif_follows_autocast():
    layer = RLIF(12, 10, alpha=0.9, slope=5.0)
    x = (torch.rand(15, 3, 12) < 0.3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spk = layer(x)
    assert spk.dtype == torch.bfloat16
    spk.float().sum().backward()
    assert layer.rec_weight.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
