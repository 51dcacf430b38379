"""b_th="auto": the smallest b_th keeping 95 % of the surrogate's mass; convert's default."""
import math
import warnings

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad import functional as F_sg
from sparsegrad.conversion import _SURROGATE_FORMS


def _numeric_share(surrogate, slope, b_th):
    # integrate the closed form (conversion's copy, checked against the kernels elsewhere)
    u = torch.linspace(-4000.0 / slope, 4000.0 / slope, 4_000_001, dtype=torch.float64)
    g = _SURROGATE_FORMS[surrogate](u, slope)
    total = torch.trapezoid(g, u)
    inside = torch.trapezoid(torch.where(u.abs() < b_th, g, torch.zeros_like(g)), u)
    return float(inside / total)


@pytest.mark.parametrize("surrogate,slope", [("fast_sigmoid", 100.0), ("fast_sigmoid", 25.0),
                                             ("atan", 2.0), ("sigmoid", 4.0), ("triangle", 1.0)])
def test_mass_share_and_auto_b_th(surrogate, slope):
    b = F_sg.auto_b_th(surrogate, slope)
    assert F_sg.surrogate_mass_kept(surrogate, slope, b) == pytest.approx(0.95, abs=1e-12)
    for width in (0.5 * b, b, 2 * b):
        # fast_sigmoid's tail is 1/u^2: the grid's ends cut ~1/4000 of its mass
        assert F_sg.surrogate_mass_kept(surrogate, slope, width) == pytest.approx(
            _numeric_share(surrogate, slope, width), abs=2e-3)
    assert F_sg.surrogate_mass_kept(surrogate, slope, math.inf) == 1.0
    with pytest.raises(ValueError, match="share"):
        F_sg.auto_b_th(surrogate, slope, share=1.0)


def test_documented_values():
    assert F_sg.auto_b_th("fast_sigmoid", 100.0) == pytest.approx(0.19)
    assert F_sg.auto_b_th("atan", 2.0) == pytest.approx(4.0445, abs=1e-4)
    # the old default keeps a third of snnTorch's default surrogate
    assert F_sg.surrogate_mass_kept("atan", 2.0, 0.2) == pytest.approx(0.357, abs=1e-3)


def test_convert_default_is_auto_and_a_narrow_band_warns():
    snn = pytest.importorskip("snntorch")
    net = nn.Sequential(nn.Linear(4, 3), snn.Leaky(beta=0.5, init_hidden=True),  # atan(2)
                        nn.Linear(3, 2),
                        snn.Leaky(beta=0.5, init_hidden=True,
                                  spike_grad=snn.surrogate.fast_sigmoid(slope=100)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = sparsegrad.convert(net)
    assert conv[0].b_th == pytest.approx(F_sg.auto_b_th("atan", 2.0))
    assert conv[2].b_th == pytest.approx(0.19)
    with pytest.warns(UserWarning, match=r"keeps 35\.7% of the atan\(slope=2\)"):
        conv = sparsegrad.convert(net, b_th=0.2)
    assert conv[0].b_th == 0.2 and conv[2].b_th == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dense mode: b_th does not matter, no warning
        sparsegrad.convert(net, b_th=0.2, backward="dense")
    with pytest.raises(ValueError, match="b_th"):
        sparsegrad.convert(net, b_th="wide")
