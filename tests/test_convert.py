"""sparsegrad.convert: snnTorch / SpikingJelly models -> fused LIF layers, exactly."""
import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad.conversion import ConversionReport, OffsetLIF, SequenceModel, surrogate_slope
from sparsegrad.nn import LIF

T, B, N_IN, N_H1, N_H2, N_OUT = 40, 6, 20, 32, 24, 5


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, N_IN, generator=g) < 0.3).to(dtype)


def _scale_up(model, factor=2.5):
    # nn.Linear's default init gives almost no spikes with 0/1 inputs; make the layers fire.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


class _Cast(nn.Module):
    """snnTorch emits float32 spikes whatever the dtype; a float64 Sequential needs this cast."""

    def forward(self, x):
        return x.to(torch.float64)


# ----------------------------------------------------------------------------------- snnTorch

def _snntorch():
    return pytest.importorskip("snntorch")


def _tutorial_net(sg, beta1=0.9, beta2=0.8, thr2=0.7):
    """Linear -> Leaky -> Linear -> Leaky -> Linear readout, written as in snnTorch's tutorials."""
    snn = _snntorch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(N_IN, N_H1)
            self.lif1 = snn.Leaky(beta=beta1, spike_grad=sg)
            self.fc2 = nn.Linear(N_H1, N_H2)
            self.lif2 = snn.Leaky(beta=beta2, threshold=thr2, spike_grad=sg)
            self.fc3 = nn.Linear(N_H2, N_OUT)

        def forward(self, x):
            mem1, mem2 = self.lif1.reset_mem(), self.lif2.reset_mem()
            out, spk1_rec, spk2_rec = [], [], []
            for t in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
                spk1 = spk1.to(x.dtype)  # snnTorch's spikes are float32
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                spk2 = spk2.to(x.dtype)
                out.append(self.fc3(spk2))
                spk1_rec.append(spk1)
                spk2_rec.append(spk2)
            return torch.stack(out), torch.stack(spk1_rec), torch.stack(spk2_rec)

    torch.manual_seed(0)
    return _scale_up(Net().double())


def test_snntorch_tutorial_net_same_spikes_and_dense_gradients():
    surrogate = _snntorch().surrogate
    net = _tutorial_net(surrogate.fast_sigmoid(slope=25))
    x = _inputs()
    out, spk1, spk2 = net(x)
    assert 0.02 < spk1.mean() < 0.5 and 0.02 < spk2.mean() < 0.5  # the test exercises spiking

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact conversion warns about nothing
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and len(report.converted) == 2 and not report.skipped
    assert isinstance(conv.fc1, LIF) and isinstance(conv.fc2, LIF)
    assert isinstance(conv.lif1, nn.Identity) and type(conv.fc3) is nn.Linear
    assert conv.fc1.slope == 25.0 and conv.fc2.threshold == float(net.lif2.threshold)
    assert conv.fc1.alpha == float(net.lif1.beta)

    # Spikes: exactly the same, layer by layer.
    c1 = conv.fc1(x)
    c2 = conv.fc2(c1)
    assert torch.equal(c1, spk1)
    assert torch.equal(c2, spk2)
    out2 = SequenceModel(conv)(x)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)

    # Dense-mode gradients equal snnTorch's (to the float32 rounding snnTorch applies to the
    # gradient arriving at its float32 spikes).
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out2 * g).sum().backward()
    grads = dict(net.named_parameters())
    for name, p in conv.named_parameters():
        ref = grads[name].grad
        assert ref.abs().max() > 0
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))

    # The original model is untouched (convert works on a copy by default).
    assert type(net.fc1) is nn.Linear and type(net.lif1).__name__ == "Leaky"


