"""The CUDA kernels, run on the CPU through the host emulation harness (docs/cuda.md).

A small test-only extension (csrc/emul/emul_ops.cpp) compiles the CUDA kernel headers
(csrc/cuda/*.cuh) and the CUDA host sequence (csrc/cuda/host_ops.h) with g++ and the emulation
header csrc/cuda/emulation.h, and registers torch.ops.sparsegrad_emul.<op> with the schemas of
torch.ops.sparsegrad.<op>. These tests compare it with sparsegrad.reference (spikes exactly,
gradients to 1e-10 in float64) and with the CPU kernels (every compact output exactly).
Select them with `pytest -k emul`.
"""
import hashlib
import math
import os
import pathlib
import tempfile

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from conftest import TOL, random_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMUL_SOURCE = CSRC / "emul" / "emul_ops.cpp"
DTYPES = [torch.float32, torch.float64]
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
cpu_ops = torch.ops.sparsegrad


# SPARSEGRAD_EMUL_SANITIZE=1 builds the emulation with AddressSanitizer; run pytest with
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 and -k "not host_checks"
# (a C++ exception thrown under a preloaded ASan aborts; that test only checks error messages).
SANITIZE = os.environ.get("SPARSEGRAD_EMUL_SANITIZE", "0") == "1"


def _build_dir():
    """A cache directory keyed by the sources (headers included) and the torch version."""
    h = hashlib.sha256((torch.__version__ + ("asan" if SANITIZE else "")).encode())
    files = [EMUL_SOURCE] + sorted(CSRC.glob("*.h")) + sorted((CSRC / "cuda").glob("*.cuh")) + \
        sorted((CSRC / "cuda").glob("*.h")) + sorted((CSRC / "cpu").glob("*.h"))
    for f in files:
        h.update(f.read_bytes())
    base = os.environ.get("SPARSEGRAD_EMUL_BUILD_DIR") or os.path.join(
        tempfile.gettempdir(), f"sparsegrad_emul_{os.getuid()}")
    path = os.path.join(base, h.hexdigest()[:16])
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def emul():
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.sparsegrad_emul, "lif_forward"):
        cflags, ldflags = ["-O1", "-ffp-contract=off"], []
        if SANITIZE:  # out-of-bounds accesses of the kernels abort the run (see docs/cuda.md)
            cflags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
            ldflags += ["-fsanitize=address"]
        load(name="sparsegrad_emul", sources=[str(EMUL_SOURCE)], extra_include_paths=[str(CSRC)],
             extra_cflags=cflags, extra_ldflags=ldflags, build_directory=_build_dir(),
             is_python_module=False, verbose=False)
    ops = torch.ops.sparsegrad_emul
    ops.set_launch_config(0, 0, 0, 0, False)
    yield ops
    ops.set_launch_config(0, 0, 0, 0, False)


@pytest.fixture
def launch(emul):
    """Set the emulated launch geometry / thread order for one test, restore the default after."""
    def set_config(order="forward", threads=0, max_blocks=0, seed=0, wide_tiles=False):
        emul.set_launch_config(ORDERS[order], seed, threads, max_blocks, wide_tiles)
    yield set_config
    emul.set_launch_config(0, 0, 0, 0, False)


def lif_args(x, w, b, v0=None, s0=None, alpha=0.9, threshold=1.0, b_th=0.4, slope=10.0, sparse=True):
    return (x, w, b, v0, s0, None, None, alpha, threshold, b_th, slope, sparse)


def assert_all_equal(got, want, names):
    for g, w, n in zip(got, want, names):
        assert g.dtype == w.dtype and g.shape == w.shape, (n, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), f"output {n} differs"


FWD_NAMES = ["spikes", "v_final", "act_cnt", "act_idx", "act_sg", "ev_cnt", "ev_idx", "ev_val",
             "rst_bits", "stats"]

# T, B, N_in, N_out: T = 1, B = 1, N = 1, and B*N_out / B*T not multiples of the block size
SHAPES = [(1, 1, 1, 1), (1, 4, 6, 5), (9, 1, 7, 3), (13, 5, 17, 11), (6, 3, 40, 100), (4, 37, 9, 7)]


