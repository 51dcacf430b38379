"""sparsegrad.to_nir / from_nir: the discretisation, node coverage, refusals, file round trips,
and interop with snnTorch's and Norse's NIR exports (docs/nir.md)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")
import sparsegrad  # noqa: E402
from sparsegrad import nn as sgnn  # noqa: E402
from sparsegrad.nir import (NIRConversionError, NIRGraphModule, from_nir,  # noqa: E402
                            neuron_params, to_nir)


def _spikes(T, B, *shape, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, *shape, generator=g) < p).float()


def _lif_ref(cur, alpha, theta):
    """NIR's LIF under docs/nir.md's discretisation (reset to 0 after a spike), [T, B, ...]."""
    v = torch.zeros_like(cur[0])
    s = torch.zeros_like(cur[0])
    out, mem = [], []
    for t in range(cur.shape[0]):
        v = alpha * (1 - s) * v + cur[t]
        s = (v > theta).to(cur.dtype)
        out.append(s)
        mem.append(v)
    return torch.stack(out), torch.stack(mem)


def _full(shape, v):
    return np.full(shape, v, dtype=np.float32)


def _lif(shape, tau, thr=1.0, r=None, v_leak=0.0, v_reset=0.0, dt=1e-4):
    return nir.LIF(tau=_full(shape, tau), r=_full(shape, tau / dt if r is None else r),
                   v_leak=_full(shape, v_leak), v_threshold=_full(shape, thr),
                   v_reset=_full(shape, v_reset))


# ----------------------------------------------------------------------------- the formulas

def test_neuron_params_discretisation():
    dt = 1e-4
    p = neuron_params("n", _lif((3,), tau=1e-3, thr=0.5, r=2.0, v_leak=0.25), dt)
    assert p["kind"] == "lif" and p["shape"] == (3,)
    assert p["alpha"] == pytest.approx(0.9, abs=1e-7)
    assert p["gain"] == pytest.approx(2.0 * dt / 1e-3, rel=1e-6)
    assert p["shift"] == pytest.approx(0.25 * dt / 1e-3, rel=1e-6)
    assert p["threshold"] == 0.5
    # snnTorch's r = tau/dt gives a gain of exactly 1 (the float32 rounding of r is absorbed)
    assert neuron_params("n", _lif((3,), tau=1e-3), dt)["gain"] == 1.0
    p = neuron_params("i", nir.IF(r=_full(4, 0.5), v_threshold=_full(4, 2.0)), dt)
    assert (p["alpha"], p["gain"], p["threshold"]) == (1.0, 0.5, 2.0)
    p = neuron_params("li", nir.LI(tau=_full(2, 2e-3), r=_full(2, 3.0), v_leak=_full(2, 1.0)), 1e-3)
    assert p["kind"] == "li" and p["alpha"] == pytest.approx(0.5) and p["gain"] == 3.0
    assert p["shift"] == 1.0
    # Norse's dt: the same node at dt = 1e-3
    assert neuron_params("n", _lif((1,), tau=1e-2), 1e-3)["alpha"] == pytest.approx(0.9)


def _cuba(shape, tau_syn, tau_mem, thr=1.0, r=None, w_in=None, v_leak=0.0, dt=1e-4):
    f = lambda v: np.broadcast_to(np.asarray(v, np.float32), shape).copy()  # noqa: E731
    return nir.CubaLIF(tau_syn=f(tau_syn), tau_mem=f(tau_mem),
                       r=f(np.asarray(tau_mem) / dt if r is None else r),
                       w_in=f(np.asarray(tau_syn) / dt if w_in is None else w_in),
                       v_leak=f(v_leak), v_threshold=f(thr), v_reset=f(0.0))


def test_neuron_params_per_neuron_and_cubalif():
    dt = 1e-4
    tau = np.array([1e-3, 2e-3, 5e-4], np.float32)
    node = _lif((3,), tau=1e-3, thr=0.5)
    node.tau, node.r = tau, tau / dt
    node.v_threshold = np.array([0.5, 1.0, 0.75], np.float32)
    p = neuron_params("n", node, dt)
    # per-neuron values are float32 tensors (float64 arithmetic rounded once); uniform ones floats
    assert isinstance(p["alpha"], torch.Tensor) and p["alpha"].dtype == torch.float32
    assert torch.equal(p["alpha"], torch.tensor(1 - dt / tau.astype(np.float64)).float())
    assert torch.equal(p["threshold"], torch.tensor([0.5, 1.0, 0.75]))
    assert p["gain"] == 1.0 and p["shift"] == 0.0 and p["alpha_syn"] is None
    # a per-neuron gain and v_leak current
    node.r = np.array([20.0, 10.0, 5.0], np.float32)
    node.v_leak = np.array([0.0, 1.0, 2.0], np.float32)
    p = neuron_params("n", node, dt)
    assert torch.allclose(p["gain"], torch.tensor([2.0, 0.5, 1.0]))
    assert torch.allclose(p["shift"], torch.tensor([0.0, 0.05, 0.4]))
    # CubaLIF: alpha_syn = 1 - dt/tau_syn, gain w_in*dt/tau_syn * r*dt/tau_mem (1 as snnTorch
    # writes it, within its float32 rounding)
    p = neuron_params("c", _cuba((4,), 5e-4, 1e-3, thr=0.5), dt)
    assert p["kind"] == "lif" and p["alpha_syn"] == pytest.approx(0.8)
    assert p["alpha"] == pytest.approx(0.9) and p["gain"] == 1.0 and p["threshold"] == 0.5
    p = neuron_params("c", _cuba((2,), [5e-4, 1e-3], 2e-3, r=[4.0, 12.0], w_in=2.0), dt)
    assert torch.allclose(p["alpha_syn"], torch.tensor([0.8, 0.9]))
    assert p["alpha"] == pytest.approx(0.95) and p["shift"] == 0.0
    assert torch.allclose(p["gain"], torch.tensor([2 * 0.2 * 4 * 0.05, 2 * 0.1 * 12 * 0.05]))
    # a 0-d parameter broadcasts over the node's shape
    p = neuron_params("i", nir.IF(r=_full(3, 2.0), v_threshold=np.float32(1.5) * np.ones(3)), dt)
    assert (p["alpha"], p["gain"], p["threshold"], p["shape"]) == (1.0, 2.0, 1.5, (3,))


def test_neuron_params_refusals():
    short = _lif((3,), tau=1e-3)
    short.tau = np.array([1e-3, 5e-5, 1e-3], dtype=np.float32)
    with pytest.raises(NIRConversionError,
                       match=r"'layer1' \(LIF\): tau = values in \[5e-05, 0.001\] is shorter"):
        neuron_params("layer1", short, 1e-4)
    thr = _lif((2,), tau=1e-3)
    thr.v_threshold = np.array([1.0, -0.5], dtype=np.float32)
    with pytest.raises(NIRConversionError, match=r"v_threshold must be > 0, got values in"):
        neuron_params("x", thr, 1e-4)
    with pytest.raises(NIRConversionError, match=r"'syn' \(CubaLIF\): v_leak != 0"):
        neuron_params("syn", _cuba((2,), 5e-4, 1e-3, v_leak=0.1), 1e-4)
    with pytest.raises(NIRConversionError, match=r"'syn' \(CubaLIF\): tau_syn .* shorter"):
        neuron_params("syn", _cuba((2,), 5e-5, 1e-3), 1e-4)
    with pytest.raises(NIRConversionError, match="v_reset != 0"):
        neuron_params("x", _lif((2,), tau=1e-3, v_reset=0.1), 1e-4)
    reset = _lif((2,), tau=1e-3)
    reset.v_reset = np.array([0.0, 0.1], dtype=np.float32)
    with pytest.raises(NIRConversionError, match="v_reset != 0"):
        neuron_params("x", reset, 1e-4)
    with pytest.raises(NIRConversionError, match="shorter than dt"):
        neuron_params("x", _lif((2,), tau=1e-5), 1e-4)
    nan = _lif((2,), tau=1e-3)
    nan.r = np.array([1.0, np.nan], dtype=np.float32)
    with pytest.raises(NIRConversionError, match="'x' \\(LIF\\): r is not finite"):
        neuron_params("x", nan, 1e-4)
    with pytest.raises(NIRConversionError, match="Affine is not a neuron node"):
        neuron_params("x", nir.Affine(weight=np.eye(2), bias=np.zeros(2)), 1e-4)


def test_alpha_round_trip_through_tau_is_exact_in_float32():
    # to_nir writes tau = dt/(1-alpha) in float64; 1 - dt/tau gives alpha back in float32.
    for a in np.linspace(0.01, 0.999, 400):
        g = to_nir(sgnn.TimeSequential(sgnn.LIF(2, 2, alpha=float(a), reset="zero")),
                   torch.zeros(1, 1, 2))
        m = from_nir(g)
        assert np.float32(m[0].alpha) == np.float32(a)


# ----------------------------------------------------------------------------- round trips

def _mlp(reset="zero", **kw):
    torch.manual_seed(1)
    return sgnn.TimeSequential(
        sgnn.LIF(6, 8, alpha=0.9, threshold=0.5, reset=reset, **kw),
        sgnn.RLIF(8, 7, alpha=0.8, threshold=0.7, reset="zero", rec_bias=True),
        sgnn.LIF(7, 5, alpha=0.95, reset="zero", bias=False),
        sgnn.LIReadout(5, 3, alpha=0.7, reduce="none"))


def test_round_trip_mlp_and_file(tmp_path):
    m = _mlp()
    x = _spikes(30, 4, 6, p=0.5) * 2
    g = to_nir(m, x)
    kinds = [type(n).__name__ for n in g.nodes.values()]
    assert kinds.count("LIF") == 3 and kinds.count("LI") == 1 and "Linear" in kinds
    path = tmp_path / "mlp.nir"
    nir.write(path, g)
    for src in (g, nir.read(path), str(path)):
        m2 = from_nir(src)
        assert isinstance(m2, sgnn.TimeSequential)
        assert [type(c) for c in m2] == [sgnn.LIF, sgnn.RLIF, sgnn.LIF, sgnn.LIReadout]
        assert torch.equal(m2(x), m(x))
        for a, b in zip(m.parameters(), m2.parameters()):
            assert torch.equal(a, b)
    assert m(x).abs().sum() > 0


def test_round_trip_conv(tmp_path):
    torch.manual_seed(2)
    TD = sgnn.TimeDistributed
    m = sgnn.TimeSequential(
        TD(nn.Conv2d(2, 4, 3, padding=1)), sgnn.LIFNeuron(alpha=0.9, threshold=0.5, reset="zero"),
        TD(nn.AvgPool2d(2)),
        TD(nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)),
        sgnn.LIFNeuron(alpha=1.0, threshold=0.3, reset="zero"),
        TD(nn.Conv2d(4, 4, 3, padding="same")), sgnn.LIFNeuron(alpha=0.8, reset="zero"),
        TD(nn.AvgPool2d(2, divisor_override=1)), TD(nn.Flatten()),
        sgnn.LIF(4, 3, alpha=0.9, reset="zero"))
    x = _spikes(8, 3, 2, 8, 8, p=0.4) * 2
    g = to_nir(m, x)
    kinds = {type(n).__name__ for n in g.nodes.values()}
    assert {"Conv2d", "AvgPool2d", "SumPool2d", "Flatten", "IF", "LIF", "Affine"} <= kinds
    nir.write(tmp_path / "conv.nir", g)
    m2 = from_nir(tmp_path / "conv.nir")
    y = m(x)
    assert torch.equal(m2(x), y)
    assert y.sum() > 0


def test_non_chain_graph_runs_and_round_trips(tmp_path):
    torch.manual_seed(3)
    w1, w2, w3 = torch.randn(6, 4), torch.randn(5, 6) * 0.5, torch.randn(5, 6) * 0.5
    b1 = torch.randn(6) * 0.1
    nodes = {"in": nir.Input(input_type=np.array([4])),
             "a1": nir.Affine(weight=w1.numpy(), bias=b1.numpy()),
             "l1": _lif((6,), tau=1e-3, thr=0.5),
             "a2": nir.Linear(weight=w2.numpy()), "a3": nir.Linear(weight=w3.numpy()),
             "l2": _lif((5,), tau=5e-4, thr=0.8),
             "out": nir.Output(output_type=np.array([5]))}
    edges = [("in", "a1"), ("a1", "l1"), ("l1", "a2"), ("l1", "a3"), ("a2", "l2"),
             ("a3", "l2"), ("l2", "out")]
    g = nir.NIRGraph(nodes=nodes, edges=edges)
    m = from_nir(g)
    assert isinstance(m, NIRGraphModule)
    x = _spikes(25, 3, 4, p=0.5) * 2
    s1, mem1 = _lif_ref(x @ w1.T + b1, 0.9, 0.5)
    s2, mem2 = _lif_ref(s1 @ w2.T + s1 @ w3.T, 0.8, 0.8)
    y = m(x)
    # no membrane within rounding of its threshold: the spike comparison is free of ties
    assert (mem1 - 0.5).abs().min() > 1e-5 and (mem2 - 0.8).abs().min() > 1e-5
    assert torch.equal(y, s2) and y.sum() > 0
    g2 = to_nir(m, x)
    nir.write(tmp_path / "g.nir", g2)
    assert torch.equal(from_nir(tmp_path / "g.nir")(x), y)


def test_scale_flatten_sumpool_nodes():
    torch.manual_seed(4)
    scale = np.array([0.5, 2.0], dtype=np.float32)
    nodes = {"in": nir.Input(input_type=np.array([2, 4, 4])),
             "s": nir.Scale(scale=np.broadcast_to(scale[:, None, None], (2, 4, 4)).copy()),
             "p": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                padding=np.array([0, 0])),
             "f": nir.Flatten(input_type={"input": np.array([2, 2, 2])}, start_dim=0, end_dim=-1),
             "n": nir.IF(r=_full(8, 1.0), v_threshold=_full(8, 1.5)),
             "out": nir.Output(output_type=np.array([8]))}
    g = nir.NIRGraph(nodes=nodes, edges=[("in", "s"), ("s", "p"), ("p", "f"), ("f", "n"),
                                         ("n", "out")])
    m = from_nir(g)
    x = _spikes(10, 2, 2, 4, 4, p=0.4)
    cur = torch.nn.functional.avg_pool2d((x * torch.tensor(scale)[:, None, None]).flatten(0, 1),
                                         2, divisor_override=1).flatten(1).unflatten(0, (10, 2))
    ref, mem = _lif_ref(cur, 1.0, 1.5)
    assert torch.equal(m(x), ref) and ref.sum() > 0


def test_gain_and_v_leak_become_weight_and_bias():
    w = np.array([[1.0, -0.5], [0.25, 0.75]], dtype=np.float32)
    nodes = {"in": nir.Input(input_type=np.array([2])),
             "a": nir.Linear(weight=w),
             "l": _lif((2,), tau=1e-3, r=4.0, v_leak=0.5),
             "out": nir.Output(output_type=np.array([2]))}
    m = from_nir(nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("a", "l"), ("l", "out")]))
    lif = m[0]
    # gain r*dt/tau = 0.4, v_leak current v_leak*dt/tau = 0.05
    assert torch.allclose(lif.weight, torch.tensor(w) * 0.4)
    assert torch.allclose(lif.bias, torch.full((2,), 0.05))


def test_from_nir_refusals():
    nodes = {"in": nir.Input(input_type=np.array([2])), "a": nir.Linear(weight=np.eye(2)),
             "d": nir.Delay(delay=np.ones(2)), "out": nir.Output(output_type=np.array([2]))}
    with pytest.raises(NIRConversionError, match="'d': Delay"):
        from_nir(nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("a", "d"), ("d", "out")],
                              type_check=False))
    # a cycle through two dense nodes is not a recurrent LIF
    nodes = {"in": nir.Input(input_type=np.array([2])), "a": nir.Linear(weight=np.eye(2)),
             "b": nir.Linear(weight=np.eye(2)), "l": _lif((2,), tau=1e-3),
             "out": nir.Output(output_type=np.array([2]))}
    with pytest.raises(NIRConversionError, match="cycle"):
        from_nir(nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("a", "b"), ("b", "a"),
                                                  ("a", "l"), ("l", "out")], type_check=False))
    with pytest.raises(ValueError, match="dt must be"):
        from_nir(nir.NIRGraph(nodes={"in": nir.Input(input_type=np.array([2])),
                                     "out": nir.Output(output_type=np.array([2]))},
                              edges=[("in", "out")]), dt=0)


def test_from_nir_defaults_and_overrides():
    g = to_nir(_mlp(), torch.zeros(2, 1, 6))
    m = from_nir(g)
    assert (m[0].surrogate, m[0].slope, m[0].b_th, m[0].reset) == \
        ("fast_sigmoid", 100.0, 0.2, "zero")
    m = from_nir(g, surrogate="atan", slope=2.0, b_th=0.5)
    assert (m[1].surrogate, m[1].slope, m[1].b_th) == ("atan", 2.0, 0.5)


def test_to_nir_refuses_what_nir_cannot_express(tmp_path):
    x = torch.zeros(3, 1, 6)
    with pytest.raises(NIRConversionError, match=r"layer '0' \(LIF\): reset='subtract'"):
        to_nir(_mlp(reset="subtract"), x)
    with pytest.raises(NIRConversionError, match=r"'0'.*surrogate='atan'"):
        to_nir(_mlp(surrogate="atan"), x)
    with pytest.raises(NIRConversionError, match=r"'0'.*b_th=0.5"):
        to_nir(_mlp(b_th=0.5), x)
    ro = sgnn.TimeSequential(sgnn.LIReadout(6, 2, reduce="max"))
    with pytest.raises(NIRConversionError, match=r"'0' \(LIReadout\): reduce='max'"):
        to_nir(ro, x)
    with pytest.raises(NIRConversionError, match="MaxPool2d"):
        to_nir(sgnn.TimeSequential(sgnn.TimeDistributed(nn.MaxPool2d(2))),
               torch.zeros(2, 1, 1, 4, 4))
    # metadata=True stores them, and from_nir reads them back (through a file too)
    m = _mlp(reset="subtract", surrogate="atan", slope=3.0, b_th=0.5)
    g = to_nir(m, x, metadata=True)
    assert g.nodes["0.lif"].metadata["sparsegrad"]["reset"] == "subtract"
    nir.write(tmp_path / "m.nir", g)
    m2 = from_nir(tmp_path / "m.nir")
    assert (m2[0].reset, m2[0].surrogate, m2[0].slope, m2[0].b_th) == ("subtract", "atan", 3.0, 0.5)
    xs = _spikes(20, 2, 6, p=0.5) * 2
    assert torch.equal(m2(xs), m(xs))
    assert from_nir(g, use_metadata=False)[0].reset == "zero"


def test_sparsegrad_imports_without_nir():
    code = ("import sys; sys.modules['nir'] = None; import sparsegrad\n"
            "try:\n    sparsegrad.to_nir\nexcept ImportError as e:\n    print('refused', e)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout and "sparsegrad[nir]" in out.stdout
    assert sparsegrad.to_nir is to_nir and sparsegrad.from_nir is from_nir


def _euler64(cur, tau, r, v_leak, dt, theta=None):
    """NIR's ODE tau dv/dt = v_leak - v + r I by forward Euler in float64 (reset to 0 after a
    spike when theta is given): (outputs, min |v - theta|)."""
    cur = cur.double()
    v = torch.zeros_like(cur[0])
    s = torch.zeros_like(cur[0])
    out, margin = [], float("inf")
    for t in range(cur.shape[0]):
        v = v * (1 - s) if theta is not None else v
        v = v + dt / tau * (v_leak - v + r * cur[t])
        if theta is None:
            out.append(v)
            continue
        margin = min(margin, float((v - theta).abs().min()))
        s = (v > theta).double()
        out.append(s)
    return torch.stack(out), margin


@pytest.mark.parametrize("dt", [1e-4, 1e-3])
def test_lif_and_li_follow_nirs_ode_by_euler(dt):
    torch.manual_seed(7)
    w = torch.randn(6, 5)
    b = torch.randn(6) * 0.1
    tau, r, v_leak, theta = 20 * dt, 4.0, 0.3, 0.5
    nodes = {"in": nir.Input(input_type=np.array([5])),
             "a": nir.Affine(weight=w.numpy(), bias=b.numpy()),
             "l": _lif((6,), tau=tau, thr=theta, r=r, v_leak=v_leak),
             "a2": nir.Linear(weight=torch.randn(3, 6).numpy()),
             "li": nir.LI(tau=_full(3, 10 * dt), r=_full(3, 2.0), v_leak=_full(3, 0.1)),
             "out": nir.Output(output_type=np.array([3]))}
    g = nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("a", "l"), ("l", "a2"), ("a2", "li"),
                                         ("li", "out")])
    m = from_nir(g, dt=dt)
    x = _spikes(80, 4, 5, p=0.5)
    ref_s, margin = _euler64(x.double() @ w.double().T + b.double(), tau, r, v_leak, dt, theta)
    assert margin > 1e-5 and ref_s.sum() > 20
    assert torch.equal(m[0](x), ref_s.float())
    w2 = torch.as_tensor(nodes["a2"].weight).double()
    ref_li, _ = _euler64(ref_s @ w2.T, 10 * dt, 2.0, 0.1, dt)
    assert torch.allclose(m(x).double(), ref_li, atol=1e-5)


def test_argument_errors_and_edge_shapes():
    m = _mlp()
    with pytest.raises(ValueError, match=r"sample_input must be a \[T, B, \.\.\.\]"):
        to_nir(m, torch.zeros(3, 6))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        to_nir("model", torch.zeros(1, 1, 6))
    with pytest.raises(ValueError, match="dt must be"):
        to_nir(m, torch.zeros(1, 1, 6), dt=-1.0)
    two_inputs = nir.NIRGraph(nodes={"a": nir.Input(input_type=np.array([2])),
                                     "b": nir.Input(input_type=np.array([2])),
                                     "out": nir.Output(output_type=np.array([2]))},
                              edges=[("a", "out"), ("b", "out")])
    with pytest.raises(NIRConversionError, match="exactly one Input"):
        from_nir(two_inputs)
    # T = 1, B = 1
    g = to_nir(m, torch.zeros(1, 1, 6))
    x = torch.full((1, 1, 6), 3.0)
    assert torch.equal(from_nir(g)(x), m(x))
    assert sparsegrad.nir.NIRConversionError is NIRConversionError


def test_readout_without_integration_refused_naming_it():
    with pytest.raises(NIRConversionError, match=r"layer '0' \(LIReadout\): alpha = 1"):
        to_nir(sgnn.TimeSequential(sgnn.LIReadout(3, 2, alpha=1.0, reduce="none")),
               torch.zeros(2, 1, 3))


def test_nested_recurrent_subgraph_equals_flat():
    torch.manual_seed(9)
    w, r = torch.randn(4, 3), torch.randn(4, 4) * 0.5
    lif = lambda: _lif((4,), tau=1e-3, thr=0.5)  # noqa: E731
    flat = nir.NIRGraph(
        nodes={"in": nir.Input(input_type=np.array([3])), "a": nir.Linear(weight=w.numpy()),
               "l": lif(), "rec": nir.Linear(weight=r.numpy()),
               "out": nir.Output(output_type=np.array([4]))},
        edges=[("in", "a"), ("a", "l"), ("l", "rec"), ("rec", "l"), ("l", "out")])
    sub = nir.NIRGraph(
        nodes={"input": nir.Input(input_type=np.array([4])), "lif": lif(),
               "w_rec": nir.Linear(weight=r.numpy()),
               "output": nir.Output(output_type=np.array([4]))},
        edges=[("input", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "output")])
    nested = nir.NIRGraph(
        nodes={"in": nir.Input(input_type=np.array([3])), "a": nir.Linear(weight=w.numpy()),
               "rnn": sub, "out": nir.Output(output_type=np.array([4]))},
        edges=[("in", "a"), ("a", "rnn"), ("rnn", "out")])
    m_flat, m_nested = from_nir(flat), from_nir(nested)
    assert isinstance(m_flat[0], sgnn.RLIF) and isinstance(m_nested[0], sgnn.RLIF)
    x = _spikes(30, 3, 3, p=0.5) * 2
    y = m_flat(x)
    assert torch.equal(m_nested(x), y) and y.sum() > 10
    # and against NIR's meaning, V = a(1-S)V + W x + R S[t-1], in float64 with a margin
    v = torch.zeros(3, 4, dtype=torch.float64)
    s = torch.zeros_like(v)
    ref, margin = [], float("inf")
    for t in range(30):
        v = 0.9 * (1 - s) * v + x[t].double() @ w.double().T + s @ r.double().T
        margin = min(margin, float((v - 0.5).abs().min()))
        s = (v > 0.5).double()
        ref.append(s)
    assert margin > 1e-5
    assert torch.equal(torch.stack(ref).float(), y)


def test_gain_and_v_leak_before_a_neuron_alone():
    nodes = {"in": nir.Input(input_type=np.array([3])),
             "l": _lif((3,), tau=1e-3, r=5.0, v_leak=1.0, thr=0.4),
             "out": nir.Output(output_type=np.array([3]))}
    m = from_nir(nir.NIRGraph(nodes=nodes, edges=[("in", "l"), ("l", "out")]))
    x = _spikes(30, 2, 3, p=0.5)
    ref, mem = _lif_ref(x * 0.5 + 0.1, 0.9, 0.4)  # gain 5*0.1, current 1*0.1 each step
    assert (mem - 0.4).abs().min() > 1e-5  # no tie that another rounding order could flip
    assert torch.equal(m(x), ref) and ref.sum() > 5


def test_partial_flatten_and_valid_padding_round_trip():
    TD = sgnn.TimeDistributed
    torch.manual_seed(10)
    m = sgnn.TimeSequential(TD(nn.Conv2d(2, 3, 3, padding="valid")), TD(nn.Flatten(2, 3)),
                            TD(nn.Flatten()), sgnn.LIFNeuron(alpha=0.9, reset="zero"))
    x = _spikes(5, 2, 2, 6, 6, p=0.5) * 3
    g = to_nir(m, x)
    flats = [n for n in g.nodes.values() if isinstance(n, nir.Flatten)]
    assert [(f.start_dim, f.end_dim) for f in flats] == [(1, 2), (0, 1)]
    m2 = from_nir(g)
    assert [c.module.start_dim for c in m2 if isinstance(c, TD) and
            isinstance(c.module, nn.Flatten)] == [2, 1]
    y = m(x)
    assert torch.equal(m2(x), y) and y.sum() > 0


# ----------------------------------------------------------------------------- per-neuron, CubaLIF

def _cuba_euler64(cur, tau_syn, tau_mem, r, w_in, dt, theta):
    """NIR's CubaLIF by forward Euler in float64, the current first (docs/nir.md): spikes and
    min |v - theta| over all pre-reset v."""
    cur = cur.double()
    i = torch.zeros_like(cur[0])
    v = torch.zeros_like(i)
    s = torch.zeros_like(i)
    out, margin = [], float("inf")
    for t in range(cur.shape[0]):
        i = i + dt / tau_syn * (-i + w_in * cur[t])
        v = v * (1 - s)
        v = v + dt / tau_mem * (-v + r * i)
        margin = min(margin, float((v - theta).abs().min()))
        s = (v > theta).double()
        out.append(s)
    return torch.stack(out), margin


def _rand(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("dt", [1e-4, 1e-3])
def test_per_neuron_lif_cubalif_li_follow_nirs_odes(dt):
    torch.manual_seed(11)
    n1, n2, n3 = 7, 6, 3
    w1, b1 = torch.randn(n1, 5), torch.randn(n1) * 0.1
    w2, w3 = torch.randn(n2, n1) * 0.8, torch.randn(n3, n2)
    tau1, r1 = _rand(n1, 5 * dt, 30 * dt, 1), _rand(n1, 2.0, 6.0, 2)
    leak1, thr1 = _rand(n1, -0.2, 0.4, 3), _rand(n1, 0.3, 0.8, 4)
    ts, tm = _rand(n2, 2 * dt, 8 * dt, 5), _rand(n2, 5 * dt, 20 * dt, 6)
    r2, w_in, thr2 = _rand(n2, 1.0, 4.0, 7), _rand(n2, 0.5, 2.0, 8), _rand(n2, 0.2, 0.6, 9)
    tau3, r3, leak3 = _rand(n3, 3 * dt, 9 * dt, 10), _rand(n3, 1.0, 3.0, 11), _rand(n3, 0, 0.2, 12)
    np_ = lambda t: t.numpy()  # noqa: E731
    nodes = {"in": nir.Input(input_type=np.array([5])),
             "a": nir.Affine(weight=np_(w1), bias=np_(b1)),
             "l": nir.LIF(tau=np_(tau1), r=np_(r1), v_leak=np_(leak1), v_threshold=np_(thr1),
                          v_reset=np.zeros(n1, np.float32)),
             "a2": nir.Linear(weight=np_(w2)),
             "c": nir.CubaLIF(tau_syn=np_(ts), tau_mem=np_(tm), r=np_(r2), w_in=np_(w_in),
                              v_leak=np.zeros(n2, np.float32), v_threshold=np_(thr2),
                              v_reset=np.zeros(n2, np.float32)),
             "a3": nir.Linear(weight=np_(w3)),
             "li": nir.LI(tau=np_(tau3), r=np_(r3), v_leak=np_(leak3)),
             "out": nir.Output(output_type=np.array([n3]))}
    chain = ["in", "a", "l", "a2", "c", "a3", "li", "out"]
    m = from_nir(nir.NIRGraph(nodes=nodes, edges=list(zip(chain, chain[1:]))), dt=dt)
    assert [type(c) for c in m] == [sgnn.LIF, sgnn.LIF, sgnn.LIReadout]
    assert isinstance(m[0].alpha, torch.Tensor) and m[0].alpha.shape == (n1,)
    assert m[1].alpha_syn.shape == (n2,) and m[2].alpha.shape == (n3,)
    x = _spikes(80, 4, 5, p=0.5)
    d = lambda t: t.double()  # noqa: E731
    s1, margin1 = _euler64(x.double() @ d(w1).T + d(b1), d(tau1), d(r1), d(leak1), dt, d(thr1))
    s2, margin2 = _cuba_euler64(s1 @ d(w2).T, d(ts), d(tm), d(r2), d(w_in), dt, d(thr2))
    assert min(margin1, margin2) > 1e-5 and s1.sum() > 20 and s2.sum() > 20
    assert torch.equal(m[0](x), s1.float())
    assert torch.equal(m[1](s1.float()), s2.float())
    ref_li, _ = _euler64(s2 @ d(w3).T, d(tau3), d(r3), d(leak3), dt)
    assert torch.allclose(m(x).double(), ref_li, atol=1e-5)


def test_per_neuron_if_and_cubalif_after_a_layer_that_is_not_dense():
    dt = 1e-4
    n = 8
    scale = _rand(n, 0.5, 1.5, 20)
    ts, tm = _rand(n, 2e-4, 6e-4, 21), _rand(n, 5e-4, 2e-3, 22)
    r, w_in, thr = _rand(n, 2.0, 5.0, 23), _rand(n, 1.0, 3.0, 24), _rand(n, 0.3, 0.9, 25)
    r_if, thr_if = _rand(n, 0.5, 1.0, 26), _rand(n, 0.8, 1.6, 27)
    zeros = np.zeros(n, np.float32)
    nodes = {"in": nir.Input(input_type=np.array([n])),
             "s": nir.Scale(scale=scale.numpy()),
             "c": nir.CubaLIF(tau_syn=ts.numpy(), tau_mem=tm.numpy(), r=r.numpy(),
                              w_in=w_in.numpy(), v_leak=zeros, v_threshold=thr.numpy(),
                              v_reset=zeros),
             "i": nir.IF(r=r_if.numpy(), v_threshold=thr_if.numpy()),
             "out": nir.Output(output_type=np.array([n]))}
    chain = ["in", "s", "c", "i", "out"]
    m = from_nir(nir.NIRGraph(nodes=nodes, edges=list(zip(chain, chain[1:]))))
    # the gains before the neurons alone: GainShift, then LIFNeuron (with alpha_syn for CubaLIF)
    neurons = [c.neuron for c in m[1:]]
    assert neurons[0].alpha_syn.shape == (n,) and neurons[1].alpha_syn is None
    x = _spikes(60, 3, n, p=0.5, seed=3) * 2
    d = lambda t: t.double()  # noqa: E731
    s1, margin1 = _cuba_euler64(x.double() * d(scale), d(ts), d(tm), d(r), d(w_in), dt, d(thr))
    # IF: v[t] = v'[t-1] + r I[t]
    v = torch.zeros(3, n, dtype=torch.float64)
    s = torch.zeros_like(v)
    ref, margin2 = [], float("inf")
    for t in range(60):
        v = v * (1 - s) + d(r_if) * s1[t]
        margin2 = min(margin2, float((v - d(thr_if)).abs().min()))
        s = (v > d(thr_if)).double()
        ref.append(s)
    ref = torch.stack(ref).float()
    assert min(margin1, margin2) > 1e-5 and s1.sum() > 20 and ref.sum() > 20
    assert torch.equal(m(x), ref)


@pytest.mark.parametrize("syn", [False, True])
def test_recurrent_per_neuron_lif_and_cubalif_import_as_rlif(syn):
    """A recurrent LIF whose tau / threshold differ across neurons, and a recurrent CubaLIF,
    become nn.RLIF with per-neuron alpha, threshold (alpha_syn); the round trip is exact."""
    torch.manual_seed(3)
    n = 5
    layer = sgnn.RLIF(6, n, alpha=torch.linspace(0.7, 0.95, n), threshold=torch.linspace(0.4, 0.8, n),
                      alpha_syn=torch.linspace(0.3, 0.6, n) if syn else None, reset="zero")
    with torch.no_grad():
        layer.weight.mul_(2.0)
    m = sgnn.TimeSequential(layer)
    x = _spikes(30, 4, 6, p=0.5)
    g = to_nir(m, x)
    kinds = [type(v).__name__ for v in g.nodes.values()]
    assert ("CubaLIF" if syn else "LIF") in kinds
    m2 = from_nir(g)
    assert [type(c) for c in m2] == [sgnn.RLIF]
    for k in ("alpha", "threshold") + (("alpha_syn",) if syn else ()):
        assert torch.equal(getattr(m2[0], k).float(), getattr(layer, k).float()), k
    assert not syn or m2[0].alpha_syn is not None
    out = m(x)
    assert out.sum() > 0 and torch.equal(m2(x), out)


def _param_models():
    torch.manual_seed(12)
    TD = sgnn.TimeDistributed
    mlp = sgnn.TimeSequential(
        sgnn.LIF(6, 8, alpha=_rand(8, 0.7, 0.95, 30), threshold=_rand(8, 0.3, 0.8, 31),
                 reset="zero", learn_alpha=True, learn_threshold=True),
        sgnn.LIF(8, 7, alpha=torch.tensor(0.85), threshold=0.6, reset="zero",
                 alpha_syn=_rand(7, 0.3, 0.8, 32)),
        sgnn.LIF(7, 5, alpha=0.9, alpha_syn=0.6, reset="zero", bias=False, learn_alpha_syn=True),
        sgnn.LIReadout(5, 3, alpha=_rand(3, 0.5, 0.9, 33), reduce="none"))
    conv = sgnn.TimeSequential(
        TD(nn.Conv2d(2, 4, 3, padding=1)),
        sgnn.LIFNeuron(alpha=_rand(4, 0.7, 0.95, 34).reshape(4, 1, 1), threshold=0.5,
                       reset="zero"),
        TD(nn.AvgPool2d(2)),
        sgnn.LIFNeuron(alpha=0.8, threshold=_rand(4 * 4 * 4, 0.2, 0.6, 35).reshape(4, 4, 4),
                       alpha_syn=torch.tensor(0.5), reset="zero", learn_threshold=True),
        TD(nn.Flatten()), sgnn.LIF(64, 3, alpha=0.9, reset="zero"))
    with torch.no_grad():
        for mod in mlp.modules():
            if isinstance(mod, sgnn.LIF):
                mod.weight.mul_(3.0)
    return mlp, conv


def test_round_trip_tensor_parameters_and_synaptic_current(tmp_path):
    mlp, conv = _param_models()
    for model, x in ((mlp, _spikes(30, 4, 6, p=0.5) * 2), (conv, _spikes(8, 3, 2, 8, 8) * 2)):
        g = to_nir(model, x)
        kinds = [type(n).__name__ for n in g.nodes.values()]
        assert "CubaLIF" in kinds
        nir.write(tmp_path / "p.nir", g)
        back = from_nir(tmp_path / "p.nir")
        y = model(x)
        assert torch.equal(back(x), y) and y.abs().sum() > 0
        for a, b in zip(model.modules(), back.modules()):
            assert type(a) is type(b)
            for k in ("alpha", "threshold", "alpha_syn"):
                va, vb = getattr(a, k, None), getattr(b, k, None)
                if va is None:
                    assert vb is None
                    continue
                # the same float32 values (per neuron where they differ, else one float)
                va, vb = (torch.as_tensor(v).detach().float() for v in (va, vb))
                shape = torch.broadcast_shapes(va.shape, vb.shape)
                assert torch.equal(va.expand(shape), vb.expand(shape)), (k, a)
    # a uniform tensor is a float after the round trip; per-neuron values stay tensors
    back = from_nir(to_nir(mlp, torch.zeros(2, 1, 6)))
    assert isinstance(back[0].alpha, torch.Tensor) and back[0].alpha.shape == (8,)
    assert isinstance(back[1].alpha, float) and back[1].alpha_syn.shape == (7,)
    assert isinstance(back[2].alpha_syn, float)
    # a uniform tensor alpha without synaptic current comes back a float: the float kernels give
    # the tensor kernels' bits
    torch.manual_seed(13)
    uni = sgnn.TimeSequential(sgnn.LIF(6, 8, alpha=torch.full((8,), 0.8), learn_alpha=True,
                                       threshold=torch.tensor(0.4), reset="zero"))
    x = _spikes(30, 4, 6, p=0.5) * 2
    back = from_nir(to_nir(uni, x))
    assert isinstance(back[0].alpha, float) and isinstance(back[0].threshold, float)
    y = uni(x)
    assert torch.equal(back(x), y) and y.sum() > 20


def test_to_nir_clamps_tensor_alpha_as_the_layer_runs_it():
    lif = sgnn.LIF(3, 3, alpha=torch.tensor([0.5, 0.9, 0.8]), reset="zero", learn_alpha=True)
    with torch.no_grad():
        lif.alpha[1] = 1.3  # a learned alpha past 1: the forward clamps it to 1
    with pytest.raises(NIRConversionError, match=r"layer '0': alpha = 1 for some neurons"):
        to_nir(sgnn.TimeSequential(lif), torch.zeros(2, 1, 3))
    with torch.no_grad():
        lif.alpha[1] = -0.5  # clamped to 0: tau = dt
    g = to_nir(sgnn.TimeSequential(lif), torch.zeros(2, 1, 3))
    assert np.allclose(g.nodes["0.lif"].tau, [2e-4, 1e-4, 5e-4])


def test_to_nir_refuses_synaptic_current_without_leak():
    for kw in (dict(alpha=1.0, alpha_syn=0.5), dict(alpha=0.9, alpha_syn=1.0)):
        m = sgnn.TimeSequential(sgnn.LIF(3, 2, reset="zero", **kw))
        with pytest.raises(NIRConversionError, match=r"layer '0': alpha = 1 or alpha_syn = 1"):
            to_nir(m, torch.zeros(2, 1, 3))
    # alpha_syn = 0 is a CubaLIF with tau_syn = dt: syn[t] = I[t]
    m = sgnn.TimeSequential(sgnn.LIF(3, 2, reset="zero", alpha_syn=0.0))
    g = to_nir(m, torch.zeros(2, 1, 3))
    assert np.allclose(g.nodes["0.lif"].tau_syn, 1e-4)
    assert from_nir(g)[0].alpha_syn == 0.0
