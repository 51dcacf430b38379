"""Convolutional spiking layers (issue 20) on every device: ConvLIF and SpikePool2d on the device
in float64 against sparsegrad.reference.conv_lif on the CPU, spikes exactly and every gradient
to 1e-9 relative; the CUDA kernels' results also against the CPU kernels'. The "cpu" cases run
everywhere (they check this file's set-up); the "cuda" cases are what scripts/gpu_check.sh runs
on a GPU (`--gpu-select cuda` picks the device parameter).
"""
import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from sparsegrad.conv import ConvLIF, SpikePool2d
from test_conv import _ref_kwargs, _spikes

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
D = torch.float64
NEURON = dict(alpha=0.8, threshold=1.0, b_th=0.4, slope=5.0)
TOL = dict(rtol=1e-9, atol=1e-11)

# (cin, cout, k, H, T, B, ConvLIF keyword arguments)
CASES = [
    (3, 8, 3, 10, 4, 2, dict(pool="max", padding=1)),
    (3, 8, 3, 10, 3, 2, dict(pool="avg", pool_position="after")),
    (4, 8, 3, 11, 3, 2, dict(pool="max", stride=2, padding=1, groups=2)),
    (4, 8, 3, 12, 3, 2, dict(padding=2, dilation=2, groups=4)),
    (2, 16, 5, 12, 1, 1, dict(pool="max")),  # T = 1, B = 1; the taps-major forward order
    (3, 8, 3, 10, 3, 2, dict(pool="max", reset="zero")),
    (3, 8, 3, 10, 3, 2, dict(pool="avg", backward="dense")),
]


def _layer(cin, cout, k, seed, scale=3.0, **kw):
    torch.manual_seed(seed)
    m = ConvLIF(cin, cout, k, dtype=D, **kw)
    with torch.no_grad():
        m.weight.mul_(scale)
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("route", ["events", "dense"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"c{i}" for i in range(len(CASES))])
def test_conv_lif_on_device_matches_reference(case, route, device):
    cin, cout, k, H, T, B, kw = CASES[case]
    kw = {**NEURON, **kw}
    m = _layer(cin, cout, k, case, route=route, **kw).to(device)
    w = m.weight.detach().cpu().clone().requires_grad_(True)
    b = m.bias.detach().cpu().clone().requires_grad_(True)
    x = _spikes((T, B, cin, H, H), seed=case)
    xd = x.clone().to(device).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    s = m(xd)
    assert s.device.type == device
    sr = ref.conv_lif(xr, w, b, **_ref_kwargs(m))
    assert torch.equal(s.cpu(), sr)
    assert sr.sum() > 0
    g = torch.randn(sr.shape, generator=torch.Generator().manual_seed(case), dtype=D)
    (s * g.to(device)).sum().backward()
    (sr * g).sum().backward()
    torch.testing.assert_close(m.weight.grad.cpu(), w.grad, **TOL)
    torch.testing.assert_close(m.bias.grad.cpu(), b.grad, **TOL)
    torch.testing.assert_close(xd.grad.cpu(), xr.grad, **TOL)  # no producer: the dense dx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [None, "max", "avg"])
