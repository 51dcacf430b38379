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
from conftest import TOL, assert_spikes_match, layer_membrane, random_problem

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
    ops.set_routes(0, 0)
    yield ops
    ops.set_launch_config(0, 0, 0, 0, False)
    ops.set_routes(0, 0)


@pytest.fixture
def launch(emul):
    """Set the emulated launch geometry / thread order for one test, restore the default after."""
    def set_config(order="forward", threads=0, max_blocks=0, seed=0, wide_tiles=False):
        emul.set_launch_config(ORDERS[order], seed, threads, max_blocks, wide_tiles)
    yield set_config
    emul.set_launch_config(0, 0, 0, 0, False)


DW_ROUTES = {"events": 1, "active": 2, "gemm": 3}  # the GPU's dW routes (csrc/cuda/gpu_routes.h)
DX_ROUTES = {"dots": 1, "gemm": 2}                # dx on a producer's active set


@pytest.fixture
def routes(emul):
    """Force the GPU routes of the emulated backwards for one test, back to the cost model after."""
    def set_routes(dw=None, dx=None):
        emul.set_routes(DW_ROUTES[dw] if dw else 0, DX_ROUTES[dx] if dx else 0)
    yield set_routes
    emul.set_routes(0, 0)


def lif_args(x, w, b, v0=None, s0=None, alpha=0.9, threshold=1.0, b_th=0.4, slope=10.0, sparse=True):
    return (x, w, b, v0, s0, None, None, alpha, threshold, b_th, slope, sparse)


def assert_all_equal(got, want, names):
    for g, w, n in zip(got, want, names):
        assert g.dtype == w.dtype and g.shape == w.shape, (n, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), f"output {n} differs"


def bits(t):
    """The tensor's bytes as integers: equal bits, not just equal values (-0.0 != 0.0, NaN == NaN)."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_same_bits(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(bits(g), bits(w)), f"{what}: output {k} differs in its bits"


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
    host = "".join((CSRC / "cuda" / f).read_text() for f in ("host_ops.h", "recurrent_host.h", "conv_host.h"))
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
    kernel, active-set count + fill; every thread of every block runs, and the warp-per-row
    compaction and the block reduction of the spike count really meet at collectives."""
    x, w, b = random_problem(5, 3, 8, 6, rate=0.3)
    before = emul.launch_counters()
    emul.lif_forward(*lif_args(x, w, b))
    after = emul.launch_counters()
    assert after[0] - before[0] == 5
    # 15 rows: one warp each, 480 threads = 2 blocks of 256 per compaction launch; the walk of
    # 3 * 6 neurons: one block of 64 (walk_launch_shape: small blocks at small B*N)
    assert after[1] - before[1] == 4 * 512 + 64
    assert after[2] > before[2]
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
        assert_spikes_match(got[0], spikes, layer_membrane(x, w, b, spikes, 0.9))  # events vs GEMM
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
def test_emul_determinism_launch_geometry_and_thread_order(emul, launch, routes, order, threads, max_blocks):
    """Tiny blocks, capped grids (the grid-stride loops wrap) and any thread order give the same
    bits, for the forward and for every route of the sparse backward: no kernel depends on the
    launch shape or on which thread runs first. (The producer set passed to the backward is the
    layer's own active set, a valid CSR with columns < N_in.)"""
    x, w, b = random_problem(10, 6, 20, 9, rate=0.3, binary=False, seed=11)
    g = torch.randn(10, 6, 9, dtype=torch.float64)
    gv = torch.randn(6, 9, dtype=torch.float64)
    base_fwd = cpu_ops.lif_forward(*lif_args(x, w, b))
    cases = [(dw, dx) for dw in DW_ROUTES for dx in DX_ROUTES]

    def backwards(fwd):
        out = []
        for dw, dx in cases:
            routes(dw, dx)
            out.append(emul.lif_backward_sparse(g, gv, w, *fwd[2:8], fwd[2], fwd[3], None, 0.9, True, True, True,
                                                True, 0))
        routes()
        return out

    base_bwd = backwards(base_fwd)
    launch(order, threads, max_blocks, seed=3)
    fwd = emul.lif_forward(*lif_args(x, w, b))
    assert_all_equal(fwd, base_fwd, FWD_NAMES)
    for case, got, base in zip(cases, backwards(fwd), base_bwd):
        assert_same_bits(got, base, f"lif_backward_sparse {case}")
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
# (T = 37: several blocks of the reverse scan, kScanSteps = 16, the last one partial)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 4), (7, 2, 6, 9), (15, 4, 21, 10), (5, 9, 3, 17),
                                   (37, 2, 5, 6)])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("with_gv", [True, False])
