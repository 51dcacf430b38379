"""Robustness: property-based comparison with the reference, determinism, memory, non-finite
values, 64-bit indexing, and module (de)serialisation.

Property tests: a CI-sized run by default (derandomized, so reproducible) and a 1,000-example run
under ``-m nightly``. The numerics they rely on are described in docs/numerics.md.
"""
import copy
import gc
import io
import math
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref

from conftest import assert_spikes_match, layer_membrane

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
    HAVE_HYPOTHESIS = True
except ImportError:  # only the property tests need it
    HAVE_HYPOTHESIS = False

if HAVE_HYPOTHESIS:
    CI_SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow])
    NIGHTLY_SETTINGS = settings(max_examples=1000, deadline=None, database=None,
                                suppress_health_check=[HealthCheck.too_slow])


    # ---------------------------------------------------------------------------------- problems

    @st.composite
    def lif_problems(draw):
        """A random LIF problem. float32 problems use weights on a grid of 1/64 and inputs on a grid
        of 1/4, so the input current is exact whatever the summation order and the kernel and the
        reference must produce the same bits; float64 problems use arbitrary normal weights."""
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        T = draw(st.integers(1, 24))
        B = draw(st.integers(1, 6))
        n_in = draw(st.integers(1, 40))
        n_out = draw(st.integers(1, 24))
        rate = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 1.0]))
        binary = draw(st.booleans())
        use_bias = draw(st.booleans())
        seed = draw(st.integers(0, 2**31 - 1))
        kw = dict(
            alpha=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
            threshold=draw(st.floats(0.1, 2.0)),
            b_th=draw(st.sampled_from([math.inf]) | st.floats(0.01, 1.5)),
            slope=draw(st.floats(0.5, 200.0)),
            backward=draw(st.sampled_from(["sparse", "dense"])),
        )
        with_state = draw(st.booleans())

        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(T, B, n_in, generator=g) < rate
        if binary:
            x = mask.to(torch.float64)
        else:
            x = torch.randint(-8, 9, (T, B, n_in), generator=g).to(torch.float64) / 4 * mask
        scale = 1.5 / max(1.0, (max(rate, 0.01) * n_in) ** 0.5)
        w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * scale
        b = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.3
        v0 = torch.randn(B, n_out, generator=g, dtype=torch.float64) * 0.5
        s0 = (torch.rand(B, n_out, generator=g) < 0.3).to(torch.float64)
        if dtype == torch.float32:
            w, b, v0 = (torch.round(t * 64) / 64 for t in (w, b, v0))
        x, w, b, v0, s0 = (t.to(dtype) for t in (x, w, b, v0, s0))
        return x, w, (b if use_bias else None), ((v0, s0) if with_state else None), kw


    def _tol(dtype, scale):
        if dtype == torch.float64:
            return dict(rtol=1e-9, atol=1e-11 * max(1.0, scale))
        return dict(rtol=2e-4, atol=2e-5 * max(1.0, scale))


    def check_lif_against_reference(problem):
        x, w, b, state, kw = problem
        leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        if b is not None:
            leaves.append(b.clone().requires_grad_(True))
        if state is not None:
            leaves.append(state[0].clone().requires_grad_(True))

        def run(impl):
            xs = [t.clone().detach().requires_grad_(True) for t in leaves]
            bias = xs[2] if b is not None else None
            st_in = (xs[-1], state[1]) if state is not None else None
            spikes, (v, s) = impl(xs[0], xs[1], bias, state=st_in, return_state=True, **kw)
            return xs, spikes, v, s

        xs_k, spk_k, v_k, s_k = run(sparsegrad.lif_layer)
        xs_r, spk_r, v_r, s_r = run(ref.lif_layer)
        if x.dtype == torch.float32:  # currents exact by construction (grid values): same bits
            assert torch.equal(spk_k, spk_r), "spikes differ from the reference"
            assert torch.equal(s_k, s_r)
        else:  # events vs the reference's GEMM round differently near the threshold
            v = layer_membrane(x, w, b, spk_r, kw["alpha"], kw["threshold"], state=state)
            assert_spikes_match(spk_k, spk_r, v, kw["threshold"])
            assert_spikes_match(s_k, s_r, v[-1], kw["threshold"])
        torch.testing.assert_close(v_k, v_r, **_tol(x.dtype, float(v_r.detach().abs().max())))

        g = torch.Generator().manual_seed(int(spk_r.sum()) + 7)
        g_spk = torch.randn(spk_r.shape, generator=g, dtype=torch.float64).to(x.dtype)
        g_v = torch.randn(v_r.shape, generator=g, dtype=torch.float64).to(x.dtype)
        got = torch.autograd.grad((spk_k * g_spk).sum() + (v_k * g_v).sum(), xs_k)
        want = torch.autograd.grad((spk_r * g_spk).sum() + (v_r * g_v).sum(), xs_r)
        for name, gk, gr in zip(["x", "weight", "bias/state", "state"], got, want):
            torch.testing.assert_close(gk, gr, **_tol(x.dtype, float(gr.abs().max())),
                                       msg=lambda m: f"d{name} ({kw}): {m}")


    @st.composite
    def readout_problems(draw):
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        T, B = draw(st.integers(1, 24)), draw(st.integers(1, 6))
        n_in, n_out = draw(st.integers(1, 40)), draw(st.integers(1, 12))
        rate = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        kw = dict(alpha=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
                  reduce=draw(st.sampled_from(["max", "sum", "mean", "none"])))
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(T, B, n_in, generator=g) < rate).to(dtype)
        w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(n_out, generator=g, dtype=torch.float64).to(dtype)
        return x, w, b, kw


    def check_readout_against_reference(problem):
        x, w, b, kw = problem

        def run(impl):
            xs = [t.clone().requires_grad_(True) for t in (x, w, b)]
            return xs, impl(*xs, **kw)

        xs_k, out_k = run(sparsegrad.li_readout)
        xs_r, out_r = run(ref.li_readout)
        scale = float(out_r.detach().abs().max()) if out_r.numel() else 1.0
        torch.testing.assert_close(out_k, out_r, **_tol(x.dtype, scale))
        if kw["reduce"] == "max":
            # The gradient goes to the first time step reaching the maximum: only compare where the
            # maximum is not a near-tie (a 1-ulp difference may move it to another step).
            trace = ref.li_readout(x, w, b, alpha=kw["alpha"], reduce="none")
            top2 = trace.topk(min(2, trace.shape[0]), dim=0).values
            if trace.shape[0] > 1 and bool(((top2[0] - top2[1]).abs() < 1e-5 * (1 + scale)).any()):
                return
        g_out = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64).to(x.dtype)
        got = torch.autograd.grad((out_k * g_out).sum(), xs_k)
        want = torch.autograd.grad((out_r * g_out).sum(), xs_r)
        for gk, gr in zip(got, want):
            torch.testing.assert_close(gk, gr, **_tol(x.dtype, float(gr.abs().max())))


    @CI_SETTINGS
    @given(lif_problems())
    def test_lif_property_ci(problem):
        check_lif_against_reference(problem)


    @CI_SETTINGS
    @given(readout_problems())
    def test_readout_property_ci(problem):
        check_readout_against_reference(problem)


    @pytest.mark.nightly
    @NIGHTLY_SETTINGS
    @given(lif_problems())
    def test_lif_property_nightly(problem):
        check_lif_against_reference(problem)


    @pytest.mark.nightly
    @NIGHTLY_SETTINGS
    @given(readout_problems())
    def test_readout_property_nightly(problem):
        check_readout_against_reference(problem)
