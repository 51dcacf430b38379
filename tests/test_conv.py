"""Convolutional spiking layers (issue 20): sparsegrad.conv / nn.ConvLIF against reference.conv_lif."""
import math

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad import reference as R
from sparsegrad.conv import ConvLIF, SpikePool2d, conv_pool, fuse_conv_layers

NEURON = dict(alpha=0.8, threshold=1.0, b_th=0.4, slope=5.0)
D = torch.float64


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _spikes(shape, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=D) < p).to(D)


def _pair(cin, cout, k, scale=3.0, seed=0, **kw):
    torch.manual_seed(seed)
    m = ConvLIF(cin, cout, k, dtype=D, **kw)
    with torch.no_grad():
        m.weight.mul_(scale)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True) if m.bias is not None else None
    return m, w, b


def _ref_kwargs(m):
    n = m.neuron
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                pool=m.pool, pool_kernel=m.pool_kernel, pool_position=m.pool_position,
                alpha=n.alpha, threshold=n.threshold, b_th=n.b_th, slope=n.slope,
                surrogate=n.surrogate, reset=n.reset, backward=n.backward)


CASES = [
    # (cin, cout, k, H, T, B, kwargs)
    (3, 8, 3, 10, 4, 2, dict()),
    (3, 8, 3, 10, 4, 2, dict(pool="max")),
    (3, 8, 3, 10, 4, 2, dict(pool="avg")),
    (3, 8, 3, 10, 4, 2, dict(pool="max", pool_position="after")),
    (3, 8, 3, 9, 3, 2, dict(pool="avg", pool_position="after", padding=1)),
    (4, 8, 3, 11, 3, 2, dict(pool="max", stride=2, padding=1, groups=2)),
    (4, 8, 3, 12, 3, 2, dict(padding=2, dilation=2, groups=4)),
    (2, 16, 5, 12, 1, 1, dict(pool="max")),  # T = 1, B = 1
    (3, 32, 3, 8, 2, 3, dict(pool="max", pool_kernel=3, padding=1)),  # gather route, 3x3 pool
    (3, 8, 3, 10, 3, 2, dict(pool="max", reset="zero")),
    (3, 8, 3, 10, 3, 2, dict(pool="max", backward="dense")),
]


