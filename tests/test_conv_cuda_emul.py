"""The CUDA kernels of the convolution ops (csrc/cuda/conv.cuh), run on the CPU through the host
emulation (csrc/emul/emul_ops.cpp), against the CPU kernels (csrc/cpu/conv_cpu.cpp).

Every CUDA kernel adds in the CPU kernel's order (conv_math.h: the forward's event order, the
fixed chunks of dW / db, the lanes of dx), so every output must have the CPU's bits (including
the sign of zeros), under any thread order and launch geometry. Select with `pytest -k emul`.
"""
import pytest
import torch

from test_cuda_emul import assert_same_bits, emul, launch  # noqa: F401  (fixtures)

cpu_ops = torch.ops.sparsegrad

# (cin, cout, k, H, W, stride, padding, dilation, groups, pool, pool_k)
GEOMS = [
    (3, 8, 3, 10, 9, 1, 0, 1, 1, "none", 1),
    (3, 8, 3, 10, 10, 1, 1, 1, 1, "max", 2),
    (3, 8, 3, 10, 10, 1, 1, 1, 1, "avg", 2),
    (4, 8, 3, 11, 11, 2, 1, 1, 2, "max", 2),       # stride 2, groups 2
    (4, 8, 3, 12, 12, 1, 2, 2, 4, "none", 1),      # dilation 2, depthwise-like groups
    (2, 16, 3, 8, 8, 1, 1, 1, 1, "max", 3),        # float32: the taps-major order (16 = one vector)
    (3, 16, 5, 12, 12, (2, 1), (2, 1), (1, 2), 1, "avg", 3),  # mixed strides / dilations
    (5, 6, (2, 3), 9, 7, 1, (1, 0), 1, 1, "max", 2),  # non-square kernel, C_out not a vector
    (2, 40, 3, 6, 6, 1, 1, 1, 2, "none", 1),       # C_out/groups > 16 lanes with a tail (dx)
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _problem(geom, n, dtype, density, seed, bias=True):
    cin, cout, k, h, w, stride, padding, dilation, groups, pool, pk = geom
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = (torch.rand(n, cin * h * w, generator=g) < density).to(dtype)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    args = ([cin, h, w], _pair(stride), _pair(padding), _pair(dilation), groups, pool, pk)
    return x, weight, b, args, g


def _forward(ops, x, weight, b, args):
    bits, info = ops.spike_pack(x)
    out, idx = ops.spike_conv2d_forward(bits, weight, b, *args)
    return bits, info, out, idx


def _producer_set(n_rows, n_in, g, p=0.3):
    mask = torch.rand(n_rows, n_in, generator=g) < p
    cnt = mask.sum(1).to(torch.int32)
    idx = mask.nonzero()[:, 1].to(torch.int32)
    return cnt, idx


def _grad_out(out, g, zero_samples=()):
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grad[torch.rand(out.shape, generator=g) < 0.3] = 0  # some positions carry no gradient
    for s in zero_samples:
        grad[s] = 0  # a sample whose neurons are never active again
    return grad


def _backward(ops, grad, idx, bits, weight, args, cnt, pidx, T, need=(True, True, True, True)):
    return ops.spike_conv2d_backward(grad, idx, bits, weight, *args, cnt, pidx, T, *need)


def _check_layer(emul, geom, T, B, dtype, density, seed, bias=True):
    x, weight, b, args, g = _problem(geom, T * B, dtype, density, seed, bias)
    want = _forward(cpu_ops, x, weight, b, args)
    got = _forward(emul, x, weight, b, args)
    assert_same_bits(got, want, "forward")
    bits, _, out, idx = want
    cin, h, w = args[0]
    cnt, pidx = _producer_set(T * B, cin * h * w, g)
    grad = _grad_out(out, g, zero_samples=(0,) if T * B > 2 else ())
    want_b = _backward(cpu_ops, grad, idx, bits, weight, args, cnt, pidx, T)
    got_b = _backward(emul, grad, idx, bits, weight, args, cnt, pidx, T)
    assert_same_bits(got_b, want_b, "backward")
    dx, dw, db, gc = want_b
    assert dw.abs().sum() > 0 and gc.abs().sum() > 0
    return want, want_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(GEOMS)), ids=[f"g{i}" for i in range(len(GEOMS))])
def test_conv_ops_emul_match_cpu_bits(emul, case, dtype):
    _check_layer(emul, GEOMS[case], T=3, B=2, dtype=dtype, density=0.3, seed=case)


@pytest.mark.parametrize("order,threads,max_blocks", [("reverse", 0, 0), ("shuffled", 32, 3),
                                                       ("forward", 64, 1)])