else:
    @pytest.mark.skip(reason="the property tests need hypothesis (pip install hypothesis)")
    def test_property_tests_need_hypothesis():
        pass


# ------------------------------------------------------------------------------------ determinism

_DETERMINISM_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    import sparsegrad
    results = {}
    # B = 13 spans several fixed batch chunks; both input densities select both current paths.
    for dtype in (torch.float32, torch.float64):
        for rate, binary in ((0.03, True), (0.5, True), (0.1, False)):
            for backward in ("sparse", "dense"):
                g = torch.Generator().manual_seed(11)
                T, B, n_in, n_h, n_out = 40, 13, 90, 70, 6
                x = (torch.rand(T, B, n_in, generator=g) < rate).to(dtype)
                if not binary:
                    x = x * torch.rand(T, B, n_in, generator=g).to(dtype)
                x.requires_grad_(True)
                w1 = (torch.randn(n_h, n_in, generator=g) * 0.6).to(dtype).requires_grad_(True)
                b1 = (torch.randn(n_h, generator=g) * 0.1).to(dtype).requires_grad_(True)
                w2 = (torch.randn(n_out, n_h, generator=g) * 0.3).to(dtype).requires_grad_(True)
                h = sparsegrad.lif_layer(x, w1, b1, alpha=0.9, slope=5.0, b_th=0.5,
                                         backward=backward)
                out = sparsegrad.li_readout(h, w2, alpha=0.8, reduce="sum")
                loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)).sum()
                loss.backward()
                key = f"{dtype}-{rate}-{binary}-{backward}"
                for name, t in (("h", h), ("out", out), ("dx", x.grad), ("dw1", w1.grad),
                                ("db1", b1.grad), ("dw2", w2.grad)):
                    results[f"{key}-{name}"] = t.detach().clone()
    torch.save(results, sys.argv[2])
