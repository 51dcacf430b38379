import math

import pytest
import torch

import sparsegrad
from sparsegrad import reference
from sparsegrad.losses import (SCHEDULES, ActivityRegularizer, SpikeCountLoss,
                               alternating_included, spikes_per_sample)
from sparsegrad.nn import LIF

from conftest import assert_spikes_match, layer_membrane


def test_alternating_inclusion_pattern():
    # S(n) = n(n+1)/2 / 9: 0, .11, .33, .67, 1.11, 1.67, 2.33, 3.11, 4, 5 -> crosses at 4, 6, 7, 8, 9
    assert [n for n in range(10) if alternating_included(n, 10)] == [4, 6, 7, 8, 9]
    for N in (2, 5, 17, 40):
        on = [alternating_included(n, N) for n in range(N)]
        assert not on[0] and on[-1]
        # the included share rises: second half includes more epochs than the first
        assert sum(on[N // 2:]) >= sum(on[:N // 2])
        # over the run, about half the epochs are included (sum of k/(N-1) = N/2)
        assert abs(sum(on) - N / 2) <= 1
    assert alternating_included(0, 1)
    with pytest.raises(ValueError, match="epoch"):
        alternating_included(-1, 10)


@pytest.mark.parametrize("schedule,epoch,expected", [
    ("constant", 0, 0.5), ("constant", 7.5, 0.5),
    ("linear", 0, 0.0), ("linear", 5, 0.25), ("linear", 2.5, 0.125),
    ("quadratic", 0, 0.0), ("quadratic", 3, 0.5 * 9 / 10), ("quadratic", 9, 0.5 * 81 / 10),
    ("alternating", 0, 0.0), ("alternating", 3, 0.0), ("alternating", 4, 0.5),
    ("alternating", 4.9, 0.5), ("alternating", 5, 0.0), ("alternating", 9, 0.5),
    ("alternating_linear", 5, 0.0), ("alternating_linear", 6, 0.5 * 6 / 10),
    ("alternating_linear", 9, 0.5 * 9 / 10),
])
def test_schedule_weights(schedule, epoch, expected):
    loss = SpikeCountLoss(0.5, schedule, total_epochs=10)
    assert loss.weight(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_value_is_weight_times_spikes_per_sample():
    g = torch.Generator().manual_seed(0)
    s1 = (torch.rand(20, 4, 7, generator=g) < 0.3).double()
    s2 = (torch.rand(20, 4, 5, generator=g) < 0.3).double()
    per_sample = (s1.sum() + s2.sum()) / 4
    for schedule in SCHEDULES:
        fn = SpikeCountLoss(0.1, schedule, total_epochs=10)
        torch.testing.assert_close(fn([s1, s2], 6.0), per_sample * fn.weight(6.0))
    # counts instead of spike tensors: 1-d per-sample counts and a 0-d per-sample count
    counts = s1.sum(dim=(0, 2))
    torch.testing.assert_close(spikes_per_sample(counts), s1.sum() / 4)
    torch.testing.assert_close(spikes_per_sample([counts, s2.sum() / 4]), per_sample)
    # batch-first layout
    torch.testing.assert_close(spikes_per_sample(s1.transpose(0, 1), batch_dim=0), s1.sum() / 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        SpikeCountLoss(0.1, "cubic", total_epochs=3)
    with pytest.raises(ValueError, match="total_epochs"):
        SpikeCountLoss(0.1, "linear")
    with pytest.raises(ValueError, match="sigma0"):
        SpikeCountLoss(-1.0)
    with pytest.raises(ValueError, match="epoch"):
        SpikeCountLoss(0.1).weight(-0.5)
    with pytest.raises(TypeError, match="spikes"):
        SpikeCountLoss(0.1)("not a tensor", 0)
    with pytest.raises(ValueError, match="spikes"):
        SpikeCountLoss(0.1)([], 0)


def _problem(seed=0, T=30, B=6, n_in=12, n_out=9):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, n_in, generator=g) < 0.3).double()
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.1
    return x, w, b


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("schedule", ["constant", "alternating_linear"])
def test_gradient_matches_reference(backward, schedule):
    x, w, b = _problem()
    fn = SpikeCountLoss(0.3, schedule, total_epochs=10)
    layer = LIF(12, 9, alpha=0.85, b_th=0.3, backward=backward, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    w_ref = w.clone().requires_grad_()
    b_ref = b.clone().requires_grad_()
    s = layer(x)
    s_ref = reference.lif_layer(x, w_ref, b_ref, alpha=0.85, b_th=0.3, backward=backward)
    assert_spikes_match(s, s_ref, layer_membrane(x, w, b, s_ref, 0.85))  # events vs GEMM
    assert s.sum() > 0
    # a loss that also reads the spikes elsewhere, as training does
    extra = torch.linspace(-1, 1, 9, dtype=torch.float64)
    (fn([s], 9) + (s * extra).sum()).backward()
    (fn([s_ref], 9) + (s_ref * extra).sum()).backward()
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-10, atol=1e-12)
    assert layer.weight.grad.abs().sum() > 0


def test_sparse_gradient_reaches_only_active_entries():
    x, w, b = _problem(seed=1)
    fn = SpikeCountLoss(1.0)
    # spike-count gradient alone, sparse: equals the reference with the masked surrogate
    layer = LIF(12, 9, alpha=0.85, b_th=0.05, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    fn(layer(x)).backward()
    g_sparse = layer.weight.grad.clone()
    layer.zero_grad()
    layer.backward = "dense"
    fn(layer(x)).backward()
    g_dense = layer.weight.grad.clone()
    assert not torch.allclose(g_sparse, g_dense)
    # with a band so thin that nothing is active, the spike-count loss gives exactly zero
    layer.backward = "sparse"
    layer.b_th = 1e-12
    layer.zero_grad()
    s = layer(x)
    assert int(layer.last_stats.active_count) == 0
    fn(s).backward()
    assert torch.count_nonzero(layer.weight.grad) == 0


def test_activity_regularizer_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(40, 5, 8, generator=g) < 0.05).double()
    s[:, :, 0] = 0  # a silent neuron for the lower term
    reg = ActivityRegularizer(lambda_upper=0.5, f_upper=0.2, p_upper=2, lambda_lower=3.0,
                              f_lower=0.5)
    counts = s.sum(0)  # [B, N]
    upper = torch.clamp(counts.mean(1) - 0.2, min=0) ** 2
    lower = (torch.clamp(0.5 - counts, min=0) ** 2).sum(1) / 8
    expected = (0.5 * upper + 3.0 * lower).mean()
    assert expected > 0
    torch.testing.assert_close(reg(s), expected)
    torch.testing.assert_close(reg([s, s]), 2 * expected)
    # through a layer it matches the reference's gradient
    x, w, b = _problem(seed=4)
    layer = LIF(12, 9, alpha=0.85, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    w_ref = w.clone().requires_grad_()
    ActivityRegularizer(f_upper=0.1)(layer(x)).backward()
    ActivityRegularizer(f_upper=0.1)(
        reference.lif_layer(x, w_ref, b, alpha=0.85, b_th=0.2)).backward()
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="lambda_upper"):
        ActivityRegularizer(lambda_upper=-1)


def test_lazy_attribute():
    assert sparsegrad.losses.SpikeCountLoss is SpikeCountLoss
    assert math.isclose(sparsegrad.losses.SpikeCountLoss(2.0, "linear", 4).weight(1), 0.5)
