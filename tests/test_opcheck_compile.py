"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) through a training step."""
import pytest
import torch

import sparsegrad
from conftest import assert_compile_matches_eager, random_problem

ops = torch.ops.sparsegrad


def _forward_samples():
    x, w, b = random_problem(6, 3, 5, 4, rate=0.4)
    xr = torch.rand(6, 3, 5, dtype=torch.float64)  # non-binary input
    v0 = torch.rand(3, 4, dtype=torch.float64)
    s0 = torch.zeros(3, 4, dtype=torch.float64)
    for sparse in (True, False):
        yield (x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, sparse)
        yield (xr, w, None, v0, s0, None, None, 0.8, 1.0, 0.5, 5.0, sparse)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lif_forward(requires_grad):
    for args in _forward_samples():
        if requires_grad:
            args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         and i in (0, 1, 2, 3) else a for i, a in enumerate(args))
        torch.library.opcheck(ops.lif_forward.default, args)


def test_opcheck_lif_backward_ops():
    x, w, b = random_problem(6, 3, 5, 4, rate=0.4)
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, _, _ = ops.lif_forward(
        x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, True)
    g = torch.randn_like(spikes)
    for route in (0, 1, 2):
        torch.library.opcheck(ops.lif_backward_sparse.default, (
            g, torch.randn_like(v_final), w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val,
            None, None, None, 0.9, True, True, True, True, route))
    torch.library.opcheck(ops.lif_backward_sparse.default, (
        g, None, w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, act_cnt.new_zeros(18),
        act_idx[:0], None, 0.9, True, False, True, False, 0))
    fwd = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, False)
    torch.library.opcheck(ops.lif_backward_dense.default,
                          (g, None, x, w, fwd[4], None, 0.9, True, True, True, False))
    # reset to zero: the backward ops take the reset bits
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst, _ = ops.lif_forward(
        x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, True, "atan", "zero")
    assert rst.shape == (6, 3, 1)
    torch.library.opcheck(ops.lif_backward_sparse.default, (
        g, torch.randn_like(v_final), w, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val,
        None, None, rst, 0.9, True, True, True, True, 0))
    fwd = ops.lif_forward(x, w, b, None, None, None, None, 0.9, 1.0, 0.5, 5.0, False, "sigmoid", "zero")
    torch.library.opcheck(ops.lif_backward_dense.default,
                          (g, None, x, w, fwd[4], fwd[8], 0.9, True, True, True, False))


@pytest.mark.parametrize("reduce", ["max", "sum", "mean", "none"])
def test_opcheck_readout(reduce):
    x, w, b = random_problem(6, 3, 5, 4, rate=0.4)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), w.clone().requires_grad_(requires_grad),
                b, None, None, 0.8, reduce)
        torch.library.opcheck(ops.li_readout_forward.default, args)
    out, argmax_t, ev_cnt, ev_idx, ev_val = ops.li_readout_forward(x, w, b, None, None, 0.8, reduce)
    torch.library.opcheck(ops.li_readout_backward.default, (
        torch.randn_like(out), argmax_t, w, ev_cnt, ev_idx, ev_val, None, None, 6, 0.8, reduce,
        True, True, True))


class TwoLayer(torch.nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.hidden = sparsegrad.nn.LIF(20, 16, alpha=0.9, b_th=0.5, slope=10.0, backward=backward)
        self.readout = sparsegrad.nn.LIReadout(16, 4, alpha=0.8)

    def forward(self, x):
        return self.readout(self.hidden(x))


@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_compile_fullgraph_matches_eager(backward):
    x = (torch.rand(15, 5, 20) < 0.3).float()
    labels = torch.randint(0, 4, (5,))
    model = TwoLayer(backward)
    with torch.no_grad():
        model.hidden.weight.mul_(3.0)
    assert_compile_matches_eager(model, x, labels, every_grad_nonzero=False)
