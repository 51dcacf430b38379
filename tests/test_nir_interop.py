"""NIR interop: snnTorch's exports load into sparsegrad with the original's spikes, sparsegrad's
exports load into snnTorch's import_from_nir with the same spikes, Norse's conventions (dt=1e-3)."""
import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")
snn = pytest.importorskip("snntorch")
pytest.importorskip("nirtorch")
from snntorch import utils as snn_utils  # noqa: E402
from snntorch.export_nir import export_to_nir  # noqa: E402
from snntorch.import_nir import import_from_nir  # noqa: E402

from sparsegrad import nn as sgnn  # noqa: E402
from sparsegrad.nir import NIRConversionError, from_nir, to_nir  # noqa: E402

MARGIN = 1e-5  # far above the float32 rounding of a different summation order (~1e-7 here)


def _x(T, B, *shape, seed=0, p=0.4, amp=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, *shape, generator=g) < p).float() * amp


def _leaky(n, beta, thr, **kw):
    # snnTorch 1.0.0's exporter needs beta and threshold as [n] tensors (a scalar beta gives a
    # 0-d tau that nir's type check rejects); uniform values map to sparsegrad's floats.
    shape = n if isinstance(n, tuple) else (n,)
    return snn.Leaky(beta=torch.full(shape, beta), threshold=torch.full(shape, thr),
                     init_hidden=True, reset_mechanism="zero", **kw)


def _boost(net, k=3.0):
    """Scale every weight so that the deeper layers spike too (checked by each test)."""
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, sgnn.LIF)):
                mod.weight.mul_(k)
    return net


def _run_snntorch(net, x):
    """Step an init_hidden snnTorch Sequential; spikes [T, B, ...] and every Leaky's membrane."""
    snn_utils.reset(net)
    spikes, mems = [], []
    with torch.no_grad():
        for t in range(x.shape[0]):
            spikes.append(net(x[t]))
            mems.append([m.mem.clone() - m.threshold for m in net.modules()
                         if isinstance(m, (snn.Leaky, snn.RLeaky))])
    return torch.stack(spikes), mems


def _lif64(x, w, b, alpha, theta, rec=None, rec_b=None):
    """NIR's LIF (docs/nir.md) in float64: spikes and min |V - theta| over all pre-reset V.

    Two float32 implementations each stay within ~1e-6 of this V, so while the margin is larger
    their spikes agree (by induction over steps) whatever their summation order.
    """
    x, w = x.detach().double(), w.detach().double()
    b = b.detach() if b is not None else None
    rec = rec.detach() if rec is not None else None
    rec_b = rec_b.detach() if rec_b is not None else None
    cur = x @ w.T + (b.double() if b is not None else 0)
    v = torch.zeros_like(cur[0])
    s = torch.zeros_like(cur[0])
    out, margin = [], float("inf")
    for t in range(x.shape[0]):
        i = cur[t]
        if rec is not None:
            i = i + s @ rec.double().T + (rec_b.double() if rec_b is not None else 0)
        v = alpha * (1 - s) * v + i
        margin = min(margin, float((v - theta).abs().min()))
        s = (v > theta).double()
        out.append(s)
    return torch.stack(out).float(), margin


def _min_margin(mems):
    return min(float(m.abs().min()) for step in mems for m in step)


@pytest.mark.parametrize("via_file", [False, True])
def test_snntorch_leaky_mlp_export_loads_with_same_spikes(tmp_path, via_file):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), _leaky(16, 0.9, 0.5), nn.Linear(16, 6),
                        _leaky(6, 0.8, 1.0), nn.Linear(6, 4, bias=False), _leaky(4, 0.95, 0.3))
    _boost(net)
    g = export_to_nir(net, torch.zeros(12))
    if via_file:
        nir.write(tmp_path / "snn.nir", g)
        g = tmp_path / "snn.nir"
    m = from_nir(g)
    assert [type(c) for c in m] == [sgnn.LIF] * 3
    assert np.float32(m[0].alpha) == np.float32(0.9) and m[0].threshold == 0.5
    x = _x(40, 5, 12)
    ref, mems = _run_snntorch(net, x)
    assert _min_margin(mems) > MARGIN  # no membrane within rounding of its threshold
    out = m(x)
    assert torch.equal(out, ref)
    assert ref.sum() > 20


