"""sparsegrad.convert on model classes: their own per-step forward, traced (torch.fx) and run over
whole sequences (sparsegrad/conversion_fx.py).

Each model is written the way snnTorch's tutorials write it and run the way they run it (reset,
then one call per step); the converted model takes the whole sequence. Spikes are compared
exactly where the same arithmetic runs (every spike here is checked to be away from the
threshold by more than rounding); membranes and dense-mode gradients with tolerances (a folded
layer computes T*B samples in one call, whose summation order may differ in the last bits).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrad
from sparsegrad.conversion import StepByStep
from sparsegrad.conversion_fx import ConversionError, SequenceForward
from sparsegrad.conv import ConvLIF
from sparsegrad.nn import LIF, LIFNeuron

snn = pytest.importorskip("snntorch")
utils = pytest.importorskip("snntorch.utils")

T, B = 6, 4


def _run_steps(net, x, *state):
    """snnTorch's way: reset, one call per step; state arguments fed back as the loop does."""
    utils.reset(net)
    outs = []
    for t in range(x.shape[0]):
        out = net(x[t], *state) if state else net(x[t])
        outs.append(out)
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def _grads_close(conv, net, rtol=1e-4):
    ref = dict(net.named_parameters())
    n = 0
    for name, p in conv.named_parameters():
        r = ref[name.replace("module.", "")].grad
        assert r is not None and p.grad is not None, name
        scale = float(r.abs().max())
        assert scale > 0, name
        assert float((p.grad - r).abs().max()) <= rtol * scale, name
        n += 1
    assert n == len(ref)


def _compare(net, conv, x, *, spikes_at=(0,), membranes_at=(1,), tol=1e-5):
    """Spikes equal, membranes close, dense-mode gradients within 1e-4 relative."""
    ref = _run_steps(net, x)
    got = conv(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(ref) == len(got)
    for i in spikes_at:
        assert ref[i].sum() > 0, "the test must exercise spikes"
        assert torch.equal(got[i].to(ref[i].dtype), ref[i]), f"output {i}: spikes differ"
    for i in membranes_at:
        torch.testing.assert_close(got[i], ref[i], rtol=tol, atol=tol)
    gs = [torch.randn_like(r) for r in ref]
    sum((r * g).sum() for r, g in zip(ref, gs)).backward()
    sum((o * g).sum() for o, g in zip(got, gs)).backward()
    _grads_close(conv, net)
    return ref, got


class TutorialCSNN(nn.Module):
    """snnTorch tutorial 6's class CSNN, as printed (mem re-initialised in every call)."""

    def __init__(self, beta=0.5, spike_grad=None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=beta, spike_grad=spike_grad)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        mem3 = self.lif3.init_leaky()
        cur1 = F.max_pool2d(self.conv1(x), 2)
        spk1, mem1 = self.lif1(cur1, mem1)
        cur2 = F.max_pool2d(self.conv2(spk1), 2)
        spk2, mem2 = self.lif2(cur2, mem2)
        cur3 = self.fc1(spk2.view(B, -1))
        spk3, mem3 = self.lif3(cur3, mem3)
        return spk3, mem3


class HiddenCSNN(nn.Module):
    """The same network with init_hidden=True neurons, F.avg_pool2d and a scaled current."""

    def __init__(self, spike_grad=None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=0.5, spike_grad=spike_grad, init_hidden=True)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=0.5, spike_grad=spike_grad, init_hidden=True)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=0.5, spike_grad=spike_grad, init_hidden=True, output=True)

    def forward(self, x):
        spk1 = self.lif1(F.max_pool2d(self.conv1(x), 2))
        spk2 = self.lif2(2.0 * F.avg_pool2d(self.conv2(spk1), 2))
        return self.lif3(self.fc1(spk2.view(x.size(0), -1)))


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, B, 1, 28, 28, generator=g) * 2


def _boost(net, **factors):
    with torch.no_grad():
        for name, f in factors.items():
            getattr(net, name).weight.mul_(f)
    return net


