"""Every surrogate and every reset of the fused LIF layer (csrc/lif_math.h) against the reference,
in both backward modes, and against snnTorch's Leaky for the resets it defines."""
import math

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from conftest import DEVICE_DTYPES, TOL, assert_spikes_match, layer_membrane, random_problem

SURROGATES = sparsegrad.functional.SURROGATES
RESETS = sparsegrad.functional.RESETS
# a slope per surrogate that gives gradients on a useful range of |V - threshold|
SLOPES = {"fast_sigmoid": 10.0, "atan": 2.0, "sigmoid": 5.0, "triangle": 2.0}


def _problem(shape, dtype, device, seed):
    T, B, n_in, n_out = shape
    x, w, b = random_problem(*shape, rate=0.35, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    v0 = (torch.rand(B, n_out, generator=g) * 1.5).to(dtype).to(device)
    s0 = (torch.rand(B, n_out, generator=g) < 0.4).to(dtype).to(device)
    return x, w, b, v0, s0


def _grads(layer, x, w, b, v0, s0, seed=0, **kw):
    """Gradients of a random projection of (spikes, V_final) w.r.t. x, W, b and V_init."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, v0)]
    xs, ws, bs, vs = leaves
    spikes, (v, _) = layer(xs, ws, bs, state=(vs, s0), return_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(spikes.shape, generator=g, dtype=spikes.dtype).to(spikes.device)
    gv = torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)
    loss = (spikes * gs).sum() + (v * gv).sum()
    return spikes.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (17, 4, 12, 9), (9, 3, 7, 40)])
def test_lif_layer_matches_reference(device, dtype, surrogate, reset, backward, shape):
    x, w, b, v0, s0 = _problem(shape, dtype, device, seed=sum(shape))
    kw = dict(alpha=0.85, threshold=1.0, b_th=0.6, surrogate=surrogate, slope=SLOPES[surrogate],
              reset=reset, backward=backward)
    got_s, got = _grads(sparsegrad.lif_layer, x, w, b, v0, s0, **kw)
    want_s, want = _grads(ref.lif_layer, x, w, b, v0, s0, **kw)
    # events vs the reference's GEMM: spikes equal off the threshold's rounding
    assert_spikes_match(got_s, want_s, layer_membrane(x, w, b, want_s, 0.85, reset=reset, state=(v0, s0)))
    for name, a, c in zip(("dx", "dW", "db", "dV_init"), got, want):
        torch.testing.assert_close(a, c, **TOL[dtype], msg=name)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("reset", RESETS)
def test_unmasked_sparse_equals_dense(surrogate, reset):
    """b_th = inf: the sparse backward is the dense one, for every surrogate and reset."""
    x, w, b, v0, s0 = _problem((14, 3, 10, 21), torch.float64, "cpu", seed=5)
    kw = dict(alpha=0.9, surrogate=surrogate, slope=SLOPES[surrogate], reset=reset)
    _, sparse = _grads(sparsegrad.lif_layer, x, w, b, v0, s0, b_th=math.inf, backward="sparse", **kw)
    _, dense = _grads(sparsegrad.lif_layer, x, w, b, v0, s0, backward="dense", **kw)
    assert any(torch.count_nonzero(g) > 0 for g in dense)
    for a, c in zip(sparse, dense):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_saved_surrogate_values(surrogate):
    """The forward keeps the chosen surrogate's value at each active entry."""
    x, w, b, _, _ = _problem((8, 2, 6, 5), torch.float64, "cpu", seed=2)
    slope = SLOPES[surrogate]
    out = sparsegrad.ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.7, slope, True,
                                     surrogate, "subtract")
    act_cnt, act_idx, act_sg = out[2:5]
    v = torch.zeros(2, 5, dtype=torch.float64)
    s = torch.zeros_like(v)
    cur = torch.nn.functional.linear(x, w, b)
    us = []
    for t in range(8):
        v = 0.9 * v + cur[t] - s
        s = (v > 1).double()
        us.append(v - 1)
    u = torch.stack(us).transpose(0, 1)  # [B, T, N]: rows b*T + t
    mask = u.abs() < 0.7
    assert torch.equal(act_cnt, mask.reshape(16, 5).sum(1).int())
    assert torch.equal(act_idx, mask.reshape(16, 5).nonzero()[:, 1].int())
    torch.testing.assert_close(act_sg, ref.surrogate_grad(u[mask], slope, surrogate))


def test_surrogate_formulas():
    """The closed forms named in the docs, at a few points (a = 2)."""
    u = torch.tensor([0.0, 0.1, -0.3, 2.0], dtype=torch.float64)
    a = 2.0
    torch.testing.assert_close(ref.surrogate_grad(u, a, "atan"), (a / 2) / (1 + (math.pi / 2 * a * u) ** 2))
    sig = torch.sigmoid(a * u)
    torch.testing.assert_close(ref.surrogate_grad(u, a, "sigmoid"), a * sig * (1 - sig))
    torch.testing.assert_close(ref.surrogate_grad(u, a, "triangle"), a * torch.clamp(1 - a * u.abs(), min=0))
    torch.testing.assert_close(ref.surrogate_grad(u, a, "fast_sigmoid"), 1 / (a * u.abs() + 1) ** 2)
    # far from threshold the sigmoid form neither overflows nor returns NaN
    far = ref.surrogate_grad(torch.tensor([-1e4, 1e4]), 50.0, "sigmoid")
    assert torch.equal(far, torch.zeros(2))