def _rand(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g)


@pytest.mark.parametrize("via_file", [False, True])
def test_snntorch_per_neuron_leaky_mlp_loads_with_same_spikes(tmp_path, via_file):
    torch.manual_seed(10)
    # per-neuron beta as a tensor, learnable (learn_beta / learn_threshold), thresholds per neuron.
    # beta >= 0.625: snnTorch's float32 tau = dt/(1 - beta) keeps every bit of beta there
    # (docs/nir.md), so the loaded alpha is the original's beta exactly.
    b1, t1 = _rand(16, 0.7, 0.97, 1), _rand(16, 0.3, 0.8, 2)
    b2, t2 = _rand(6, 0.65, 0.95, 3), _rand(6, 0.5, 1.2, 4)
    net = nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=b1, threshold=t1, init_hidden=True,
                                     reset_mechanism="zero"),
        nn.Linear(16, 6), snn.Leaky(beta=b2.clone(), threshold=t2.clone(), learn_beta=True,
                                    learn_threshold=True, init_hidden=True,
                                    reset_mechanism="zero"),
        nn.Linear(6, 4, bias=False), _leaky(4, 0.95, 0.3))
    _boost(net)
    g = export_to_nir(net, torch.zeros(12))
    if via_file:
        nir.write(tmp_path / "snn.nir", g)
        g = tmp_path / "snn.nir"
    m = from_nir(g)
    assert [type(c) for c in m] == [sgnn.LIF] * 3
    assert torch.equal(m[0].alpha, b1) and torch.equal(m[0].threshold, t1)
    assert torch.equal(m[1].alpha, b2) and torch.equal(m[1].threshold, t2)
    assert isinstance(m[2].alpha, float) and np.float32(m[2].alpha) == np.float32(0.95)
    x = _x(40, 5, 12, seed=11)
    ref, mems = _run_snntorch(net, x)
    assert _min_margin(mems) > MARGIN  # no membrane within rounding of its threshold
    out = m(x)
    assert torch.equal(out, ref)
    assert all(float(ref[..., sl].sum()) > 20 for sl in (slice(0, 2), slice(2, 4)))


def _syn64(x, w, b, alpha_syn, alpha, theta):
    """NIR's CubaLIF with gains 1 (snnTorch's Synaptic, zero reset at the spike) in float64:
    spikes and min |V - theta| over all pre-reset V."""
    cur = x.double() @ w.detach().double().T + (b.detach().double() if b is not None else 0)
    a_s, a, th = (torch.as_tensor(v).double() for v in (alpha_syn, alpha, theta))
    i = torch.zeros_like(cur[0])
    v, s = torch.zeros_like(i), torch.zeros_like(i)
    out, margin = [], float("inf")
    for t in range(cur.shape[0]):
        i = a_s * i + cur[t]
        v = a * (1 - s) * v + i
        margin = min(margin, float((v - th).abs().min()))
        s = (v > th).double()
        out.append(s)
    return torch.stack(out).float(), margin


@pytest.mark.parametrize("via_file", [False, True])
def test_snntorch_synaptic_export_loads_with_same_spikes(tmp_path, via_file):
    torch.manual_seed(12)
    a1, b1, t1 = _rand(12, 0.65, 0.9, 5), _rand(12, 0.7, 0.95, 6), _rand(12, 0.8, 1.6, 7)
    # reset_delay=False: snnTorch's Synaptic then resets the membrane to 0 at the spike, NIR's
    # CubaLIF (its default delayed zero reset also drops the next step's input: docs/nir.md).
    net = nn.Sequential(
        nn.Linear(10, 12), snn.Synaptic(alpha=a1, beta=b1, threshold=t1, learn_alpha=True,
                                        init_hidden=True, reset_mechanism="zero",
                                        reset_delay=False),
        nn.Linear(12, 5), snn.Synaptic(alpha=torch.full((5,), 0.7), beta=torch.full((5,), 0.85),
                                       threshold=torch.full((5,), 1.5), init_hidden=True,
                                       reset_mechanism="zero", reset_delay=False))
    g = export_to_nir(net, torch.zeros(10))
    assert sum(isinstance(n, nir.CubaLIF) for n in g.nodes.values()) == 2
    if via_file:
        nir.write(tmp_path / "syn.nir", g)
        g = tmp_path / "syn.nir"
    m = from_nir(g)
    assert [type(c) for c in m] == [sgnn.LIF] * 2
    assert torch.equal(m[0].alpha_syn, a1) and torch.equal(m[0].alpha, b1)
    assert torch.equal(m[0].threshold, t1)
    assert np.float32(m[1].alpha_syn) == np.float32(0.7) and m[1].threshold == 1.5
    x = _x(50, 4, 10, seed=13, amp=1.0)
    ref, _ = _run_snntorch(net, x)  # (its stored membrane is post-reset: margin from _syn64)
    s1, m1 = _syn64(x, net[0].weight, net[0].bias, a1, b1, t1)
    s2, m2 = _syn64(s1, net[2].weight, net[2].bias, 0.7, 0.85, 1.5)
    assert min(m1, m2) > MARGIN and torch.equal(s2, ref)
    assert torch.equal(m(x), ref) and s1.sum() > 50 and ref.sum() > 20