# --------------------------------------------------------------------------------- the harness
def test_emul_schemas_match_sparsegrad(emul):
    for name in ("lif_forward", "lif_backward_sparse", "lif_backward_dense", "li_readout_forward",
                 "li_readout_backward"):
        mine = str(getattr(emul, name).default._schema).replace("sparsegrad_emul::", "")
        theirs = str(getattr(cpu_ops, name).default._schema).replace("sparsegrad::", "")
        assert mine == theirs


def test_emul_compiles_the_same_kernel_source_as_nvcc():
    """Every __global__ kernel lives in a csrc/cuda/*.cuh header that both the nvcc translation
    unit and the emulation extension include (through host_ops.h); threads index only through the
    64-bit grid-stride loop SG_KERNEL_LOOP."""
    cu_files = sorted((CSRC / "cuda").glob("*.cu"))
    headers = sorted((CSRC / "cuda").glob("*.cuh"))
    assert cu_files and headers
    for f in cu_files:
        text = f.read_text()
        assert "__global__" not in text, f"{f.name}: kernels belong in a .cuh header"
        assert '#include "cuda/host_ops.h"' in text
    assert '#include "cuda/host_ops.h"' in EMUL_SOURCE.read_text()
    host = (CSRC / "cuda" / "host_ops.h").read_text()
    kernels = 0
    for h in headers:
        text = h.read_text()
        kernels += text.count("__global__ void")
        if h.name != "kernel_common.cuh":
            assert f'#include "cuda/{h.name}"' in host, f"{h.name} is not compiled by both builds"
            assert "blockIdx" not in text and "threadIdx" not in text, \
                f"{h.name}: index threads through SG_KERNEL_LOOP (64-bit, grid-stride)"
    assert kernels >= 9


def test_emul_runs_the_kernels(emul):
    """The emulated ops really launch kernels: sparse LIF forward = event count + fill, the LIF
    kernel, active-set count + fill; every thread of every block runs."""
    x, w, b = random_problem(5, 3, 8, 6, rate=0.3)
    before = emul.launch_counters()
    emul.lif_forward(*lif_args(x, w, b))
    after = emul.launch_counters()
    assert after[0] - before[0] == 5
    assert after[1] - before[1] == 5 * 256  # each launch is one block of 256 threads here
    emul.lif_forward(*lif_args(x, w, b, sparse=False))
    assert emul.launch_counters()[0] - after[0] == 3


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate,binary", [(0.0, True), (0.05, True), (0.4, True), (0.3, False)])
def test_emul_lif_forward_matches_cpu_and_reference(emul, dtype, shape, rate, binary):
    x, w, b = random_problem(*shape, rate=rate, binary=binary, dtype=dtype, seed=sum(shape))
    for sparse in (True, False):
        got = emul.lif_forward(*lif_args(x, w, b, sparse=sparse))
        want = cpu_ops.lif_forward(*lif_args(x, w, b, sparse=sparse))
        assert_all_equal(got, want, FWD_NAMES)
        spikes, (v, _) = ref.lif_layer(x, w, b, alpha=0.9, b_th=0.4, slope=10.0, return_state=True)
        assert torch.equal(got[0], spikes)
        torch.testing.assert_close(got[1], v, **TOL[dtype])
        assert got[9].tolist()[0] == int(spikes.sum())
        assert got[9].tolist()[2] == int(torch.count_nonzero(x))


