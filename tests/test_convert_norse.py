"""sparsegrad.convert on Norse models: SequentialState and cells in a model's own forward.

Norse cells take (input, state) per step; the references below run them the Norse way (state
carried by the caller's loop). LIFBoxCell converts (SpikingJellyNeuron: the same update, reset in
the same step with its gradient); LIFCell (synaptic current), LICell / LIBoxCell and
LIFRecurrentCell are kept and stepped with their state.
"""
import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad.conversion import SpikingJellyNeuron
from sparsegrad.conversion_norse import NorseSequence

norse = pytest.importorskip("norse.torch")

T, B = 30, 3


def _spikes(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.3).float()


def _loop(seq, x):
    state, outs = None, []
    for t in range(x.shape[0]):
        out, state = seq(x[t], state)
        outs.append(out)
    return torch.stack(outs)


def _cell_loop(cell, x):
    state, outs = None, []
    for t in range(x.shape[0]):
        z, state = cell(x[t], state)
        outs.append(z)
    return torch.stack(outs)


def _grads_close(conv, net, rtol=1e-4):
    ref = dict(net.named_parameters())
    mine = dict(conv.named_parameters())
    assert set(mine) <= set(ref)
    for name, p in mine.items():
        r = ref[name].grad
        assert r is not None and float(r.abs().max()) > 0, name
        assert float((p.grad - r).abs().max()) <= rtol * float(r.abs().max()), name


def _boost(seq, factor=16.0):
    with torch.no_grad():
        for m in seq.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(factor)
    return seq


@pytest.mark.parametrize("reset", ["value", "subtract"])
def test_sequential_state_lif_box_converts_and_the_rest_is_stepped(reset):
    torch.manual_seed(0)
    reset_fn = getattr(__import__("norse.torch.functional.reset", fromlist=["x"]),
                       f"reset_{reset}")
    p = norse.LIFBoxParameters(reset_method=reset_fn)
    seq = _boost(norse.SequentialState(
        nn.Linear(20, 16), norse.LIFBoxCell(p), nn.Linear(16, 12), norse.LIFCell(),
        nn.Linear(12, 4), norse.LICell()))
    x = _spikes(0, (T, B, 20))
    ref = _loop(seq, x)
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(seq, backward="dense", return_report=True)
    assert isinstance(conv, NorseSequence) and isinstance(conv[1], SpikingJellyNeuron)
    assert [n for n, _ in report.skipped] == ["3", "5"]
    assert "synaptic current" in dict(report.skipped)["3"]
    assert "one step late" in dict(report.skipped)["3"]  # not alpha_syn's model
    assert report.converted[0].surrogate == "fast_sigmoid" and report.converted[0].slope == 1.0
    # the converted layer's spikes (away from the threshold by more than rounding: checked)
    hidden_ref, s = [], None
    mem_ref = []
    for t in range(T):
        z, s = seq[1](seq[0](x[t]), s)
        hidden_ref.append(z)
    hidden_ref = torch.stack(hidden_ref)
    assert 0.02 < hidden_ref.mean() < 0.8
    hidden = conv[1](conv[0](x))
    assert torch.equal(hidden, hidden_ref)
    got, state = conv(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert state[1] is None and state[3] is not None  # stepped cells hand back their state
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (got * g).sum().backward()
    _grads_close(conv, seq)


def test_sequential_state_example_input_check():
    torch.manual_seed(1)
    seq = _boost(norse.SequentialState(nn.Linear(20, 16), norse.LIFBoxCell(),
                                       nn.Linear(16, 4), norse.LIFBoxCell()))
    conv, report = sparsegrad.convert(seq, example_input=_spikes(1, (T, B, 20)),
                                      return_report=True)
    assert report.exact and "SequentialState stepped" in report.checked
    assert len(report.converted) == 2


def test_unsupported_norse_parameters_are_stepped_with_state():
    torch.manual_seed(2)
    cell = norse.LIFBoxCell(norse.LIFBoxParameters(v_leak=torch.as_tensor(0.1)))
    seq = _boost(norse.SequentialState(nn.Linear(10, 8), cell,
                                       nn.Linear(8, 8), norse.LIFRecurrentCell(8, 6)))
    x = _spikes(2, (T, B, 10))
    ref = _loop(seq, x)
    assert ref.sum() > 0
    with pytest.warns(UserWarning):
        conv, report = sparsegrad.convert(seq, return_report=True)
    reasons = dict(report.skipped)
    assert "v_leak" in reasons["1"] and "recurrent" in reasons["3"]
    got, _ = conv(x)
    assert torch.equal(got, ref)


class CellNet(nn.Module):
    """Norse cells in a model's own per-step forward, the state passed in and out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.lif1 = norse.LIFBoxCell()
        self.fc2 = nn.Linear(16, 4)
        self.lif2 = norse.LIFCell()

    def forward(self, x, s1, s2):
        z, s1 = self.lif1(self.fc1(x), s1)
        z, s2 = self.lif2(self.fc2(z), s2)
        return z, s1, s2


class StatelessCall(nn.Module):
    """A cell called without its state: Norse starts it from rest at every call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 8)
        self.lif = norse.LIFBoxCell(norse.LIFBoxParameters(tau_mem_inv=torch.as_tensor(900.0)))

    def forward(self, x):
        z, _ = self.lif(self.fc(x))
        return z