def test_snntorch_synaptic_with_its_delayed_zero_reset_is_not_nirs_cubalif():
    import copy
    torch.manual_seed(16)
    syn = dict(alpha=torch.full((8,), 0.7), beta=torch.full((8,), 0.9),
               threshold=torch.ones(8), init_hidden=True, reset_mechanism="zero")
    net = nn.Sequential(nn.Linear(10, 8), snn.Synaptic(**syn))  # reset_delay=True (default)
    _boost(net, 2.0)
    x = _x(50, 4, 10, seed=17, amp=1.0)
    ref, _ = _run_snntorch(net, x)
    g = export_to_nir(net, torch.zeros(10))
    ours = from_nir(g)(x)
    # sparsegrad runs what the file says (NIR's CubaLIF), as snnTorch's own importer does
    # (Synaptic(reset_delay=False)), and as the same net with reset_delay=False does
    back = _run_imported(import_from_nir(copy.deepcopy(g)), x)
    undelayed = nn.Sequential(net[0], snn.Synaptic(**syn, reset_delay=False))
    exact, _ = _run_snntorch(undelayed, x)
    _, margin = _syn64(x, net[0].weight, net[0].bias, 0.7, 0.9, 1.0)
    assert margin > MARGIN and torch.equal(ours, exact) and torch.equal(ours, back)
    # the delayed zero reset also drops the input of the step after a spike: another model
    assert (ours != ref).sum() > 0.1 * ref.numel(), (int((ours != ref).sum()), ref.numel())


def test_snntorch_rleaky_export_loads_as_rlif():
    torch.manual_seed(1)
    # reset_delay=False: snnTorch's RLeaky then resets to 0 at the spike, as NIR's LIF does
    # (with the default delay its zero reset also drops the next step's input).
    rl = snn.RLeaky(beta=0.9, threshold=1.0, linear_features=10, init_hidden=True,
                    reset_mechanism="zero", reset_delay=False)
    net = nn.Sequential(nn.Linear(8, 10), rl)
    g = export_to_nir(net, torch.zeros(8))
    m = from_nir(g)
    assert [type(c) for c in m] == [sgnn.RLIF] and m[0].rec_bias is not None
    x = _x(40, 4, 8, seed=2)
    ref, _ = _run_snntorch(net, x)  # (its stored membrane is post-reset: margin from _lif64)
    ref64, margin = _lif64(x, net[0].weight, net[0].bias, 0.9, 1.0, rl.recurrent.weight,
                           rl.recurrent.bias)
    assert margin > MARGIN and torch.equal(ref64, ref)
    assert torch.equal(m(x), ref) and ref.sum() > 20


def test_snntorch_conv_export_loads_with_same_spikes():
    torch.manual_seed(3)
    net = _boost(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _leaky((4, 8, 8), 0.9, 0.5),
                               nn.AvgPool2d(2), nn.Flatten(0), nn.Linear(64, 5),
                               _leaky(5, 0.8, 0.2)), 4.0)
    g = export_to_nir(net, torch.zeros(1, 8, 8))  # unbatched sample: its exporter needs one
    m = from_nir(g)
    x = _x(20, 3, 1, 8, 8, seed=4)
    # snnTorch's Flatten(0) is only right for the unbatched trace: run it sample by sample
    refs = []
    for b in range(x.shape[1]):
        r, mems = _run_snntorch(net, x[:, b:b + 1].squeeze(1))
        assert _min_margin(mems) > MARGIN
        refs.append(r)
    ref = torch.stack(refs, 1)
    assert torch.equal(m(x), ref) and ref.sum() > 10


