"""The real ops on every available device against sparsegrad.reference, and CUDA against CPU.

The device list is ["cpu"] plus "cuda" when a GPU is present, so on a GPU machine these run the
compiled CUDA kernels; here (no GPU) the CUDA cases drop out and the CPU cases are a cross-check of
the same assertions. The CUDA kernel bodies are also executed on the CPU by tests/test_cuda_emul.py.
"""
import pytest
import torch

import sparsegrad
from sparsegrad import reference as ref
from conftest import DEVICE_DTYPES, TOL, assert_spikes_match, layer_membrane, random_problem

ops = torch.ops.sparsegrad
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
FWD_NAMES = ["spikes", "v_final", "act_cnt", "act_idx", "act_sg", "ev_cnt", "ev_idx", "ev_val",
             "rst_bits", "stats"]


def _close(got, want, dtype):
    """TOL, with float32's absolute tolerance scaled by the gradient's size (long sums)."""
    tol = dict(TOL[dtype])
    if dtype == torch.float32:
        tol["atol"] = max(tol["atol"], 1e-5 * float(want.abs().max()))
    torch.testing.assert_close(got, want, **tol)


def _grads(fn, x, params, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in [x] + params]
    out = fn(*leaves)
    return torch.autograd.grad((out * g).sum(), leaves)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape,rate", [((1, 1, 1, 1), 0.5), ((20, 7, 30, 300), 0.05), ((12, 33, 50, 17), 0.4)])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_cuda_ops_lif_matches_reference(device, dtype, shape, rate, backward):
    x, w, b = random_problem(*shape, rate=rate, dtype=dtype, device=device, seed=sum(shape))
    kw = dict(alpha=0.9, b_th=0.4, slope=5.0, backward=backward)
    s = sparsegrad.lif_layer(x, w, b, **kw)
    s_ref = ref.lif_layer(x, w, b, **kw)
    assert s.device == x.device
    assert_spikes_match(s, s_ref, layer_membrane(x, w, b, s_ref, 0.9))  # events/cuBLAS vs GEMM
    g = torch.randn(s.shape, dtype=dtype, device=device)
    got = _grads(lambda x, w, b: sparsegrad.lif_layer(x, w, b, **kw), x, [w, b], g)
    want = _grads(lambda x, w, b: ref.lif_layer(x, w, b, **kw), x, [w, b], g)
    for a, c in zip(got, want):
        _close(a, c, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
def test_cuda_ops_readout_matches_reference(device, dtype, reduce):
    x, w, b = random_problem(15, 6, 20, 10, rate=0.3, dtype=dtype, device=device)
    out = sparsegrad.li_readout(x, w, b, alpha=0.8, reduce=reduce)
    torch.testing.assert_close(out, ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), **TOL[dtype])
    g = torch.randn(out.shape, dtype=dtype, device=device)
    got = _grads(lambda x, w, b: sparsegrad.li_readout(x, w, b, alpha=0.8, reduce=reduce), x, [w, b], g)
    want = _grads(lambda x, w, b: ref.li_readout(x, w, b, alpha=0.8, reduce=reduce), x, [w, b], g)
    for a, c in zip(got, want):
        _close(a, c, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("binary", [True, False])
def test_cuda_forward_outputs_equal_cpu(dtype, binary):
    """Same compact layout on both devices; in float64 every output is equal (the GEMM path may
    round differently in float32, so there spikes and the integer outputs only)."""
    x, w, b = random_problem(25, 9, 40, 70, rate=0.05, binary=binary, dtype=dtype, seed=4)
    args = (None, None, None, None, 0.9, 1.0, 0.3, 10.0, True)
    cpu = ops.lif_forward(x, w, b, *args)
    gpu = [t.cpu() for t in ops.lif_forward(x.cuda(), w.cuda(), b.cuda(), *args)]
    for name, c, g in zip(FWD_NAMES, cpu, gpu):
        assert c.dtype == g.dtype and c.shape == g.shape, name
        if dtype == torch.float64 or not c.is_floating_point() or name == "spikes":
            torch.testing.assert_close(g, c, rtol=1e-12, atol=1e-12, msg=name)


@needs_gpu
def test_cuda_ops_use_the_current_stream_and_device():
    x, w, b = random_problem(10, 4, 12, 8, rate=0.3, device="cuda")
    want = sparsegrad.lif_layer(x, w, b, alpha=0.9)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = sparsegrad.lif_layer(x, w, b, alpha=0.9)
    stream.synchronize()
    assert torch.equal(got, want)
    if torch.cuda.device_count() > 1:
        x1, w1, b1 = x.to("cuda:1"), w.to("cuda:1"), b.to("cuda:1")
        assert torch.equal(sparsegrad.lif_layer(x1, w1, b1, alpha=0.9).cpu(), want.cpu())


@needs_gpu
def test_cuda_ops_reject_mixed_devices():
    x, w, b = random_problem(4, 2, 5, 3)
    with pytest.raises(RuntimeError, match="weight"):
        ops.lif_forward(x.cuda(), w, b.cuda(), None, None, None, None, 0.9, 1.0, 0.2, 10.0, True)


@needs_gpu
@pytest.mark.nightly
def test_cuda_indices_beyond_int32():
    """T*B*N_out > 2^31: the kernels index with int64 (a batch element far from the start gives
    the same spikes as when run alone)."""
    if torch.cuda.get_device_properties(0).total_memory < 40e9:
        pytest.skip("needs a GPU with >= 40 GB")
    T, B, n_in, n_out = 4096, 512, 8, 1100
    assert T * B * n_out > 2**31
    x, w, b = random_problem(T, B, n_in, n_out, rate=0.05, dtype=torch.float32, device="cuda", seed=9)
    spikes, _, act_cnt, act_idx, _, _, _, _, _, stats = ops.lif_forward(
        x, w, b, None, None, None, None, 0.9, 1.0, 0.01, 10.0, True)
    assert int(stats[0]) == int(spikes.sum(dtype=torch.float64))
    assert int(act_cnt.sum(dtype=torch.int64)) == act_idx.numel() == int(stats[1])
    alone = ops.lif_forward(x[:, -1:].contiguous(), w, b, None, None, None, None, 0.9, 1.0, 0.01,
                            10.0, True)[0]
    # one batch element's input density differs from the whole's: either may take the other
    # current route (events or cuBLAS), so compare off the threshold's rounding
    assert_spikes_match(spikes[:, -1], alone[:, 0],
                        layer_membrane(x[:, -1:], w, b, alone, 0.9)[:, 0])
