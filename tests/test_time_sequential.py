"""sparsegrad.nn.TimeSequential: runs of TimeDistributed layers applied on chunks of time steps
give what applying the layers one after another gives (outputs and gradients), and convert()
returns nn.Sequential models as TimeSequential with the original's children and keys."""
import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad.nn import LIFNeuron, TimeDistributed, TimeSequential
from sparsegrad.nn import _chunkable


def _layers(batch_first=False):
    torch.manual_seed(0)
    td = lambda m: TimeDistributed(m, batch_first=batch_first)  # noqa: E731
    return [
        td(nn.Conv2d(1, 4, 3, padding=1)), td(nn.MaxPool2d(2)), td(nn.ReLU()),
        LIFNeuron(alpha=0.8, backward="dense", batch_first=batch_first),
        td(nn.Conv2d(4, 6, 3)), td(nn.AvgPool2d(2)), td(nn.Flatten()), td(nn.Linear(6, 5)),
    ]


def _run(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=x.dtype).view_as(out))
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("chunk_samples", [1, 4, 7, 1000])
def test_chunked_runs_equal_one_after_another(batch_first, chunk_samples, monkeypatch):
    layers = _layers(batch_first)
    plain = nn.Sequential(*layers).double()
    chunked = TimeSequential(*layers).double()  # the same modules, so the same parameters
    monkeypatch.setattr(TimeSequential, "chunk_samples", chunk_samples)
    T, B = 5, 3  # T not a multiple of the chunk's steps
    x = torch.rand(T, B, 1, 8, 8, dtype=torch.float64) * 3
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    want, want_dx, want_dp = _run(plain, x)
    for p in plain.parameters():
        p.grad = None
    got, got_dx, got_dp = _run(chunked, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_dp, want_dp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_runs_are_chunked_only_for_per_sample_layers(monkeypatch):
    assert _chunkable(TimeDistributed(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())))
    assert not _chunkable(TimeDistributed(nn.Dropout(0.5)))        # masks would be drawn per chunk
    assert not _chunkable(TimeDistributed(nn.BatchNorm1d(3)))      # statistics over the samples
    assert not _chunkable(LIFNeuron(alpha=0.9))

    calls = []
    lin = TimeDistributed(nn.Linear(3, 3))
    lin.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    model = TimeSequential(lin, TimeDistributed(nn.Dropout(0.0)), TimeDistributed(nn.Identity()))
    monkeypatch.setattr(TimeSequential, "chunk_samples", 2)
    model(torch.rand(6, 2, 3))
    assert calls == [6]  # no run of two chunkable layers: Linear is called once on the sequence

    calls.clear()
    model = TimeSequential(lin, TimeDistributed(nn.Identity()))
    model(torch.rand(6, 2, 3))
    assert calls == [1] * 6  # 2 samples per chunk at batch 2: one time step per call


def test_convert_returns_a_time_sequential_with_the_original_keys():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), snn.Leaky(beta=0.5, init_hidden=True),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 5), snn.Leaky(beta=0.5, init_hidden=True))
    converted = sparsegrad.convert(net)
    assert type(converted) is TimeSequential and isinstance(converted, nn.Sequential)
    weights = [k for k in net.state_dict() if k.endswith((".weight", ".bias"))]  # not the neurons' buffers
    assert list(converted.state_dict()) == weights
    converted.load_state_dict({k: net.state_dict()[k] for k in weights})
    # conv -> pool -> Leaky becomes one ConvLIF (issue 20); the other positions keep their keys
    assert isinstance(converted[0], sparsegrad.nn.ConvLIF) and isinstance(converted[2], nn.Identity)
    same = sparsegrad.convert(net, inplace=True)
    assert same is net and type(net) is TimeSequential
    x = torch.rand(4, 2, 1, 8, 8)
    assert converted(x).shape == (4, 2, 5)
    again = sparsegrad.convert(converted)  # converting a converted model changes nothing
    assert type(again) is TimeSequential
    assert torch.equal(again(x), converted(x))