""")


def _run_determinism(threads, path):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(threads), str(path)],
                   check=True, env=env, timeout=300)
    return torch.load(path)


def test_bit_identical_across_thread_counts_and_runs(tmp_path):
    one = _run_determinism(1, tmp_path / "one.pt")
    two = _run_determinism(2, tmp_path / "two.pt")
    two_again = _run_determinism(2, tmp_path / "two_again.pt")
    assert one.keys() == two.keys() == two_again.keys()
    assert any(float(t.abs().sum()) > 0 for k, t in one.items() if k.endswith("dw1"))
    differ_threads = [k for k in one if not torch.equal(one[k], two[k])]
    differ_runs = [k for k in one if not torch.equal(two[k], two_again[k])]
    assert not differ_runs, f"results change between identical runs: {differ_runs}"
    assert not differ_threads, f"results change between 1 and 2 threads: {differ_threads}"


def test_repeated_calls_in_one_process_are_identical():
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(30, 9, 50, generator=g) < 0.1).float()
    w = (torch.randn(40, 50, generator=g) * 0.7).requires_grad_(True)
    results = []
    for _ in range(3):
        s = sparsegrad.lif_layer(x, w, alpha=0.9, slope=5.0, b_th=0.5)
        (dw,) = torch.autograd.grad((s * torch.arange(s.numel()).view_as(s)).sum(), w)
        results.append((s, dw))
    for s, dw in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(dw, results[0][1])


# ------------------------------------------------------------------------------------------ memory

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_growth_over_1000_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(sparsegrad.nn.LIF(30, 24, slope=5.0, b_th=0.5),
                              sparsegrad.nn.LIF(24, 16, slope=5.0, b_th=0.5, backward="dense"),
                              sparsegrad.nn.LIReadout(16, 5))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.rand(12, 4, 30, generator=g) < 0.2).float() for _ in range(10)]
    labels = torch.randint(0, 5, (4,), generator=g)

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(inputs[i % len(inputs)]), labels)
        loss.backward()
        opt.step()

    # One thread: the property does not depend on it, and tiny parallel regions on a busy
    # machine cost far more than the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(200):  # warm-up: allocator caches, lazy initialisation
            step(i)
        gc.collect()
        rss0, tensors0 = _rss_bytes(), _live_tensors()
        for i in range(200, 1000):
            step(i)
        gc.collect()
        growth = _rss_bytes() - rss0
    finally:
        torch.set_num_threads(threads)
    assert _live_tensors() <= tensors0, "tensors accumulate across steps"
    # A leaked saved tensor or active set (>= a few kB per step) would pass 8 MiB in 800 steps;
    # smaller leaks of Python objects show up in the tensor count above.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 800 steps"


# -------------------------------------------------------------------------------- NaN and infinity

def test_nan_in_input_propagates_like_the_reference():
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(8, 3, 30, generator=g) < 0.1).double()
    x[2, 1, 4] = math.nan
    w = torch.randn(6, 30, generator=g, dtype=torch.float64)
    w[:, 4] = 1.0  # every neuron reads input 4
    for backward in ("sparse", "dense"):
        s, (v, _) = sparsegrad.lif_layer(x, w, alpha=0.9, backward=backward, return_state=True)
        s_ref, (v_ref, _) = ref.lif_layer(x, w, alpha=0.9, backward=backward, return_state=True)
        assert_spikes_match(s, s_ref, layer_membrane(x, w, None, s_ref, 0.9))  # NaN V: exact
        # The NaN enters every membrane of batch element 1 at t=2: they never fire again and
        # end NaN; the other batch elements are untouched.
        assert s[2:, 1].sum() == 0 and torch.isnan(v[1]).all()
        assert not torch.isnan(v[[0, 2]]).any()
        torch.testing.assert_close(v, v_ref, equal_nan=True)


def test_nan_gradients_sparse_contained_dense_propagates():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(8, 3, 30, generator=g) < 0.1).double()
    x[2, 1, 4] = math.nan
    w = (torch.randn(6, 30, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    # dense: the surrogate is NaN wherever the membrane is NaN, so NaN reaches every weight.
    (dw_dense,) = torch.autograd.grad(
        sparsegrad.lif_layer(x, w, alpha=0.9, backward="dense").sum(), w)
    assert torch.isnan(dw_dense).all()
    # sparse: a NaN membrane is never within b_th of the threshold, so it is never active and
    # contributes nothing; only the NaN input value itself reaches dW (its column).
    (dw_sparse,) = torch.autograd.grad(
        sparsegrad.lif_layer(x, w, alpha=0.9, backward="sparse", b_th=0.5).sum(), w)
    nan_cols = torch.isnan(dw_sparse).any(dim=0).nonzero().flatten().tolist()
    assert nan_cols in ([], [4])
    finite = torch.ones(30, dtype=torch.bool)
    finite[4] = False
    assert torch.isfinite(dw_sparse[:, finite]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight(bad):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 40, generator=g, dtype=torch.float64)
    w[1, 7] = bad
    # Dense input: the current is a GEMM, 0 * inf = NaN, exactly the reference.
    x = (torch.rand(6, 3, 40, generator=g) < 0.6).double()
    want = ref.lif_layer(x, w, alpha=0.9)
    assert_spikes_match(sparsegrad.lif_layer(x, w, alpha=0.9), want, layer_membrane(x, w, None, want, 0.9))
    # Sparse input: the current is a sum over the nonzero inputs only, so a non-finite weight
    # acts only at the steps where its input fires (a zero input contributes exactly nothing).
    x = (torch.rand(6, 3, 40, generator=g) < 0.02).double()
    x[:, :, 7] = 0.0
    x[3, 0, 7] = 1.0
    s = sparsegrad.lif_layer(x, w, alpha=0.9)
    w_clean = w.clone()
    w_clean[1, 7] = 0.0
    s_clean = ref.lif_layer(x, w_clean, alpha=0.9)
    others = [0, 2, 3, 4]
    v = layer_membrane(x, w_clean, None, s_clean, 0.9)  # events vs GEMM: compare off threshold
    assert_spikes_match(s[:, :, others], s_clean[:, :, others], v[:, :, others])
    assert_spikes_match(s[:3, :, 1], s_clean[:3, :, 1], v[:3, :, 1])  # before the input fires
    assert_spikes_match(s[:, 1:, 1], s_clean[:, 1:, 1], v[:, 1:, 1])  # other batch elements
    after = s[3:, 0, 1]
    if math.isnan(bad) or bad < 0:
        assert after.sum() == 0  # NaN or -inf membrane never fires again
    else:
        assert after.sum() == after.numel()  # +inf fires at every remaining step


# ------------------------------------------------------------------------------ 64-bit indexing

def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(_available_memory_bytes() < 6 * 2**30, reason="needs ~3 GiB of free memory")
def test_index_arithmetic_beyond_2_31_input_elements():
    """x has 2^31 + 2^25 elements but occupies almost no memory: numpy's zeros come from calloc,
    whose untouched pages all map the shared zero page. The one event sits at flat offset
    > 2^31, so any 32-bit offset computation would read or write the wrong place."""
    np = pytest.importorskip("numpy")
    T, B, n_in, n_out = 1024, 32768, 65, 2
    xa = np.zeros((T, B, n_in), dtype=np.float32)
    xa[T - 1, B - 1, n_in - 1] = 1.0
    x = torch.from_numpy(xa)
    assert x.numel() > 2**31 and x.storage_offset() == 0
    w = torch.zeros(n_out, n_in)
    w[0, n_in - 1] = 1.1  # V = 1.1: fires, and |V - 1| = 0.1 < b_th makes it active
    w.requires_grad_(True)
    b = torch.zeros(n_out, requires_grad=True)
    alpha, slope = 0.5, 100.0

    spikes, _, stats, _ = sparsegrad.functional.lif_layer_with_stats(
        x, w, b, alpha=alpha, slope=slope, b_th=0.2)
    assert int(stats.input_nonzeros) == 1 and int(stats.spike_count) == 1
    assert int(stats.active_count) == 1
    assert spikes.nonzero().tolist() == [[T - 1, B - 1, 0]]
    spikes.sum().backward()
    delta = 1.0 / (slope * 0.1 + 1.0) ** 2
    expected_dw = torch.zeros(n_out, n_in)
    expected_dw[0, n_in - 1] = delta
    torch.testing.assert_close(w.grad, expected_dw, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([delta * (1 - alpha**T) / (1 - alpha), 0.0]),
                               rtol=1e-5, atol=0)
    del spikes

    # The readout reads the same input: U = (1 - alpha) * 1.1 at the very last entry only.
    w_r = w.detach().clone().requires_grad_(True)
    out = sparsegrad.li_readout(x, w_r, alpha=alpha, reduce="max")
    expected = torch.zeros(B, n_out)
    expected[B - 1, 0] = (1 - alpha) * 1.1
    torch.testing.assert_close(out, expected)
    out[B - 1, 0].backward()
    assert w_r.grad[0, n_in - 1] == pytest.approx(1 - alpha)
    assert float(w_r.grad.abs().sum()) == pytest.approx(1 - alpha)


# ---------------------------------------------------------------- modules: copy, pickle, dtypes

def _modules():
    torch.manual_seed(0)
    return [sparsegrad.nn.LIF(12, 7, alpha=0.8, b_th=0.4, slope=7.0),
            sparsegrad.nn.LIF(12, 7, bias=False, backward="dense", batch_first=True),
            sparsegrad.nn.LIReadout(12, 7, alpha=0.7, reduce="mean")]


def _input(dtype=torch.float32, batch_first=False):
    x = (torch.rand(15, 4, 12, generator=torch.Generator().manual_seed(8)) < 0.3).to(dtype)
    return x.transpose(0, 1).contiguous() if batch_first else x


@pytest.mark.parametrize("index", [0, 1, 2])
def test_module_pickle_deepcopy_state_dict(index):
    m = _modules()[index]
    x = _input(batch_first=getattr(m, "batch_first", False))
    y = m(x)
    assert getattr(m, "last_stats", None) is not None or isinstance(m, sparsegrad.nn.LIReadout)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert getattr(clone, "last_stats", None) is None  # per-call state is not part of it
        assert torch.equal(clone(x), y)
        assert clone.extra_repr() == m.extra_repr()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    fresh = type(m)(12, 7, bias=m.bias is not None)
    fresh.load_state_dict(m.state_dict())
    for attr in ("alpha", "threshold", "b_th", "slope", "backward", "reduce", "batch_first"):
        if hasattr(m, attr):
            setattr(fresh, attr, getattr(m, attr))
    assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_module_moves_between_dtypes(index):
    m = _modules()[index]
    bf = getattr(m, "batch_first", False)
    x32 = _input(torch.float32, bf)
    y32 = m(x32)
    m64 = copy.deepcopy(m).double()
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    y64 = m64(_input(torch.float64, bf))
    assert y64.dtype == torch.float64
    if isinstance(m, sparsegrad.nn.LIF):
        kw = dict(alpha=m.alpha, threshold=m.threshold, b_th=m.b_th, slope=m.slope)
        x_tm = _input(torch.float64)
        expected = ref.lif_layer(x_tm, m64.weight, m64.bias, **kw)
        assert torch.equal(y64.transpose(0, 1) if bf else y64, expected)
    else:
        torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-6)
    back = m64.to(torch.float32)
    assert torch.equal(back.weight, m.weight)  # float32 -> float64 -> float32 is lossless
    assert torch.equal(back(x32), y32)
    with pytest.raises(TypeError, match="dtype"):
        m(_input(torch.float64, bf))  # parameters float32, input float64: a clear error
