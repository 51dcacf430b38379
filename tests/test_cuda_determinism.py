"""The CUDA ops on a GPU: bit-for-bit identical results from run to run, no host synchronisation in
the backwards, and inconsistent compact tensors turned into NaN gradients instead of memory errors.

Skipped without a GPU. The same properties are checked on the CPU through the host emulation of
the kernels (tests/test_cuda_emul.py, `pytest -k "emul and determinism"`), across thread orders and
launch geometries; docs/cuda.md explains why they hold.
"""
import pytest
import torch

from conftest import random_problem

ops = torch.ops.sparsegrad
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _bits(t):
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _every_op(x, w, b, prev, g_seed):
    """All outputs of every op (both backwards, every reset, every reduction, dx with and without a
    producer set), as one list of tensors."""
    T, B, _ = x.shape
    n_out = w.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(g_seed)
    g = torch.randn(T, B, n_out, generator=gen, device=x.device, dtype=x.dtype)
    gv = torch.randn(B, n_out, generator=gen, device=x.device, dtype=x.dtype)
    outs = []
    for reset in ("subtract", "zero"):
        fwd = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.4, 5.0, True, "atan", reset)
        outs += list(fwd)
        rst = fwd[8] if reset == "zero" else None
        for p in ((None, None), prev):
            for route in ((0, 1) if rst is not None else (0, 1, 2)):
                outs += list(ops.lif_backward_sparse(g, gv, w, *fwd[2:8], *p, rst, 0.9, True, True, True, True,
                                                     route))
        dense = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.4, 5.0, False, "atan", reset)
        outs += list(dense)
        outs += list(ops.lif_backward_dense(g, gv, x, w, dense[4], dense[8] if reset == "zero" else None, 0.9,
                                            True, True, True, True))
    for reduce in ("max", "sum", "mean", "none"):
        ro = ops.li_readout_forward(x, w, b, None, None, 0.8, reduce)
        outs += list(ro)
        go = torch.randn(ro[0].shape, generator=gen, device=x.device, dtype=x.dtype)
        for p in ((None, None), prev):
            outs += list(ops.li_readout_backward(go, ro[1], w, *ro[2:5], *p, T, 0.8, reduce, True, True, True))
    return outs


PROBLEMS = [  # T, B, N_in, N_out, input rate, binary: small; SHD-like sparse; dense real-valued input
    ((7, 3, 9, 5), 0.3, True),
    ((100, 16, 700, 200), 0.02, True),
    ((50, 8, 128, 64), 1.0, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,rate,binary", PROBLEMS)
def test_cuda_determinism_two_runs_identical_bits(dtype, shape, rate, binary):
    """Every op, every output, every route the cost model or the caller picks: two runs on the GPU
    give identical bits (no float atomics; cuBLAS, CUB sorts and ATen reductions are
    deterministic on one device and stream)."""
    x, w, b = random_problem(*shape, rate=rate, binary=binary, dtype=dtype, device="cuda", seed=sum(shape))
    T, B, n_in, _ = shape
    prev_x, prev_w, prev_b = random_problem(T, B, 11, n_in, rate=0.4, dtype=dtype, device="cuda", seed=1)
    prev = ops.lif_forward(prev_x, prev_w, prev_b, None, None, None, None, 0.9, 1.0, 0.6, 5.0, True)[2:4]
    first = _every_op(x, w, b, prev, 7)
    second = _every_op(x, w, b, prev, 7)
    assert len(first) == len(second)
    for k, (a, c) in enumerate(zip(first, second)):
        assert a.shape == c.shape and torch.equal(_bits(a), _bits(c)), f"output {k} differs between runs"


def test_cuda_backward_does_not_synchronise():
    """The backward ops queue their work without any device->host copy (docs/cuda.md lists the
    forward's two)."""
    x, w, b = random_problem(40, 8, 64, 32, rate=0.1, dtype=torch.float32, device="cuda", seed=2)
    fwd = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.4, 5.0, True)
    # a producer set holding every input entry
    prev = (torch.full((40 * 8,), 64, dtype=torch.int32, device="cuda"),
            torch.arange(64, dtype=torch.int32, device="cuda").repeat(40 * 8))
    ro = ops.li_readout_forward(x, w, b, None, None, 0.8, "max")
    g = torch.randn(40, 8, 32, device="cuda")
    go = torch.randn(8, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for route in (0, 1, 2):
            for p in ((None, None), prev):
                ops.lif_backward_sparse(g, None, w, *fwd[2:8], *p, None, 0.9, True, True, True, True, route)
        ops.li_readout_backward(go, ro[1], w, *ro[2:5], None, None, 40, 0.8, "max", True, True, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_inconsistent_compact_tensors_give_nan_gradients():
    """Out-of-range indices passed directly to a backward: no memory error, no exception (that
    would need a synchronisation), NaN gradients, and the device stays usable."""
    x, w, b = random_problem(6, 3, 8, 5, rate=0.5, dtype=torch.float32, device="cuda", seed=3)
    fwd = list(ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 10.0, 5.0, True))
    fwd[3] = fwd[3].clone()
    fwd[3][4] = 1 << 30  # act_idx far out of range
    g = torch.randn(6, 3, 5, device="cuda")
    for route in (1, 2):
        grads = ops.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, True, True, True,
                                        route)
        for t in grads:
            assert torch.isnan(t).all()
    fwd = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 10.0, 5.0, True)
    grads = ops.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, True, True, True, 0)
    assert all(torch.isfinite(t).all() for t in grads)