def test_snntorch_sparse_mode_with_infinite_band_equals_dense():
    surrogate = _snntorch().surrogate
    net = _tutorial_net(surrogate.fast_sigmoid(slope=25))
    x = _inputs(1)
    dense = SequenceModel(sparsegrad.convert(net, backward="dense"))
    sparse = SequenceModel(sparsegrad.convert(net, backward="sparse", b_th=math.inf))
    g = torch.randn(T, B, N_OUT, dtype=torch.float64)
    (dense(x) * g).sum().backward()
    (sparse(x) * g).sum().backward()
    for (n, p), (_, q) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_snntorch_sequential_init_hidden():
    snn = _snntorch()
    sg = snn.surrogate.fast_sigmoid(slope=40)
    torch.manual_seed(1)
    net = _scale_up(nn.Sequential(
        nn.Linear(N_IN, N_H1), snn.Leaky(beta=0.85, spike_grad=sg, init_hidden=True), _Cast(),
        nn.Linear(N_H1, N_H2), snn.Leaky(beta=0.95, spike_grad=sg, init_hidden=True), _Cast(),
        nn.Linear(N_H2, N_OUT)).double())
    x = _inputs(2)
    pytest.importorskip("snntorch.utils").reset(net)
    hidden, out = [], []
    for t in range(T):
        h = net[2](net[1](net[0](x[t])))
        hidden.append(h)
        out.append(net[6](net[5](net[4](net[3](h)))))
    hidden, out = torch.stack(hidden), torch.stack(out)
    assert hidden.sum() > 0

    conv, report = sparsegrad.convert(net, return_report=True)
    assert report.exact and [p.linear for p in report.converted] == ["0", "3"]
    assert torch.equal(conv[0](x), hidden)
    torch.testing.assert_close(SequenceModel(conv)(x), out, rtol=1e-12, atol=1e-12)
    # Layer names are kept, so the converted model loads the original's weights.
    missing, unexpected = conv.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.split(".")[0] in ("1", "4") for k in unexpected)


@pytest.mark.parametrize("option,reason_word", [
    (dict(reset_mechanism="zero"), "reset_mechanism"),
    (dict(reset_mechanism="none"), "reset_mechanism"),
    (dict(learn_beta=True), "learnable"),
    (dict(learn_threshold=True), "learnable"),
    (dict(graded_spikes_factor=2.0), "graded_spikes_factor"),
    (dict(reset_delay=False), "reset_delay"),
    (dict(beta=torch.full((N_H1,), 0.9)), "per neuron"),
    (dict(surrogate_disable=True), "surrogate_disable"),
])
def test_snntorch_unsupported_options_are_left_and_reported(option, reason_word):
    snn = _snntorch()
    kwargs = dict(beta=0.9, init_hidden=True)
    kwargs.update(option)
    torch.manual_seed(2)
    net = _scale_up(nn.Sequential(nn.Linear(N_IN, N_H1), snn.Leaky(**kwargs), _Cast(),
                                  nn.Linear(N_H1, N_OUT)).double())
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.converted and len(report.skipped) == 1
    name, reason = report.skipped[0]
    assert name == "1" and reason_word in reason
    assert type(conv[0]) is nn.Linear and type(conv[1]) is type(net[1])
    # The partially converted model still runs on sequences, stepping the neuron in time.
    x = _inputs(3)
    pytest.importorskip("snntorch.utils").reset(net)
    ref = torch.stack([net(x[t]) for t in range(T)])
    torch.testing.assert_close(SequenceModel(conv)(x), ref, rtol=1e-12, atol=1e-12)


def test_snntorch_neuron_without_linear_in_front_is_reported():
    snn = _snntorch()
    net = nn.Sequential(nn.Linear(N_IN, N_H1), nn.ReLU(), snn.Leaky(beta=0.9, init_hidden=True))
    with pytest.warns(UserWarning, match="not directly preceded"):
        _, report = sparsegrad.convert(net, return_report=True)
    assert report.skipped == [("2", "not directly preceded by an nn.Linear sibling")]