def _reference_active_set(x, w, b, v0, s0, alpha, threshold, b_th, slope):
    """CSR (rows b*T + t, ascending j) of |V - threshold| < b_th and the surrogate there."""
    T, B, _ = x.shape
    cur = torch.nn.functional.linear(x, w, b)
    v = torch.zeros(B, w.shape[0], dtype=x.dtype) if v0 is None else v0
    s = torch.zeros_like(v) if s0 is None else s0
    vs = []
    for t in range(T):
        v = alpha * v + cur[t] - threshold * s
        s = (v > threshold).to(x.dtype)
        vs.append(v)
    u = torch.stack(vs).transpose(0, 1) - threshold  # [B, T, N]
    mask = u.abs() < b_th
    cnt = mask.reshape(B * T, -1).sum(1).to(torch.int32)
    idx = mask.reshape(B * T, -1).nonzero()[:, 1].to(torch.int32)
    return cnt, idx, ref.surrogate_grad(u[mask], slope)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emul_active_set_layout_and_initial_state(emul, dtype):
    x, w, b = random_problem(11, 4, 9, 13, rate=0.3, dtype=dtype, seed=5)
    v0 = torch.rand(4, 13, dtype=dtype)
    s0 = (torch.rand(4, 13) < 0.5).to(dtype)
    out = emul.lif_forward(*lif_args(x, w, b, v0, s0, alpha=0.8, b_th=0.5, slope=4.0))
    cnt, idx, sg = _reference_active_set(x, w, b, v0, s0, 0.8, 1.0, 0.5, 4.0)
    assert torch.equal(out[2], cnt)
    assert torch.equal(out[3], idx)
    torch.testing.assert_close(out[4], sg, **TOL[dtype])
    assert out[9].tolist()[1] == idx.numel()
    s_ref = ref.lif_layer(x, w, b, alpha=0.8, state=(v0, s0))
    assert torch.equal(out[0], s_ref)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
@pytest.mark.parametrize("threads,max_blocks", [(0, 0), (1, 1), (3, 2), (32, 1), (7, 1000)])
@pytest.mark.parametrize("wide_tiles", [False, True])
def test_emul_launch_geometry_and_thread_order_do_not_matter(emul, launch, order, threads, max_blocks,
                                                              wide_tiles):
    """Tiny blocks, capped grids (the grid-stride loops wrap), any thread order and either tile
    width of the backward walks give the same result: no kernel depends on the launch shape or on
    which thread runs first. (The producer set passed to the backward is the layer's own active
    set, a valid CSR with columns < N_in.)"""
    x, w, b = random_problem(10, 6, 20, 9, rate=0.3, binary=False, seed=11)
    g = torch.randn(10, 6, 9, dtype=torch.float64)
    gv = torch.randn(6, 9, dtype=torch.float64)
    base_fwd = cpu_ops.lif_forward(*lif_args(x, w, b))
    base_bwd = [emul.lif_backward_sparse(g, gv, w, *base_fwd[2:8], base_fwd[2], base_fwd[3], None, 0.9,
                                         True, True, True, True, route) for route in (1, 2)]
    launch(order, threads, max_blocks, seed=3, wide_tiles=wide_tiles)
    fwd = emul.lif_forward(*lif_args(x, w, b))
    assert_all_equal(fwd, base_fwd, FWD_NAMES)
    for route, base in zip((1, 2), base_bwd):
        got = emul.lif_backward_sparse(g, gv, w, *fwd[2:8], fwd[2], fwd[3], None, 0.9, True, True, True,
                                       True, route)
        for a, c in zip(got, base):  # float atomics: summation order may differ
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)
    ro = emul.li_readout_forward(x, w, b, None, None, 0.8, "max")
    assert_all_equal(ro, cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, "max"),
                     ["out", "argmax", "ev_cnt", "ev_idx", "ev_val"])


