"""sparsegrad.convert: snnTorch / SpikingJelly models -> sparsegrad modules, exactly.

The converted model must give the original's spikes bit for bit and, with backward="dense", its
gradients to float round-off, for every surrogate and reset sparsegrad has; whatever it cannot
convert it leaves in place, stepped over time, computing what the original did.
"""
import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad.conversion import (ConversionReport, SequenceModel, StepByStep, Unsupported,
                                   surrogate_of)
from sparsegrad.nn import LIF, LIFNeuron, TimeDistributed

from conftest import assert_spikes_match, layer_membrane, lif_membrane

T, B, N_IN, N_H1, N_H2, N_OUT = 40, 6, 20, 32, 24, 5


def _inputs(seed=0, dtype=torch.float64, shape=(T, B, N_IN)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.3).to(dtype)


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


def _assert_grads_close(conv, net, rtol, atol_rel):
    """Gradients of the converted model's parameters equal the original's (names mapped)."""
    grads = {n: p.grad for n, p in net.named_parameters()}
    seen = 0
    for name, p in conv.named_parameters():
        ref = grads[name.replace("module.", "")]
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=rtol, atol=atol_rel * float(ref.abs().max()),
                                   msg=name)
        seen += 1
    assert seen == len(grads)


# ----------------------------------------------------------------------------------- snnTorch

def _snntorch():
    return pytest.importorskip("snntorch")


def _snn_run(net, x):
    """The snnTorch way: reset, then one call per time step; outputs stacked over time."""
    pytest.importorskip("snntorch.utils").reset(net)
    outs = [net(x[t]) for t in range(x.shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


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


@pytest.mark.parametrize("surrogate", ["fast_sigmoid", "atan", "sigmoid"])
def test_snntorch_tutorial_net_same_spikes_and_dense_gradients(surrogate):
    sg_mod = _snntorch().surrogate
    sg, slope = {"fast_sigmoid": (sg_mod.fast_sigmoid(slope=25), 25.0),
                 "atan": (sg_mod.atan(), 2.0),
                 "sigmoid": (sg_mod.sigmoid(slope=5), 5.0)}[surrogate]
    net = _tutorial_net(sg)
    x = _inputs()
    out, spk1, spk2 = net(x)
    assert 0.02 < spk1.mean() < 0.5 and 0.02 < spk2.mean() < 0.5  # the test exercises spiking

    # Net.forward runs its own time loop over range(x.shape[0]): lifted to one step
    # (conversion_loop.py), and the converted model takes the original's argument
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.forward_followed is True and report.exact
    assert any("its own time loop" in n for n in report.notes)
    assert len(report.converted) == 2 and not report.skipped
    assert isinstance(conv.fc1, LIF) and isinstance(conv.fc2, LIF)
    assert isinstance(conv.lif1, nn.Identity)
    assert conv.fc1.slope == slope and conv.fc2.threshold == float(net.lif2.threshold)
    assert conv.fc1.alpha == float(net.lif1.beta)
    assert report.converted[0].surrogate == surrogate

    # Spikes: the same, layer by layer, wherever the membrane clears the threshold by more than
    # the rounding (the fused layer sums events, snnTorch's nn.Linear runs a GEMM)
    c1 = conv.fc1(x)
    c2 = conv.fc2(c1)
    assert_spikes_match(c1, spk1, layer_membrane(x, net.fc1.weight, net.fc1.bias, spk1, 0.9))
    assert_spikes_match(c2, spk2, layer_membrane(spk1, net.fc2.weight, net.fc2.bias, spk2, 0.8, 0.7),
                        0.7)
    out2, s1, s2 = conv(x)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    assert torch.equal(s1, spk1) and torch.equal(s2, spk2)

    # Dense-mode gradients equal snnTorch's (to the float32 rounding snnTorch applies to the
    # gradient arriving at its float32 spikes).
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out2 * g).sum().backward()
    _assert_grads_close(conv, net, rtol=1e-5, atol_rel=1e-6)

    # The original model is untouched (convert works on a copy by default).
    assert type(net.fc1) is nn.Linear and type(net.lif1).__name__ == "Leaky"


def test_snntorch_sparse_mode_with_infinite_band_equals_dense():
    surrogate = _snntorch().surrogate
    net = _tutorial_net(surrogate.fast_sigmoid(slope=25))
    x = _inputs(1)
    dense = sparsegrad.convert(net, backward="dense")
    sparse = sparsegrad.convert(net, backward="sparse", b_th=math.inf)
    g = torch.randn(T, B, N_OUT, dtype=torch.float64)
    (dense(x)[0] * g).sum().backward()
    (sparse(x)[0] * g).sum().backward()
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
    assert [name for name, _ in report.stepped] == ["2", "5"]  # the user's _Cast: per step
    assert isinstance(conv[2], StepByStep) and isinstance(conv[6], TimeDistributed)
    assert_spikes_match(conv[0](x), hidden, layer_membrane(x, net[0].weight, net[0].bias, hidden, 0.85))
    torch.testing.assert_close(conv(x), out, rtol=1e-12, atol=1e-12)  # runs sequences itself
    torch.testing.assert_close(SequenceModel(conv)(x), out, rtol=1e-12, atol=1e-12)
    # Layer names are kept, so the converted model loads the original's weights.
    missing, unexpected = conv.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.split(".")[0] in ("1", "4") for k in unexpected)