def test_tutorial6_class_csnn_follows_forward():
    torch.manual_seed(6)
    net = _boost(TutorialCSNN(), conv1=3.0, conv2=6.0, fc1=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert isinstance(conv, SequenceForward) and report.forward_followed and report.exact
    # init_leaky() inside forward re-creates the state at every call: every step starts at rest
    assert {"lif1", "lif2", "lif3"} <= set(report.folded)
    _compare(net, conv, _images())
    # same parameter names, so the original's weights load
    conv.load_state_dict(net.state_dict(), strict=False)


@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_class_csnn_with_functional_ops_and_scaling(surrogate):
    """F.max_pool2d, F.avg_pool2d, 2.0 * current, x.view(x.size(0), -1): as the forward says."""
    sg = None if surrogate == "atan" else snn.surrogate.fast_sigmoid(slope=25)
    torch.manual_seed(1)
    net = _boost(HiddenCSNN(sg), conv1=2.0, conv2=2.0, fc1=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and len(report.converted) == 3
    # conv1 -> F.max_pool2d -> lif1 is one ConvLIF; lif2's input is scaled (2.0 * pool), lif3
    # returns its membrane: those stay neurons of their own
    assert isinstance(conv.conv1, ConvLIF) and conv.conv1.pool == "max"
    assert isinstance(conv.lif1, nn.Identity)
    assert all(isinstance(getattr(conv, n), LIFNeuron) for n in ("lif2", "lif3"))
    assert report.converted[0].surrogate == surrogate
    x = _images(1)
    ref, got = _compare(net, conv, x)
    # the factor 2.0 is applied (it was lost by the registration-order conversion)
    utils.reset(net)
    hidden = torch.stack([net.lif2(2.0 * F.avg_pool2d(net.conv2(net.lif1(F.max_pool2d(
        net.conv1(x[t]), 2))), 2)) for t in range(T)])
    assert hidden.sum() > 0


class MLP(nn.Module):
    """fc1 -> lif1(2.0 * fc1(x)) -> fc2 -> lif2, and a fused pair fc3 -> lif3."""

    def __init__(self, n_in=20, hidden=32, out=5):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.lif1 = snn.Leaky(beta=0.9, init_hidden=True)
        self.fc2 = nn.Linear(hidden, hidden)
        self.lif2 = snn.Leaky(beta=0.8, init_hidden=True)
        self.fc3 = nn.Linear(hidden, out)
        self.lif3 = snn.Leaky(beta=0.7, init_hidden=True, output=True)

    def forward(self, x):
        spk1 = self.lif1(2.0 * self.fc1(x))
        spk2 = self.lif2(self.fc2(spk1))
        return self.lif3(self.fc3(spk2))


def _spikes(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.3).float()


def test_scaled_current_is_not_lost_and_linear_fuses():
    torch.manual_seed(3)
    net = _boost(MLP(), fc1=2.0, fc2=3.0, fc3=3.0)
    conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    # fc2 feeds only lif2 and lif2's membrane is not used: one fused LIF; fc1 is scaled first
    assert isinstance(conv.fc2, LIF) and isinstance(conv.lif2, nn.Identity)
    assert isinstance(conv.lif1, LIFNeuron) and not isinstance(conv.fc1, LIF)
    assert [p.linear for p in report.converted] == [None, "fc2", None]
    x = _spikes(0, (T * 5, B, 20))
    ref, got = _compare(net, conv, x)
    # without the factor the output differs: the test would see a lost 2.0
    utils.reset(net)
    spk1 = torch.stack([net.lif1(net.fc1(x[t])) for t in range(x.shape[0])])
    utils.reset(net)
    spk1_scaled = torch.stack([net.lif1(2.0 * net.fc1(x[t])) for t in range(x.shape[0])])
    assert not torch.equal(spk1, spk1_scaled)


class Conv1dNet(nn.Module):
    """Audio-style: Conv1d -> F.max_pool1d -> Leaky -> flatten -> Linear -> Leaky."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3)
        self.lif1 = snn.Leaky(beta=0.6, init_hidden=True)
        self.fc = nn.Linear(8 * 7, 4)
        self.lif2 = snn.Leaky(beta=0.6, init_hidden=True)

    def forward(self, x):
        h = self.lif1(F.max_pool1d(self.conv(x), 2))
        return self.lif2(self.fc(torch.flatten(h, 1)))


def test_max_pool1d_and_flatten():
    torch.manual_seed(4)
    net = _boost(Conv1dNet(), conv=3.0, fc=4.0)
    conv = sparsegrad.convert(net, backward="dense")
    assert isinstance(conv.fc, LIF)
    x = torch.rand(T, B, 2, 16, generator=torch.Generator().manual_seed(2)) * 2
    _compare(net, conv, x, membranes_at=())


class StatePassing(nn.Module):
    """snnTorch's docstring style: the state is a forward input and output (init_hidden=False)."""

    def __init__(self, **lif1):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.lif1 = snn.Leaky(**{"beta": 0.9, **lif1})
        self.fc2 = nn.Linear(16, 5)
        self.lif2 = snn.Leaky(beta=0.8)

    def forward(self, x, mem1, mem2):
        spk1, mem1 = self.lif1(self.fc1(x), mem1)
        spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
        return spk2, mem2, mem1


def test_state_passed_in_and_out_is_the_initial_state():
    torch.manual_seed(5)
    net = _boost(StatePassing(), fc1=3.0, fc2=3.0)
    x = _spikes(1, (T * 4, B, 20))
    # the caller's loop: state in, state out
    mem1 = torch.full((B, 16), 0.3)
    mem2 = torch.zeros(B, 5)
    m1, m2 = mem1, mem2
    outs = []
    for t in range(x.shape[0]):
        spk2, m2, m1 = net(x[t], m1, m2)
        outs.append((spk2, m2, m1))
    ref = [torch.stack(o) for o in zip(*outs)]
    conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and len(report.converted) == 2
    got = conv(x, mem1, mem2)
    assert ref[0].sum() > 0 and torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    # snnTorch's init_leaky() gives an empty tensor: "start from rest"
    got0 = conv(x, net.lif1.init_leaky(), net.lif2.init_leaky())
    utils.reset(net)
    ref0 = []
    m1, m2 = net.lif1.init_leaky(), net.lif2.init_leaky()
    for t in range(x.shape[0]):
        spk2, m2, m1 = net(x[t], m1, m2)
        ref0.append(spk2)
    assert torch.equal(got0[0], torch.stack(ref0))


def test_state_passed_in_with_a_learnable_per_neuron_threshold():
    """The state at t = 0 is an input: its spike S[-1] = 1[mem0 > threshold] is read with the
    converted neuron's own (tensor, learnable) threshold."""
    torch.manual_seed(5)
    thr = torch.linspace(0.2, 0.5, 16)
    net = _boost(StatePassing(threshold=thr, learn_threshold=True, learn_beta=True), fc1=3.0,
                 fc2=3.0)
    x = _spikes(1, (T * 4, B, 20))
    mem1, mem2 = torch.full((B, 16), 0.3), torch.zeros(B, 5)
    m1, m2 = mem1, mem2
    outs = []
    for t in range(x.shape[0]):
        spk2, m2, m1 = net(x[t], m1, m2)
        outs.append((spk2, m2, m1))
    ref = [torch.stack(o) for o in zip(*outs)]
    conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and len(report.converted) == 2
    assert isinstance(conv.lif1.threshold, nn.Parameter) and conv.lif1.threshold.shape == (16,)
    got = conv(x, mem1, mem2)
    assert ref[0].sum() > 0 and torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    gs = [torch.randn_like(r) for r in ref]
    sum((r * g).sum() for r, g in zip(ref, gs)).backward()
    sum((o * g).sum() for o, g in zip(got, gs)).backward()
    for a, b in (("lif1.threshold", "lif1.threshold"), ("lif1.alpha", "lif1.beta"),
                 ("fc1.weight", "fc1.weight")):
        r = net.get_parameter(b).grad
        d = conv.get_parameter(a).grad
        assert float((d - r).abs().max()) <= 1e-4 * float(r.abs().max()), a


class WithSynaptic(nn.Module):
    """A Synaptic with reset "zero" (snnTorch zeroes the whole new membrane after a spike: not
    sparsegrad's zero reset) before a Leaky."""

    def __init__(self, syn_reset="zero", **kw):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.syn = snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True,
                                reset_mechanism=syn_reset)
        self.fc2 = nn.Linear(16, 5)
        self.lif = snn.Leaky(beta=0.7, init_hidden=True, **kw)

    def forward(self, x):
        return self.lif(self.fc2(self.syn(self.fc1(x))))


@pytest.mark.parametrize("kw,word", [({}, None), ({"reset_delay": False}, "reset_delay")])
def test_unsupported_neurons_are_stepped_with_their_state(kw, word):
    torch.manual_seed(7)
    net = _boost(WithSynaptic(**kw), fc1=3.0, fc2=3.0)
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    names = [n for n, _ in report.skipped]
    assert "syn" in names and not report.exact
    if word:
        assert "lif" in names and word in dict(report.skipped)["lif"]
    x = _spikes(3, (T * 4, B, 20))
    ref = _run_steps(net, x)
    got = conv(x)
    assert ref.sum() > 0 and torch.equal(got, ref)
    # running twice restarts the stepped neurons from rest
    assert torch.equal(conv(x), ref)


class OwnTimeLoop(nn.Module):
    def __init__(self, **lif1):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.lif1 = snn.Leaky(**{"beta": 0.9, **lif1})

    def forward(self, x):
        mem = self.lif1.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk, mem = self.lif1(self.fc1(x[t]), mem)
            out.append(spk)
        return torch.stack(out)


NUM_STEPS = 5


class UnrolledLoop(OwnTimeLoop):
    def forward(self, x):
        mem = self.lif1.init_leaky()
        out = []
        for t in range(NUM_STEPS):
            spk, mem = self.lif1(self.fc1(x[t]), mem)
            out.append(spk)
        return torch.stack(out)


@pytest.mark.parametrize("cls", [OwnTimeLoop, UnrolledLoop])
def test_forward_with_its_own_time_loop_is_lifted(cls):
    torch.manual_seed(3)
    net = _boost(cls(), fc1=3.0)
    x = _spikes(2, (NUM_STEPS, B, 20))
    conv, report = sparsegrad.convert(net, return_report=True, backward="dense")
    assert report.forward_followed is True and report.exact
    assert any("its own time loop" in n for n in report.notes)
    assert isinstance(conv, SequenceForward) and isinstance(conv.fc1, LIF)
    ref = net(x)
    assert ref.sum() > 0 and torch.equal(conv(x), ref)


class Accumulating(OwnTimeLoop):
    def forward(self, x):
        mem = self.lif1.init_leaky()
        total = 0
        for t in range(NUM_STEPS):
            spk, mem = self.lif1(self.fc1(x[t]), mem)
            total = total + spk
        return total


def test_loop_with_data_flow_outside_the_neurons_is_refused_clearly():
    conv, report = sparsegrad.convert(Accumulating(), return_report=True)
    assert report.forward_followed is False and not isinstance(conv, SequenceForward)
    assert any("outside the neurons" in n for n in report.notes)
    # the converted model's own forward would feed one step to sequence layers: it refuses
    with pytest.raises(ConversionError, match="SequenceModel"):
        conv(torch.zeros(NUM_STEPS, B, 20))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.lif(self.fc(x))


def test_control_flow_on_values_is_refused_with_the_reason():
    with pytest.raises(ConversionError, match="control flow|cannot be traced"):
        from sparsegrad.conversion_fx import trace_step
        trace_step(DataDependent())


class StateFromOtherValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x):
        cur = self.fc(x)
        return self.lif(cur, 0.5 * cur)