def test_conv_ops_emul_any_thread_order(emul, launch, order, threads, max_blocks):
    """Grid-stride loops that wrap, tiny blocks, reversed and shuffled threads: the same bits."""
    launch(order=order, threads=threads, max_blocks=max_blocks, seed=7)
    for geom in (GEOMS[1], GEOMS[3], GEOMS[5]):
        _check_layer(emul, geom, T=2, B=2, dtype=torch.float32, density=0.3, seed=3)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["no_events", "all_events"])
def test_conv_ops_emul_no_and_all_events(emul, density):
    for geom in (GEOMS[1], GEOMS[4], GEOMS[6]):
        x, weight, b, args, g = _problem(geom, 4, torch.float64, density, 11)
        want = _forward(cpu_ops, x, weight, b, args)
        assert_same_bits(_forward(emul, x, weight, b, args), want, "forward")
        assert int(want[1][0]) == (0 if density == 0 else x.numel())
        bits, _, out, idx = want
        cin, h, w = args[0]
        cnt, pidx = _producer_set(4, cin * h * w, g)
        grad = _grad_out(out, g)
        assert_same_bits(_backward(emul, grad, idx, bits, weight, args, cnt, pidx, 2),
                         _backward(cpu_ops, grad, idx, bits, weight, args, cnt, pidx, 2), "backward")


def test_conv_ops_emul_single_sample_no_bias_and_partial_needs(emul):
    """B = T = 1, no bias, and each gradient asked for alone (the others come back empty)."""
    geom = GEOMS[2]
    x, weight, _, args, g = _problem(geom, 1, torch.float32, 0.4, 5, bias=False)
    want = _forward(cpu_ops, x, weight, None, args)
    assert_same_bits(_forward(emul, x, weight, None, args), want, "forward")
    bits, _, out, idx = want
    cin, h, w = args[0]
    cnt, pidx = _producer_set(1, cin * h * w, g)
    grad = _grad_out(out, g)
    for need in [(True, False, False, False), (False, True, False, False),
                 (False, False, True, False), (False, False, False, True)]:
        assert_same_bits(_backward(emul, grad, idx, bits, weight, args, cnt, pidx, 1, need),
                         _backward(cpu_ops, grad, idx, bits, weight, args, cnt, pidx, 1, need),
                         f"backward {need}")


def test_conv_ops_emul_empty_producer_set_and_zero_gradient(emul):
    geom = GEOMS[3]
    x, weight, b, args, g = _problem(geom, 4, torch.float64, 0.3, 2)
    bits, _, out, idx = _forward(cpu_ops, x, weight, b, args)
    cnt = torch.zeros(4, dtype=torch.int32)
    pidx = torch.zeros(0, dtype=torch.int32)
    for grad in (_grad_out(out, g), torch.zeros_like(out)):
        got = _backward(emul, grad, idx, bits, weight, args, cnt, pidx, 2)
        assert_same_bits(got, _backward(cpu_ops, grad, idx, bits, weight, args, cnt, pidx, 2),
                         "backward")
        assert not got[0].any()


def test_spike_pack_emul_dtypes_non_binary_and_non_contiguous(emul):
    g = torch.Generator().manual_seed(4)
    base = (torch.rand(70, 13, generator=g) < 0.4).double()
    base[3, 5], base[10, 0], base[69, 12] = 0.5, -2.0, 1e-50  # 1e-50 is 0 as float (the CPU's rule)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = base.to(dtype).t()  # [13, 70], not contiguous
        assert not x.is_contiguous()
        assert_same_bits(emul.spike_pack(x), cpu_ops.spike_pack(x), f"spike_pack {dtype}")
    bits, info = emul.spike_pack(base.t())
    assert info.tolist() == [int((base.float() != 0).sum()), 2]
    empty = torch.zeros(0, 40)
    assert_same_bits(emul.spike_pack(empty), cpu_ops.spike_pack(empty), "spike_pack empty")


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_conv_pool_and_unpool_emul_match_cpu(emul, pool, k):
    g = torch.Generator().manual_seed(k)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(3, 4, 8, 7, generator=g, dtype=dtype)
        y[0, 0, :2, :2] = 1.5  # ties: the first maximum wins
        y[0, 1, 0, 1] = float("nan")  # NaN wins its window
        y[1, 2, :2, :2] = float("-inf")
        y = y.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
        want = cpu_ops.conv_pool2d(y, pool, k)
        got = emul.conv_pool2d(y, pool, k)
        assert_same_bits(got, want, "conv_pool2d")
        grad = torch.randn(want[0].shape, generator=g, dtype=dtype)
        grad[0, 0] = 0
        assert_same_bits([emul.conv_unpool2d(grad, want[1], pool, k, 8, 7)],
                         [cpu_ops.conv_unpool2d(grad, want[1], pool, k, 8, 7)], "conv_unpool2d")


