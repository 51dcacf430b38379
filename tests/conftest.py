import itertools

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
DEVICE_DTYPES = list(itertools.product(DEVICES, DTYPES))

# Relative/absolute tolerances for gradients compared with the reference's autograd.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def random_problem(T, B, n_in, n_out, *, rate=0.2, dtype=torch.float64, device="cpu", binary=True,
                   weight_scale=None, seed=0):
    """Inputs and parameters giving a few percent of output spikes."""
    g = torch.Generator().manual_seed(seed)
    if binary:
        x = (torch.rand(T, B, n_in, generator=g) < rate).to(dtype)
    else:
        x = torch.rand(T, B, n_in, generator=g).to(dtype) * (torch.rand(T, B, n_in, generator=g) < rate)
    if weight_scale is None:
        weight_scale = 2.0 / max(1.0, (rate * n_in) ** 0.5)
    w = (torch.randn(n_out, n_in, generator=g) * weight_scale).to(dtype)
    b = (torch.randn(n_out, generator=g) * 0.1).to(dtype)
    return x.to(device), w.to(device), b.to(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ---------------------------------------------------------------- spikes of two summation orders
# Two kernels that sum the same currents in a different order (conv / GEMM algorithms picked by
# shape, events vs GEMM, cuBLAS vs CPU) round differently in the last bits, so a spike may flip
# where the membrane lies within that rounding of the threshold: compare spikes only where the
# reference membrane is clear of it, and membranes with a tolerance.
SPIKE_EPS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def lif_membrane(current, spikes, alpha, threshold=1.0, reset="subtract", state=None):
    """The pre-reset membrane V[t] (float64) the reference spikes came from, resets taken from
    `spikes` themselves (teacher-forced), so it is that computation's V up to rounding."""
    current, spikes = current.detach().double(), spikes.detach().double()
    v = current.new_zeros(current.shape[1:]) if state is None else state[0].detach().double()
    s = current.new_zeros(current.shape[1:]) if state is None else state[1].detach().double()
    out = []
    for i_t, s_t in zip(current.unbind(0), spikes.unbind(0)):
        if reset == "subtract":
            v = alpha * v + i_t - threshold * s
        elif reset == "zero":
            v = alpha * ((1 - s) * v) + i_t
        else:
            v = alpha * v + i_t
        out.append(v)
        s = s_t
    return torch.stack(out)


def assert_spikes_match(got, want, v, threshold=1.0, eps=None):
    """got == want wherever |v - threshold| exceeds eps (the rounding of two summation orders)."""
    assert got.shape == want.shape == v.shape, (got.shape, want.shape, v.shape)
    if eps is None:
        eps = SPIKE_EPS[want.dtype] * (1.0 + (float(v.abs().max()) if v.numel() else 0.0))
    # a NaN membrane counts as clear: both sides must then agree exactly (no spike)
    clear = ~((v.to(want.device).double() - threshold).abs() <= eps)
    bad = (got != want) & clear
    assert not bool(bad.any()), (f"{int(bad.sum())} spikes differ where |V - threshold| > {eps:g} "
                                 f"({int((got != want).sum())} differ in all)")


def layer_membrane(x, weight, bias, spikes, alpha, threshold=1.0, reset="subtract", state=None,
                   rec_weight=None):
    """lif_membrane of a (recurrent) LIF layer's current x @ W.T + b (+ S[t-1] @ R.T), float64."""
    import torch.nn.functional as F
    cur = F.linear(x.detach().double(), weight.detach().double(),
                   None if bias is None else bias.detach().double())
    if rec_weight is not None:
        s0 = (torch.zeros_like(cur[0]) if state is None else state[1].detach().double())
        prev = torch.cat([s0[None], spikes.detach().double()[:-1]])
        cur = cur + F.linear(prev, rec_weight.detach().double())
    return lif_membrane(cur, spikes, alpha, threshold, reset, state)


def assert_compile_matches_eager(model, x, labels, *, every_grad_nonzero=True):
    """torch.compile(model, fullgraph=True) gives the eager model's output and parameter
    gradients (cross-entropy on `labels`); the gradients are checked to be nonzero (every one, or
    at least one) so that the comparison is not empty."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for m in (model, compiled):
        m.zero_grad()
        out = m(x)
        torch.nn.functional.cross_entropy(out, labels).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    nonzero = [torch.count_nonzero(g) > 0 for g in results[0][1]]
    assert all(nonzero) if every_grad_nonzero else any(nonzero)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
