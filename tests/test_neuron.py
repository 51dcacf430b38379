"""sparsegrad.lif / nn.LIFNeuron (the LIF neuron after any layer) and nn.TimeDistributed.

Every surrogate x reset x backward mode, on [T, B, N] and [T, B, C, H, W], float32 / float64,
against sparsegrad.reference.lif_neuron (spikes and membrane exactly, gradients to round-off).
"""
import copy
import itertools
import math
import pickle

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad import reference as ref
from sparsegrad.nn import LIFNeuron, TimeDistributed
from conftest import DEVICES, TOL, assert_spikes_match

SURROGATES = ["fast_sigmoid", "atan", "sigmoid", "triangle"]
RESETS = ["subtract", "zero", "none"]
SLOPES = {"fast_sigmoid": 10.0, "atan": 2.0, "sigmoid": 5.0, "triangle": 2.0}
SHAPES = [(12, 3, 37), (7, 2, 3, 5, 4)]
ops = torch.ops.sparsegrad


def _current(shape, dtype, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.25).to(dtype)


def _run(fn, current, state=None, **kw):
    """spikes, mem, v_final and the gradients w.r.t. current and v_init for random cotangents."""
    cur = current.clone().requires_grad_(True)
    st = None
    if state is not None:
        st = (state[0].clone().requires_grad_(True), state[1])
    spikes, mem, (v_final, _) = fn(cur, state=st, return_state=True, return_mem=True, **kw)
    g = torch.Generator().manual_seed(7)
    gs = torch.randn(spikes.shape, generator=g, dtype=torch.float64).to(cur.dtype)
    gm = torch.randn(mem.shape, generator=g, dtype=torch.float64).to(cur.dtype) * 0.1
    gv = torch.randn(v_final.shape, generator=g, dtype=torch.float64).to(cur.dtype)
    loss = (spikes * gs).sum() + (mem * gm).sum() + (v_final * gv).sum()
    inputs = [cur] + ([st[0]] if st is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return spikes.detach(), mem.detach(), v_final.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=["TBN", "TBCHW"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_lif_matches_reference(surrogate, reset, backward, shape, dtype, device):
    current = _current(shape, dtype).to(device)
    kw = dict(alpha=0.8, threshold=1.0, b_th=0.3, surrogate=surrogate, slope=SLOPES[surrogate],
              reset=reset, backward=backward)
    B, feat = shape[1], shape[2:]
    state = (_current((B,) + feat, dtype, seed=1, scale=0.5).to(device),
             (torch.rand((B,) + feat, generator=torch.Generator().manual_seed(2)) < 0.3).to(dtype).to(device))
    for st in (None, state):
        out = _run(sparsegrad.lif, current, st, **kw)
        exp = _run(ref.lif_neuron, current, st, **kw)
        assert 0.02 < out[0].mean() < 0.6  # the test exercises spiking
        if device == "cpu":  # the same per-element arithmetic in the same order: the same bits
            assert torch.equal(out[0], exp[0])  # spikes
            assert torch.equal(out[1], exp[1])  # membrane
            assert torch.equal(out[2], exp[2])  # final membrane
        else:  # another device's kernels: spikes off the threshold's rounding, membranes close
            assert_spikes_match(out[0], exp[0], exp[1])
            for a, b in zip(out[1:3], exp[1:3]):
                torch.testing.assert_close(a, b, **TOL[dtype])
        for a, b in zip(out[3], exp[3]):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_infinite_band_equals_dense(surrogate, reset, device):
    current = _current((10, 4, 3, 6), torch.float64, seed=3).to(device)
    kw = dict(alpha=0.9, surrogate=surrogate, slope=SLOPES[surrogate], reset=reset)
    sparse = _run(sparsegrad.lif, current, backward="sparse", b_th=math.inf, **kw)
    dense = _run(sparsegrad.lif, current, backward="dense", **kw)
    assert torch.equal(sparse[0], dense[0])
    torch.testing.assert_close(sparse[3][0], dense[3][0], rtol=1e-13, atol=1e-14)


def test_sparse_keeps_only_active_entries():
    current = _current((20, 5, 40), torch.float64, seed=4)
    out = sparsegrad.ops.lif_neuron_forward(current, None, None, 0.9, 1.0, 0.05, 10.0, True,
                                            "atan", "zero", False)
    spikes, v_final, cnt, idx, sg, rg, rst, mem, stats = out
    assert rg.numel() == 0
    v = ref.lif_neuron(current, alpha=0.9, reset="zero", return_mem=True)[1]
    active = (v - 1.0).abs() < 0.05
    assert cnt.dtype == torch.int32 and cnt.shape == (5 * 20,)
    # rows b*T + t, ascending neuron index within a row
    rows = active.permute(1, 0, 2).reshape(100, 40)
    assert torch.equal(cnt, rows.sum(1).to(torch.int32))
    assert torch.equal(idx.long(), rows.nonzero()[:, 1])
    assert int(stats[1]) == int(active.sum()) and int(stats[0]) == int(spikes.sum())
    # rst_bits row (t, b): S[t-1, b, :], one bit per neuron
    bits = rst.to(torch.int64) & 0xFFFFFFFF
    unpacked = ((bits.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(20, 5, -1)[..., :40]
    prev = torch.cat([torch.zeros_like(spikes[:1]), spikes[:-1]])
    assert torch.equal(unpacked.to(spikes.dtype), prev)
    assert mem.numel() == 0


def _saved_bytes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total, saved


@pytest.mark.parametrize("reset", RESETS)
def test_sparse_saved_bytes_at_most_15_percent_of_dense_bptt(reset):
    torch.manual_seed(0)
    T, B, C, H, W = 25, 8, 8, 12, 12
    current = (torch.randn(T, B, C, H, W) * 0.4 + 0.3).requires_grad_(True)
    # b_th chosen so that about 5 % of the entries are active
    b_th = {"subtract": 0.045, "zero": 0.05, "none": 0.1}[reset]
    kw = dict(alpha=0.9, b_th=b_th, surrogate="atan", slope=2.0, reset=reset)
    layer = LIFNeuron(**kw)
    layer(current)
    assert 0.04 < layer.last_stats.active_fraction < 0.06, layer.last_stats.active_fraction
    sparse_bytes, saved = _saved_bytes(lambda: sparsegrad.lif(current, **kw))
    for t in saved:  # no dense [T, B, ...] float tensor
        assert not (t.is_floating_point() and t.numel() >= current.numel() / 8), t.shape
    dense_bytes, _ = _saved_bytes(lambda: ref.lif_neuron(current, backward="dense", **kw))
    assert sparse_bytes <= 0.15 * dense_bytes, (sparse_bytes, dense_bytes)
    # and the sparse path's own dense mode saves the surrogate everywhere, as dense BPTT does
    assert _saved_bytes(lambda: sparsegrad.lif(current, backward="dense", **kw))[0] >= \
        4 * current.numel()


def test_module_batch_first_state_and_stats():
    current = _current((6, 4, 2, 3, 3), torch.float32, seed=5)
    layer = LIFNeuron(alpha=0.7, surrogate="triangle", slope=2.0, reset="zero", b_th=0.4)
    spikes, state = layer(current, return_state=True)
    assert torch.equal(spikes, ref.lif_neuron(current, alpha=0.7, reset="zero"))
    assert layer.last_stats.numel == current.numel()
    assert int(layer.last_stats.spike_count) == int(spikes.sum())
    bf = LIFNeuron(alpha=0.7, surrogate="triangle", slope=2.0, reset="zero", b_th=0.4,
                   batch_first=True)
    assert torch.equal(bf(current.transpose(0, 1)), spikes.transpose(0, 1))
    # a sequence in two chunks, with the state carried over, equals one call
    first, st = layer(current[:3], return_state=True)
    second = layer(current[3:], state=st)
    assert torch.equal(torch.cat([first, second]), spikes)
    mem_layer = LIFNeuron(alpha=0.7, return_mem=True)
    s, m = mem_layer(current)
    assert torch.equal(m, ref.lif_neuron(current, alpha=0.7, return_mem=True)[1])
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.last_stats is None and torch.equal(other(current), spikes)
    assert "reset='zero'" in repr(layer)


def test_lif_argument_errors():
    current = _current((4, 2, 5), torch.float32)
    with pytest.raises(ValueError, match="surrogate"):
        sparsegrad.lif(current, alpha=0.9, surrogate="triangular")
    with pytest.raises(ValueError, match="reset"):
        sparsegrad.lif(current, alpha=0.9, reset="hard")
    with pytest.raises(ValueError, match="T, B"):
        sparsegrad.lif(current[0], alpha=0.9)
    with pytest.raises(TypeError, match="float32 or float64"):
        sparsegrad.lif(current.to(torch.int32), alpha=0.9)
    with pytest.raises(ValueError, match="alpha"):
        sparsegrad.lif(current, alpha=1.5)
    with pytest.raises(ValueError, match="state.v"):
        sparsegrad.lif(current, alpha=0.9, state=(torch.zeros(3, 5), torch.zeros(2, 5)))
    with pytest.raises(RuntimeError, match="lif_neuron_forward: argument 'surrogate'"):
        ops.lif_neuron_forward(current, None, None, 0.9, 1.0, 0.2, 1.0, True, "x", "subtract",
                               False)
    with pytest.raises(RuntimeError, match="lif_neuron_forward: argument 'reset'"):
        ops.lif_neuron_forward(current, None, None, 0.9, 1.0, 0.2, 1.0, True, "atan", "x", False)
    with pytest.raises(RuntimeError, match="lif_neuron_backward: argument 'act_cnt'"):
        ops.lif_neuron_backward(current, None, None, torch.zeros(3, dtype=torch.int32),
                                torch.zeros(0, dtype=torch.int32), current.new_zeros(0), None,
                                None, 0.9, True, False)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_opcheck_lif_neuron(sparse, requires_grad):
    current = _current((5, 3, 7), torch.float64).requires_grad_(requires_grad)
    v0 = _current((3, 7), torch.float64, seed=3).requires_grad_(requires_grad)
    s0 = torch.zeros(3, 7, dtype=torch.float64)
    for reset, mem in (("subtract", False), ("zero", True), ("none", False)):
        torch.library.opcheck(ops.lif_neuron_forward.default,
                              (current, v0, s0, 0.8, 1.0, 0.5, 5.0, sparse, "atan", reset, mem))
    out = ops.lif_neuron_forward(current.detach(), None, None, 0.8, 1.0, 0.5, 5.0, sparse, "sigmoid",
                                 "zero", False)
    g = torch.randn_like(out[0])
    torch.library.opcheck(ops.lif_neuron_backward.default,
                          (g, torch.randn_like(out[1]), torch.randn_like(g), out[2], out[3], out[4],
                           None, out[6], 0.8, sparse, True))


# ------------------------------------------------------------------------------ TimeDistributed

@pytest.mark.parametrize("batch_first", [False, True])
def test_time_distributed_equals_per_step(batch_first):
    torch.manual_seed(0)
    T, B = 5, 3
    x = torch.randn(T, B, 2, 9, 9, dtype=torch.float64)
    layers = [nn.Conv2d(2, 4, 3, padding=1).double(), nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True),
              nn.BatchNorm2d(2).double().eval(), nn.Flatten(), nn.Identity(), nn.ReLU()]
    for layer in layers:
        td = TimeDistributed(layer, batch_first=batch_first)
        xin = x.transpose(0, 1) if batch_first else x
        y = td(xin)
        per_step = torch.stack([layer(x[t]) for t in range(T)])
        if batch_first:
            per_step = per_step.transpose(0, 1)
        if isinstance(layer, nn.Conv2d):  # T*B samples at once may take another conv algorithm
            torch.testing.assert_close(y, per_step, rtol=1e-12, atol=1e-12)
        else:  # per-element or per-sample arithmetic: the same bits
            assert torch.equal(y, per_step), type(layer).__name__
    lin = TimeDistributed(nn.Linear(6, 3))
    assert lin(torch.randn(T, B, 6)).shape == (T, B, 3)
    assert list(dict(lin.named_parameters())) == ["module.weight", "module.bias"]


def test_time_distributed_state_dict_is_the_wrapped_modules():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    wrapped = nn.Sequential(*[TimeDistributed(copy.deepcopy(m)) for m in plain])
    for p in wrapped.parameters():
        p.data.zero_()
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())  # strict
    for (_, a), (_, b) in zip(plain.state_dict().items(), wrapped.state_dict().items()):
        assert torch.equal(a, b)
    plain2 = copy.deepcopy(plain)
    for p in plain2.parameters():
        p.data.zero_()
    plain2.load_state_dict(wrapped.state_dict())
    assert torch.equal(plain2[3].weight, plain[3].weight)
    with pytest.raises(RuntimeError, match="Unexpected"):
        wrapped.load_state_dict({**plain.state_dict(), "3.extra": torch.zeros(1)})
    again = pickle.loads(pickle.dumps(wrapped))
    again.load_state_dict(plain.state_dict())
    assert list(again.state_dict()) == list(plain.state_dict())


def test_time_distributed_errors():
    td = TimeDistributed(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\]"):
        td(torch.randn(4))
    with pytest.raises(TypeError, match="nn.Module"):
        TimeDistributed(lambda x: x)

    class Tuple(nn.Module):
        def forward(self, x):
            return x, x

    class Reduce(nn.Module):
        def forward(self, x):
            return x.sum(0)

    with pytest.raises(TypeError, match="one tensor"):
        TimeDistributed(Tuple())(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="batch dimension"):
        TimeDistributed(Reduce())(torch.randn(2, 3, 4))


def test_conv_neuron_stack_trains_end_to_end():
    torch.manual_seed(0)
    net = nn.Sequential(TimeDistributed(nn.Conv2d(1, 4, 3, padding=1)), LIFNeuron(alpha=0.9, b_th=0.5),
                        TimeDistributed(nn.MaxPool2d(2)), TimeDistributed(nn.Flatten()),
                        sparsegrad.nn.LIF(4 * 4 * 4, 5, alpha=0.9))
    x = (torch.rand(8, 6, 1, 8, 8) < 0.3).float()
    net(x).sum().backward()
    assert net[0].module.weight.grad is not None and net[4].weight.grad is not None


# ------------------------------------------------------------------------------ emulated CUDA

from test_cuda_emul import emul, launch  # noqa: E402,F401  (the emulation build and its settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("reset", RESETS)
def test_emul_lif_neuron_equals_cpu_kernel(emul, launch, reset, sparse, dtype):
    """The CUDA kernels (run by the host emulation) give the CPU kernel's results bit for bit."""
    T, B, N = 9, 3, 70  # N not a multiple of 32: the last reset word is partial
    current = _current((T, B, N), dtype, seed=8)
    v0 = _current((B, N), dtype, seed=9, scale=0.5)
    s0 = (torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.3).to(dtype)
    g = torch.Generator().manual_seed(5)
    gs = torch.randn(T, B, N, generator=g, dtype=torch.float64).to(dtype)
    gm = torch.randn(T, B, N, generator=g, dtype=torch.float64).to(dtype)
    gv = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    for surrogate, order, threads in itertools.product(SURROGATES, ["forward", "shuffled"], [0, 32]):
        launch(order=order, threads=threads, max_blocks=3 if threads else 0)
        for state, mem in (((None, None), False), ((v0, s0), True)):
            args = (current, *state, 0.85, 1.0, 0.3, SLOPES[surrogate], sparse, surrogate, reset, mem)
            want = ops.lif_neuron_forward(*args)
            got = emul.lif_neuron_forward(*args)
            for name, a, b in zip(["spikes", "v_final", "act_cnt", "act_idx", "act_sg", "act_rg",
                                   "rst_bits", "mem", "stats"], got, want):
                assert torch.equal(a, b), name
            bwd = (gs, gv, gm if mem else None, want[2], want[3], want[4], None,
                   want[6] if reset == "zero" else None, 0.85, sparse, True)
            for a, b, name in zip(emul.lif_neuron_backward(*bwd), ops.lif_neuron_backward(*bwd),
                                  ["grad_current", "dv_init"]):
                assert torch.equal(a, b), name
    assert want[0].sum() > 0


def test_emul_lif_neuron_schema_matches(emul):
    assert str(emul.lif_neuron_forward.default._schema).split("(", 1)[1] == \
        str(ops.lif_neuron_forward.default._schema).split("(", 1)[1]
    assert str(emul.lif_neuron_backward.default._schema).split("(", 1)[1] == \
        str(ops.lif_neuron_backward.default._schema).split("(", 1)[1]


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dynamics,reset,detach", [
    ("sj_lif_decay_input", "zero", False), ("sj_lif", "subtract", True),
    ("sj_if", "subtract", False), ("sj_lif_decay_input", "zero", True)])