def test_other_surrogates_are_mapped_and_announced():
    snn = _snntorch()
    net = _tutorial_net(snn.surrogate.atan(alpha=2.0))  # snnTorch's default surrogate
    x = _inputs(4)
    _, spk1, spk2 = net(x)
    with pytest.warns(UserWarning, match="not a fast sigmoid"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert len(report.converted) == 2 and not report.exact
    # atan'(u) = (a/2)/(1 + (pi a u/2)^2) has half width 2/(pi a); the mapped slope keeps it.
    expected = (math.sqrt(2) - 1) * math.pi * 2.0 / 2
    assert conv.fc1.slope == pytest.approx(expected, rel=0.01)
    assert "slope" in report.converted[0].notes[0]
    # The forward is still exact: only the gradient's shape changed.
    assert torch.equal(conv.fc2(conv.fc1(x)), spk2)


def test_surrogate_slope_recognises_fast_sigmoid_and_rejects_non_step_forward():
    surrogate = _snntorch().surrogate
    for k in (0.5, 25, 100, 1000):
        assert surrogate_slope(surrogate.fast_sigmoid(slope=k)) == (float(k), None)
    slope, note = surrogate_slope(lambda u: torch.sigmoid(u))  # not a step function
    assert slope is None and "step" in note
    slope, note = surrogate_slope(surrogate.SSO())
    assert slope == 100.0 and "random" in note


def test_convert_arguments_and_copy_semantics():
    snn = _snntorch()
    net = nn.Sequential(nn.Linear(4, 3), snn.Leaky(beta=0.5, init_hidden=True,
                                                   spike_grad=snn.surrogate.fast_sigmoid()))
    with pytest.raises(TypeError, match="model"):
        sparsegrad.convert("not a model")
    with pytest.raises(ValueError, match="backward"):
        sparsegrad.convert(net, backward="fast")
    with pytest.raises(ValueError, match="b_th"):
        sparsegrad.convert(net, b_th=-1.0)
    net(torch.rand(2, 4))  # leaves non-leaf state tensors behind, which plain deepcopy rejects
    conv = sparsegrad.convert(net, b_th=0.3)
    assert isinstance(conv[0], LIF) and conv[0].b_th == 0.3 and type(net[0]) is nn.Linear
    assert conv[0].weight is not net[0].weight and torch.equal(conv[0].weight, net[0].weight)
    same = sparsegrad.convert(net, inplace=True)
    assert same is net and isinstance(net[0], LIF)
    # A converted model pickles (no per-call state survives).
    again = pickle.loads(pickle.dumps(conv))
    assert torch.equal(again[0].weight, conv[0].weight)


def test_report_is_readable():
    report = ConversionReport()
    assert report.exact and "0 layer(s) converted" in str(report)


# ----------------------------------------------------------------------------------- SpikingJelly

def _sj():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, neuron
    return neuron, functional


class _FastSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, slope):
        ctx.save_for_backward(u)
        ctx.slope = slope
        return (u >= 0).to(u.dtype)  # SpikingJelly's convention: fire at u >= 0

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad / (ctx.slope * u.abs() + 1.0) ** 2, None


def _fast_sigmoid(u):
    return _FastSigmoid.apply(u, 20.0)


def _sj_net(kind, step_mode, surrogate=None, **extra):
    neuron, _ = _sj()
    kw = dict(v_reset=None, step_mode=step_mode, detach_reset=True, **extra)
    if surrogate is not None:
        kw["surrogate_function"] = surrogate
    if kind == "lif":
        def make(tau):
            return neuron.LIFNode(tau=tau, decay_input=False, v_threshold=0.8, **kw)
    else:
        def make(tau):
            return neuron.IFNode(**kw)
    torch.manual_seed(3)
    return _scale_up(nn.Sequential(nn.Linear(N_IN, N_H1), make(3.0), nn.Linear(N_H1, N_H2),
                                   make(5.0), nn.Linear(N_H2, N_OUT)).double(), 2.0)