def test_stacked_conv_lif_restricted_dx_on_device(pool, device):
    """The second layer computes dx only at the first layer's active set (the CUDA dx kernel
    on a GPU); every parameter's gradient must equal the reference's."""
    T, B = 4, 3
    l1 = _layer(2, 6, 3, 1, scale=4.0, padding=1, **NEURON).to(device)
    l2 = _layer(6, 16, 3, 2, pool=pool, **NEURON).to(device)
    x = _spikes((T, B, 2, 10, 10), 0.3, seed=2)
    s1 = l1(x.to(device))
    assert sparsegrad.functional.producer_active_set(s1)[0] is not None
    s2 = l2(s1)
    ps = [p.detach().cpu().clone().requires_grad_(True)
          for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
    r2 = ref.conv_lif(ref.conv_lif(x, ps[0], ps[1], padding=1, **NEURON), ps[2], ps[3], pool=pool,
                      **NEURON)
    assert torch.equal(s2.cpu(), r2) and r2.sum() > 0
    g = torch.randn(r2.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    (s2 * g.to(device)).sum().backward()
    (r2 * g).sum().backward()
    for mine, want in zip((l1.weight, l1.bias, l2.weight, l2.bias), ps):
        torch.testing.assert_close(mine.grad.cpu(), want.grad, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_spike_pool_on_device_matches_aten(pool, device):
    s = _spikes((3, 2, 4, 9, 8), 0.4, seed=3)
    sd = s.clone().to(device).requires_grad_(True)
    sr = s.clone().requires_grad_(True)
    out = SpikePool2d(2, pool)(sd)
    fn = torch.nn.functional.max_pool2d if pool == "max" else torch.nn.functional.avg_pool2d
    want = fn(sr.flatten(0, 1), 2).unflatten(0, (3, 2))
    assert torch.equal(out.cpu(), want)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=D)
    (out * g.to(device)).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(sd.grad.cpu(), sr.grad, **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_ops_on_device_match_cpu_kernels(device):
    """The device's kernels give the CPU kernels' bits (csrc/conv_math.h: the same order of
    every sum; nvcc builds with --fmad=false), float32 and float64."""
    ops = torch.ops.sparsegrad
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64):
        x = (torch.rand(6, 4 * 11 * 11, generator=g) < 0.3).to(dtype)
        w = torch.randn(8, 2, 3, 3, generator=g, dtype=dtype)
        b = torch.randn(8, generator=g, dtype=dtype)
        geom = ([4, 11, 11], [2, 2], [1, 1], [1, 1], 2, "max", 2)
        mask = torch.rand(6, x.shape[1], generator=g) < 0.3
        cnt, idx = mask.sum(1).to(torch.int32), mask.nonzero()[:, 1].to(torch.int32)
        results = []
        for dev in ("cpu", device):
            bits, info = ops.spike_pack(x.to(dev))
            out, pidx = ops.spike_conv2d_forward(bits, w.to(dev), b.to(dev), *geom)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
            back = ops.spike_conv2d_backward(grad.to(dev), pidx, bits, w.to(dev), *geom, cnt.to(dev),
                                             idx.to(dev), 3, True, True, True, True)
            pooled = ops.conv_pool2d(back[3], "max", 2)
            unpooled = ops.conv_unpool2d(pooled[0], pooled[1], "max", 2, *back[3].shape[2:])
            results.append([t.cpu() for t in (bits, info, out, pidx, *back, *pooled, unpooled)])
        for k, (got, want) in enumerate(zip(results[1], results[0])):
            assert got.dtype == want.dtype and torch.equal(got, want), f"output {k} ({dtype})"


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lif_float32_events_route_same_spikes_as_cpu(device):
    """float32 by events: the device's conv currents are the CPU's bits, so the spikes of two
    stacked layers equal the CPU module's exactly; gradients to float32 round-off (the neuron
    backwards may sum in other orders)."""
    x = _spikes((5, 2, 3, 12, 12), 0.25, seed=8).float()
    mods = []
    for dev in ("cpu", device):
        l1 = _layer(3, 16, 3, 3, padding=1, pool="max", route="events", **NEURON).float().to(dev)
        l2 = _layer(16, 16, 3, 4, stride=2, route="events", **NEURON).float().to(dev)
        mods.append((l1, l2))
    outs = []
    for (l1, l2), dev in zip(mods, ("cpu", device)):
        s = l2(l1(x.to(dev)))
        g = torch.randn(s.shape, generator=torch.Generator().manual_seed(9)).to(dev)
        (s * g).sum().backward()
        outs.append((s.cpu(), [p.grad.cpu() for p in (l1.weight, l1.bias, l2.weight, l2.bias)]))
    assert torch.equal(outs[1][0], outs[0][0]) and outs[0][0].sum() > 0
    for got, want in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _op_samples(device, dtype=torch.float32):
    """One call of every conv op on `device` (the arguments of tests/test_conv.py's opcheck)."""
    ops = torch.ops.sparsegrad
    g = torch.Generator().manual_seed(10)
    x = (torch.rand(4, 3 * 8 * 8, generator=g) < 0.2).to(dtype).to(device)
    w = torch.randn(16, 3, 3, 3, generator=g, dtype=dtype).to(device)
    bits, _ = ops.spike_pack(x)
    geom = ([3, 8, 8], [1, 1], [1, 1], [1, 1], 1)
    out, idx = ops.spike_conv2d_forward(bits, w, None, *geom, "max", 2)
    cnt = torch.full((4,), 2, dtype=torch.int32, device=device)
    pidx = torch.tensor([0, 5] * 4, dtype=torch.int32, device=device)
    grad = torch.randn(out.shape, generator=g, dtype=dtype).to(device)
    y = torch.randn(4, 16, 8, 8, generator=g, dtype=dtype).to(device)
    return [
        (ops.spike_pack.default, (x,)),
        (ops.spike_conv2d_forward.default, (bits, w, torch.randn(16, dtype=dtype, device=device),
                                            *geom, "max", 2)),
        (ops.spike_conv2d_forward.default, (bits, w, None, *geom, "none", 1)),
        (ops.conv_pool2d.default, (y, "avg", 2)),
        (ops.conv_unpool2d.default, (grad, idx, "max", 2, 8, 8)),
        (ops.spike_conv2d_backward.default,
         (grad, idx, bits, w, *geom, "max", 2, cnt, pidx, 2, True, True, True, True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_conv_ops_pass_opcheck_on_device(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_conv_ops_do_not_synchronise_and_repeat_their_bits():
    """No conv op copies to the host (docs/cuda.md, "Host synchronisation"), and two runs give
    the same bits."""
    samples = _op_samples("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = [op(*args) for op, args in samples]
        second = [op(*args) for op, args in samples]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second):
        for ta, tb in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(ta, tb)