def _run_imported(net, x):
    snn_utils.reset(net)
    state, out = None, []
    for t in range(x.shape[0]):
        o, state = net(x[t], state)
        out.append(o)
    return torch.stack(out)


def test_sparsegrad_export_loads_into_snntorch_with_same_spikes(tmp_path):
    torch.manual_seed(5)
    TD = sgnn.TimeDistributed
    mlp = sgnn.TimeSequential(sgnn.LIF(12, 16, alpha=0.9, threshold=0.5, reset="zero"),
                              sgnn.LIF(16, 6, alpha=0.85, reset="zero", bias=False))
    conv = sgnn.TimeSequential(TD(nn.Conv2d(2, 4, 3, padding=1)),
                               sgnn.LIFNeuron(alpha=0.9, threshold=0.5, reset="zero"),
                               TD(nn.AvgPool2d(2)), TD(nn.Flatten()),
                               sgnn.LIF(64, 5, alpha=0.8, threshold=0.2, reset="zero"))
    for model, x in ((_boost(mlp), _x(40, 5, 12)), (_boost(conv, 4.0), _x(20, 3, 2, 8, 8))):
        nir.write(tmp_path / "m.nir", to_nir(model, x))
        net = import_from_nir(nir.read(tmp_path / "m.nir"))
        ref = model(x)
        if x.dim() == 3:
            got = _run_imported(net, x)
            # no membrane within rounding of its threshold (per-step vs fused GEMM)
            s1, m1 = _lif64(x, model[0].weight, model[0].bias, 0.9, 0.5)
            _, m2 = _lif64(s1, model[1].weight, None, 0.85, 1.0)
            assert min(m1, m2) > MARGIN
        else:  # its Flatten(0) (NIR dims exclude the batch) is right only unbatched
            got = torch.stack([_run_imported(net, x[:, b]) for b in range(x.shape[1])], 1)
        assert torch.equal(got, ref) and ref.sum() > 10


def test_sparsegrad_per_neuron_and_synaptic_export_loads_into_snntorch(tmp_path):
    torch.manual_seed(14)
    a1 = _rand(16, 0.6, 0.95, 8)
    a2, s2 = _rand(6, 0.7, 0.9, 9), _rand(6, 0.3, 0.8, 10)
    # (snnTorch's importer needs one threshold per layer: it asserts v_threshold is uniform)
    model = _boost(sgnn.TimeSequential(
        sgnn.LIF(12, 16, alpha=a1, threshold=0.5, reset="zero", learn_alpha=True),
        sgnn.LIF(16, 6, alpha=a2, alpha_syn=s2, threshold=0.8, reset="zero", bias=False),
        sgnn.LIF(6, 4, alpha=0.9, alpha_syn=0.5, threshold=0.6, reset="zero")), 2.0)
    x = _x(40, 5, 12, seed=15)
    g = to_nir(model, x)
    assert [type(n).__name__ for k, n in g.nodes.items() if k.endswith(".lif")] == \
        ["LIF", "CubaLIF", "CubaLIF"]
    nir.write(tmp_path / "p.nir", g)
    net = import_from_nir(nir.read(tmp_path / "p.nir"))
    assert sum(isinstance(mod, snn.Synaptic) for mod in net.modules()) == 2
    with torch.no_grad():
        ref = model(x)
    got = _run_imported(net, x)
    # no membrane within rounding of its threshold (snnTorch runs the float64 parameters the
    # file holds, sparsegrad their float32 rounding; per-step vs fused GEMM)
    s1, m1 = _lif64(x, model[0].weight, model[0].bias, a1.double(), 0.5)
    sp2, m2 = _syn64(s1, model[1].weight, None, s2, a2, 0.8)
    _, m3 = _syn64(sp2, model[2].weight, model[2].bias, 0.5, 0.9, 0.6)
    assert min(m1, m2, m3) > MARGIN
    assert torch.equal(got.float(), ref) and all(float(ref_l.sum()) > 10 for ref_l in
                                                 (s1, sp2, ref))