def _mlp(snn, sg, reset, beta=0.9, dtype=torch.float32, output=False):
    torch.manual_seed(3)
    return _scale_up(nn.Sequential(
        nn.Linear(N_IN, N_H1), snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True,
                                         reset_mechanism=reset),
        nn.Linear(N_H1, N_H2), snn.Leaky(beta=0.8, spike_grad=sg, init_hidden=True,
                                         reset_mechanism=reset, output=output)).to(dtype), 2.0)


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_snntorch_mlp_atan_every_reset_float32(reset):
    """snnTorch's default surrogate (atan) and every reset, in float32 as snnTorch runs."""
    snn = _snntorch()
    net = _mlp(snn, None, reset)  # spike_grad=None: snnTorch's default atan(alpha=2)
    x = _inputs(4, torch.float32)
    out = _snn_run(net, x)
    assert 0.01 < out.mean() < 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and all(p.surrogate == "atan" and p.slope == 2.0 and p.reset == reset
                                for p in report.converted)
    out2 = conv(x)
    hidden = _snn_run(net[:2], x)  # the first layer's spikes give the second layer's membrane
    assert_spikes_match(out2, out, layer_membrane(hidden, net[2].weight, net[2].bias, out, 0.8,
                                                  reset=reset))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out2 * g).sum().backward()
    _assert_grads_close(conv, net, rtol=1e-4, atol_rel=1e-5)


def test_snntorch_output_true_returns_membrane():
    snn = _snntorch()
    net = _mlp(snn, snn.surrogate.atan(alpha=3.0), "zero", output=True)
    x = _inputs(5, torch.float32)
    spk, mem = _snn_run(net, x)
    conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    # the membrane is needed: that neuron runs alone after a time-folded Linear
    assert isinstance(conv[3], LIFNeuron) and conv[3].return_mem
    assert isinstance(conv[2], TimeDistributed) and report.converted[1].to == "LIFNeuron"
    spk2, mem2 = conv(x)
    assert_spikes_match(spk2, spk, mem.detach())
    # the membrane to round-off: nn.Linear on 6 samples per call (MKL's small-batch kernel) may
    # round differently from one call on T*6 samples (docs/conversion.md, "Time folding")
    torch.testing.assert_close(mem2, mem, rtol=1e-6, atol=1e-6)
    g1, g2 = torch.randn_like(spk), torch.randn_like(mem)
    ((spk * g1).sum() + (mem * g2).sum()).backward()
    ((spk2 * g1).sum() + (mem2 * g2).sum()).backward()
    _assert_grads_close(conv, net, rtol=1e-4, atol_rel=1e-5)