def test_conv_ops_emul_dense_reference(emul):
    """The emulated forward against ATen's conv2d + pooling (float64: the sums of a few weights
    are exact to round-off in any order), dW against conv2d_weight, dx against conv2d_input at
    the producer's set."""
    geom = GEOMS[3]
    x, weight, b, args, g = _problem(geom, 4, torch.float64, 0.3, 9)
    in_shape, stride, padding, dilation, groups, pool, pk = args
    bits, _, out, idx = _forward(emul, x, weight, b, args)
    xi = x.view(4, *in_shape)
    y = torch.nn.functional.conv2d(xi, weight, b, stride, padding, dilation, groups)
    torch.testing.assert_close(out, torch.nn.functional.max_pool2d(y, pk), rtol=1e-12, atol=1e-12)
    cnt, pidx = _producer_set(4, x.shape[1], g)
    grad = _grad_out(out, g)
    dx, dw, db, gc = _backward(emul, grad, idx, bits, weight, args, cnt, pidx, 2)
    # max pooling's winners as flat indices of the conv map: the unpooled gradient is max_unpool2d's
    ho, wo = gc.shape[2:]
    py = torch.arange(out.shape[2]).view(-1, 1) * pk
    px = torch.arange(out.shape[3]).view(1, -1) * pk
    flat = (py + idx.long() // pk) * wo + px + idx.long() % pk
    torch.testing.assert_close(gc, torch.nn.functional.max_unpool2d(grad, flat, pk, output_size=(ho, wo)),
                               rtol=0, atol=0)
    torch.testing.assert_close(db, gc.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dw, torch.nn.grad.conv2d_weight(xi, weight.shape, gc, stride, padding, dilation, groups),
        rtol=1e-12, atol=1e-12)
    dense_dx = torch.nn.grad.conv2d_input(xi.shape, weight, gc, stride, padding, dilation, groups)
    mask = torch.zeros(4 * x.shape[1], dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(4), cnt.long())  # row r = b*T + t -> s = t*B + b
    samples = (rows % 2) * 2 + rows // 2
    mask[samples * x.shape[1] + pidx.long()] = True
    mask = mask.view(dx.shape)
    torch.testing.assert_close(dx[mask], dense_dx[mask], rtol=1e-12, atol=1e-12)
    assert not dx[~mask].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", [(4, 16, 3, 10, 10, 1, 1, 1, 1, "max", 2),
                                  (3, 32, 3, 9, 8, 2, 1, 1, 1, "none", 1),
                                  (6, 16, 3, 8, 8, 1, 1, 2, 1, "avg", 2)],
                         ids=["pad", "stride2", "dilation2"])
def test_conv_forward_emul_gather_and_scatter_samples_same_bits(emul, dtype, geom):
    """The CPU forward scatters the samples with few events and gathers the others (the CUDA
    kernel always gathers), adding in the same order: the same bits for every sample, and ATen's
    conv2d to round-off."""
    x, weight, b, args, g = _problem(geom, 6, dtype, 0.0, 13)
    cin, h, w = args[0]
    for s, density in enumerate((0.02, 0.95, 0.3, 0.7, 0.0, 1.0)):  # events per position: cin * density
        x[s] = (torch.rand(cin * h * w, generator=g) < density).to(dtype)
    per_position = x.view(6, cin, h * w).sum((1, 2)) / (h * w)
    assert (per_position < 2).any() and (per_position >= 2).any()  # both paths run
    want = _forward(cpu_ops, x, weight, b, args)
    assert_same_bits(_forward(emul, x, weight, b, args), want, "forward")
    in_shape, stride, padding, dilation, groups, pool, pk = args
    y = torch.nn.functional.conv2d(x.view(6, *in_shape), weight, b, stride, padding, dilation, groups)
    if pool == "max":
        y = torch.nn.functional.max_pool2d(y, pk)
    elif pool == "avg":
        y = torch.nn.functional.avg_pool2d(y, pk)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(want[2], y, **tol)