def test_cuda_neuron_and_rlif_inconsistent_compact_tensors_give_nan_gradients():
    """lif_neuron_backward and rlif_backward_sparse check their CSRs on the device too: corrupted
    counts or indices give NaN gradients, no exception, no memory error, and the device stays
    usable (a following consistent call is finite)."""
    T, B, n_in, n = 6, 3, 8, 5
    x, w, b = random_problem(T, B, n_in, n, rate=0.5, dtype=torch.float32, device="cuda", seed=3)
    r = torch.randn(n, n, device="cuda") * 0.3
    g = torch.randn(T, B, n, device="cuda")
    f = list(ops.rlif_forward(x, w, r, b, None, None, None, None, 0.9, 1.0, 10.0, 5.0, True,
                              "fast_sigmoid", "subtract"))
    cnt, idx = f[2], f[3]
    bad_cnt = cnt.clone()
    bad_cnt[2] = 1 << 30
    bad_idx = idx.clone()
    bad_idx[4] = 1 << 30
    for c, i in ((bad_cnt, idx), (cnt, bad_idx)):
        grads = ops.rlif_backward_sparse(g, None, w, r, None, c, i, *f[4:9], None, None, 0.9,
                                         "subtract", True, True, True, True, True, True)
        assert all(torch.isnan(t).all() for t in grads if t.numel())
    grads = ops.rlif_backward_sparse(g, None, w, r, None, *f[2:9], None, None, 0.9, "subtract",
                                     True, True, True, True, True, True)
    assert all(torch.isfinite(t).all() for t in grads)

    cur = torch.randn(T, B, n, device="cuda") + 0.8
    nf = ops.lif_neuron_forward(cur, None, None, 0.9, 1.0, 10.0, 5.0, True)
    bad_cnt = nf[2].clone()
    bad_cnt[1] = -7
    bad_idx = nf[3].clone()
    bad_idx[0] = 1 << 30
    for c, i in ((bad_cnt, nf[3]), (nf[2], bad_idx)):
        gc, dv = ops.lif_neuron_backward(g, g[0], None, c, i, nf[4], None, None, 0.9, True, True)
        assert torch.isnan(gc).all() and torch.isnan(dv).all()
    gc, dv = ops.lif_neuron_backward(g, g[0], None, *nf[2:5], None, None, 0.9, True, True)
    assert torch.isfinite(gc).all() and torch.isfinite(dv).all()
