"""A second oracle: DESIGN.md §3's closed-form gradients computed with NumPy (no autograd), and
snnTorch's Leaky neuron for the forward spikes."""
import numpy as np
import pytest
import torch

import sparsegrad

from conftest import assert_spikes_match, layer_membrane


def numpy_lif(x, w, b, alpha, thr, slope, b_th):
    """Forward V and S, then G[k] = sum_{t>=k} alpha^(t-k) delta[t] by explicit sums."""
    T, B, _ = x.shape
    cur = x @ w.T + b
    v = np.zeros((T, B, w.shape[0]))
    s = np.zeros_like(v)
    v_prev = np.zeros((B, w.shape[0]))
    s_prev = np.zeros_like(v_prev)
    for t in range(T):
        v[t] = alpha * v_prev + cur[t] - thr * s_prev
        s[t] = (v[t] > thr).astype(float)
        v_prev, s_prev = v[t], s[t]
    return v, s


def numpy_grads(x, w, v, grad_s, alpha, thr, slope, b_th):
    u = v - thr
    sg = 1.0 / (slope * np.abs(u) + 1.0) ** 2
    delta = grad_s * sg * (np.abs(u) < b_th)
    T = x.shape[0]
    G = np.zeros_like(delta)
    for k in range(T):
        for t in range(k, T):
            G[k] += alpha ** (t - k) * delta[t]
    dW = np.einsum("tbj,tbi->ji", G, x)
    db = G.sum(axis=(0, 1))
    dx = np.einsum("tbj,ji->tbi", G, w)
    # the active-entry form of dW (DESIGN.md §3): sum over A of delta * input trace
    trace = np.zeros_like(x)
    acc = np.zeros(x.shape[1:])
    for t in range(T):
        acc = alpha * acc + x[t]
        trace[t] = acc
    dW_active = np.einsum("tbj,tbi->ji", delta, trace)
    np.testing.assert_allclose(dW, dW_active, rtol=1e-9, atol=1e-12)
    return dx, dW, db


@pytest.mark.parametrize("backward,b_th", [("dense", np.inf), ("sparse", 0.3), ("sparse", 0.05)])
@pytest.mark.parametrize("seed", range(4))
def test_gradients_match_closed_form(backward, b_th, seed):
    rng = np.random.default_rng(seed)
    T, B, n_in, n_out = rng.integers(1, 25), rng.integers(1, 5), rng.integers(1, 20), rng.integers(1, 12)
    x = (rng.random((T, B, n_in)) < 0.3).astype(float)
    w = rng.normal(0, 0.8, (n_out, n_in))
    b = rng.normal(0, 0.2, n_out)
    alpha, thr, slope = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.5), rng.uniform(1, 20)
    grad_s = rng.normal(size=(T, B, n_out))
    v, s = numpy_lif(x, w, b, alpha, thr, slope, b_th)
    want = numpy_grads(x, w, v, grad_s, alpha, thr, slope, b_th)

    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    out = sparsegrad.lif_layer(xt, wt, bt, alpha=alpha, threshold=thr, slope=slope,
                               b_th=b_th if backward == "sparse" else 0.2, backward=backward)
    assert np.array_equal(out.detach().numpy(), s)
    got = torch.autograd.grad(out, [xt, wt, bt], torch.tensor(grad_s))
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_spikes_match_snntorch_leaky(seed):
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(seed)
    T, B, n_in, n_out, beta = 60, 4, 30, 20, 0.9
    fc = torch.nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        fc.weight.mul_(3.0)
    lif = snn.Leaky(beta=beta, threshold=1.0, reset_mechanism="subtract")
    x = (torch.rand(T, B, n_in) < 0.3).double()
    mem = torch.zeros(B, n_out, dtype=torch.float64)
    spikes = []
    for t in range(T):
        spk, mem = lif(fc(x[t]), mem)
        spikes.append(spk)
    want = torch.stack(spikes)
    got = sparsegrad.lif_layer(x, fc.weight, fc.bias, alpha=beta, threshold=1.0)
    assert want.sum() > 0
    # events vs snnTorch's per-step GEMM: the same spikes off the threshold's rounding
    assert_spikes_match(got, want, layer_membrane(x, fc.weight, fc.bias, want, beta))