def test_cells_in_a_class_forward_keep_their_state():
    torch.manual_seed(3)
    net = _boost(CellNet())
    x = _spikes(3, (T, B, 20))
    s1 = s2 = None
    outs = []
    for t in range(T):
        z, s1, s2 = net(x[t], s1, s2)
        outs.append(z)
    ref = torch.stack(outs)
    assert ref.sum() > 0
    with pytest.warns(UserWarning, match="left unchanged"):
        conv, report = sparsegrad.convert(net, return_report=True)
    got = conv(x, None, None)
    assert torch.equal(got[0], ref)

    net = _boost(StatelessCall(), 20.0)
    ref = torch.stack([net(x[t]) for t in range(T)])
    assert ref.sum() > 0
    conv, report = sparsegrad.convert(net, return_report=True)
    assert "lif" in report.folded and report.exact
    assert torch.equal(conv(x), ref)


def test_norse_cell_stepped_by_step_by_step_gets_its_state():
    cell = norse.LICell()
    x = torch.randn(T, B, 5)
    got = sparsegrad.conversion.StepByStep(cell)(x)
    assert torch.equal(got, _cell_loop(cell, x))


class SequenceNet(nn.Module):
    """Norse's tutorial style: modules over whole sequences (LIF loops over time itself)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 8)
        self.lif = norse.LIF()

    def forward(self, x):
        z, _ = self.lif(self.fc(x))
        return z


def test_models_of_norse_sequence_modules_are_kept_whole():
    torch.manual_seed(4)
    x = _spikes(4, (T, B, 20))
    for net in (_boost(SequenceNet()), _boost(norse.SequentialState(
            nn.Linear(20, 8), norse.LIF(), nn.Linear(8, 3), norse.LI()))):
        ref = net(x)
        with pytest.warns(UserWarning, match="runs the whole sequence itself"):
            conv, report = sparsegrad.convert(net, return_report=True)
        assert not report.exact
        got = conv(x)
        leaves = [[t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]
                  for o in (got, ref)]
        assert len(leaves[0]) == len(leaves[1]) > 0
        for a, b in zip(*leaves):
            assert torch.equal(a, b)
        conv, report = sparsegrad.convert(net, example_input=x, return_report=True)
        assert report.exact and "called once on the sequence" in report.checked


class SeqInClass(nn.Module):
    """A SequentialState inside a model class, its state list passed in and out."""

    def __init__(self):
        super().__init__()
        self.seq = norse.SequentialState(nn.Linear(20, 16), norse.LIFBoxCell(),
                                         nn.Linear(16, 4), norse.LICell())

    def forward(self, x, state):
        out, state = self.seq(x, state)
        return out, state


def test_sequential_state_inside_a_class_keeps_its_state():
    torch.manual_seed(5)
    net = _boost(SeqInClass())
    x = _spikes(5, (T, B, 20))
    state, outs = None, []
    for t in range(T):
        out, state = net(x[t], state)
        outs.append(out)
    ref = torch.stack(outs)
    with pytest.warns(UserWarning, match="left unchanged"):  # the LICell readout is stepped
        conv, report = sparsegrad.convert(net, return_report=True)
    assert report.forward_followed and isinstance(conv.seq, NorseSequence)
    got, final = conv(x, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert final[1] is None and final[3] is not None