def _sj_run(net, x, step_mode):
    _, functional = _sj()
    functional.reset_net(net)
    if step_mode == "m":
        hidden = net[1](net[0](x))
        out = net[4](net[3](net[2](hidden)))
    else:
        hs, outs = [], []
        for t in range(x.shape[0]):
            h = net[1](net[0](x[t]))
            hs.append(h)
            outs.append(net[4](net[3](net[2](h))))
        hidden, out = torch.stack(hs), torch.stack(outs)
    functional.reset_net(net)
    return hidden, out


@pytest.mark.parametrize("kind", ["lif", "if"])
@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_spikingjelly_same_spikes(kind, step_mode):
    net = _sj_net(kind, step_mode)
    x = _inputs(5)
    hidden, out = _sj_run(net, x, step_mode)
    assert 0.02 < hidden.mean() < 0.5
    with pytest.warns(UserWarning, match="not a fast sigmoid"):  # SpikingJelly's Sigmoid
        conv, report = sparsegrad.convert(net, return_report=True)
    assert len(report.converted) == 2 and not report.skipped
    layer = conv[0]
    assert isinstance(layer, LIF)
    if kind == "lif":
        assert isinstance(layer, OffsetLIF) and layer.alpha == pytest.approx(2 / 3)
    else:
        assert layer.alpha == 1.0 and layer.threshold == 1.0
    assert torch.equal(layer(x), hidden)
    torch.testing.assert_close(SequenceModel(conv)(x), out, rtol=1e-10, atol=1e-10)


def test_spikingjelly_dense_gradients_with_fast_sigmoid():
    net = _sj_net("lif", "m", surrogate=_fast_sigmoid)
    x = _inputs(6)
    _, out = _sj_run(net, x, "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and conv[0].slope == 20.0
    out2 = SequenceModel(conv)(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out2 * g).sum().backward()
    grads = dict(net.named_parameters())
    for name, p in conv.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_spikingjelly_undetached_reset_is_announced():
    net = _sj_net("lif", "m", surrogate=_fast_sigmoid)
    for m in net:
        if hasattr(m, "detach_reset"):
            m.detach_reset = False
    with pytest.warns(UserWarning, match="detach_reset=False"):
        _, report = sparsegrad.convert(net, return_report=True)
    assert len(report.converted) == 2


@pytest.mark.parametrize("extra,word", [(dict(v_reset=0.0), "hard reset"),
                                        (dict(decay_input=True), "decay_input")])
def test_spikingjelly_unsupported_left_alone(extra, word):
    neuron, _ = _sj()
    kw = dict(tau=2.0, v_reset=None, decay_input=False, step_mode="m")
    kw.update(extra)
    net = nn.Sequential(nn.Linear(N_IN, N_H1), neuron.LIFNode(**kw))
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.converted and word in report.skipped[0][1]
    assert type(conv[0]) is nn.Linear


def test_offset_lif_pickles_and_copies():
    layer = OffsetLIF(5, 4, alpha=0.5, v_init=-0.25, current=-0.125)
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert other.v_init == -0.25 and other.current == -0.125
        x = _inputs(7, torch.float32)[:, :, :5]
        assert torch.equal(other(x), layer(x))


def test_linear_without_bias():
    snn = _snntorch()
    torch.manual_seed(4)
    net = _scale_up(nn.Sequential(
        nn.Linear(N_IN, N_H1, bias=False),
        snn.Leaky(beta=0.9, spike_grad=snn.surrogate.fast_sigmoid(), init_hidden=True),
        _Cast()).double(), 3.0)
    x = _inputs(8)
    pytest.importorskip("snntorch.utils").reset(net)
    expected = torch.stack([net(x[t]) for t in range(T)])
    assert expected.sum() > 0
    conv = sparsegrad.convert(net)
    assert conv[0].bias is None
    assert torch.equal(SequenceModel(conv)(x), expected)