def test_norse_convention_dt_1e3():
    pytest.importorskip("norse.torch")
    from norse.torch.utils.import_nir import from_nir as norse_from_nir
    torch.manual_seed(6)
    w = torch.randn(5, 7) * 0.6
    b = torch.randn(5) * 0.1
    # v_leak = 0: Norse starts its membrane at v_leak, sparsegrad (and snnTorch) at 0
    g = nir.NIRGraph(nodes={
        "in": nir.Input(input_type=np.array([7])),
        "a": nir.Affine(weight=w.numpy(), bias=b.numpy()),
        "l": nir.LIF(tau=np.full(5, 1e-2, np.float32), r=np.ones(5, np.float32),
                     v_leak=np.zeros(5, np.float32), v_threshold=np.full(5, 0.2, np.float32)),
        "out": nir.Output(output_type=np.array([5]))},
        edges=[("in", "a"), ("a", "l"), ("l", "out")])
    x = _x(60, 4, 7, seed=7)
    ref_net = norse_from_nir(g, dt=1e-3)
    state, ref = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            z, state = ref_net(x[t], state)
            ref.append(z)
    ref = torch.stack(ref)
    # NIR's meaning in float64 with Norse's gain dt/tau = 0.1 on the current
    ref64, margin = _lif64(x, w * 0.1, b * 0.1, 0.9, 0.2)
    m = from_nir(g, dt=1e-3)
    assert np.isclose(m[0].alpha, 0.9) and m[0].weight.data.allclose(w * 0.1)
    # Norse steps v + dt/tau*(I - v), sparsegrad alpha*v + (dt/tau)*I: the same up to rounding,
    # so the spikes are equal while no membrane comes within rounding of the threshold.
    assert margin > MARGIN and torch.equal(ref64, ref)
    assert torch.equal(m(x), ref) and ref.sum() > 20


def test_norse_lifbox_export_is_refused_with_its_tau():
    norse = pytest.importorskip("norse.torch")
    from norse.torch.utils.export_nir import to_nir as norse_to_nir
    net = norse.SequentialState(nn.Linear(3, 4), norse.LIFBoxCell())
    g = norse_to_nir(net, torch.zeros(1, 3), dt=1e-3)
    taus = [float(np.asarray(n.tau).ravel()[0]) for n in g.nodes.values() if isinstance(n, nir.LIF)]
    # Norse 1.1.0 writes tau = dt / tau_mem_inv = 1e-5 s for its default tau_mem = 10 ms
    assert taus and np.isclose(taus[0], 1e-5)
    with pytest.raises(NIRConversionError, match="shorter than dt"):
        from_nir(g, dt=1e-3)


def test_worked_example_smoke():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "nir_example.py")
    spec = importlib.util.spec_from_file_location("nir_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(epochs=1, T=20, n_test=32)
    assert r["logits_identical_from_file"] and r["hidden_spikes_identical_in_snntorch"]
    assert r["hidden_spikes"] > 0


def test_converted_snntorch_model_exports_with_its_surrogate_in_metadata(tmp_path):
    import sparsegrad
    torch.manual_seed(8)
    net = _boost(nn.Sequential(
        nn.Linear(10, 20), snn.Leaky(beta=0.9, reset_mechanism="zero", init_hidden=True),
        nn.Linear(20, 5), snn.Leaky(beta=0.8, threshold=0.5, reset_mechanism="zero",
                                    init_hidden=True)))
    conv = sparsegrad.convert(net)
    x = _x(30, 4, 10, seed=9)
    ref, mems = _run_snntorch(net, x)
    assert _min_margin(mems) > MARGIN
    # snnTorch's default surrogate (atan, slope 2) is not NIR's: refused unless stored
    with pytest.raises(NIRConversionError, match=r"layer '0' \(LIF\): surrogate='atan', slope=2.0"):
        to_nir(conv, x[:, :1])
    nir.write(tmp_path / "c.nir", to_nir(conv, x[:, :1], metadata=True))
    back = from_nir(tmp_path / "c.nir")
    assert (back[0].surrogate, back[0].slope) == ("atan", 2.0)
    assert torch.equal(back(x), ref)
    assert torch.equal(_run_imported(import_from_nir(nir.read(tmp_path / "c.nir")), x), ref)
    assert ref.sum() > 20