@pytest.mark.parametrize("dw_route", list(DW_ROUTES))
def test_emul_lif_backward_sparse_matches_reference(emul, routes, dtype, shape, binary, with_gv, dw_route):
    T, B, n_in, n_out = shape
    x, w, b = random_problem(*shape, rate=0.35, binary=binary, dtype=dtype, seed=sum(shape) + binary)
    v0 = torch.rand(B, n_out, dtype=dtype) * 0.5
    kw = dict(alpha=0.9, b_th=0.5, slope=5.0)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(T, B, n_out, generator=gen).to(dtype)
    gv = torch.randn(B, n_out, generator=gen).to(dtype) if with_gv else torch.zeros(B, n_out, dtype=dtype)
    want = reference_grads(x, w, b, v0, g, gv, backward="sparse", **kw)
    fwd = emul.lif_forward(*lif_args(x, w, b, v0, None, kw["alpha"], 1.0, kw["b_th"], kw["slope"]))
    routes(dw_route)
    dx, dw, db, dv = emul.lif_backward_sparse(g, gv if with_gv else None, w, *fwd[2:8], None, None, None,
                                              kw["alpha"], True, True, True, True, 0)
    for got, ref_grad in zip((dx, dw, db, dv), want):
        torch.testing.assert_close(got, ref_grad, **TOL[dtype])
    # the op's own dw_route argument (1 events, 2 active entries) when nothing is forced
    routes()
    for route in (1, 2):
        got = emul.lif_backward_sparse(g, gv if with_gv else None, w, *fwd[2:8], None, None, None,
                                       kw["alpha"], True, True, True, True, route)
        for a, ref_grad in zip(got, want):
            torch.testing.assert_close(a, ref_grad, **TOL[dtype])
    # unrequested gradients come back empty, the others unchanged
    dx, dw, db, dv = emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, False, True,
                                              False, False, 0)
    assert dx.numel() == 0 and db.numel() == 0 and dv.numel() == 0 and dw.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_emul_dx_on_producer_active_set(emul, routes, dtype):
    """dx by one dot product per producer entry: equal to the full dx there, zero elsewhere; the
    GEMM route gives the full dx (also correct where the producer reads it)."""
    T, B, n_in, n_out = 12, 5, 14, 8
    x0, w0, b0 = random_problem(T, B, 10, n_in, rate=0.4, dtype=dtype, seed=2)
    prev = emul.lif_forward(*lif_args(x0, w0, b0, b_th=0.6))
    h = prev[0]
    _, w, b = random_problem(T, B, n_in, n_out, rate=0.3, dtype=dtype, seed=3)
    fwd = emul.lif_forward(*lif_args(h, w, b, b_th=0.5, slope=5.0))
    g = torch.randn(T, B, n_out, dtype=dtype)
    full = emul.lif_backward_sparse(g, None, w, *fwd[2:8], None, None, None, 0.9, True, False, False, False, 0)[0]
    routes(dx="dots")
    restricted = emul.lif_backward_sparse(g, None, w, *fwd[2:8], prev[2], prev[3], None, 0.9, True, False,
                                          False, False, 0)[0]
    mask = torch.zeros(B * T, n_in, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(B * T), prev[2].long())
    mask[rows, prev[3].long()] = True
    mask = mask.view(B, T, n_in).transpose(0, 1)
    assert mask.any() and not mask.all()
    torch.testing.assert_close(restricted[mask], full[mask], **TOL[dtype])
    assert torch.count_nonzero(restricted[~mask]) == 0
    routes(dx="gemm")
    as_gemm = emul.lif_backward_sparse(g, None, w, *fwd[2:8], prev[2], prev[3], None, 0.9, True, False, False,
                                       False, 0)[0]
    torch.testing.assert_close(as_gemm, full, **TOL[dtype])
    want = reference_grads(h, w, b, torch.zeros(B, n_out, dtype=dtype), g, torch.zeros(B, n_out, dtype=dtype),
                           alpha=0.9, b_th=0.5, slope=5.0, backward="sparse")[0]
    torch.testing.assert_close(full, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (9, 3, 11, 6), (14, 5, 7, 260)])
def test_emul_lif_backward_dense_matches_reference(emul, routes, dtype, shape):
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
    assert fwd[9][1] == T * B * n_out  # every entry active
    every_input = (torch.full((B * T,), n_in, dtype=torch.int32), torch.arange(n_in, dtype=torch.int32).repeat(B * T))
    for dw in DW_ROUTES:
        for dx in DX_ROUTES:
            routes(dw, dx)
            sp = emul.lif_backward_sparse(g, gv, w, *fwd[2:8], *every_input, None, 0.85, True, True, True, True, 0)
            for a, c in zip(sp, want):
                torch.testing.assert_close(a, c, **TOL[dtype])


