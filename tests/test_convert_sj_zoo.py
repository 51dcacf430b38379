"""sparsegrad.convert on SpikingJelly's model zoo (built small), in single- and multi-step mode.

Single-step models are traced (their forward is per step, conversion_fx.py); multi-step models
keep their forward (it takes [T, B, ...]) and get their neurons replaced where they are. Outputs
and dense-mode gradients are compared with tolerances (a folded layer may round differently in
the last bits), spikes of the first neuron layer exactly.
"""
import warnings

import pytest
import torch

import sparsegrad
from sparsegrad.conversion import SpikingJellyNeuron
from sparsegrad.conversion_fx import SequenceForward

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: E402
from spikingjelly.activation_based.model import parametric_lif_net, sew_resnet, spiking_resnet  # noqa: E402


def _zoo(name):
    kw = dict(surrogate_function=surrogate.ATan(), detach_reset=True)
    if name == "DVSGestureNet":
        return parametric_lif_net.DVSGestureNet(channels=4, spiking_neuron=neuron.LIFNode, **kw)
    if name == "CIFAR10DVSNet":
        return parametric_lif_net.CIFAR10DVSNet(channels=4, spiking_neuron=neuron.LIFNode, **kw)
    if name == "spiking_resnet18":
        return spiking_resnet.spiking_resnet18(spiking_neuron=neuron.IFNode, num_classes=10, **kw)
    return sew_resnet.sew_resnet18(spiking_neuron=neuron.IFNode, cnf="ADD", num_classes=10, **kw)


def _activate(net, name):
    """Scale weights so that every neuron layer spikes (default init is almost silent here)."""
    dvs = "Net" in name
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and (dvs or
                                                                    isinstance(m, torch.nn.Conv2d)):
                m.weight.mul_(6.0 if dvs else 3.0)
            if dvs and isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(4.0)
    return net


def _spike_rates(net, run):
    rates = []
    hooks = [m.register_forward_hook(lambda m, i, o: rates.append(float(o.detach().mean())))
             for m in net.modules() if isinstance(m, (neuron.LIFNode, neuron.IFNode))]
    run()
    for h in hooks:
        h.remove()
    return rates


def _input(name, T=2, B=2):
    g = torch.Generator().manual_seed(0)
    shape = (T, B, 2, 128, 128) if "Net" in name else (T, B, 3, 32, 32)
    return torch.rand(shape, generator=g) * 2


def _run_original(net, x, mode):
    functional.reset_net(net)
    out = net(x) if mode == "m" else torch.stack([net(x[t]) for t in range(x.shape[0])])
    functional.reset_net(net)
    return out


@pytest.mark.parametrize("mode", ["s", "m"])
@pytest.mark.parametrize("name", ["DVSGestureNet", "CIFAR10DVSNet", "spiking_resnet18",
                                  "sew_resnet18"])
def test_zoo_models_convert_exactly(name, mode):
    torch.manual_seed(0)
    net = _activate(_zoo(name), name)
    functional.set_step_mode(net, mode)
    net.eval()  # the zoo's dropout would draw other masks; BatchNorm uses its running stats
    x = _input(name)
    assert min(_spike_rates(net, lambda: _run_original(net, x, mode))) > 0.01
    ref = _run_original(net, x, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every neuron converts: nothing to warn about
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    n_neurons = sum(isinstance(m, (neuron.LIFNode, neuron.IFNode)) for m in net.modules())
    assert report.exact and len(report.converted) == n_neurons > 0
    assert sum(isinstance(m, SpikingJellyNeuron) for m in conv.modules()) == n_neurons
    assert isinstance(conv, SequenceForward) == (mode == "s")
    got = conv(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (got * g).sum().backward()
    grads = dict(net.named_parameters())
    for pname, p in conv.named_parameters():
        r = grads[pname.replace("module.", "")].grad
        if r is None or float(r.abs().max()) == 0:
            assert p.grad is None or float(p.grad.abs().max()) == 0, pname
            continue
        assert float((p.grad - r).abs().max()) <= 1e-4 * float(r.abs().max()), pname


def test_single_step_first_layer_spikes_equal():
    torch.manual_seed(1)
    net = _activate(_zoo("DVSGestureNet"), "DVSGestureNet")
    net.eval()
    x = _input("DVSGestureNet", T=3)
    first = net.conv_fc[:3]  # conv, BN, LIF
    ref = _run_original(first, x, "s")
    assert 0.01 < ref.mean() < 0.9
    conv = sparsegrad.convert(net, backward="dense")
    got = conv.conv_fc[2](torch.stack([conv.conv_fc[1](conv.conv_fc[0](x[t]))
                                       for t in range(3)]))
    assert torch.equal(got, ref)


def test_model_that_already_ran_converts():
    """Its neurons hold state tensors with autograd history (deepcopy would refuse them)."""
    net = _zoo("CIFAR10DVSNet")
    functional.set_step_mode(net, "m")
    x = _input("CIFAR10DVSNet")
    net(x).sum().backward()  # no reset_net afterwards: v holds a graph
    conv = sparsegrad.convert(net, example_input=x)
    assert conv is not net


def test_parametric_lif_is_kept_and_reported():
    net = parametric_lif_net.DVSGestureNet(channels=4, spiking_neuron=neuron.ParametricLIFNode,
                                           surrogate_function=surrogate.ATan(), detach_reset=True)
    net.eval()
    x = _input("DVSGestureNet")
    for mode in ("s", "m"):
        functional.set_step_mode(net, mode)
        ref = _run_original(net, x, mode)
        with pytest.warns(UserWarning, match="left unchanged"):
            conv, report = sparsegrad.convert(net, return_report=True)
        assert any("sigmoid(w) is learnable" in why for _, why in report.skipped)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_mixed_step_modes_are_refused():
    net = _zoo("DVSGestureNet")
    functional.set_step_mode(net, "m")
    net.conv_fc[2].step_mode = "s"
    with pytest.raises(sparsegrad.conversion.ConversionError, match="single-step and multi-step"):
        sparsegrad.convert(net)


def test_kept_stateful_container_is_listed():
    from spikingjelly.activation_based import layer
    net = torch.nn.Sequential(
        layer.Linear(8, 8),
        layer.LinearRecurrentContainer(neuron.IFNode(), in_features=8, out_features=8))
    functional.set_step_mode(net, "m")
    x = torch.rand(3, 2, 8)
    ref = _run_original(net, x, "m")
    with pytest.warns(UserWarning, match="LinearRecurrentContainer"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert any(name == "1" and "kept as it is" in why for name, why in report.skipped)
    with torch.no_grad():
        functional.reset_net(conv)
        torch.testing.assert_close(conv(x), ref.detach())
