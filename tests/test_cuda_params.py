"""Tensor and learnable parameters and the synaptic current (issue 18) on every device.

The neuron op with per-channel / per-neuron learnable alpha, threshold and alpha_syn, and two
stacked fused layers with per-neuron parameters, each run on the device in float64 and compared
with sparsegrad.reference on the CPU: spikes exactly (float64 leaves no rounding near the
threshold at these sizes), every gradient to 1e-9 relative. The "cpu" cases run everywhere (they
check this file's set-up); the "cuda" cases are what scripts/gpu_check.sh runs on a GPU
(`--gpu-select cuda` picks the device parameter).
"""
import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
SURROGATES = ["fast_sigmoid", "atan", "sigmoid", "triangle"]
SLOPES = {"fast_sigmoid": 10.0, "atan": 2.0, "sigmoid": 5.0, "triangle": 2.0}
RESETS = ["subtract", "zero", "none"]
TOL = dict(rtol=1e-9, atol=1e-11)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grads(fn, inputs, device, seed):
    """fn's output and the gradients of a fixed random projection of it w.r.t. inputs (a dict
    of CPU float64 tensors, moved to `device` as leaves)."""
    leaves = {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves)
    cot = torch.randn(out.shape, generator=_gen(seed), dtype=torch.float64).to(device)
    grads = torch.autograd.grad((out * cot).sum(), list(leaves.values()))
    return out.detach().cpu(), {k: g.cpu() for k, g in zip(leaves, grads)}


def _compare(got, want):
    assert torch.equal(got[0], want[0]), "spikes differ"
    assert got[0].sum() > 0
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **TOL, msg=f"d/d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_neuron_op_tensor_parameters(surrogate, reset, backward, syn, device):
    g = _gen(1)
    inputs = dict(current=torch.randn(12, 3, 4, 5, generator=g, dtype=torch.float64) * 0.6 + 0.3,
                  alpha=0.8 + 0.15 * torch.rand(4, 1, generator=g, dtype=torch.float64),
                  threshold=0.8 + 0.4 * torch.rand(4, 5, generator=g, dtype=torch.float64))
    if syn:
        inputs["alpha_syn"] = torch.tensor(0.5, dtype=torch.float64)
    kw = dict(b_th=0.3, surrogate=surrogate, slope=SLOPES[surrogate], reset=reset,
              backward=backward)
    got = _grads(lambda current, **p: sparsegrad.lif(current, **p, **kw), inputs, device, 2)
    want = _grads(lambda current, **p: ref.lif_neuron(current, **p, **kw), inputs, "cpu", 2)
    _compare(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("syn", [False, True], ids=["nosyn", "syn"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
def test_two_layers_tensor_parameters(reset, backward, syn, device):
    # the second layer's input is the first's spikes (its dx on the producer's active set)
    T, B, n_in, n_hid = 20, 3, 30, 24
    g = _gen(3)
    x = (torch.rand(T, B, n_in, generator=g) < 0.2).double()
    inputs = dict(w1=torch.randn(n_hid, n_in, generator=g, dtype=torch.float64) * 0.5,
                  w2=torch.randn(n_hid, n_hid, generator=g, dtype=torch.float64) * 0.5,
                  b1=torch.randn(n_hid, generator=g, dtype=torch.float64) * 0.2 + 0.1,
                  alpha=0.75 + 0.2 * torch.rand(n_hid, generator=g, dtype=torch.float64),
                  threshold=0.8 + 0.4 * torch.rand(n_hid, generator=g, dtype=torch.float64))
    if syn:
        inputs["alpha_syn"] = 0.3 + 0.5 * torch.rand(n_hid, generator=g, dtype=torch.float64)
    kw = dict(b_th=0.4, slope=5.0, reset=reset, backward=backward)

    def net(layer, xd):
        def fn(w1, w2, b1, **p):
            return layer(layer(xd(w1), w1, b1, **p, **kw), w2, None, **p, **kw)
        return fn

    got = _grads(net(sparsegrad.lif_layer, lambda w: x.to(w.device)), inputs, device, 4)
    want = _grads(net(ref.lif_layer, lambda w: x), inputs, "cpu", 4)
    _compare(got, want)