def test_state_computed_inside_forward_is_refused():
    from sparsegrad.conversion_fx import convert_traced  # noqa: F401
    conv, report = sparsegrad.convert(StateFromOtherValues(), return_report=True)
    assert report.forward_followed is False
    assert any("passed as the state" in n for n in report.notes)


def test_batchnorm_is_stepped_in_training_and_folded_in_eval():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.lif = snn.Leaky(beta=0.5, init_hidden=True)

        def forward(self, x):
            return self.lif(self.bn(self.conv(x)))

    torch.manual_seed(8)
    net = Net()
    conv = sparsegrad.convert(net, backward="dense")
    x = torch.rand(T, B, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
    for train in (True, False):
        net.train(train)
        conv.train(train)
        ref = _run_steps(net, x)
        got = conv(x)
        assert ref.sum() > 0
        torch.testing.assert_close(got, ref)
    assert isinstance(conv.bn, nn.BatchNorm2d)  # not wrapped: the graph decides per call
    assert not isinstance(conv.bn, StepByStep)


# ------------------------------------------------------------------- convert(..., example_input)

def test_example_input_check_passes_and_is_reported():
    torch.manual_seed(1)
    net = _boost(HiddenCSNN(), conv1=2.0, conv2=2.0, fc1=3.0)
    conv, report = sparsegrad.convert(net, example_input=_images(2), return_report=True)
    assert report.exact and "2 output tensor(s), 1 of spikes equal" in report.checked
    assert "stepped over time" in report.checked and "checked:" in str(report)
    # a stepped (unsupported) neuron: exact because checked
    net = _boost(WithSynaptic(), fc1=3.0, fc2=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, example_input=_spikes(0, (T, B, 20)),
                                          return_report=True)
    assert report.skipped and report.exact and report.checked


class OutOfOrder(nn.Module):
    """A time-loop forward that calls its layers in another order than they were registered."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(16, 16)
        self.lif2 = snn.Leaky(beta=0.8, init_hidden=True)
        self.fc1 = nn.Linear(16, 16)
        self.lif1 = snn.Leaky(beta=0.9, init_hidden=True)

    def forward(self, x):
        utils.reset(self)
        out = []
        for t in range(x.shape[0]):
            out.append(self.lif2(self.fc2(self.lif1(self.fc1(x[t])))))
        return torch.stack(out)


class OutOfOrderSum(OutOfOrder):
    def forward(self, x):
        utils.reset(self)
        total = 0
        for t in range(x.shape[0]):
            total = total + self.lif2(self.fc2(self.lif1(self.fc1(x[t]))))
        return total


def test_example_input_catches_a_model_that_would_differ():
    torch.manual_seed(2)
    net = _boost(OutOfOrder(), fc1=3.0, fc2=3.0)
    x = _spikes(1, (T * 3, B, 16))
    # the loop is lifted: the forward's own order is followed
    conv, report = sparsegrad.convert(net, return_report=True, example_input=x)
    assert report.forward_followed is True and report.checked
    assert torch.equal(conv(x), net(x))
    # not lifted (data flows from step to step outside the neurons): registration order, which
    # example_input shows to differ
    net = _boost(OutOfOrderSum(), fc1=3.0, fc2=3.0)
    conv, report = sparsegrad.convert(net, return_report=True)  # unchecked: only a note
    assert report.forward_followed is False
    with pytest.raises(ConversionError, match="differ|does not match"):
        sparsegrad.convert(net, example_input=x)


def test_example_input_is_validated():
    with pytest.raises(ValueError, match="example_input"):
        sparsegrad.convert(MLP(), example_input=torch.zeros(3))
    with pytest.raises(ValueError, match="states as inputs"):
        sparsegrad.convert(StatePassing(), example_input=torch.zeros(T, B, 20))


def test_neuron_parameters_are_read_under_sparsegrads_names():
    """The rule reads per-neuron / learnable parameters and alpha_syn under sparsegrad's names
    (alpha = beta, alpha_syn = snnTorch's alpha, threshold) and builds them as tensors."""
    from sparsegrad.conversion import NEURON_RULES, _rule_for
    leaky = snn.Leaky(beta=torch.full((8,), 0.9), learn_threshold=True)
    spec = _rule_for(leaky)(leaky)
    assert not spec.pending and "alpha" in spec.tensor_params and spec.learnable == ["threshold"]
    assert any("sparsegrad's alpha" in n for n in spec.parameters) and not spec.notes
    m = spec.neuron(0.2, "sparse")
    assert isinstance(m.threshold, nn.Parameter) and not isinstance(m.alpha, nn.Parameter)
    assert torch.equal(m.alpha, torch.full((8,), 0.9))
    syn = snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)
    spec = _rule_for(syn)(syn)
    assert spec.alpha_syn == pytest.approx(0.8) and spec.alpha == pytest.approx(0.9)
    assert not spec.pending and spec.neuron(0.2, "sparse").alpha_syn == pytest.approx(0.8)
    assert ("snntorch", "Synaptic") in NEURON_RULES


class SynapticNet(nn.Module):
    """Linear -> Synaptic -> Linear -> Synaptic, with the neurons' state internal (init_hidden)
    or returned as (spk, syn, mem) tuples of which the forward passes the spikes on."""

    def __init__(self, init_hidden=True, reset="subtract", learn=False, per_neuron=False):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv_like = nn.ReLU()
        kw = dict(init_hidden=init_hidden, reset_mechanism=reset,
                  spike_grad=snn.surrogate.fast_sigmoid(slope=4.0))
        if learn:
            kw.update(learn_alpha=True, learn_beta=True, learn_threshold=True)

        def params(n):
            if not per_neuron:
                return dict(alpha=0.8, beta=0.9, threshold=1.0)
            return dict(alpha=0.5 + 0.4 * torch.rand(n, generator=g),
                        beta=0.6 + 0.35 * torch.rand(n, generator=g),
                        threshold=0.7 + 0.6 * torch.rand(n, generator=g))

        self.syn1 = snn.Synaptic(**params(16), **kw)
        self.syn2 = snn.Synaptic(**params(8), **kw)
        self.init_hidden = init_hidden

    def forward(self, x):
        # the ReLU keeps fc1 apart from syn1 (an LIFNeuron); fc2 + syn2 fuse into one LIF
        if self.init_hidden:
            return self.syn2(self.fc2(self.syn1(self.conv_like(self.fc1(x)))))
        s1 = self.syn1(self.conv_like(self.fc1(x)))[0]
        return self.syn2(self.fc2(s1))[0]


@pytest.mark.parametrize("init_hidden", [True, False])
@pytest.mark.parametrize("reset", ["subtract", "none"])
@pytest.mark.parametrize("learn,per_neuron", [(False, False), (True, False), (True, True)])
def test_snntorch_synaptic_converts_exactly(init_hidden, reset, learn, per_neuron):
    """Synaptic -> sparsegrad's synaptic current (alpha_syn): the same spikes, the gradients of
    alpha / beta / threshold mapped onto alpha_syn / alpha / threshold."""
    torch.manual_seed(7)
    net = _boost(SynapticNet(init_hidden, reset, learn, per_neuron), fc1=2.0, fc2=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
    assert report.exact and not report.skipped and len(report.converted) == 2
    assert all(p.kind == "snntorch.Synaptic" for p in report.converted)
    # fc2 feeds only syn2: one fused LIF with the synaptic current; syn1 runs after the ReLU
    assert isinstance(conv.fc2, LIF) and conv.fc2.alpha_syn is not None
    assert isinstance(conv.syn1, LIFNeuron) and conv.syn1.alpha_syn is not None
    for p in conv.parameters():
        p.grad = None
    x = _spikes(2, (T * 5, B, 20))
    ref = _run_steps(net, x)
    got = conv(x)
    assert ref.sum() > 0 and torch.equal(got, ref)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (got * g).sum().backward()
    names = {"fc2.weight": "fc2.weight", "fc2.bias": "fc2.bias", "fc1.module.weight": "fc1.weight",
             "fc1.module.bias": "fc1.bias", "fc1.weight": "fc1.weight", "fc1.bias": "fc1.bias",
             "fc2.alpha": "syn2.beta", "fc2.alpha_syn": "syn2.alpha",
             "fc2.threshold": "syn2.threshold", "syn1.alpha": "syn1.beta",
             "syn1.alpha_syn": "syn1.alpha", "syn1.threshold": "syn1.threshold"}
    ref_p = dict(net.named_parameters())
    got_p = dict(conv.named_parameters())
    assert {names[k] for k in got_p} == set(ref_p)  # learnable iff the original's are
    for k, p in got_p.items():
        r = ref_p[names[k]].grad
        assert r is not None and p.grad is not None and r.abs().max() > 0, k
        assert float((p.grad.reshape(r.shape) - r).abs().max()) <= 1e-4 * float(r.abs().max()), k


def test_snntorch_synaptic_that_cannot_convert_is_stepped_and_listed():
    """reset "zero" (another model), output=True (its syn sequence is returned), the state
    passed in: left in place, stepped, with the reason."""
    torch.manual_seed(7)
    cases = [(SynapticNet(reset="zero"), "zeroes the whole new membrane")]
    out_net = SynapticNet()
    out_net.syn2 = snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True, output=True)
    cases.append((out_net, "synaptic current's sequence"))
    for net, word in cases:
        _boost(net, fc1=2.0, fc2=3.0)
        with pytest.warns(UserWarning, match="left unchanged"):
            conv, report = sparsegrad.convert(net, backward="dense", return_report=True)
        reasons = dict(report.skipped)
        assert "syn2" in reasons and word in reasons["syn2"], reasons
        x = _spikes(4, (T * 3, B, 20))
        ref = _run_steps(net, x)
        got = conv(x)
        ref, got = (ref if isinstance(ref, tuple) else (ref,)), (got if isinstance(got, tuple)
                                                                 else (got,))
        assert ref[0].sum() > 0 and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_converted_class_model_deepcopies_and_pickles():
    import copy
    import pickle
    torch.manual_seed(1)
    net = _boost(HiddenCSNN(), conv1=2.0, conv2=2.0, fc1=3.0)  # F.max_pool2d: a torch closure
    conv = sparsegrad.convert(net)
    x = _images(3)
    want = conv(x)
    for other in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        got = other(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_delta_leaky_is_stepped_with_its_nested_output():
    if not hasattr(snn, "DeltaLeaky"):
        pytest.skip("snnTorch without DeltaLeaky")
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(16, 16), snn.DeltaLeaky(beta=0.9, init_hidden=True))
    x = torch.rand(T, B, 16) * 3
    with pytest.warns(UserWarning, match="left unchanged"):
        conv = sparsegrad.convert(net)
    # a fresh neuron starts from rest (utils.reset walks every Leaky ever made: not used here)
    outs = [net(x[t]) for t in range(T)]
    ref = torch.utils._pytree.tree_map(lambda *p: torch.stack(p), *outs)
    got = conv(x)
    assert len(torch.utils._pytree.tree_leaves(got)) == len(torch.utils._pytree.tree_leaves(ref))
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
        assert torch.equal(a, b)


class LoopCSNN(nn.Module):
    """snnTorch tutorial 6's CSNN with the tutorial's own time loop over the same image
    (state carried by mem1..mem3); `pool` says how each conv is pooled before its neuron."""

    def __init__(self, pool="F.max_pool2d", stride=1, padding=0):
        super().__init__()
        sg = snn.surrogate.fast_sigmoid(slope=25)
        self.pool = pool
        self.conv1 = nn.Conv2d(1, 6, 5, stride=stride, padding=padding)
        self.lif1 = snn.Leaky(beta=0.5, spike_grad=sg)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.lif2 = snn.Leaky(beta=0.5, spike_grad=sg)
        self.mp = nn.MaxPool2d(2)
        self.ap = nn.AvgPool2d(2)
        side = ((28 + 2 * padding - 5) // stride + 1) // 2 // 2  # after both poolings
        self.fc1 = nn.Linear(8 * side * side, 10)
        self.lif3 = snn.Leaky(beta=0.5, spike_grad=sg)

    def _pool(self, y):
        if self.pool == "F.max_pool2d":
            return F.max_pool2d(y, 2)
        if self.pool == "F.avg_pool2d":
            return F.avg_pool2d(y, kernel_size=2, stride=2)
        if self.pool == "nn.MaxPool2d":
            return self.mp(y)
        if self.pool == "nn.AvgPool2d":
            return self.ap(y)
        if self.pool == "overlapping":  # stride 1: not ConvLIF's pooling
            return F.max_pool2d(y, 2, 1)
        raise ValueError(self.pool)

    def forward(self, x):
        mem1, mem2, mem3 = self.lif1.init_leaky(), self.lif2.init_leaky(), self.lif3.init_leaky()
        spk_rec = []
        for _ in range(NUM_STEPS):
            spk1, mem1 = self.lif1(self._pool(self.conv1(x)), mem1)
            spk2, mem2 = self.lif2(self._pool(self.conv2(spk1)), mem2)
            spk3, mem3 = self.lif3(self.fc1(spk2.view(x.size(0), -1)), mem3)
            spk_rec.append(spk3)
        return torch.stack(spk_rec)


@pytest.mark.parametrize("pool,stride,padding", [
    ("F.max_pool2d", 1, 0), ("F.avg_pool2d", 1, 0), ("nn.MaxPool2d", 1, 0),
    ("nn.AvgPool2d", 2, 2)])
@pytest.mark.parametrize("backward", ["dense", "sparse"])
def test_class_csnn_conv_pool_neuron_becomes_conv_lif(pool, stride, padding, backward):
    """conv -> pool -> Leaky in a class forward (functional or module pooling) is one ConvLIF:
    the original's spikes; dense-mode gradients within 1e-4 of snnTorch's."""
    torch.manual_seed(7)
    net = _boost(LoopCSNN(pool, stride, padding), conv1=3.0, conv2=2.0, fc1=3.0)
    x = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(8)) * 2
    conv, report = sparsegrad.convert(net, backward=backward, example_input=x,
                                      return_report=True)
    assert report.exact
    fused = {p.linear: p.to for p in report.converted}
    assert fused.get("conv1") == "ConvLIF" and fused.get("conv2") == "ConvLIF"
    for name in ("conv1", "conv2"):
        assert isinstance(getattr(conv, name), ConvLIF)
        assert getattr(conv, name).pool == ("max" if "ax" in pool else "avg")
    ref = net(x)
    got = conv(x)
    assert ref.sum() > 0 and torch.equal(got, ref)
    if backward == "dense":
        g = torch.randn_like(ref)
        (ref * g).sum().backward()
        (got * g).sum().backward()
        _grads_close(conv, net)
    # the original's parameter names: its weights load into the converted model
    conv.load_state_dict(net.state_dict(), strict=False)


def test_conv_runs_that_conv_lif_cannot_compute_stay_exact():
    """Overlapping pooling (stride 1) is not ConvLIF's: not fused; the convolution and the
    pooling run over all steps, the neuron is a LIFNeuron, the spikes are the same."""
    torch.manual_seed(9)
    net = _boost(LoopCSNN("overlapping"), conv1=3.0, conv2=2.0, fc1=3.0)
    net.fc1 = nn.Linear(8 * 22 * 22, 10)  # 28 -> conv 24 -> pool 23 -> conv 23 -> pool 22
    x = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(10)) * 2
    conv, report = sparsegrad.convert(net, example_input=x, return_report=True)
    assert report.exact and not any(p.to == "ConvLIF" for p in report.converted)
    assert isinstance(conv.lif1, LIFNeuron)
    assert torch.equal(conv(x), net(x))