def _tutorial_csnn(snn, sg, beta=0.5):
    """snnTorch tutorial 6's convolutional network (28x28 inputs)."""
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(1, 12, 5), nn.MaxPool2d(2),
        snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True),
        nn.Conv2d(12, 64, 5), nn.MaxPool2d(2),
        snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True, output=True))


@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_snntorch_tutorial_csnn_same_spikes_and_dense_gradients(surrogate):
    snn = _snntorch()
    sg = None if surrogate == "atan" else snn.surrogate.fast_sigmoid(slope=25)
    net = _tutorial_csnn(snn, sg)
    with torch.no_grad():
        net[3].weight.mul_(3.0)
        net[7].weight.mul_(4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 4, 1, 28, 28, generator=g) * 2  # [T, B, C, H, W]
    spk, mem = _snn_run(net, x)
    pytest.importorskip("snntorch.utils").reset(net)
    hidden, hidden_v = [], []
    for t in range(x.shape[0]):  # the first hidden layer's spikes and (pre-reset) membrane
        hidden.append(net[2](net[1](net[0](x[t]))))
        hidden_v.append(net[2].mem.detach().clone())
    hidden, hidden_v = torch.stack(hidden), torch.stack(hidden_v)
    assert 0.01 < hidden.mean() < 0.6 and 0.01 < spk.mean() < 0.9

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and len(report.converted) == 3
    assert report.folded == ["0", "1", "3", "4", "6", "7"]
    assert isinstance(conv[2], LIFNeuron) and isinstance(conv[0], TimeDistributed)
    # oneDNN may pick another convolution algorithm for T*B samples than for B, so the currents
    # differ in the last bits: spikes equal wherever V clears the threshold by more than that
    # rounding, membranes to round-off
    assert_spikes_match(conv[2](conv[1](conv[0](x))), hidden, hidden_v)
    spk2, mem2 = conv(x)
    assert_spikes_match(spk2, spk, mem.detach())
    torch.testing.assert_close(mem2, mem, rtol=1e-5, atol=1e-5 * float(mem.detach().abs().max()))

    g1 = torch.randn(spk.shape, generator=g)
    g2 = torch.randn(mem.shape, generator=g)
    ((spk * g1).sum() + (mem * g2).sum()).backward()
    ((spk2 * g1).sum() + (mem2 * g2).sum()).backward()
    _assert_grads_close(conv, net, rtol=1e-4, atol_rel=1e-5)
    # the converted model loads the original's state_dict (the neurons' buffers are extra)
    missing, unexpected = conv.load_state_dict(net.state_dict(), strict=False)
    assert not missing and {k.split(".")[0] for k in unexpected} == {"2", "5", "8"}


@pytest.mark.parametrize("option,reason_word", [
    (dict(graded_spikes_factor=2.0), "graded_spikes_factor"),
    (dict(reset_delay=False), "reset_delay"),
    (dict(threshold=torch.linspace(-0.5, 1.0, N_H1)), "<= 0"),
    (dict(surrogate_disable=True), "surrogate_disable"),
    (dict(spike_grad="triangular"), "not a triangle"),
])
def test_snntorch_unsupported_options_are_left_and_reported(option, reason_word):
    snn = _snntorch()
    kwargs = dict(beta=0.9, init_hidden=True)
    kwargs.update(option)
    if kwargs.get("spike_grad") == "triangular":
        kwargs["spike_grad"] = snn.surrogate.triangular()
    torch.manual_seed(2)
    net = _scale_up(nn.Sequential(nn.Linear(N_IN, N_H1), snn.Leaky(**kwargs), _Cast(),
                                  nn.Linear(N_H1, N_OUT)).double())
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.converted and len(report.skipped) == 1
    name, reason = report.skipped[0]
    assert name == "1" and reason_word in reason
    assert isinstance(conv[0], TimeDistributed) and type(conv[0].module) is nn.Linear
    assert isinstance(conv[1], StepByStep) and type(conv[1].module) is type(net[1])
    # The partially converted model still runs on sequences, stepping the neuron in time.
    x = _inputs(3)
    ref = _snn_run(net, x)
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SequenceModel(conv)(x), ref, rtol=1e-12, atol=1e-12)


