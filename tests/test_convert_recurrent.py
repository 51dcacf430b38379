"""sparsegrad.convert on snnTorch's recurrent neuron: nn.Linear -> snn.RLeaky(all_to_all=True,
linear_features=N) becomes one sparsegrad.nn.RLIF, exactly (spikes equal, dense-mode gradients
equal to round-off); what cannot be matched is refused and reported."""
import warnings

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad.conversion import SequenceModel
from sparsegrad.conversion_recurrent import exact_surrogate
from sparsegrad.nn import RLIF

from conftest import assert_spikes_match, layer_membrane

snn = pytest.importorskip("snntorch")
snn_utils = pytest.importorskip("snntorch.utils")
surrogate = snn.surrogate

T, B, N_IN, N_H, N_OUT = 30, 5, 12, 16, 4


def _net(dtype, **rleaky):
    class Net(nn.Module):
        """Linear -> RLeaky -> Linear, stepped as in snnTorch's tutorials."""

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(N_IN, N_H)
            self.lif1 = snn.RLeaky(beta=0.85, linear_features=N_H, **rleaky)
            self.fc2 = nn.Linear(N_H, N_OUT)

        def forward(self, x):
            spk, mem = self.lif1.init_rleaky()
            out, spikes = [], []
            for t in range(x.shape[0]):
                # snnTorch emits float32 spikes; cast so a float64 model runs (0/1 is exact)
                spk, mem = self.lif1(self.fc1(x[t]), spk.to(x.dtype), mem)
                spk = spk.to(x.dtype)
                spikes.append(spk)
                out.append(self.fc2(spk))
            return torch.stack(out), torch.stack(spikes)

    torch.manual_seed(0)
    net = Net().to(dtype)
    with torch.no_grad():
        net.fc1.weight.mul_(3.0)
        net.lif1.recurrent.weight.mul_(2.0)
    return net


def _rleaky_membrane(net, x, spikes, reset="subtract"):
    lif = net.lif1
    return layer_membrane(x, net.fc1.weight, net.fc1.bias + lif.recurrent.bias, spikes,
                          float(lif.beta), float(lif.threshold), reset,
                          rec_weight=lif.recurrent.weight)


def _x(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, N_IN, generator=g) < 0.3).to(dtype)


def _grads(module_params):
    return [p.grad.clone() for p in module_params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spike_grad,want", [(None, ("atan", 2.0)),
                                             (surrogate.fast_sigmoid(slope=25), ("fast_sigmoid", 25.0)),
                                             (surrogate.sigmoid(slope=5), ("sigmoid", 5.0))])
def test_rleaky_converts_exactly(dtype, spike_grad, want):
    net = _net(dtype, spike_grad=spike_grad)
    x = _x(dtype)
    out, spikes = net(x)
    assert 0.05 < spikes.mean() < 0.6
    (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
    orig = [net.fc1.weight.grad, net.lif1.recurrent.weight.grad, net.fc1.bias.grad,
            net.lif1.recurrent.bias.grad, net.fc2.weight.grad]

    # the forward runs its own time loop: not followed, layers converted (warned, not "exact")
    with pytest.warns(UserWarning, match="not followed"):
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.forward_followed is False and not report.skipped
    assert len(report.converted) == 1
    layer = conv.fc1
    assert isinstance(layer, RLIF) and isinstance(conv.lif1, nn.Identity)
    assert (layer.surrogate, layer.slope) == want and layer.alpha == pytest.approx(0.85)
    seq = SequenceModel(conv)
    got = seq(x)
    hidden = layer(x)
    # spikes equal off the threshold's rounding (RLIF's events vs snnTorch's per-step GEMMs)
    assert_spikes_match(hidden, spikes, _rleaky_membrane(net, x, spikes))
    torch.testing.assert_close(got, out, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    (got * torch.linspace(-1, 1, got.numel(), dtype=dtype).view(got.shape)).sum().backward()
    # snnTorch's spike functions return float32 even in a float64 model, so its gradients pass
    # through float32 at every spike: equal to float32 round-off is the best either side can do.
    rtol = 1e-5 if dtype == torch.float64 else 1e-4
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "rec_weight", "rec_bias"}
    for g, w in zip([layer.weight.grad, layer.rec_weight.grad, layer.bias.grad, layer.rec_bias.grad,
                     conv.fc2.module.weight.grad], orig):  # fc2: TimeDistributed(Linear)
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))