def test_emul_empty_active_set_gives_exact_zeros(emul, routes):
    x = torch.zeros(8, 3, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    fwd = emul.lif_forward(*lif_args(x, w, None, b_th=0.1))
    assert fwd[3].numel() == 0 and fwd[9].tolist() == [0, 0, 0] and fwd[2].abs().sum() == 0
    g = torch.randn(8, 3, 4, dtype=torch.float64)
    every_input = (torch.full((3 * 8,), 6, dtype=torch.int32), torch.arange(6, dtype=torch.int32).repeat(3 * 8))
    for dw in DW_ROUTES:
        for dx in DX_ROUTES:
            routes(dw, dx)
            for prev in ((None, None), every_input):
                for grad in emul.lif_backward_sparse(g, None, w, *fwd[2:8], *prev, None, 0.9, True, True, True,
                                                     False, 0)[:3]:
                    assert grad.numel() > 0 and not torch.isnan(grad).any() and torch.count_nonzero(grad) == 0


# ------------------------------------------------------------------------------------- readout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
@pytest.mark.parametrize("shape,rate,binary", [((1, 1, 1, 1), 0.5, True), ((16, 5, 12, 4), 0.05, True),
                                               ((9, 4, 30, 10), 0.4, False), ((7, 3, 8, 5), 0.0, True)])
def test_emul_readout_matches_cpu_and_reference(emul, routes, dtype, reduce, shape, rate, binary):
    x, w, b = random_problem(*shape, rate=rate, binary=binary, dtype=dtype, seed=sum(shape))
    got = emul.li_readout_forward(x, w, b, None, None, 0.8, reduce)
    assert_all_equal(got, cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, reduce),
                     ["out", "argmax", "ev_cnt", "ev_idx", "ev_val"])
    torch.testing.assert_close(got[0], ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), **TOL[dtype])

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    out = ref.li_readout(*leaves, alpha=0.8, reduce=reduce)
    g = torch.randn(out.shape, dtype=dtype)
    want = torch.autograd.grad((out * g).sum(), leaves)
    for dw_route in ("events", "gemm"):
        routes(dw_route)
        dx, dw, db = emul.li_readout_backward(g, got[1], w, *got[2:5], None, None, shape[0], 0.8,
                                              reduce, True, True, True)
        for a, c in zip((dx, dw, db), want):
            torch.testing.assert_close(a, c, **TOL[dtype])
    routes(dx="dots")
    # dx restricted to a producer's active set (here: every other input neuron of every row)
    T, B, n_in, _ = shape
    keep = torch.arange(n_in, dtype=torch.int32)[::2]
    prev_cnt = torch.full((B * T,), keep.numel(), dtype=torch.int32)
    prev_idx = keep.repeat(B * T)
    dx_r = emul.li_readout_backward(g, got[1], w, *got[2:5], prev_cnt, prev_idx, T, 0.8, reduce,
                                    True, False, False)[0]
    torch.testing.assert_close(dx_r[:, :, ::2], want[0][:, :, ::2], **TOL[dtype])
    assert torch.count_nonzero(dx_r[:, :, 1::2]) == 0
    routes(dx="gemm")
    dx_g = emul.li_readout_backward(g, got[1], w, *got[2:5], prev_cnt, prev_idx, T, 0.8, reduce,
                                    True, False, False)[0]
    torch.testing.assert_close(dx_g, want[0], **TOL[dtype])


# -------------------------------------------------------------- independently generated problems
def test_emul_random_problems(emul, routes):
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
        state = (v0, torch.zeros_like(v0))
        s_ref = ref.lif_layer(x, w, b, alpha=alpha, state=state)
        assert_spikes_match(fwd[0], s_ref, layer_membrane(x, w, b, s_ref, alpha, state=state))
        for route, forced in ((1, None), (2, None), (0, "gemm")):
            routes(forced)
            args = (g, gv, w, *fwd[2:8], None, None, None, alpha, True, True, True, True, route)
            got = emul.lif_backward_sparse(*args)
            for a, c, d in zip(got, want, cpu_ops.lif_backward_sparse(*args)):
                torch.testing.assert_close(a, c, **TOL[torch.float64])
                torch.testing.assert_close(a, d, **TOL[torch.float64])
        routes()

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