def test_emul_spikingjelly_dynamics_equal_cpu_kernel(emul, launch, dynamics, reset, detach, sparse):
    T, B, N = 7, 2, 45
    dtype = torch.float32
    current = _current((T, B, N), dtype, seed=11, scale=0.8)
    v0 = _current((B, N), dtype, seed=12, scale=0.3)
    g = torch.Generator().manual_seed(6)
    gs = torch.randn(T, B, N, generator=g)
    gv = torch.randn(B, N, generator=g)
    launch(order="shuffled", threads=16, max_blocks=2)
    alpha = 1.0 if dynamics == "sj_if" else 1 - 1 / 2.5
    args = (current, v0, None, alpha, 1.0, 0.3, 4.0, sparse, "sigmoid", reset, False, dynamics,
            2.5, 0.25 if reset == "zero" else 0.0, detach)
    want = ops.lif_neuron_forward(*args)
    got = emul.lif_neuron_forward(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert want[0].sum() > 0 and (want[5].numel() > 0) == (not detach)
    bwd = (gs, gv, None, want[2], want[3], want[4], want[5] if not detach else None,
           want[6] if reset == "zero" else None, alpha, sparse, True, dynamics, 1 / 2.5)
    for a, b in zip(emul.lif_neuron_backward(*bwd), ops.lif_neuron_backward(*bwd)):
        assert torch.equal(a, b)


SJ_DYNAMICS = [("sj_lif_decay_input", 2.5), ("sj_lif", 3.0), ("sj_if", 2.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("dynamics,tau", SJ_DYNAMICS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_spikingjelly_dynamics_on_every_device(surrogate, dynamics, tau, reset, detach, sparse, device):
    """The SpikingJelly dynamics (and their reset-gradient paths) of the neuron op on `device`
    against the CPU kernel and reference.spikingjelly_neuron: every surrogate x reset x dynamics."""
    T, B, N = 9, 3, 41
    dtype = torch.float64
    x = _current((T, B, N), dtype, seed=21, scale=0.9) + 0.5
    v_reset = 0.25 if reset == "zero" else None
    alpha = 1.0 if dynamics == "sj_if" else 1 - 1 / tau
    v0 = torch.full((B, N), 0.0 if v_reset is None else v_reset, dtype=dtype)  # V[-1] = V_reset
    args = (None, alpha, 1.0, 0.4, SLOPES[surrogate], sparse, surrogate, reset, False,
            dynamics, tau, 0.0 if v_reset is None else v_reset, detach)
    want = ops.lif_neuron_forward(x, v0, *args)
    got = ops.lif_neuron_forward(x.to(device), v0.to(device), *args)
    assert 0.05 < float(want[0].mean()) < 0.9
    # H[t], the pre-reset membrane, from the wanted spikes (SpikingJelly's charge and reset)
    vr = 0.0 if v_reset is None else v_reset
    v, h = torch.full((B, N), vr, dtype=dtype), []
    for x_t, s_t in zip(x, want[0]):
        if dynamics == "sj_if":
            h.append(v + x_t)
        elif dynamics == "sj_lif_decay_input":
            h.append(v + (x_t - (v - vr)) / tau)
        else:
            h.append(v - (v - vr) / tau + x_t)
        v = h[-1] - s_t if v_reset is None else s_t * vr + (1 - s_t) * h[-1]
    assert_spikes_match(got[0].cpu(), want[0], torch.stack(h))
    torch.testing.assert_close(got[1].cpu(), want[1], **TOL[dtype])  # V after the last step
    rows = dict(tau=None if dynamics == "sj_if" else tau, decay_input=dynamics == "sj_lif_decay_input",
                v_reset=v_reset, surrogate=surrogate, slope=SLOPES[surrogate], detach_reset=detach)
    spk, _ = ref.spikingjelly_neuron(x, threshold=1.0, **rows)
    assert_spikes_match(want[0], spk, torch.stack(h))  # (the kernel may order the charge otherwise)
    g = torch.Generator().manual_seed(8)
    gs = torch.randn(T, B, N, generator=g, dtype=dtype)
    bwd = [gs, None, None, want[2], want[3], want[4], want[5] if not detach else None,
           want[6] if reset == "zero" else None, alpha, sparse, False, dynamics,
           1 / tau if dynamics == "sj_lif_decay_input" else 1.0]
    want_g = ops.lif_neuron_backward(*bwd)
    got_g = ops.lif_neuron_backward(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in bwd])
    torch.testing.assert_close(got_g[0].cpu(), want_g[0], **TOL[dtype])
    xr = x.clone().requires_grad_(True)
    b_th = 0.4 if sparse else math.inf
    spk_r, _ = ref.spikingjelly_neuron(xr, threshold=1.0, b_th=b_th,
                                       backward="sparse" if sparse else "dense", **rows)
    (grad_ref,) = torch.autograd.grad((spk_r * gs).sum(), [xr])
    torch.testing.assert_close(got_g[0].cpu(), grad_ref, **TOL[dtype])


def test_opcheck_spikingjelly_dynamics():
    current = _current((5, 3, 7), torch.float64).requires_grad_(True)
    v0 = _current((3, 7), torch.float64, seed=3).requires_grad_(True)
    for sparse in (True, False):
        torch.library.opcheck(ops.lif_neuron_forward.default,
                              (current, v0, None, 0.5, 1.0, 0.5, 4.0, sparse, "sigmoid", "zero",
                               False, "sj_lif_decay_input", 2.0, 0.0, False))
    with pytest.raises(RuntimeError, match="argument 'dynamics'"):
        ops.lif_neuron_forward(current.detach(), None, None, 0.5, 1.0, 0.5, 4.0, True, "sigmoid",
                               "zero", False, "sj", 2.0, 0.0, False)
    with pytest.raises(RuntimeError, match="argument 'reset'"):
        ops.lif_neuron_forward(current.detach(), None, None, 0.5, 1.0, 0.5, 4.0, True, "sigmoid",
                               "none", False, "sj_lif", 2.0, 0.0, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lif_half_types_run_the_float32_kernel(dtype):
    current = _current((9, 3, 2, 4, 4), torch.float32, seed=13).to(dtype)
    kw = dict(alpha=0.85, surrogate="atan", slope=2.0, reset="zero", b_th=0.3)
    a = current.clone().requires_grad_(True)
    b = current.float().requires_grad_(True)
    sa, sb = sparsegrad.lif(a, **kw), sparsegrad.lif(b, **kw)
    assert sa.dtype == dtype and torch.equal(sa.float(), sb)
    g = torch.randn(sb.shape, generator=torch.Generator().manual_seed(1))
    (sa.float() * g).sum().backward()
    (sb * g).sum().backward()
    assert a.grad.dtype == dtype
    # the saved surrogate values are rounded to the half type too: a few of its ulps
    tol = 6e-2 if dtype == torch.bfloat16 else 8e-3
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=tol,
                               atol=tol * float(b.grad.abs().max()))


def test_backward_refuses_a_corrupt_active_set():
    """The sparse backward indexes and binary-searches the active set's columns: an index out of
    range or out of order within its row is refused with the argument's name, not followed."""
    T, B, N = 6, 2, 40
    current = _current((T, B, N), torch.float64, seed=4, scale=2.0)
    out = ops.lif_neuron_forward(current, None, None, 0.85, 1.0, 0.5, 4.0, True, "fast_sigmoid",
                                 "subtract", False)
    cnt, idx, sg = out[2], out[3], out[4]
    gs = torch.ones(T, B, N, dtype=torch.float64)
    row = int(torch.nonzero(cnt.flatten() >= 2)[0])  # a row with two entries or more
    first = int(cnt.flatten()[:row].sum())

    def backward(bad_idx):
        return ops.lif_neuron_backward(gs, None, None, cnt, bad_idx, sg, None, None, 0.85, True, False)

    backward(idx)  # the forward's own set is accepted
    swapped = idx.clone()
    swapped[first], swapped[first + 1] = idx[first + 1], idx[first]
    outside = idx.clone()
    outside[first] = N
    negative = idx.clone()
    negative[first] = -1
    for bad in (swapped, outside, negative):
        with pytest.raises(RuntimeError, match="act_idx.*ascending within each row"):
            backward(bad)