# ----------------------------------------------------------------------------------- gradients
def reference_grads(x, w, b, v0, g, gv, *, alpha, b_th, slope, backward):
    """Gradients of sum(g * spikes) + sum(gv * v_final) through the reference model."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, v0)]
    xr, wr, br, vr = leaves
    s, (v, _) = ref.lif_layer(xr, wr, br, alpha=alpha, b_th=b_th, slope=slope, backward=backward,
                              state=(vr, torch.zeros_like(vr)), return_state=True)
    loss = (s * g).sum() + (v * gv).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 4), (7, 2, 6, 9), (15, 4, 21, 10), (5, 9, 3, 17)])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("with_gv", [True, False])
@pytest.mark.parametrize("wide_tiles", [False, True])
def test_emul_lif_backward_sparse_matches_reference(emul, launch, dtype, shape, binary, with_gv, wide_tiles):
    T, B, n_in, n_out = shape
    x, w, b = random_problem(*shape, rate=0.35, binary=binary, dtype=dtype, seed=sum(shape) + binary)
    v0 = torch.rand(B, n_out, dtype=dtype) * 0.5
    kw = dict(alpha=0.9, b_th=0.5, slope=5.0)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(T, B, n_out, generator=gen).to(dtype)
    gv = torch.randn(B, n_out, generator=gen).to(dtype) if with_gv else torch.zeros(B, n_out, dtype=dtype)
    want = reference_grads(x, w, b, v0, g, gv, backward="sparse", **kw)
    launch(wide_tiles=wide_tiles)
    fwd = emul.lif_forward(*lif_args(x, w, b, v0, None, kw["alpha"], 1.0, kw["b_th"], kw["slope"]))
    for route in (1, 2):
        dx, dw, db, dv = emul.lif_backward_sparse(g, gv if with_gv else None, w, *fwd[2:8], None, None, None,
                                                  kw["alpha"], True, True, True, True, route)
        for got, ref_grad in zip((dx, dw, db, dv), want):
            torch.testing.assert_close(got, ref_grad, **TOL[dtype])
    # unrequested gradients come back empty, the others unchanged
    dx, dw, db, dv = emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, False, True,
                                              False, False, 0)
    assert dx.numel() == 0 and db.numel() == 0 and dv.numel() == 0 and dw.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_emul_dx_on_producer_active_set(emul, dtype):
    """dx is computed only on the producer's active set, and equals the full dx there."""
    T, B, n_in, n_out = 12, 5, 14, 8
    x0, w0, b0 = random_problem(T, B, 10, n_in, rate=0.4, dtype=dtype, seed=2)
    prev = emul.lif_forward(*lif_args(x0, w0, b0, b_th=0.6))
    h = prev[0]
    _, w, b = random_problem(T, B, n_in, n_out, rate=0.3, dtype=dtype, seed=3)
    fwd = emul.lif_forward(*lif_args(h, w, b, b_th=0.5, slope=5.0))
    g = torch.randn(T, B, n_out, dtype=dtype)
    full = emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, False, False, False, 0)[0]
    restricted = emul.lif_backward_sparse(g, None, w, *fwd[2:8], prev[2], prev[3], None, 0.9, True, False,
                                          False, False, 0)[0]
    mask = torch.zeros(B * T, n_in, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(B * T), prev[2].long())
    mask[rows, prev[3].long()] = True
    mask = mask.view(B, T, n_in).transpose(0, 1)
    assert mask.any() and not mask.all()
    torch.testing.assert_close(restricted[mask], full[mask], **TOL[dtype])
    assert torch.count_nonzero(restricted[~mask]) == 0
    want = reference_grads(h, w, b, torch.zeros(B, n_out, dtype=dtype), g, torch.zeros(B, n_out, dtype=dtype),
                           alpha=0.9, b_th=0.5, slope=5.0, backward="sparse")[0]
    torch.testing.assert_close(full, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (9, 3, 11, 6), (14, 5, 7, 260)])
def test_emul_lif_backward_dense_matches_reference(emul, dtype, shape):
    T, B, n_in, n_out = shape
    x, w, b = random_problem(*shape, rate=0.3, dtype=dtype, seed=7)
    v0 = torch.rand(B, n_out, dtype=dtype)
    g = torch.randn(T, B, n_out, dtype=dtype)
    gv = torch.randn(B, n_out, dtype=dtype)
    want = reference_grads(x, w, b, v0, g, gv, alpha=0.85, b_th=0.2, slope=3.0, backward="dense")
    fwd = emul.lif_forward(*lif_args(x, w, b, v0, None, 0.85, 1.0, 0.2, 3.0, sparse=False))
    got = emul.lif_backward_dense(g, gv, x, w, fwd[4], None, 0.85, True, True, True, True)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, **TOL[dtype])
    # sparse mode with b_th = inf is the dense gradient
    fwd = emul.lif_forward(*lif_args(x, w, b, v0, None, 0.85, 1.0, math.inf, 3.0))
    assert fwd[9][1] == T * B * n_out
    for route in (1, 2):
        sp = emul.lif_backward_sparse(g, gv, w, *fwd[2:8], None, None, None, 0.85, True, True, True, True, route)
        for a, c in zip(sp, want):
            torch.testing.assert_close(a, c, **TOL[dtype])