def test_snntorch_neuron_after_a_nonlinear_layer_becomes_lif_neuron():
    snn = _snntorch()
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(N_IN, N_H1), nn.ReLU(), snn.Leaky(beta=0.7, init_hidden=True))
    with torch.no_grad():
        net[0].weight.mul_(3)
    x = _inputs(6, torch.float32)
    ref = _snn_run(net, x)
    assert ref.sum() > 0
    conv, report = sparsegrad.convert(net, return_report=True)
    assert report.exact and report.converted[0].to == "LIFNeuron" and report.converted[0].linear is None
    # nn.Linear on T*B samples at once vs B per step: the currents may differ in the last bits
    current = torch.relu(net[0](x))
    assert_spikes_match(conv(x), ref, lif_membrane(current, ref, 0.7))
    # a bare neuron converts too
    bare = sparsegrad.convert(snn.Leaky(beta=0.7, init_hidden=True))
    assert isinstance(bare, LIFNeuron)


def test_surrogate_of_recognises_snntorch_and_closed_forms():
    surrogate = _snntorch().surrogate
    for k in (0.5, 25, 100, 1000):
        assert surrogate_of(surrogate.fast_sigmoid(slope=k)) == ("fast_sigmoid", float(k))
    assert surrogate_of(surrogate.atan()) == ("atan", 2.0)
    assert surrogate_of(surrogate.atan(alpha=0.7)) == ("atan", 0.7)
    assert surrogate_of(surrogate.sigmoid(slope=5)) == ("sigmoid", 5.0)

    class Triangle(torch.autograd.Function):  # a user's own: recognised by its derivative
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u > 0).to(u.dtype)

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            return g * 3.0 * torch.clamp(1 - 3.0 * u.abs(), min=0)

    assert surrogate_of(Triangle.apply) == ("triangle", 3.0)
    for fn, word in ((lambda u: torch.sigmoid(u), "step"), (surrogate.SSO(), "random"),
                     (surrogate.triangular(), "not a triangle"),
                     (surrogate.straight_through_estimator(), "straight-through"),
                     (surrogate.spike_rate_escape(), "escape")):
        with pytest.raises(Unsupported, match=word):
            surrogate_of(fn)


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
    assert report.exact and "0 neuron(s) converted" in str(report)