@pytest.mark.parametrize("reset", sparsegrad.functional.RESETS)
@pytest.mark.parametrize("dw_route", list(DW_ROUTES))
@pytest.mark.parametrize("dx_route", list(DX_ROUTES))
def test_emul_every_route_every_reset_matches_reference(emul, routes, reset, dw_route, dx_route):
    """Each GPU route of the sparse backward (forced), under each reset, against the reference's
    autograd; reset-to-zero makes the active-entry route fall back to the events route. dx is
    restricted to a producer set holding every other input (dots: zero elsewhere)."""
    T, B, n_in, n_out = 21, 3, 9, 7
    x, w, b = random_problem(T, B, n_in, n_out, rate=0.35, seed=41)
    gen = torch.Generator().manual_seed(42)
    v0 = torch.rand(B, n_out, generator=gen, dtype=torch.float64)
    s0 = (torch.rand(B, n_out, generator=gen) < 0.5).double()
    g = torch.randn(T, B, n_out, generator=gen, dtype=torch.float64)
    gv = torch.randn(B, n_out, generator=gen, dtype=torch.float64)
    kw = dict(alpha=0.85, threshold=1.0, b_th=0.6, surrogate="atan", slope=2.0, reset=reset)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, v0)]
    s, (v, _) = ref.lif_layer(*leaves[:3], state=(leaves[3], s0), return_state=True, **kw)
    want = torch.autograd.grad((s * g).sum() + (v * gv).sum(), leaves)
    fwd = emul.lif_forward(x, w, b, v0, s0, None, None, 0.85, 1.0, 0.6, 2.0, True, "atan", reset)
    assert torch.equal(fwd[0], s.detach())
    rst = fwd[8] if reset == "zero" else None
    keep = torch.arange(n_in, dtype=torch.int32)[::2]
    prev = (torch.full((B * T,), keep.numel(), dtype=torch.int32), keep.repeat(B * T))
    routes(dw_route, dx_route)
    dx, dw, db, dv = emul.lif_backward_sparse(g, gv, w, *fwd[2:8], *prev, rst, 0.85, True, True, True, True, 0)
    for name, got, ref_grad in (("dW", dw, want[1]), ("db", db, want[2]), ("dV_init", dv, want[3])):
        torch.testing.assert_close(got, ref_grad, **TOL[torch.float64], msg=name)
    torch.testing.assert_close(dx[:, :, ::2], want[0][:, :, ::2], **TOL[torch.float64])
    if dx_route == "dots":
        assert torch.count_nonzero(dx[:, :, 1::2]) == 0
    else:
        torch.testing.assert_close(dx, want[0], **TOL[torch.float64])


# ------------------------------------------------------------------------------- determinism
def _every_op_call(emul, routes, dtype):
    """(name, call) for every emulated op, every output, every GPU route of the backwards, on
    fixed inputs (made by the CPU ops, so that they do not depend on the launch settings)."""
    T, B, n_in, n_out = 19, 5, 16, 11  # T > kScanSteps
    x, w, b = random_problem(T, B, n_in, n_out, rate=0.3, binary=False, dtype=dtype, seed=21)
    xb = random_problem(T, B, n_in, n_out, rate=0.3, dtype=dtype, seed=22)[0]
    gen = torch.Generator().manual_seed(5)
    v0 = (torch.rand(B, n_out, generator=gen) * 0.5).to(dtype)
    s0 = (torch.rand(B, n_out, generator=gen) < 0.3).to(dtype)
    g = torch.randn(T, B, n_out, generator=gen).to(dtype)
    gv = torch.randn(B, n_out, generator=gen).to(dtype)
    # the producer's active set: a sparse layer feeding x
    x0, w0, b0 = random_problem(T, B, 7, n_in, rate=0.4, dtype=dtype, seed=23)
    prev = cpu_ops.lif_forward(*lif_args(x0, w0, b0, b_th=0.6))
    fwd = cpu_ops.lif_forward(*lif_args(x, w, b, v0, s0))
    dense = cpu_ops.lif_forward(*lif_args(x, w, b, v0, s0, sparse=False))
    calls = []

    def add(name, fn, dw=None, dx=None):
        def call():
            routes(dw, dx)
            return fn()
        calls.append((name, call))

    for xin in (x, xb):
        for sparse in (True, False):
            add(f"lif_forward sparse={sparse}", lambda xin=xin, sparse=sparse:
                emul.lif_forward(*lif_args(xin, w, b, v0, s0, sparse=sparse)))
        add("li_readout_forward", lambda xin=xin: [t for r in ("max", "sum", "mean", "none")
                                                   for t in emul.li_readout_forward(xin, w, b, None, None, 0.8, r)])
    for dw in DW_ROUTES:
        for dx in (None, "dots", "gemm"):
            p = (prev[2], prev[3]) if dx else (None, None)
            add(f"lif_backward_sparse dw={dw} dx={dx}", lambda p=p:
                emul.lif_backward_sparse(g, gv, w, *fwd[2:8], *p, None, 0.9, True, True, True, True, 0), dw, dx)
    add("lif_backward_dense", lambda: emul.lif_backward_dense(g, gv, x, w, dense[4], None, 0.9, True, True, True, True))
    # reset to zero (the trace cut by rst_bits), another surrogate
    zargs = (x, w, b, v0, s0, None, None, 0.9, 1.0, 0.4, 4.0)
    zfwd = cpu_ops.lif_forward(*zargs, True, "sigmoid", "zero")
    zdense = cpu_ops.lif_forward(*zargs, False, "sigmoid", "zero")
    add("lif_forward reset=zero", lambda: list(emul.lif_forward(*zargs, True, "sigmoid", "zero")) +
        list(emul.lif_forward(*zargs, False, "sigmoid", "zero")))
    for dw in DW_ROUTES:
        for dx in (None, "dots", "gemm"):
            p = (prev[2], prev[3]) if dx else (None, None)
            add(f"lif_backward_sparse reset=zero dw={dw} dx={dx}", lambda p=p:
                emul.lif_backward_sparse(g, gv, w, *zfwd[2:8], *p, zfwd[8], 0.9, True, True, True, True, 0), dw, dx)
    add("lif_backward_dense reset=zero", lambda: emul.lif_backward_dense(g, gv, x, w, zdense[4], zdense[8], 0.9, True,
                                                                        True, True, True))
    for reduce in ("max", "sum", "mean", "none"):
        ro = cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, reduce)
        go = torch.randn(ro[0].shape, generator=gen).to(dtype)
        for dw in ("events", "gemm"):
            for dx in (None, "dots", "gemm"):
                p = (prev[2], prev[3]) if dx else (None, None)
                add(f"li_readout_backward {reduce} dw={dw} dx={dx}", lambda ro=ro, go=go, p=p, reduce=reduce:
                    emul.li_readout_backward(go, ro[1], w, *ro[2:5], *p, T, 0.8, reduce, True, True, True), dw, dx)
    return calls