def test_conv_ops_emul_flag_bad_compact_tensors(emul):
    """Contents only the data can show: the CPU raises on the host, the emulation through the
    kernels' error flag (on the GPU: NaN gradients, no synchronisation)."""
    geom = GEOMS[1]
    x, weight, b, args, g = _problem(geom, 4, torch.float32, 0.3, 1)
    bits, _, out, idx = _forward(cpu_ops, x, weight, b, args)
    cin, h, w = args[0]
    cnt, pidx = _producer_set(4, cin * h * w, g)
    grad = _grad_out(out, g)
    bad_idx = idx.clone()
    bad_idx.view(-1)[5] = 4  # pool_k = 2: offsets lie in [0, 4)
    for ops in (cpu_ops, emul):
        with pytest.raises(RuntimeError, match="pool_idx"):
            _backward(ops, grad, bad_idx, bits, weight, args, cnt, pidx, 2)
        with pytest.raises(RuntimeError, match="pool_idx"):
            ops.conv_unpool2d(grad, bad_idx, "max", 2, 10, 10)
    bad_p = pidx.clone()
    bad_p[0] = cin * h * w
    with pytest.raises(RuntimeError, match="prev_"):
        _backward(emul, grad, idx, bits, weight, args, cnt, bad_p, 2)
    with pytest.raises(RuntimeError, match="prev_"):
        _backward(emul, grad, idx, bits, weight, args, cnt + 1, pidx, 2)
    with pytest.raises(RuntimeError, match="bits must be int32"):
        emul.spike_conv2d_forward(bits[:, :-1], weight, b, *args)
    with pytest.raises(RuntimeError, match="weight must be float32 or float64"):
        emul.spike_conv2d_forward(bits, weight.half(), None, *args)


CONV_OPS = ("spike_pack", "spike_conv2d_forward", "conv_pool2d", "conv_unpool2d",
            "spike_conv2d_backward")


def test_conv_emul_schemas_sources_and_launches(emul):
    """The emulated ops have the CPU ops' schemas, the GPU and the emulation include the same
    host code, and every op really launches kernels."""
    from test_cuda_emul import CSRC, EMUL_SOURCE

    for name in CONV_OPS:
        mine = str(getattr(emul, name).default._schema).replace("sparsegrad_emul::", "")
        assert mine == str(getattr(cpu_ops, name).default._schema).replace("sparsegrad::", "")
    include = '#include "cuda/conv_host.h"'
    assert include in EMUL_SOURCE.read_text()
    assert include in (CSRC / "cuda" / "sparsegrad_cuda.cu").read_text()
    cu = (CSRC / "cuda" / "sparsegrad_cuda.cu").read_text()
    assert all(f'm.impl("{name}"' in cu for name in CONV_OPS)
    x, weight, b, args, g = _problem(GEOMS[1], 4, torch.float32, 0.3, 0)
    counts = []
    bits, info, out, idx = _forward(cpu_ops, x, weight, b, args)
    cnt, pidx = _producer_set(4, x.shape[1], g)
    grad = _grad_out(out, g)
    for call in (lambda: emul.spike_pack(x), lambda: emul.spike_conv2d_forward(bits, weight, b, *args),
                 lambda: emul.conv_pool2d(grad, "avg", 2),
                 lambda: emul.conv_unpool2d(grad, idx, "max", 2, 10, 10),
                 lambda: _backward(emul, grad, idx, bits, weight, args, cnt, pidx, 2)):
        before = emul.launch_counters()[0]
        call()
        counts.append(emul.launch_counters()[0] - before)
    # backward: 2 CSR checks, gc + channels-last unpool, db 2, dW 2, dx 1, poison 1
    assert counts == [1, 1, 1, 2, 10], counts


def test_conv_ops_emul_non_contiguous_weight_and_gradient(emul):
    geom = GEOMS[3]
    x, weight, b, args, g = _problem(geom, 4, torch.float64, 0.3, 12)
    w_nc = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert not w_nc.is_contiguous() and torch.equal(w_nc, weight)
    bits, _, out, idx = _forward(cpu_ops, x, weight, b, args)
    assert_same_bits(emul.spike_conv2d_forward(bits, w_nc, b, *args), (out, idx), "forward")
    cin, h, w = args[0]
    cnt, pidx = _producer_set(4, cin * h * w, g)
    grad = _grad_out(out, g)
    g_nc = grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not g_nc.is_contiguous()
    assert_same_bits(_backward(emul, g_nc, idx, bits, w_nc, args, cnt, pidx, 2),
                     _backward(cpu_ops, grad, idx, bits, weight, args, cnt, pidx, 2), "backward")


def test_conv_ops_emul_zero_samples(emul):
    """N = 0: empty outputs, zero dW / db, as the CPU ops (the emulation launches nothing that
    would read out of bounds)."""
    x, weight, b, args, g = _problem(GEOMS[1], 0, torch.float32, 0.3, 13)
    want = _forward(cpu_ops, x, weight, b, args)
    assert_same_bits(_forward(emul, x, weight, b, args), want, "forward")
    bits, _, out, idx = want
    cnt, pidx = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    got = _backward(emul, out, idx, bits, weight, args, cnt, pidx, 1)
    assert_same_bits(got, _backward(cpu_ops, out, idx, bits, weight, args, cnt, pidx, 1), "backward")
    assert not got[1].any() and got[1].shape == weight.shape