def test_batchnorm_and_unknown_modules_are_stepped_exactly():
    snn = _snntorch()
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), snn.Leaky(beta=0.6, init_hidden=True),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.rand(5, 3, 1, 8, 8) * 3
    conv, report = sparsegrad.convert(net, return_report=True)
    ref = _snn_run(net, x)  # training mode: BatchNorm normalises each step's batch
    assert report.exact and report.stepped[0][0] == "1" and isinstance(conv[1], StepByStep)
    torch.testing.assert_close(conv(x), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(conv[1].module.running_mean, net[1].running_mean)


# ------------------------------------------------------------------------- snnTorch tutorial 5

def test_tutorial5_network_written_with_sparsegrad_modules():
    """docs/conversion.md: snnTorch tutorial 5's network, rewritten with sparsegrad modules."""
    snn = _snntorch()
    num_inputs, num_hidden, num_outputs, num_steps, beta = 784, 100, 10, 12, 0.95

    class Net(nn.Module):  # snnTorch tutorial 5, as written there
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(num_inputs, num_hidden)
            self.lif1 = snn.Leaky(beta=beta)
            self.fc2 = nn.Linear(num_hidden, num_outputs)
            self.lif2 = snn.Leaky(beta=beta)

        def forward(self, x):
            mem1 = self.lif1.init_leaky()
            mem2 = self.lif2.init_leaky()
            spk2_rec, mem2_rec = [], []
            for step in range(num_steps):
                cur1 = self.fc1(x)
                spk1, mem1 = self.lif1(cur1, mem1)
                cur2 = self.fc2(spk1)
                spk2, mem2 = self.lif2(cur2, mem2)
                spk2_rec.append(spk2)
                mem2_rec.append(mem2)
            return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)

    class SparseNet(nn.Module):  # the same network with sparsegrad modules (docs/conversion.md)
        def __init__(self, backward="sparse"):
            super().__init__()
            self.fc1 = sparsegrad.nn.LIF(num_inputs, num_hidden, alpha=beta, surrogate="atan",
                                         slope=2.0, backward=backward)
            self.fc2 = sparsegrad.nn.TimeDistributed(nn.Linear(num_hidden, num_outputs))
            self.lif2 = sparsegrad.nn.LIFNeuron(alpha=beta, surrogate="atan", slope=2.0,
                                                backward=backward, return_mem=True)

        def forward(self, x):
            x_seq = x.unsqueeze(0).expand(num_steps, *x.shape)  # the same input every step
            return self.lif2(self.fc2(self.fc1(x_seq)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc2.weight.mul_(8.0)  # so that the output layer spikes in a short test
    sparse_net = SparseNet(backward="dense")
    sparse_net.load_state_dict(net.state_dict(), strict=False)
    x = torch.rand(16, num_inputs)
    spk, mem = net(x)
    spk2, mem2 = sparse_net(x)
    assert 0.01 < spk.mean() < 0.9
    # the fused first layer sums events, snnTorch's nn.Linear a GEMM: equal off the rounding
    assert_spikes_match(spk2, spk, mem.detach())
    torch.testing.assert_close(mem2, mem, rtol=1e-5, atol=1e-5 * float(mem.detach().abs().max()))
    # tutorial 5's loss: cross-entropy of the membrane at every step
    targets = torch.randint(0, num_outputs, (16,))
    loss_fn = nn.CrossEntropyLoss()
    sum(loss_fn(mem[t], targets) for t in range(num_steps)).backward()
    sum(loss_fn(mem2[t], targets) for t in range(num_steps)).backward()
    _assert_grads_close(sparse_net, net, rtol=1e-4, atol_rel=1e-5)


# ----------------------------------------------------------------------------------- SpikingJelly

SJ_CASES = [  # (tau or None for IFNode, decay_input, v_reset, detach_reset)
    (2.0, True, 0.0, False),     # LIFNode's defaults
    (3.0, False, None, True),
    (2.5, True, None, False),
    (None, True, 0.0, True),     # IFNode
    (None, True, None, False),
    (4.0, False, 0.3, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("surrogate,slope", [("sigmoid", 4.0), ("atan", 2.0), ("triangle", 1.5)])
@pytest.mark.parametrize("case", SJ_CASES)
def test_spikingjelly_neuron_matches_reference(case, surrogate, slope, dtype):
    """SpikingJellyNeuron (sparsegrad's kernels) against SpikingJelly's formulas in plain PyTorch."""
    from sparsegrad import reference as ref
    from sparsegrad.conversion import SpikingJellyNeuron

    tau, decay_input, v_reset, detach = case
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(15, 3, 4, 5, generator=g, dtype=torch.float64) * 0.8 + 0.6).to(dtype)
    kw = dict(tau=tau, decay_input=decay_input, v_reset=v_reset, surrogate=surrogate, slope=slope,
              detach_reset=detach)
    for backward, b_th in (("dense", 0.2), ("sparse", 0.4), ("sparse", math.inf)):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        mod = SpikingJellyNeuron(v_threshold=1.0, b_th=b_th, backward=backward, **kw)
        got = mod(xa)
        want, _ = ref.spikingjelly_neuron(xb, threshold=1.0, b_th=b_th, backward=backward, **kw)
        assert torch.equal(got, want)
        assert 0.05 < float(want.detach().mean()) < 0.8
        cot = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        (got * cot).sum().backward()
        (want * cot).sum().backward()
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)


def _sj():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    return neuron, functional, layer, surrogate


def _sj_conv_net(dtype=torch.float32):
    neuron, functional, layer, surrogate = _sj()
    torch.manual_seed(3)
    net = nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1), neuron.LIFNode(),         # LIFNode's defaults
        layer.MaxPool2d(2),
        layer.SeqToANNContainer(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
        neuron.IFNode(v_reset=None, detach_reset=True, surrogate_function=surrogate.ATan()),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(16 * 3 * 3, 10),
        neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None,
                       surrogate_function=surrogate.PiecewiseQuadratic(alpha=1.5))).to(dtype)
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(2.0)
        net[3][0].weight.mul_(1.5)
        net[7].weight.mul_(3.0)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spikingjelly_multistep_conv_model_same_spikes_and_dense_gradients(dtype):
    neuron, functional, layer, surrogate = _sj()
    net = _sj_conv_net(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 4, 1, 12, 12, generator=g) * 2.5).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and [p.to for p in report.converted] == ["SpikingJellyNeuron"] * 3
    assert [p.surrogate for p in report.converted] == ["sigmoid", "atan", "triangle"]
    assert all(isinstance(conv[i], TimeDistributed) for i in (0, 2, 3, 5, 6, 7))
    functional.reset_net(net)
    hidden = net[1](net[0](x))
    out = net[8](net[7](net[6](net[5](net[4](net[3](net[2](hidden)))))))
    assert 0.01 < float(hidden.detach().mean()) < 0.6 and 0.01 < float(out.detach().mean()) < 0.8
    assert torch.equal(conv[1](conv[0](x)), hidden)
    out2 = conv(x)
    assert torch.equal(out2, out)
    cot = torch.randn(out.shape, generator=g).to(dtype)
    (out * cot).sum().backward()
    (out2 * cot).sum().backward()
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-10)
    _assert_grads_close(conv, net, rtol=rtol, atol_rel=atol)
    functional.reset_net(net)