GEOMETRIES = [("reverse", 0, 0, 0), ("shuffled", 0, 0, 1), ("shuffled", 1, 1, 2), ("forward", 3, 2, 0),
              ("shuffled", 32, 1, 4), ("reverse", 7, 1000, 0), ("shuffled", 100, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order,threads,max_blocks,seed", GEOMETRIES)
def test_emul_determinism_every_op_every_output(emul, launch, routes, dtype, order, threads, max_blocks, seed):
    """Every op, every output, every route: the same bits whatever the thread order (forward,
    reverse, shuffled), the block size and the grid cap. (No float atomics, one writer per
    output element summing in a fixed order: docs/cuda.md.)"""
    calls = _every_op_call(emul, routes, dtype)
    base = [(name, call()) for name, call in calls]
    launch(order, threads, max_blocks, seed=seed)
    for (name, call), (_, want) in zip(calls, base):
        assert_same_bits(call(), want, name)


def test_emul_determinism_repeated_runs_and_no_float_atomics(emul, routes):
    """Two runs give the same bits; and no kernel header adds floats through atomics (the only
    atomics left are the integer spike/error counters)."""
    calls = _every_op_call(emul, routes, torch.float32)
    for name, call in calls:
        assert_same_bits(call(), call(), name)
    import re
    for h in sorted((CSRC / "cuda").glob("*.cuh")):
        text = h.read_text()
        for m in re.finditer(r"atomic\w*\s*\(", text):
            line = text[:m.start()].count("\n") + 1
            allowed = m.group(0).startswith(("atomicOr(", "atomic_add_count(")) or (
                h.name == "kernel_common.cuh" and "unsigned long long" in text.splitlines()[line - 1])
            assert allowed, f"{h.name}:{line}: {m.group(0)} (float atomics are not deterministic)"


def test_emul_gpu_route_model_choices(emul):
    """The GPU cost model (csrc/cuda/gpu_routes.h; docs/cuda.md): segment sums over input events for
    dW and one dot per producer entry for dx at the SHD layer; a GEMM dx at the large layer, where
    W^T no longer fits in L2; never the active-entry route when it is invalid."""
    # T, B, n_in, n_out, nnz, n_active, n_prev, acc_bytes, active_route_valid
    shd1 = emul.gpu_routes(500, 64, 700, 200, int(0.02 * 500 * 64 * 700), int(0.04 * 500 * 64 * 200), -1, 4, True)
    assert shd1 == [DW_ROUTES["events"], DX_ROUTES["gemm"]]  # no producer set: dx everywhere
    shd2 = emul.gpu_routes(500, 64, 200, 200, int(0.03 * 500 * 64 * 200), int(0.04 * 500 * 64 * 200),
                           int(0.04 * 500 * 64 * 200), 4, True)
    assert shd2 == [DW_ROUTES["events"], DX_ROUTES["dots"]]
    n = 1000 * 256 * 4096
    large = emul.gpu_routes(1000, 256, 4096, 4096, int(0.02 * n), int(0.04 * n), int(0.04 * n), 4, True)
    assert large == [DW_ROUTES["events"], DX_ROUTES["gemm"]]
    dense_in = emul.gpu_routes(500, 64, 700, 200, 500 * 64 * 700, 100, -1, 4, True)
    assert dense_in[0] != DW_ROUTES["events"]
    assert emul.gpu_routes(500, 64, 700, 200, 500 * 64 * 700, 100, -1, 4, False)[0] == DW_ROUTES["gemm"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emul_non_contiguous_inputs(emul, dtype):
    """Strided inputs give the results of their contiguous copies."""
    T, B, n_in, n_out = 6, 4, 9, 7
    x, w, b = random_problem(T, B, n_in, n_out, rate=0.3, dtype=dtype, seed=31)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    ws = w.t().contiguous().t()
    bs = torch.stack([b, b], 1)[:, 0]
    v0 = torch.rand(n_out, B, dtype=dtype).t()
    assert not (xs.is_contiguous() or ws.is_contiguous() or bs.is_contiguous() or v0.is_contiguous())
    fwd = emul.lif_forward(*lif_args(xs, ws, bs, v0))
    assert_all_equal(fwd, emul.lif_forward(*lif_args(x, w, b, v0.contiguous())), FWD_NAMES)
    g = torch.randn(B, T, n_out, dtype=dtype).transpose(0, 1)
    gv = torch.randn(n_out, B, dtype=dtype).t()
    got = emul.lif_backward_sparse(g, gv, ws, *fwd[2:8], fwd[2], fwd[3][:], None, 0.9, True, True, True, True, 0)
    want = emul.lif_backward_sparse(g.contiguous(), gv.contiguous(), w, *fwd[2:8], fwd[2], fwd[3], None, 0.9,
                                    True, True, True, True, 0)
    assert_same_bits(got, want, "lif_backward_sparse")
    dense = emul.lif_forward(*lif_args(x, w, b, sparse=False))
    sg = dense[4].transpose(0, 1).contiguous().transpose(0, 1)
    assert_same_bits(emul.lif_backward_dense(g, gv, xs, ws, sg, None, 0.9, True, True, True, True),
                     emul.lif_backward_dense(g.contiguous(), gv.contiguous(), x, w, dense[4], None, 0.9, True, True,
                                             True, True), "lif_backward_dense")
    ro = emul.li_readout_forward(xs, ws, bs, None, None, 0.8, "max")
    assert_all_equal(ro, emul.li_readout_forward(x, w, b, None, None, 0.8, "max"), ["out", "argmax", "p", "i", "v"])
    go = torch.randn(n_out, B, dtype=dtype).t()
    assert_same_bits(emul.li_readout_backward(go, ro[1], ws, *ro[2:5], None, None, T, 0.8, "max", True, True, True),
                     emul.li_readout_backward(go.contiguous(), ro[1], w, *ro[2:5], None, None, T, 0.8, "max",
                                              True, True, True), "li_readout_backward")


# ------------------------------------------------------- zero sizes and inconsistent tensors
def _run_isolated(emul, body):
    """Runs `body` in a fresh interpreter with the emulation library loaded as `emul`: a crash
    (segmentation fault, abort) fails the test instead of killing pytest."""
    import subprocess
    import sys
    import textwrap

    so = os.path.join(_build_dir(), "sparsegrad_emul.so")
    assert os.path.exists(so), so
    prelude = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({so!r})
        emul = torch.ops.sparsegrad_emul
        DW_ROUTES = {DW_ROUTES!r}
        DX_ROUTES = {DX_ROUTES!r}
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_emul_zero_sizes(emul):
    """Every op with each of T, B, N_in, N_out equal to 0 (and 1, 3): empty outputs and zero or
    empty gradients, every backward route, never a crash. (Readout reductions over zero time
    steps are undefined: an error is allowed there, nothing else.)"""
    out = _run_isolated(emul, """
        import itertools, math
        checked = 0
        def prev_all(T, B, n_in):  # a producer set holding every entry
            cnt = torch.full((B * T,), n_in, dtype=torch.int32)
            return cnt, torch.arange(n_in, dtype=torch.int32).repeat(B * T)
        for (T, B, n_in, n_out), dtype in itertools.product(itertools.product([0, 1, 3], repeat=4),
                                                            [torch.float32, torch.float64]):
            x = (torch.rand(T, B, n_in) < 0.5).to(dtype)
            w = torch.randn(n_out, n_in, dtype=dtype)
            b = torch.randn(n_out, dtype=dtype)
            v0 = torch.rand(B, n_out, dtype=dtype)
            g = torch.randn(T, B, n_out, dtype=dtype)
            gv = torch.randn(B, n_out, dtype=dtype)
            pp, pi = prev_all(T, B, n_in)
            for sparse, reset in itertools.product((True, False), ("subtract", "zero")):
                f = emul.lif_forward(x, w, b, v0, None, None, None, 0.9, 1.0, 10.0, 5.0, sparse, "atan", reset)
                rst = f[8] if reset == "zero" else None
                assert f[0].shape == (T, B, n_out) and f[1].shape == (B, n_out), (T, B, n_in, n_out)
                if T == 0:
                    assert torch.equal(f[1], v0)
                if sparse:
                    for dw, dx in itertools.product([1, 2, 3], [1, 2]):
                        emul.set_routes(dw, dx)
                        for prev in ((None, None), (pp, pi)):
                            gx, gw, gb, gvi = emul.lif_backward_sparse(g, gv, w, *f[2:8], *prev, rst, 0.9, True,
                                                                       True, True, True, 0)
                            assert gx.shape == (T, B, n_in) and gw.shape == (n_out, n_in)
                            assert gb.shape == (n_out,) and gvi.shape == (B, n_out)
                            for t in (gx, gw, gb, gvi):
                                assert torch.isfinite(t).all()
                            if T * B == 0:
                                assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
                            if T == 0:
                                assert torch.equal(gvi, gv)
                    emul.set_routes(0, 0)
                else:
                    gx, gw, gb, gvi = emul.lif_backward_dense(g, gv, x, w, f[4], rst, 0.9, True, True, True, True)
                    assert gx.shape == (T, B, n_in) and gw.shape == (n_out, n_in) and gb.shape == (n_out,)
                    assert gvi.shape == (B, n_out)
                    if T == 0:
                        assert torch.equal(gvi, gv)
                checked += 1
            for reduce in ("max", "sum", "mean", "none"):
                try:
                    r = emul.li_readout_forward(x, w, b, None, None, 0.8, reduce)
                except RuntimeError as e:
                    assert T == 0 and reduce != "none", (T, B, n_in, n_out, reduce, e)
                    continue
                want = (T, B, n_out) if reduce == "none" else (B, n_out)
                assert r[0].shape == want
                go = torch.randn(want, dtype=dtype)
                for dw, dx in itertools.product([1, 3], [1, 2]):
                    emul.set_routes(dw, dx)
                    for prev in ((None, None), (pp, pi)):
                        try:
                            gx, gw, gb = emul.li_readout_backward(go, r[1], w, *r[2:5], *prev, T, 0.8, reduce,
                                                                  True, True, True)
                        except RuntimeError as e:
                            assert T == 0, (T, B, n_in, n_out, reduce, e)
                            continue
                        assert gx.shape == (T, B, n_in) and gw.shape == (n_out, n_in) and gb.shape == (n_out,)
                        if B == 0:
                            assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
                emul.set_routes(0, 0)
                checked += 1
        print("checked", checked)
    """)
    assert "checked" in out


def test_emul_inconsistent_compact_tensors_raise(emul):
    """Compact tensors that do not describe a valid CSR (row counts that are negative or do not add
    up to the index array, out of range or unordered indices, an argmax outside [0, T)), passed to the backwards directly: an
    error that names them, from every route, never an out-of-bounds access or a crash. (On a GPU
    the same bound checks turn the gradients into NaN instead, without a host synchronisation.)"""
    out = _run_isolated(emul, """
        import itertools
        from conftest import random_problem
        T, B, n_in, n_out = 6, 3, 8, 5
        x, w, b = random_problem(T, B, n_in, n_out, rate=0.5, seed=3)
        f = emul.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 10.0, 5.0, True)  # all active
        act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val = f[2:8]
        g = torch.randn(T, B, n_out, dtype=x.dtype)
        prev_cnt = torch.full((B * T,), n_in, dtype=torch.int32)
        prev_idx = torch.arange(n_in, dtype=torch.int32).repeat(B * T)

        def changed(t, k, v):
            t = t.clone()
            t[k] = v
            return t

        def moved(cnt, r, d):  # one entry moved from row r + 1 to row r: the total still matches
            cnt = cnt.clone()
            cnt[r] += d
            cnt[r + 1] -= d
            return cnt

        bad = {  # name: (argument position, tensor, expected word in the message)
            "act_cnt total": (3, changed(act_cnt, -1, act_cnt[-1] - 1), "act_cnt"),
            "act_cnt negative": (3, changed(act_cnt, 4, -3), "act_cnt"),
            "act_cnt huge": (3, changed(act_cnt, 2, 2**30), "act_cnt"),
            "act_cnt moved": (3, moved(act_cnt, 3, 1), "act_cnt/act_idx"),
            "act_idx too large": (4, changed(act_idx, 7, n_out), "act_cnt/act_idx"),
            "act_idx negative": (4, changed(act_idx, 0, -1), "act_cnt/act_idx"),
            "act_idx unordered": (4, changed(act_idx, 1, act_idx[0]), "act_cnt/act_idx"),
            "ev_cnt total": (6, changed(ev_cnt, -1, ev_cnt[-1] + 3), "ev_cnt"),
            "ev_idx too large": (7, changed(ev_idx, 2, n_in + 100), "ev_cnt/ev_idx"),
            "ev_idx negative": (7, changed(ev_idx, 2, -7), "ev_cnt/ev_idx"),
            "prev_cnt total": (9, changed(prev_cnt, -1, 10**6), "prev_cnt"),
            "prev_idx too large": (10, changed(prev_idx, 5, n_in), "prev_cnt/prev_idx"),
            "act_cnt length": (3, act_cnt[:-1], "act_cnt"),
            "act_sg length": (5, act_sg[:-1], "act_sg"),
            "rst_bits shape": (11, torch.zeros(T, B, 2, dtype=torch.int32), "rst_bits"),
        }
        raised = 0
        for (name, (pos, tensor, word)), (dw, dx) in itertools.product(bad.items(), [(1, 1), (2, 1), (3, 2)]):
            emul.set_routes(dw, dx)
            args = [g, None, w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, prev_cnt, prev_idx, None,
                    0.9, True, True, True, True, 0]
            args[pos] = tensor
            try:
                emul.lif_backward_sparse(*args)
            except RuntimeError as e:
                assert word in str(e), (name, dw, dx, str(e))
                raised += 1
                continue
            # only a tensor that the route does not read may pass: dx by GEMM reads no producer set
            assert pos in (9, 10) and dx == 2, (name, dw, dx, "no error")
        emul.set_routes(0, 0)
        # the readout: argmax_t out of range, and corrupted events
        ro = emul.li_readout_forward(x, w, b, None, None, 0.8, "max")
        go = torch.randn(B, n_out, dtype=x.dtype)
        for arg in (changed(ro[1], (0, 0), T), changed(ro[1], (1, 2), -1)):
            try:
                emul.li_readout_backward(go, arg, w, *ro[2:5], None, None, T, 0.8, "max", True, True, True)
                raise AssertionError("argmax_t out of range passed")
            except RuntimeError as e:
                assert "argmax_t" in str(e)
                raised += 1
        for dw in (1, 3):
            emul.set_routes(dw, 0)
            try:
                emul.li_readout_backward(go, ro[1], w, ro[2], changed(ro[3], 0, n_in), ro[4], None, None, T,
                                         0.8, "max", True, True, True)
                raise AssertionError("ev_idx out of range passed")
            except RuntimeError as e:
                assert "ev_cnt/ev_idx" in str(e)
                raised += 1
        emul.set_routes(0, 0)
        print("raised", raised)
    """)
    assert "raised" in out


@pytest.mark.nightly
def test_emul_sanitized(emul):
    """The whole emulation suite again, built with AddressSanitizer: any out-of-bounds access of a
    kernel (zero sizes and inconsistent compact tensors included) aborts it. Preloading libstdc++
    after libasan lets C++ exceptions (the ops' argument errors) through."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("AddressSanitizer preload: Linux only")

    def lib(name):
        return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    asan = lib("libasan.so")
    if not os.path.isabs(asan):
        pytest.skip("no libasan")
    env = dict(os.environ, SPARSEGRAD_EMUL_SANITIZE="1", LD_PRELOAD=f"{asan} {lib('libstdc++.so')}",
               ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pathlib.Path(__file__)),
                           "-k", "emul and not sanitized", "-m", "not nightly"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emul_half_types_match_cpu(emul, dtype):
    """bfloat16 / float16 through the emulated CUDA ops: float32 state and sums, outputs in the
    input dtype, the same values as the CPU ops."""
    x, w, b = (t.to(dtype) for t in random_problem(11, 3, 14, 9, rate=0.3, dtype=torch.float32, seed=6))
    g = torch.randn(11, 3, 9).to(dtype)
    for sparse in (True, False):
        args = (x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 4.0, sparse, "atan", "zero")
        fwd, want = emul.lif_forward(*args), cpu_ops.lif_forward(*args)
        assert fwd[0].dtype == fwd[1].dtype == dtype
        assert torch.equal(fwd[0], want[0]) and torch.equal(fwd[2], want[2])
        rst = fwd[8]
        if sparse:
            bargs = (g, None, w, *fwd[2:8], None, None, rst, 0.9, True, True, True, False, 0)
            got, ref_grads = emul.lif_backward_sparse(*bargs), cpu_ops.lif_backward_sparse(*bargs)
        else:
            bargs = (g, None, x, w, fwd[4], rst, 0.9, True, True, True, False)
            got, ref_grads = emul.lif_backward_dense(*bargs), cpu_ops.lif_backward_dense(*bargs)
        for a, c in zip(got[:3], ref_grads[:3]):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)
    out = emul.li_readout_forward(x, w, b, None, None, 0.8, "max")
    assert out[0].dtype == dtype
    torch.testing.assert_close(out[0].float(), cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, "max")[0].float())