@pytest.mark.parametrize("reset", RESETS)
def test_two_layers_with_restricted_dx(reset):
    """A sparse layer's input gradient on the producer's active set, under every reset."""
    x, w1, b1 = random_problem(30, 4, 16, 20, rate=0.3, seed=8)
    _, w2, b2 = random_problem(30, 4, 20, 7, rate=0.3, seed=9)
    kw = dict(alpha=0.9, b_th=0.5, surrogate="atan", slope=2.0, reset=reset)
    grads = []
    for lif in (sparsegrad.lif_layer, ref.lif_layer):
        params = [p.clone().requires_grad_(True) for p in (w1, b1, w2, b2)]
        h = lif(x, params[0], params[1], **kw)
        out = lif(h, params[2], params[3], **kw)
        loss = (out * torch.linspace(-1, 1, 7, dtype=out.dtype)).sum()
        grads.append(torch.autograd.grad(loss, params))
    assert torch.count_nonzero(grads[1][0]) > 0
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


@pytest.mark.parametrize("reset", ["zero", "none", "subtract"])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid", "sigmoid"])
def test_matches_snntorch_leaky(reset, surrogate):
    """snnTorch's Leaky after nn.Linear, stepped over time: equal spikes and, with the dense
    backward, equal gradients (beta = 0.875 is exact in float32, as snnTorch stores it; its
    spikes are float32 even for float64 inputs, so dL/dS reaches it rounded to float32)."""
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate as sur

    spike_grad = {"atan": sur.atan(alpha=2.0), "fast_sigmoid": sur.fast_sigmoid(slope=10.0),
                  "sigmoid": sur.sigmoid(slope=5.0)}[surrogate]
    slope = {"atan": 2.0, "fast_sigmoid": 10.0, "sigmoid": 5.0}[surrogate]
    torch.manual_seed(3)
    T, B, n_in, n_out, beta = 40, 3, 12, 10, 0.875
    fc = torch.nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        fc.weight.mul_(2.5)
    x = (torch.rand(T, B, n_in) < 0.3).double()
    lif = snn.Leaky(beta=beta, threshold=1.0, reset_mechanism=reset, spike_grad=spike_grad)
    mem = torch.zeros(B, n_out, dtype=torch.float64)
    spikes = []
    for t in range(T):
        spk, mem = lif(fc(x[t]), mem)
        spikes.append(spk)
    want = torch.stack(spikes)
    g = torch.randn(T, B, n_out, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * g).sum(), [fc.weight, fc.bias])

    w = fc.weight.detach().clone().requires_grad_(True)
    b = fc.bias.detach().clone().requires_grad_(True)
    got = sparsegrad.lif_layer(x, w, b, alpha=beta, threshold=1.0, surrogate=surrogate,
                               slope=slope, reset=reset, backward="dense")
    assert want.sum() > 0
    assert_spikes_match(got, want, layer_membrane(x, fc.weight, fc.bias, want, beta, reset=reset))
    got_grads = torch.autograd.grad((got * g).sum(), [w, b])
    assert torch.count_nonzero(want_grads[0]) > 0
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_module_options_and_errors():
    lif = sparsegrad.nn.LIF(6, 4, surrogate="triangle", slope=3.0, reset="zero")
    assert "surrogate='triangle'" in repr(lif) and "reset='zero'" in repr(lif)
    x = (torch.rand(5, 2, 6) < 0.5).float()
    want = sparsegrad.lif_layer(x, lif.weight, lif.bias, alpha=0.9, surrogate="triangle", slope=3.0,
                                reset="zero")
    assert torch.equal(lif(x), want)
    with pytest.raises(ValueError, match="surrogate"):
        sparsegrad.nn.LIF(6, 4, surrogate="arctan")
    with pytest.raises(ValueError, match="reset"):
        sparsegrad.lif_layer(x, lif.weight, alpha=0.9, reset="hard")
    with pytest.raises(ValueError, match="state.s"):  # zero reset reads S as spikes
        sparsegrad.lif_layer(x, lif.weight, alpha=0.9, reset="zero",
                             state=(torch.zeros(2, 4), torch.full((2, 4), 0.5)))
    with pytest.raises(RuntimeError, match="surrogate"):
        torch.ops.sparsegrad.lif_forward(x, lif.weight, None, None, None, None, None, 0.9, 1.0, 0.2,
                                         10.0, True, "relu", "subtract")
    with pytest.raises(RuntimeError, match="reset"):
        torch.ops.sparsegrad.lif_forward(x, lif.weight, None, None, None, None, None, 0.9, 1.0, 0.2,
                                         10.0, True, "atan", "soft")


def test_reset_bits_layout():
    """rst_bits row t holds the spikes of step t-1 (the initial S at t = 0), 32 per word."""
    x, w, b = random_problem(6, 2, 5, 40, rate=0.5, seed=4)
    s0 = (torch.rand(2, 40) < 0.5).double()
    out = sparsegrad.ops.lif_forward(x, w, b, None, s0, None, None, 0.9, 1.0, 0.2, 10.0, True,
                                     "fast_sigmoid", "zero")
    spikes, rst = out[0], out[8]
    assert rst.shape == (6, 2, 2) and rst.dtype == torch.int32
    bits = ((rst.unsqueeze(-1).long() >> torch.arange(32)) & 1).flatten(-2)[..., :40].double()
    assert torch.equal(bits[0], s0)
    assert torch.equal(bits[1:], spikes[:-1])
    # the other resets keep nothing
    assert sparsegrad.ops.lif_forward(x, w, b, None, s0, None, None, 0.9, 1.0, 0.2, 10.0, True)[8].numel() == 0