def test_spikingjelly_single_step_mlp_and_sparse_band():
    neuron, functional, layer, surrogate = _sj()
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(N_IN, N_H1), neuron.LIFNode(tau=2.0),
                        nn.Linear(N_H1, N_OUT), neuron.IFNode(v_reset=None))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[2].weight.mul_(3.0)
    x = _inputs(9, torch.float32)
    functional.reset_net(net)
    ref = torch.stack([net(x[t]) for t in range(T)])  # single-step mode, the user's loop
    functional.reset_net(net)
    assert 0.02 < float(ref.detach().mean()) < 0.8
    dense = sparsegrad.convert(net, backward="dense")
    # one GEMM on T*B samples vs B per step: compare the output spikes off the threshold's
    # rounding, with the IFNode's (v_reset=None) membrane H[t] = V[t-1] + X[t], V = H - S
    hidden = torch.stack([net[1](net[0](x[t])) for t in range(T)]).detach()
    functional.reset_net(net)
    current, h, v = net[2](hidden).detach().double(), [], 0.0
    for x_t, s_t in zip(current, ref.detach().double()):
        h.append(v + x_t)
        v = h[-1] - s_t
    assert_spikes_match(dense(x), ref, torch.stack(h))
    # sparse mode with an infinite band equals dense
    sparse = sparsegrad.convert(net, backward="sparse", b_th=math.inf)
    cot = torch.randn(ref.shape)
    (dense(x) * cot).sum().backward()
    (sparse(x) * cot).sum().backward()
    for (n, p), (_, q) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_spikingjelly_unsupported_left_alone():
    neuron, functional, layer, surrogate = _sj()
    net = nn.Sequential(layer.Linear(N_IN, N_H1),
                        neuron.LIFNode(surrogate_function=surrogate.SoftSign(alpha=3.0)))
    functional.set_step_mode(net, "m")
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, return_report=True)
    assert not report.converted and "surrogate" in report.skipped[0][1]
    assert conv[1] is not net[1] and type(conv[1]) is type(net[1])  # kept, multi-step
    x = _inputs(10, torch.float32)
    functional.reset_net(net)
    torch.testing.assert_close(conv(x), net(x))


