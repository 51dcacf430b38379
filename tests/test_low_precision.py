"""bfloat16 and float16: every op takes half-type inputs and weights, keeps its state and sums in
float32 and returns the input dtype (csrc/low_precision.h); torch.autocast runs the layers in its
dtype. Checked against the reference run in float32 on the same rounded inputs."""
import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from conftest import random_problem

HALF_TYPES = [torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# relative tolerance of a gradient computed from half-type operands (8 or 11 mantissa bits)
GRAD_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rounded_problem(dtype, device, shape=(24, 4, 30, 16), seed=0, binary=True):
    x, w, b = random_problem(*shape, rate=0.3, dtype=torch.float32, binary=binary, seed=seed)
    return [t.to(dtype).to(device) for t in (x, w, b)]


def _rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _reference_v(x, w, b, alpha, threshold, reset="subtract"):
    """V of the float32 reference, to find the entries within rounding of the threshold."""
    cur = torch.nn.functional.linear(x, w, b)
    v = torch.zeros_like(cur[0])
    s = torch.zeros_like(v)
    vs = []
    for t in range(cur.shape[0]):
        v = ref.lif_step(v, cur[t], s, alpha, threshold, reset)
        s = (v > threshold).to(v.dtype)
        vs.append(v)
    return torch.stack(vs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("surrogate,reset", [("fast_sigmoid", "subtract"), ("atan", "zero"),
                                             ("triangle", "none")])
def test_lif_layer_half_types(device, dtype, backward, surrogate, reset):
    x, w, b = _rounded_problem(dtype, device, seed=1)
    kw = dict(alpha=0.9, b_th=0.5, surrogate=surrogate, slope=4.0, reset=reset, backward=backward)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    spikes = sparsegrad.lif_layer(*leaves, **kw)
    assert spikes.dtype == dtype
    g = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = torch.autograd.grad((spikes.float() * g).sum(), leaves)
    assert all(gr.dtype == dtype for gr in grads)

    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    want = ref.lif_layer(*ref_leaves, **kw)
    want_grads = torch.autograd.grad((want * g).sum(), ref_leaves)
    # spikes agree wherever V is not within float32 rounding of the threshold
    v = _reference_v(*(t.detach().float() for t in (x, w, b)), 0.9, 1.0, reset)
    clear = (v - 1.0).abs() > 1e-4
    assert torch.equal(spikes.float()[clear], want[clear])
    assert want.sum() > 0
    for name, a, c in zip(("dx", "dW", "db"), grads, want_grads):
        assert _rel_err(a, c) < GRAD_RTOL[dtype], name


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
def test_readout_half_types(dtype, reduce):
    x, w, b = _rounded_problem(dtype, "cpu", shape=(12, 3, 20, 5), seed=3, binary=False)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = sparsegrad.li_readout(*leaves, alpha=0.8, reduce=reduce)
    assert out.dtype == dtype
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    want = ref.li_readout(*ref_leaves, alpha=0.8, reduce=reduce)
    assert _rel_err(out, want) < GRAD_RTOL[dtype] / 3
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((out.float() * g).sum(), leaves)
    want_grads = torch.autograd.grad((want * g).sum(), ref_leaves)
    for a, c in zip(grads, want_grads):
        assert a.dtype == dtype and _rel_err(a, c) < GRAD_RTOL[dtype]


def test_mixed_dtypes_are_an_error_not_a_conversion():
    x, w, b = _rounded_problem(torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="weight"):
        sparsegrad.lif_layer(x, w.float(), b, alpha=0.9)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.sparsegrad.lif_forward(x, w.float(), None, None, None, None, None, 0.9, 1.0, 0.2,
                                         10.0, True)


def _spiking_net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        sparsegrad.nn.LIF(64, 48, alpha=0.9, b_th=0.4, slope=5.0),
        sparsegrad.nn.LIF(48, 32, alpha=0.9, b_th=0.4, slope=5.0),
        sparsegrad.nn.LIReadout(32, 4, alpha=0.9)).to(dtype)


def _batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(30, 16, 64, generator=g) < 0.15).to(dtype)
    y = torch.randint(0, 4, (16,), generator=g)
    # class-dependent input: one block of 16 inputs fires more often per class
    for c in range(4):
        x[:, y == c, 16 * c:16 * (c + 1)] = (torch.rand(30, int((y == c).sum()), 16, generator=g) < 0.5).to(dtype)
    return x, y


def test_autocast_bf16_spike_count_training_step():
    """A spike-count training step under torch.autocast('cpu', bfloat16): the layers run in
    bfloat16, the float32 parameters get float32 gradients, and a few steps lower the loss."""
    from sparsegrad.losses import SpikeCountLoss

    net = _spiking_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    spike_loss = SpikeCountLoss(sigma0=1e-4, schedule="constant")
    x, y = _batches()
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h1 = net[0](x)
            h2 = net[1](h1)
            logits = net[2](h2)
            assert h1.dtype == h2.dtype == logits.dtype == torch.bfloat16
            loss = torch.nn.functional.cross_entropy(logits.float(), y) + spike_loss([h1, h2], 0)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_type_model_trains(dtype):
    """A model whose parameters are bfloat16 / float16 trains (plain SGD, loss goes down)."""
    net = _spiking_net(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = _batches(dtype)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(p.dtype == dtype for p in net.parameters())
    assert losses[-1] < losses[0]