def test_rleaky_none_reset_and_frozen_recurrence():
    net = _net(torch.float64, reset_mechanism="none", learn_recurrent=False)
    with pytest.warns(UserWarning, match="not followed"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert report.forward_followed is False and not report.skipped
    assert conv.fc1.reset == "none" and not conv.fc1.rec_weight.requires_grad
    x = _x(torch.float64, seed=1)
    _, spikes = net(x)
    assert_spikes_match(conv.fc1(x), spikes, _rleaky_membrane(net, x, spikes, "none"))


@pytest.mark.parametrize("kwargs,reason", [
    (dict(reset_mechanism="zero"), "zeroes the whole new membrane"),
    (dict(reset_delay=False), "reset_delay=False"),
    (dict(spike_grad=surrogate.straight_through_estimator()), "none of sparsegrad's"),
])
def test_rleaky_refusals_are_reported(kwargs, reason):
    net = _net(torch.float64, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.exact and any(reason in why for _, why in report.skipped), report.skipped
    # left in place: the Linear folded over time, the RLeaky stepped over time as it is
    assert isinstance(conv.fc1, sparsegrad.nn.TimeDistributed)
    assert isinstance(conv.fc1.module, nn.Linear) and type(conv.lif1.module).__name__ == "RLeaky"
    assert any(issubclass(w.category, UserWarning) for w in caught)


@pytest.mark.parametrize("per_neuron", [False, True])
def test_rleaky_learnable_beta_and_threshold_convert_to_rlif_parameters(per_neuron):
    net = _net(torch.float64, learn_beta=True, learn_threshold=True)
    if per_neuron:
        with torch.no_grad():
            net.lif1.beta = nn.Parameter(torch.linspace(0.7, 0.95, N_H, dtype=torch.float64))
            net.lif1.threshold = nn.Parameter(torch.linspace(0.8, 1.2, N_H, dtype=torch.float64))
    x = _x(torch.float64, seed=2)
    out, spikes = net(x)
    assert 0.05 < spikes.mean() < 0.6
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    (out * weights).sum().backward()
    want = {"alpha": net.lif1.beta.grad, "threshold": net.lif1.threshold.grad,
            "weight": net.fc1.weight.grad, "rec_weight": net.lif1.recurrent.weight.grad}
    with pytest.warns(UserWarning, match="not followed"):
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert not report.skipped
    layer = conv.fc1
    assert isinstance(layer, RLIF)
    assert isinstance(layer.alpha, nn.Parameter) and isinstance(layer.threshold, nn.Parameter)
    assert torch.equal(layer.alpha.detach(), net.lif1.beta.detach().reshape(layer.alpha.shape))
    got = SequenceModel(conv)(x)
    hidden = layer(x)
    lif = net.lif1
    membrane = layer_membrane(x, net.fc1.weight, net.fc1.bias + lif.recurrent.bias, spikes,
                              lif.beta.detach(), lif.threshold.detach(), "subtract",
                              rec_weight=lif.recurrent.weight)
    assert_spikes_match(hidden, spikes, membrane)
    torch.testing.assert_close(got, out, rtol=0, atol=1e-12)
    (got * weights).sum().backward()
    grads = {"alpha": layer.alpha.grad, "threshold": layer.threshold.grad,
             "weight": layer.weight.grad, "rec_weight": layer.rec_weight.grad}
    for name, w in want.items():  # snnTorch's spike functions pass its gradients through float32
        torch.testing.assert_close(grads[name].reshape(w.shape), w, rtol=1e-5,
                                   atol=1e-5 * float(w.abs().max()), msg=name)


def test_rleaky_one_to_one_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(N_IN, N_H)
            self.lif1 = snn.RLeaky(beta=0.9, all_to_all=False, V=0.5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = sparsegrad.convert(Net(), return_report=True)
    assert report.skipped and "all_to_all" in report.skipped[0][1]


def test_exact_surrogate_names_each_form():
    assert exact_surrogate(surrogate.atan(alpha=3.0))[:2] == ("atan", 3.0)
    assert exact_surrogate(surrogate.fast_sigmoid(slope=100))[:2] == ("fast_sigmoid", 100.0)
    name, _, why = exact_surrogate(lambda u: torch.sigmoid(u))
    assert name is None and "step" in why


def _rsynaptic_net(dtype, **kw):
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Linear(N_IN, N_H),
        snn.RSynaptic(**{"alpha": 0.7, "beta": 0.85, "linear_features": N_H, "init_hidden": True,
                         **kw}),
        nn.Linear(N_H, N_OUT)).to(dtype)
    with torch.no_grad():
        net[0].weight.mul_(1.5)
        net[1].recurrent.weight.mul_(1.5)
    return net


def _stepped(net, x):
    """snnTorch's way: reset, one call per step; the hidden spikes and membranes recorded."""
    snn_utils.reset(net)
    out, spikes, mems = [], [], []
    for t in range(x.shape[0]):
        h = net[1](net[0](x[t]))
        spikes.append(h.to(x.dtype))
        mems.append(net[1].mem.detach().clone())
        out.append(net[2](h.to(x.dtype)))
    return torch.stack(out), torch.stack(spikes), torch.stack(mems)


@pytest.mark.parametrize("learn", [False, True])
def test_rsynaptic_converts_to_rlif_with_a_synaptic_current(learn):
    """nn.Linear -> snn.RSynaptic (all_to_all) is one RLIF with alpha_syn: the original's spikes
    (checked to lie off the threshold's rounding), dense-mode gradients of every parameter
    within 1e-4 (float32: snnTorch's RSynaptic feeds its float32 spikes to its recurrent Linear,
    so it does not run in float64)."""
    kw = dict(learn_alpha=True, learn_beta=True, learn_threshold=True) if learn else {}
    net = _rsynaptic_net(torch.float32, **kw)
    if learn:  # per-neuron values
        with torch.no_grad():
            net[1].alpha = nn.Parameter(torch.linspace(0.5, 0.8, N_H, dtype=torch.float32))
            net[1].beta = nn.Parameter(torch.linspace(0.75, 0.9, N_H, dtype=torch.float32))
    x = _x(torch.float32, seed=5)
    out, spikes, mems = _stepped(net, x)
    spikes = spikes.detach()
    assert 0.05 < float(spikes.mean()) < 0.6
    assert float((mems - 1.0).abs().min()) > 1e-5  # no spike decided by rounding
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float32).view(out.shape)
    (out * weights).sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and not report.skipped and len(report.converted) == 1
    layer = conv[0]
    assert isinstance(layer, RLIF) and isinstance(conv[1], nn.Identity)
    assert report.converted[0].kind == "snntorch.RSynaptic"
    hidden = layer(x)
    assert torch.equal(hidden, spikes)
    got = conv(x)
    torch.testing.assert_close(got, out, rtol=0, atol=1e-5)
    (got * weights).sum().backward()
    names = {"0.weight": layer.weight, "0.bias": layer.bias, "1.recurrent.weight": layer.rec_weight,
             "1.recurrent.bias": layer.rec_bias, "2.weight": conv[2].module.weight}
    if learn:
        names.update({"1.alpha": layer.alpha_syn, "1.beta": layer.alpha, "1.threshold": layer.threshold})
    for name, p in names.items():
        w = want[name]
        torch.testing.assert_close(p.grad.reshape(w.shape), w, rtol=1e-4,
                                   atol=1e-4 * float(w.abs().max()), msg=name)


def test_rsynaptic_zero_reset_is_refused_with_the_reason():
    net = _rsynaptic_net(torch.float32, reset_mechanism="zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.exact and any("synaptic current" in why for _, why in report.skipped)
    x = _x(torch.float32, seed=6)
    out, _, _ = _stepped(net, x)
    torch.testing.assert_close(conv(x), out, rtol=0, atol=1e-5)  # stepped: still the original's
