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