def test_emul_empty_active_set_gives_exact_zeros(emul):
    x = torch.zeros(8, 3, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    fwd = emul.lif_forward(*lif_args(x, w, None, b_th=0.1))
    assert fwd[3].numel() == 0 and fwd[9].tolist() == [0, 0, 0] and fwd[2].abs().sum() == 0
    g = torch.randn(8, 3, 4, dtype=torch.float64)
    for route in (1, 2):
        for grad in emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, True, True,
                                             False, route)[:3]:
            assert grad.numel() > 0 and not torch.isnan(grad).any() and torch.count_nonzero(grad) == 0


# ------------------------------------------------------------------------------------- readout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
@pytest.mark.parametrize("shape,rate,binary", [((1, 1, 1, 1), 0.5, True), ((16, 5, 12, 4), 0.05, True),
                                               ((9, 4, 30, 10), 0.4, False), ((7, 3, 8, 5), 0.0, True)])
def test_emul_readout_matches_cpu_and_reference(emul, launch, dtype, reduce, shape, rate, binary):
    x, w, b = random_problem(*shape, rate=rate, binary=binary, dtype=dtype, seed=sum(shape))
    got = emul.li_readout_forward(x, w, b, None, None, 0.8, reduce)
    assert_all_equal(got, cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, reduce),
                     ["out", "argmax", "ev_cnt", "ev_idx", "ev_val"])
    torch.testing.assert_close(got[0], ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), **TOL[dtype])

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    out = ref.li_readout(*leaves, alpha=0.8, reduce=reduce)
    g = torch.randn(out.shape, dtype=dtype)
    want = torch.autograd.grad((out * g).sum(), leaves)
    for wide_tiles in (False, True):
        launch(wide_tiles=wide_tiles)
        dx, dw, db = emul.li_readout_backward(g, got[1], w, *got[2:5], None, None, shape[0], 0.8,
                                              reduce, True, True, True)
        for a, c in zip((dx, dw, db), want):
            torch.testing.assert_close(a, c, **TOL[dtype])
    launch()
    # dx restricted to a producer's active set (here: every other input neuron of every row)
    T, B, n_in, _ = shape
    keep = torch.arange(n_in, dtype=torch.int32)[::2]
    prev_cnt = torch.full((B * T,), keep.numel(), dtype=torch.int32)
    prev_idx = keep.repeat(B * T)
    dx_r = emul.li_readout_backward(g, got[1], w, *got[2:5], prev_cnt, prev_idx, T, 0.8, reduce,
                                    True, False, False)[0]
    torch.testing.assert_close(dx_r[:, :, ::2], want[0][:, :, ::2], **TOL[dtype])
    assert torch.count_nonzero(dx_r[:, :, 1::2]) == 0


