"""Every route of every backward op, forced, against the CPU op and sparsegrad.reference, at a
small size and at the SHD benchmarks' size (T=200, B=32, 700->200 at 2 % input density): the
routes the benchmarks take are the ones the GPU's cost model picks there (dW events, dx dots), and
the small sizes would otherwise only ever run the GEMM routes.

Two backends run the same cases: "emul" (the CUDA kernels and host code under the host emulation,
CPU tensors: runs everywhere) and "cuda" (the real GPU ops, skipped without a GPU). Routes are
forced with sparsegrad_emul.set_routes / sparsegrad_cuda.set_routes (SPARSEGRAD_CUDA_ROUTES sets
the same from the environment; docs/cuda.md, "Route choice").
"""
import pytest
import torch

from sparsegrad import reference as ref
from test_cuda_emul import DW_ROUTES, DX_ROUTES, emul  # noqa: F401  (pytest fixture)
from test_recurrent import rlif_problem

cpu_ops = torch.ops.sparsegrad
HAS_GPU = torch.cuda.is_available()
BACKENDS = ["emul", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"))]
# name: (T, B, n_in, n_out, input rate, producer rate)
SIZES = {"small": (12, 4, 30, 20, 0.3, 0.3), "bench": (200, 32, 700, 200, 0.02, 0.04)}
DTYPES = {"small": [torch.float64, torch.float32], "bench": [torch.float32]}
CASES = [(s, d) for s in SIZES for d in DTYPES[s]]


class Backend:
    """The ops and the device of one backend, with route forcing that is always undone."""

    def __init__(self, name, emul_ops):
        self.name = name
        self.ops = emul_ops if name == "emul" else cpu_ops
        self.device = "cpu" if name == "emul" else "cuda"

    def set_routes(self, dw=0, dx=0):
        if self.name == "emul":
            self.ops.set_routes(dw, dx)
        else:
            torch.ops.sparsegrad_cuda.set_routes(dw, dx)

    def to(self, *ts):
        return [None if t is None else t.to(self.device) for t in ts]


@pytest.fixture
def backend(request):
    # (the emulation is built only for its own cases: a GPU run does not compile it)
    b = Backend(request.param, request.getfixturevalue("emul") if request.param == "emul" else None)
    yield b
    b.set_routes(0, 0)


def _problem(size, dtype, seed=0):
    T, B, n_in, n_out, rate, prev_rate = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, n_in, generator=g) < rate).to(dtype)
    w = (torch.randn(n_out, n_in, generator=g) * 2.0 / max(1.0, (rate * n_in) ** 0.5)).to(dtype)
    b = (torch.randn(n_out, generator=g) * 0.1).to(dtype)
    v0 = (torch.rand(B, n_out, generator=g) * 0.5).to(dtype)
    gS = torch.randn(T, B, n_out, generator=g).to(dtype)
    gV = torch.randn(B, n_out, generator=g).to(dtype)
    # a producer's active set over x's rows (b*T + t), ascending within a row
    mask = torch.rand(B, T, n_in, generator=g) < prev_rate
    prev = (mask.sum(-1).reshape(-1).to(torch.int32), mask.reshape(-1, n_in).nonzero()[:, 1].to(torch.int32))
    return x, w, b, v0, gS, gV, prev, mask.transpose(0, 1)  # mask as [T, B, n_in]


def _close(got, want, dtype, what):
    got = got.cpu().to(want.dtype)
    scale = float(want.abs().max()) if want.numel() else 1.0
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, scale), msg=what)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("size,dtype", CASES)
@pytest.mark.parametrize("dw", list(DW_ROUTES))
@pytest.mark.parametrize("dx", list(DX_ROUTES))
def test_lif_backward_sparse_every_route(backend, size, dtype, dw, dx):
    x, w, b, v0, gS, gV, prev, mask = _problem(size, dtype)
    kw = dict(alpha=0.9, b_th=0.4, slope=5.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, v0)]
    s, (v, _) = ref.lif_layer(*leaves[:3], state=(leaves[3], torch.zeros_like(v0)), return_state=True,
                              backward="sparse", **kw)
    ref_grads = torch.autograd.grad((s * gS).sum() + (v * gV).sum(), leaves)
    args = (x, w, b, v0, None, None, None, kw["alpha"], 1.0, kw["b_th"], kw["slope"], True)
    cpu_fwd = cpu_ops.lif_forward(*args)
    fwd = backend.ops.lif_forward(*backend.to(x, w, b, v0), None, None, None, *args[7:])
    assert int(fwd[9][1]) > 0, "no active entries: the routes would have nothing to do"
    back = (None, None, None, kw["alpha"], True, True, True, True, 0)
    want = cpu_ops.lif_backward_sparse(gS, gV, w, *cpu_fwd[2:8], *prev, *back[2:])
    backend.set_routes(DW_ROUTES[dw], DX_ROUTES[dx])
    got = backend.ops.lif_backward_sparse(*backend.to(gS, gV, w), *fwd[2:8], *backend.to(*prev),
                                          *back[2:])
    m = mask.to(dtype)
    for name, a, c, r in zip(("dx", "dW", "db", "dV_init"), got, want, ref_grads):
        if name == "dx":  # wanted only on the producer's active set (either side may fill more)
            a, c, r = a.cpu() * m, c * m, r * m
        _close(a, c, dtype, f"{name} vs the CPU op ({backend.name}, {size}, dw={dw}, dx={dx})")
        _close(a, r, dtype, f"{name} vs the reference ({backend.name}, {size}, dw={dw}, dx={dx})")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("size,dtype", CASES)