def test_rule_table_takes_a_neuron_that_needs_its_linear():
    """The hook a recurrent layer's rule uses: fused_factory + needs_linear (one function)."""
    from sparsegrad import conversion

    class MyNeuron(nn.Module):  # stands for e.g. snnTorch's RLeaky
        def forward(self, x):
            return x

    class Fused(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)

    def rule(m):
        return conversion.NeuronSpec("test.MyNeuron", 0.9, 1.0, "atan", 2.0, needs_linear=True,
                                     fused_factory=lambda lin, b_th, backward: Fused(lin))

    conversion.register_neuron_rule(MyNeuron.__module__, "MyNeuron", rule)
    try:
        conv, report = sparsegrad.convert(nn.Sequential(nn.Linear(3, 4), MyNeuron()),
                                          return_report=True)
        assert isinstance(conv[0], Fused) and isinstance(conv[1], nn.Identity)
        assert report.converted[0].to == "Fused" and report.exact
        with pytest.warns(UserWarning, match="only directly after an nn.Linear"):
            conv, report = sparsegrad.convert(nn.Sequential(nn.ReLU(), MyNeuron()),
                                              return_report=True)
        assert isinstance(conv[1], StepByStep)
    finally:
        del conversion.NEURON_RULES[(MyNeuron.__module__, "MyNeuron")]


# ------------------------------------------- snnTorch learnable / per-neuron beta and threshold

_PARAM_OPTIONS = {
    "learn_beta": dict(beta=0.9, learn_beta=True),
    "learn_threshold": dict(beta=0.9, threshold=0.8, learn_threshold=True),
    "per_neuron_beta": dict(beta="per_neuron"),
    "per_neuron_learn_both": dict(beta="per_neuron", threshold="per_neuron", learn_beta=True,
                                  learn_threshold=True),
    # a trained beta may leave [0, 1]: snnTorch clamps it in every forward, so does sparsegrad
    "learn_beta_outside_01": dict(beta="outside", learn_beta=True),
}