# -------------------------------------------------------------- independently generated problems
def test_emul_random_problems(emul):
    """Random shapes, hyper-parameters, inputs and states: forward exact, gradients close."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(T=st.integers(1, 12), B=st.integers(1, 6), n_in=st.integers(1, 12),
                      n_out=st.integers(1, 12), rate=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                      binary=st.booleans(), alpha=st.floats(0.0, 1.0), b_th=st.floats(0.05, 2.0),
                      slope=st.floats(0.5, 50.0), seed=st.integers(0, 10_000))
    def check(T, B, n_in, n_out, rate, binary, alpha, b_th, slope, seed):
        x, w, b = random_problem(T, B, n_in, n_out, rate=rate, binary=binary, seed=seed)
        v0 = torch.rand(B, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        args = lif_args(x, w, b, v0, None, alpha, 1.0, b_th, slope)
        fwd = emul.lif_forward(*args)
        assert_all_equal(fwd, cpu_ops.lif_forward(*args), FWD_NAMES)
        g = torch.randn(T, B, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
        gv = torch.randn(B, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
        want = reference_grads(x, w, b, v0, g, gv, alpha=alpha, b_th=b_th, slope=slope, backward="sparse")
        assert torch.equal(fwd[0], ref.lif_layer(x, w, b, alpha=alpha, state=(v0, torch.zeros_like(v0))))
        for route in (1, 2):
            args = (g, gv, w, *fwd[2:8], None, None, None, alpha, True, True, True, True, route)
            got = emul.lif_backward_sparse(*args)
            for a, c, d in zip(got, want, cpu_ops.lif_backward_sparse(*args)):
                torch.testing.assert_close(a, c, **TOL[torch.float64])
                torch.testing.assert_close(a, d, **TOL[torch.float64])

    check()


# --------------------------------------------------------------------------------- validation
def test_emul_shared_host_checks_name_the_argument(emul):
    """The CUDA ops validate through the same host code: messages name the bad argument."""
    x, w, b = random_problem(3, 2, 4, 3)
    with pytest.raises(RuntimeError, match="weight"):
        emul.lif_forward(*lif_args(x, w[:, :2], b))
    with pytest.raises(RuntimeError, match="alpha"):
        emul.lif_forward(*lif_args(x, w, b, alpha=1.5))
    with pytest.raises(RuntimeError, match="b_th"):
        emul.lif_forward(*lif_args(x, w, b, b_th=0.0))
    with pytest.raises(RuntimeError, match="v_init"):
        emul.lif_forward(*lif_args(x, w, b, v0=torch.zeros(3, 3, dtype=x.dtype)))
    with pytest.raises(RuntimeError, match="reduce"):
        emul.li_readout_forward(x, w, b, None, None, 0.9, "median")
    fwd = emul.lif_forward(*lif_args(x, w, b))
    g = torch.randn(3, 2, 3, dtype=x.dtype)
    with pytest.raises(RuntimeError, match="dw_route"):
        emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, True, True, False, 5)
    with pytest.raises(RuntimeError, match="act_cnt"):
        emul.lif_backward_sparse(g, None, w, fwd[2][:-1], *fwd[3:8], None, None, None, 0.9, True, True,
                                 True, False, 0)


# ----------------------------------------------------------------- surrogates and resets
@pytest.mark.parametrize("surrogate", sparsegrad.functional.SURROGATES)
@pytest.mark.parametrize("reset", sparsegrad.functional.RESETS)
def test_emul_surrogates_and_resets_match_cpu(emul, surrogate, reset):
    """Every surrogate and reset: forward outputs equal the CPU op's (reset bits included), and
    both backward modes give the CPU op's gradients, initial state included."""
    x, w, b = random_problem(13, 4, 11, 37, rate=0.35, seed=21)
    v0 = torch.rand(4, 37, dtype=torch.float64)
    s0 = (torch.rand(4, 37) < 0.5).double()
    g = torch.randn(13, 4, 37, dtype=torch.float64)
    gv = torch.randn(4, 37, dtype=torch.float64)
    for sparse in (True, False):
        args = (x, w, b, v0, s0, None, None, 0.85, 1.0, 0.6, 3.0, sparse, surrogate, reset)
        fwd = emul.lif_forward(*args)
        want = cpu_ops.lif_forward(*args)
        assert_all_equal(fwd, want, FWD_NAMES)
        rst = fwd[8] if reset == "zero" else None
        assert (rst is not None) == (fwd[8].numel() > 0)
        if sparse:
            bargs = (g, gv, w, *fwd[2:8], None, None, rst, 0.85, True, True, True, True, 0)
            got, ref_grads = emul.lif_backward_sparse(*bargs), cpu_ops.lif_backward_sparse(*bargs)
        else:
            bargs = (g, gv, x, w, fwd[4], rst, 0.85, True, True, True, True)
            got, ref_grads = emul.lif_backward_dense(*bargs), cpu_ops.lif_backward_dense(*bargs)
        for a, c in zip(got, ref_grads):
            torch.testing.assert_close(a, c, **TOL[torch.float64])