@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("dw", ["events", "gemm"])
@pytest.mark.parametrize("dx", list(DX_ROUTES))
def test_readout_backward_every_route(backend, size, dtype, reduce, dw, dx):
    x, w, _, _, _, _, prev, mask = _problem(size, dtype, seed=1)
    T = x.shape[0]
    wr = w[:10]  # a readout of 10 classes
    br = torch.zeros(10, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, wr, br)]
    out = ref.li_readout(*leaves, alpha=0.8, reduce=reduce)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref_grads = torch.autograd.grad((out * g).sum(), leaves)
    cpu_fwd = cpu_ops.li_readout_forward(x, wr, br, None, None, 0.8, reduce)
    fwd = backend.ops.li_readout_forward(*backend.to(x, wr, br), None, None, 0.8, reduce)
    _close(fwd[0], cpu_fwd[0], dtype, "readout output vs the CPU op")
    want = cpu_ops.li_readout_backward(g, cpu_fwd[1], wr, *cpu_fwd[2:5], *prev, T, 0.8, reduce,
                                       True, True, True)
    backend.set_routes(DW_ROUTES[dw], DX_ROUTES[dx])
    got = backend.ops.li_readout_backward(*backend.to(g), fwd[1], *backend.to(wr), *fwd[2:5],
                                          *backend.to(*prev), T, 0.8, reduce, True, True, True)
    m = mask.to(dtype)
    for name, a, c, r in zip(("dx", "dW", "db"), got, want, ref_grads):
        if name == "dx":
            a, c, r = a.cpu() * m, c * m, r * m
        _close(a, c, dtype, f"{name} vs the CPU op ({backend.name}, {size}, dw={dw}, dx={dx})")
        _close(a, r, dtype, f"{name} vs the reference ({backend.name}, {size}, dw={dw}, dx={dx})")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("size,dtype", CASES)
@pytest.mark.parametrize("producer", [False, True])
def test_rlif_backward_sparse_both_dx_paths(backend, size, dtype, producer):
    """The recurrent layer has no cost model: dx on a producer's set (rlif_dx_restricted_kernel)
    or everywhere (a GEMM), dW through the events, dR through the spike bits."""
    T, B, n_in, n, rate, _ = SIZES[size]
    x, w, r, b = rlif_problem(T, B, n_in, n, rate=rate, dtype=dtype, seed=4)
    _, _, _, _, gS, gV, prev, mask = _problem(size, dtype, seed=5)
    prev = prev if producer else (None, None)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, r, b)]
    s, (v, _) = ref.rlif_layer(*leaves, alpha=0.9, b_th=0.4, slope=5.0, return_state=True)
    ref_grads = torch.autograd.grad((s * gS).sum() + (v * gV).sum(), leaves)
    args = (None, None, None, None, 0.9, 1.0, 0.4, 5.0, True, "fast_sigmoid", "subtract")
    cpu_fwd = cpu_ops.rlif_forward(x, w, r, b, *args)
    fwd = backend.ops.rlif_forward(*backend.to(x, w, r, b), *args)
    need = (True,) * 4 + (False, False)
    want = cpu_ops.rlif_backward_sparse(gS, gV, w, r, None, *cpu_fwd[2:9], *prev, 0.9, "subtract", *need)
    got = backend.ops.rlif_backward_sparse(*backend.to(gS, gV, w, r), None, *fwd[2:9], *backend.to(*prev),
                                           0.9, "subtract", *need)
    m = mask.to(dtype) if producer else torch.ones_like(x)
    for name, a, c, rg in zip(("dx", "dW", "dR", "db"), got, want, ref_grads):
        if name == "dx":
            a, c, rg = a.cpu() * m, c * m, rg * m
        _close(a, c, dtype, f"{name} vs the CPU op ({backend.name}, {size})")
        _close(a, rg, dtype, f"{name} vs the reference ({backend.name}, {size})")


def test_emul_forced_routes_spec_parser(emul):
    """SPARSEGRAD_CUDA_ROUTES's parser (gpu_routes.h, used by the CUDA launcher)."""
    assert emul.parse_routes("dw=events,dx=dots") == [1, 1]
    assert emul.parse_routes("dx=gemm") == [0, 2]
    assert emul.parse_routes("dw=gemm") == [3, 0]
    assert emul.parse_routes("dw=active,dx=auto") == [2, 0]
    assert emul.parse_routes("") == [0, 0]
    for bad in ("dw=fast", "dw", "dy=dots", "dw=events;dx=dots"):
        with pytest.raises(RuntimeError, match="malformed"):
            emul.parse_routes(bad)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_set_routes_checks_and_reads_back():
    torch.ops.sparsegrad_cuda.set_routes(3, 1)
    try:
        assert list(torch.ops.sparsegrad_cuda.routes()) == [3, 1]
        with pytest.raises(RuntimeError, match="dw_route"):
            torch.ops.sparsegrad_cuda.set_routes(4, 0)
    finally:
        torch.ops.sparsegrad_cuda.set_routes(0, 0)
    assert list(torch.ops.sparsegrad_cuda.routes()) == [0, 0]