def _param_kwargs(option, n, seed):
    g = torch.Generator().manual_seed(seed)
    kw = dict(_PARAM_OPTIONS[option])
    if kw.get("beta") == "per_neuron":
        kw["beta"] = 0.5 + 0.45 * torch.rand(n, generator=g)
    elif kw.get("beta") == "outside":
        kw["beta"] = torch.cat([torch.full((n // 2,), 1.2), torch.full((n - n // 2,), -0.1)])
        kw["beta"][0] = 0.7
    if kw.get("threshold") == "per_neuron":
        kw["threshold"] = 0.6 + 0.8 * torch.rand(n, generator=g)
    return kw


def _scale_layers(model, factor):
    """_scale_up for the layers' weights only (the neurons' beta / threshold stay as given)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(factor)
                m.bias.mul_(factor)
    return model


def _learn_net(snn, option, reset):
    torch.manual_seed(8)
    sg = snn.surrogate.fast_sigmoid(slope=5.0)
    return _scale_layers(nn.Sequential(
        nn.Linear(N_IN, N_H1),
        snn.Leaky(spike_grad=sg, init_hidden=True, reset_mechanism=reset,
                  **_param_kwargs(option, N_H1, 1)),
        nn.Linear(N_H1, N_H2),
        snn.Leaky(spike_grad=sg, init_hidden=True, reset_mechanism=reset, output=True,
                  **_param_kwargs(option, N_H2, 2))), 2.0)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("option", sorted(_PARAM_OPTIONS))
def test_snntorch_learnable_and_per_neuron_parameters_convert(option, reset):
    """Learnable / per-neuron beta and threshold -> sparsegrad's tensor parameters: the same
    spikes, and the gradients of alpha / threshold are snnTorch's of beta / threshold."""
    snn = _snntorch()
    net = _learn_net(snn, option, reset)
    x = _inputs(9, torch.float32)
    spk, mem = _snn_run(net, x)
    assert 0.01 < spk.mean() < 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and not report.skipped and len(report.converted) == 2
    # the first neuron fuses with its Linear, the second (its membrane is returned) runs alone
    assert isinstance(conv[0], LIF) and isinstance(conv[3], LIFNeuron) and conv[3].return_mem
    pairs = {"0": net[1], "3": net[3]}
    for at, orig in pairs.items():
        for sg_name, sn_name in (("alpha", "beta"), ("threshold", "threshold")):
            new, old = getattr(conv.get_submodule(at), sg_name), getattr(orig, sn_name)
            # learnable iff the original is; values as the original's (unclamped)
            assert isinstance(new, nn.Parameter) == isinstance(old, nn.Parameter), (at, sg_name)
            if isinstance(old, nn.Parameter) or old.numel() > 1:
                assert torch.equal(torch.as_tensor(new).detach().reshape(old.shape), old.detach())
    spk2, mem2 = conv(x)
    thr = net[3].threshold.detach()
    assert_spikes_match(spk2, spk, mem.detach(), threshold=thr)
    assert (spk2 != spk).float().mean() < 0.002
    torch.testing.assert_close(mem2, mem, rtol=1e-5, atol=1e-5 * float(mem.detach().abs().max()))
    g = torch.Generator().manual_seed(3)
    g1, g2 = torch.randn(spk.shape, generator=g), torch.randn(mem.shape, generator=g)
    ((spk * g1).sum() + (mem * g2).sum()).backward()
    ((spk2 * g1).sum() + (mem2 * g2).sum()).backward()
    names = {"0.weight": "0.weight", "0.bias": "0.bias", "0.alpha": "1.beta",
             "0.threshold": "1.threshold", "2.module.weight": "2.weight",
             "2.module.bias": "2.bias", "3.alpha": "3.beta", "3.threshold": "3.threshold"}
    ref = dict(net.named_parameters())
    got = dict(conv.named_parameters())
    assert {names[k] for k in got} == set(ref)
    for k, p in got.items():
        r = ref[names[k]].grad
        assert r is not None and p.grad is not None, k
        if "beta" in names[k] or "threshold" in names[k]:
            assert r.abs().max() > 0, k
        torch.testing.assert_close(p.grad.reshape(r.shape), r, rtol=1e-4,
                                   atol=1e-4 * float(r.abs().max()) + 1e-12, msg=k)


def test_snntorch_per_channel_beta_after_a_convolution():
    """A per-channel beta [C, 1, 1] after Conv2d: LIFNeuron with that tensor, learnable."""
    snn = _snntorch()
    torch.manual_seed(4)
    beta = torch.tensor([0.5, 0.7, 0.9, 0.95]).view(4, 1, 1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), snn.Leaky(beta=beta, learn_beta=True,
                                                      init_hidden=True, output=True))
    _scale_layers(net, 4.0)
    x = _inputs(11, torch.float32, (8, 2, 1, 6, 6))
    spk, mem = _snn_run(net, x)
    assert spk.sum() > 0
    conv = sparsegrad.convert(net, backward="dense")
    assert isinstance(conv[1], LIFNeuron) and isinstance(conv[1].alpha, nn.Parameter)
    assert conv[1].alpha.shape == (4, 1, 1)
    spk2, mem2 = conv(x)
    assert_spikes_match(spk2, spk, mem.detach())
    (mem.sum() + spk.sum()).backward()
    (mem2.sum() + spk2.sum()).backward()
    r = net[1].beta.grad
    torch.testing.assert_close(conv[1].alpha.grad, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