@pytest.mark.parametrize("route", ["auto", "events", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_conv_lif_matches_reference_float64(case, route):
    cin, cout, k, H, T, B, kw = case
    m, w, b = _pair(cin, cout, k, route=route, **kw, **NEURON)
    x = _spikes((T, B, cin, H, H)).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    s = m(x)
    sr = R.conv_lif(xr, w, b, **_ref_kwargs(m))
    assert torch.equal(s, sr)
    gw = torch.randn_like(s)
    (s * gw).sum().backward()
    (sr * gw).sum().backward()
    assert _rel(m.weight.grad, w.grad) < 1e-8
    assert _rel(m.bias.grad, b.grad) < 1e-8
    assert _rel(x.grad, xr.grad) < 1e-8  # no producer: the dense dx


def _same_chain_gradients(s, r, mine, refs):
    """Same spikes, and the same float64 parameter gradients for a random dL/ds."""
    assert torch.equal(s, r)
    g = torch.randn_like(s)
    (s * g).sum().backward()
    (r * g).sum().backward()
    for m, ref in zip(mine, refs):
        assert _rel(m.grad, ref.grad) < 1e-8


@pytest.mark.parametrize("pool", [None, "max", "avg"])
def test_chain_restricted_dx_matches_reference(pool):
    """dx of the second layer is computed only at the first layer's active set: the first
    layer's gradients must still equal the reference's."""
    T, B = 4, 3
    torch.manual_seed(1)
    l1 = ConvLIF(2, 6, 3, padding=1, dtype=D, **NEURON)
    l2 = ConvLIF(6, 16, 3, pool=pool, dtype=D, **NEURON)
    with torch.no_grad():
        l1.weight.mul_(4)
        l2.weight.mul_(3)
    x = _spikes((T, B, 2, 10, 10), 0.3, seed=2)
    s1 = l1(x)
    assert sparsegrad.functional.producer_active_set(s1)[0] is not None
    s2 = l2(s1)
    ps = [p.detach().clone().requires_grad_(True) for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
    r1 = R.conv_lif(x, ps[0], ps[1], padding=1, **NEURON)
    r2 = R.conv_lif(r1, ps[2], ps[3], pool=pool, **NEURON)
    _same_chain_gradients(s2, r2, (l1.weight, l1.bias, l2.weight, l2.bias), ps)


@pytest.mark.parametrize("h, pool_kernel", [(10, 2), (10, 3)])
def test_chain_pool_after_restricted_dx_matches_reference(h, pool_kernel):
    """Conv -> LIF -> max pool feeding the next ConvLIF: the pooled spikes carry the pooled
    entries whose winner is active, the next layer's dx is computed only there, and every
    gradient still equals the reference's (3x3 pooling of a 10x10 map leaves a border that no
    window covers)."""
    T, B = 4, 3
    torch.manual_seed(3)
    kw = dict(pool="max", pool_position="after", pool_kernel=pool_kernel)
    l1 = ConvLIF(2, 6, 3, padding=1, dtype=D, **kw, **NEURON)
    l2 = ConvLIF(6, 16, 3, padding=1, dtype=D, **NEURON)
    with torch.no_grad():
        l1.weight.mul_(4)
        l2.weight.mul_(3)
    x = _spikes((T, B, 2, h, h), 0.3, seed=5)
    s1 = l1(x)
    cnt, idx = sparsegrad.functional.producer_active_set(s1)
    assert cnt is not None and 0 < int(cnt.sum()) < s1.numel()
    assert int(cnt.sum()) <= int(l1.last_stats.active_fraction * T * B * 6 * h * h + 0.5)
    s2 = l2(s1)
    ps = [p.detach().clone().requires_grad_(True) for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
    r1 = R.conv_lif(x, ps[0], ps[1], padding=1, **kw, **NEURON)
    r2 = R.conv_lif(r1, ps[2], ps[3], padding=1, **NEURON)
    _same_chain_gradients(s2, r2, (l1.weight, l1.bias, l2.weight, l2.bias), ps)


def test_spikingjelly_pool_after_restricted_dx_equals_dense_dx():
    """The converted SpikingJelly blocks at a finite b_th: dx at the pooled active set gives the
    gradients of the full dense dx (the set stripped by a copy between the blocks)."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1), neuron.LIFNode(), layer.MaxPool2d(2),
        layer.Conv2d(8, 16, 3, padding=1), neuron.LIFNode(), layer.MaxPool2d(2)).to(D)
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(10.0)
        net[3].weight.mul_(8.0)
    x = _spikes((6, 3, 2, 16, 16), 0.2, seed=4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # b_th=0.5 keeps less than 95 % of sigmoid(4)'s mass
        model = sparsegrad.convert(net, b_th=0.5)
    g = torch.randn(6, 3, 16, 4, 4, dtype=D)
    grads = []
    for strip in (False, True):
        model.zero_grad(set_to_none=True)
        h = model[0](x)
        assert (sparsegrad.functional.producer_active_set(h)[0] is not None) is True
        out = model[3](h.clone() if strip else h)
        (out * g).sum().backward()
        grads.append([p.grad.clone() for p in (model[0].weight, model[0].bias)])
    assert 0 < model[0].last_stats.active_fraction < 0.5
    for a, b in zip(*grads):
        assert a.abs().max() > 0 and _rel(a, b) < 1e-8
    functional.reset_net(net)


def test_dense_input_and_constant_frames():
    """Non-binary input (data) takes the dense route; frames repeated at every step are
    convolved once and give the same outputs and gradients."""
    T, B = 5, 2
    m, w, b = _pair(1, 8, 5, pool="max", **NEURON)
    img = torch.rand(B, 1, 14, 14, dtype=D)
    for x in (img.expand(T, *img.shape).contiguous(), torch.rand(T, B, 1, 14, 14, dtype=D)):
        m.weight.grad = m.bias.grad = w.grad = b.grad = None
        s = m(x)
        sr = R.conv_lif(x, w, b, pool="max", **NEURON)
        assert torch.equal(s, sr)
        g = torch.randn_like(s)
        (s * g).sum().backward()
        (sr * g).sum().backward()
        assert _rel(m.weight.grad, w.grad) < 1e-8 and _rel(m.bias.grad, b.grad) < 1e-8


def test_inactive_and_all_active():
    x = _spikes((3, 2, 3, 8, 8))
    # no active entry anywhere: zero gradients, not garbage
    m = ConvLIF(3, 8, 3, pool="max", dtype=D, **NEURON)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.fill_(-10.0)
    s = m(x)
    s.sum().backward()
    assert s.sum() == 0 and m.last_stats.active_fraction == 0.0
    assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))
    # everything active (b_th = inf): equals the dense surrogate of the reference
    m2, w, b = _pair(3, 8, 3, pool="avg", alpha=0.8, b_th=math.inf, slope=5.0)
    s = m2(x)
    sr = R.conv_lif(x, w, b, pool="avg", alpha=0.8, b_th=math.inf, slope=5.0)
    g = torch.randn_like(s)
    (s * g).sum().backward()
    (sr * g).sum().backward()
    assert m2.last_stats.active_fraction == 1.0
    assert _rel(m2.weight.grad, w.grad) < 1e-8


def test_saved_state_is_compact():
    """No float tensor of the size of the input or of the conv output is kept for the backward."""
    T, B = 4, 2
    l1 = ConvLIF(2, 8, 3, padding=1, pool="max")
    l2 = ConvLIF(8, 16, 3, padding=1, pool="max")
    x = (torch.rand(T, B, 2, 16, 16) < 0.2).float()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        l2(l1(x)).sum()
    big = T * B * 8 * 8 * 8  # the smallest [T, B, C, H, W] activation of the net
    floats = [t for t in saved if t.is_floating_point() and t.numel() >= big]
    assert not floats, [tuple(t.shape) for t in floats]
    idx = [t for t in saved if t.dtype == torch.uint8]
    assert idx  # pool offsets (and narrow indices) as uint8


def test_thread_count_does_not_change_bits():
    torch.manual_seed(3)
    m = ConvLIF(4, 16, 3, padding=1, pool="max", alpha=0.8, b_th=0.4, slope=5.0)
    with torch.no_grad():
        m.weight.mul_(3)
    x = (torch.rand(6, 4, 4, 12, 12) < 0.2).float()
    outs = []
    old = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            m.weight.grad = None
            s = m(x)
            s.sum().backward()
            outs.append((s, m.weight.grad.clone()))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_spike_pool_matches_aten():
    s = _spikes((3, 2, 4, 9, 9)).requires_grad_(True)
    sr = s.detach().clone().requires_grad_(True)
    for pool, fn in (("max", torch.nn.functional.max_pool2d), ("avg", torch.nn.functional.avg_pool2d)):
        s.grad = sr.grad = None
        out = SpikePool2d(2, pool)(s)
        ref = fn(sr.flatten(0, 1), 2).unflatten(0, (3, 2))
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        (ref * g).sum().backward()
        assert torch.allclose(s.grad, sr.grad)


def test_bad_arguments():
    x = _spikes((2, 1, 3, 8, 8)).float()
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="route"):
        conv_pool(x, w, route="sparse")
    with pytest.raises(ValueError, match="pool"):
        conv_pool(x, w, pool="min")
    with pytest.raises(ValueError, match="channels"):
        conv_pool(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="binary"):
        conv_pool(torch.rand(2, 1, 3, 8, 8), w, route="events")
    with pytest.raises(ValueError, match=r"\[T, B, C, H, W\]"):
        conv_pool(x[0], w)
    with pytest.raises(ValueError, match="pool_position"):
        ConvLIF(3, 4, 3, pool="max", pool_position="middle")
    ops = torch.ops.sparsegrad
    bits, _ = ops.spike_pack(x.reshape(2, -1))
    out, idx = ops.spike_conv2d_forward(bits, w, None, [3, 8, 8], [1, 1], [0, 0], [1, 1], 1, "max", 2)
    with pytest.raises(RuntimeError, match="pool_idx"):
        ops.spike_conv2d_backward(torch.ones_like(out), torch.full_like(idx, 9), bits, w, [3, 8, 8],
                                  [1, 1], [0, 0], [1, 1], 1, "max", 2, None, None, 2, False, True,
                                  False, False)
    with pytest.raises(RuntimeError, match="prev_cnt"):
        ops.spike_conv2d_backward(torch.ones_like(out), idx, bits, w, [3, 8, 8], [1, 1], [0, 0],
                                  [1, 1], 1, "max", 2, torch.full((2,), 5, dtype=torch.int32),
                                  torch.zeros(3, dtype=torch.int32), 2, True, False, False, False)
    with pytest.raises(RuntimeError, match="bits"):
        ops.spike_conv2d_forward(bits[:, :-1], w, None, [3, 8, 8], [1, 1], [0, 0], [1, 1], 1,
                                 "max", 2)


def _tutorial_csnn(snn, surrogate):
    sg = surrogate.fast_sigmoid(slope=25)
    return nn.Sequential(
        nn.Conv2d(1, 12, 5), nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True),
        nn.Conv2d(12, 64, 5), nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True, output=True))


def test_convert_fuses_the_tutorial_csnn():
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate, utils

    torch.manual_seed(0)
    net = _tutorial_csnn(snn, surrogate)
    with torch.no_grad():
        net[0].weight.mul_(2)
        net[3].weight.mul_(3)
        net[7].weight.mul_(3)
    model = sparsegrad.convert(net)
    assert isinstance(model[0], ConvLIF) and isinstance(model[3], ConvLIF)
    assert model[0].pool == "max" and isinstance(model[1], nn.Identity)
    assert set(model.state_dict()) == {k for k in net.state_dict()
                                       if k.endswith((".weight", ".bias"))}
    T, B = 6, 4
    img = torch.rand(B, 1, 28, 28)
    x = img.expand(T, *img.shape).contiguous()
    utils.reset(net)
    with torch.no_grad():
        ref = torch.stack([net(x[t])[0] for t in range(T)])
        spk, mem = model(x)
    assert torch.equal(spk, ref)


def test_fuse_leaves_other_patterns_alone():
    from sparsegrad.nn import LIFNeuron, TimeDistributed

    seq = nn.Sequential(TimeDistributed(nn.Conv2d(2, 4, 3)), TimeDistributed(nn.MaxPool2d(2, 1)),
                        LIFNeuron(alpha=0.5), TimeDistributed(nn.Conv2d(4, 4, 3)),
                        LIFNeuron(alpha=0.5, return_mem=True))
    assert fuse_conv_layers(seq) == 0  # pool stride != kernel; a neuron returning its membrane
    seq2 = nn.Sequential(TimeDistributed(nn.Conv2d(2, 4, 3)), LIFNeuron(alpha=0.5),
                         TimeDistributed(nn.AvgPool2d(2)))
    x = _spikes((3, 2, 2, 10, 10)).float()
    with torch.no_grad():
        before = seq2(x)
    assert fuse_conv_layers(seq2) == 1 and seq2[0].pool_position == "after"
    with torch.no_grad():
        assert torch.equal(seq2(x), before)


def test_convert_fuses_a_spikingjelly_dvs_block_net():
    """SpikingJelly's conv -> LIFNode -> MaxPool2d blocks become ConvLIF(pool_position="after")
    around the exact SpikingJellyNeuron: same spikes; with b_th = inf the same float64 gradients."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), neuron.LIFNode(), layer.MaxPool2d(2),
        layer.Conv2d(8, 16, 3, padding=1, bias=False), neuron.LIFNode(), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(16 * 4 * 4, 5), neuron.LIFNode()).to(D)
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(10.0)
        net[3].weight.mul_(8.0)
        net[7].weight.mul_(8.0)
    x = _spikes((6, 3, 2, 16, 16), 0.2, seed=4)
    model = sparsegrad.convert(net, b_th=math.inf)
    assert isinstance(model[0], ConvLIF) and model[0].pool_position == "after"
    assert isinstance(model[3], ConvLIF) and isinstance(model[4], nn.Identity)
    functional.reset_net(net)
    ref = net(x)
    out = model(x)
    assert torch.equal(out, ref) and 0.01 < float(ref.mean()) < 0.9
    assert 0.01 < model[3].last_stats.spike_rate < 0.9
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    for mine, i in ((model[0], 0), (model[3], 3), (model[7].module, 7)):
        assert _rel(mine.weight.grad, net[i].weight.grad) < 1e-8
    functional.reset_net(net)


def test_conv_ops_pass_opcheck():
    """Schemas, fake (shape) kernels and the CPU kernels agree (torch.library.opcheck)."""
    ops = torch.ops.sparsegrad
    x = _spikes((4, 3 * 8 * 8), 0.2).float()
    w = torch.randn(16, 3, 3, 3)
    bits, _ = ops.spike_pack(x)
    geom = ([3, 8, 8], [1, 1], [1, 1], [1, 1], 1)
    out, idx = ops.spike_conv2d_forward(bits, w, None, *geom, "max", 2)
    cnt = torch.full((4,), 2, dtype=torch.int32)
    pidx = torch.tensor([0, 5] * 4, dtype=torch.int32)
    cases = [
        (ops.spike_pack.default, (x,)),
        (ops.spike_conv2d_forward.default, (bits, w, torch.randn(16), *geom, "max", 2)),
        (ops.spike_conv2d_forward.default, (bits, w, None, *geom, "none", 1)),
        (ops.conv_pool2d.default, (torch.randn(4, 16, 8, 8), "avg", 2)),
        (ops.spike_conv2d_backward.default,
         (torch.randn_like(out), idx, bits, w, *geom, "max", 2, cnt, pidx, 2, True, True, True,
          True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_non_contiguous_input_and_zero_sizes():
    m, w, b = _pair(3, 8, 3, pool="max", padding=1, **NEURON)
    base = _spikes((2, 4, 3, 8, 8))  # [B, T, ...]
    x = base.transpose(0, 1)  # [T, B, ...], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(m(x), m(x.contiguous()))
    assert torch.equal(m(x), R.conv_lif(x, w, b, pool="max", padding=1, **NEURON))
    with pytest.raises(ValueError, match="at least one step"):
        m(x[:0])
    with pytest.raises(ValueError, match="at least one step"):
        m(x[:, :0])


@pytest.mark.parametrize("width", [48, 38, 7])
def test_conv_pool2d_float_max_matches_scalar_rule_and_aten(width):
    """conv_pool2d's 2x2 max pooling (16 windows at a time in float) gives the scalar loop's
    (float64: the same rule) values and winner offsets, with ties, NaNs in any slot and
    infinities; and ATen's first maximum wherever a window holds no NaN."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(-2, 3, (3, 4, 10, width), generator=g).float()
    y[0, 0, 0, :8] = float("nan")
    y[1, 1, 3, 1::5] = float("nan")
    y[2, 2, 5, ::3] = float("inf")
    y[2, 3, 6, 2::4] = float("-inf")
    out, idx = torch.ops.sparsegrad.conv_pool2d(y, "max", 2)
    out64, idx64 = torch.ops.sparsegrad.conv_pool2d(y.double(), "max", 2)
    assert torch.equal(idx, idx64)
    assert torch.equal(out.isnan(), out64.isnan())
    assert torch.equal(out.nan_to_num(0.5), out64.float().nan_to_num(0.5))
    ref, ref_idx = torch.nn.functional.max_pool2d(y, 2, return_indices=True)
    row, col = ref_idx // width, ref_idx % width
    slot = (row % 2) * 2 + col % 2
    clean = ~torch.nn.functional.max_pool2d(y.isnan().float(), 2).bool()
    assert clean.sum() > 0 and torch.equal(out[clean], ref[clean])
    assert torch.equal(idx.long()[clean], slot[clean])


@pytest.mark.parametrize("width", [48, 38, 12, 7, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_unpool2d_max_matches_aten_and_checks_offsets(width, dtype):
    """conv_unpool2d's 2x2 max case (16 windows at a time in float, masked at the row's end, no
    zero fill) is max_unpool2d's: each window's gradient at its winner, zeros elsewhere, odd
    sizes included (the positions outside every window get zero); an offset outside the window
    is refused."""
    g = torch.Generator().manual_seed(width)
    h = 10
    y = torch.randint(-2, 3, (3, 4, h, width), generator=g).to(dtype)
    out, idx = torch.ops.sparsegrad.conv_pool2d(y, "max", 2)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    grad[0, 0, 0] = -0.0
    got = torch.ops.sparsegrad.conv_unpool2d(grad, idx, "max", 2, h, width)
    wp = width // 2
    py = torch.arange(out.shape[2]).view(-1, 1) * 2
    px = torch.arange(wp).view(1, -1) * 2
    flat = (py + idx.long() // 2) * width + px + idx.long() % 2
    want = torch.nn.functional.max_unpool2d(grad, flat, 2, output_size=(h, width))
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    bad = idx.clone()
    bad[2, 3, -1, -1] = 4
    with pytest.raises(RuntimeError, match="pool_idx"):
        torch.ops.sparsegrad.conv_unpool2d(grad, bad, "max", 2, h, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_and_scatter_forward_in_one_batch(dtype):
    """Samples with >= 2 events per input position take the gather form, sparser ones the
    scatter form (csrc/cpu/conv_cpu.cpp, dense_enough_to_gather): one batch holding both gives
    the reference's spikes and gradients."""
    T, B, cin, H = 3, 4, 8, 9
    torch.manual_seed(5)
    m = ConvLIF(cin, 32, 3, padding=1, pool="max", route="events", dtype=dtype, **NEURON)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    g = torch.Generator().manual_seed(6)
    rate = torch.tensor([0.05, 0.6, 0.3, 0.9], dtype=dtype).view(1, B, 1, 1, 1)
    x = (torch.rand(T, B, cin, H, H, generator=g, dtype=dtype) < rate).to(dtype)
    per_position = x.sum((2, 3, 4)) / (H * H)
    assert bool((per_position >= 2).any()) and bool((per_position < 2).any())
    s = m(x)
    sr = R.conv_lif(x, w, b, **_ref_kwargs(m))
    assert 0 < float(s.mean()) < 1
    if dtype == torch.float64:
        assert torch.equal(s, sr)
    else:  # another summation order than ATen's: a spike may flip at a rounding tie
        assert float((s != sr).to(dtype).mean()) < 1e-3
    gw = torch.randn_like(s)
    (s * gw).sum().backward()
    (sr * gw).sum().backward()
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    assert _rel(m.weight.grad, w.grad) < tol and _rel(m.bias.grad, b.grad) < tol
