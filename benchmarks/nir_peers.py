"""Measure the peers' own NIR round trips next to sparsegrad's (docs/nir.md, "Peers").

    PYTHONPATH=. python benchmarks/nir_peers.py [--out benchmarks/results/nir_peers.json]

Every case builds a model in snnTorch 1.0.0 or Norse 1.1.0, exports it with that library's NIR
exporter (nir 1.0.8), loads the graph back with the same library's importer and with
sparsegrad.from_nir, and counts the spikes that differ from the original model's on the same
random input (float32).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nir  # noqa: E402
import snntorch as snn  # noqa: E402
from snntorch import utils as snn_utils  # noqa: E402
from snntorch.export_nir import _extract_snntorch_module, export_to_nir  # noqa: E402
from snntorch.import_nir import import_from_nir  # noqa: E402

import sparsegrad  # noqa: E402
import sparsegrad.nir as sg_nir  # noqa: E402
from sparsegrad.nir import NIRConversionError, neuron_params  # noqa: E402


def _x(T, B, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < 0.4).float() * 2


def _step_snn(net, x):
    snn_utils.reset(net)
    with torch.no_grad():
        return torch.stack([net(x[t]) for t in range(x.shape[0])])


def _step_imported(net, x):
    snn_utils.reset(net)
    state, out = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            o, state = net(x[t], state)
            out.append(o[0] if isinstance(o, tuple) else o)  # its IF Leaky returns (spk, mem)
    return torch.stack(out)


def _sg(graph, x, dt=1e-4):
    try:
        with torch.no_grad():
            return sparsegrad.from_nir(graph, dt=dt)(x), None
    except NIRConversionError as e:
        return None, str(e)


def _diff(a, b):
    return None if a is None or b is None else int((a != b).sum())


def beta_sweep():
    """float32 beta -> snnTorch's export (tau in float32) -> beta back: how often exact."""
    betas = np.linspace(0.0, 0.9999, 4001, dtype=np.float32)[1:]
    own, ours, ours_hi, own_hi, n_hi = 0, 0, 0, 0, 0
    for b in betas:
        node = _extract_snntorch_module(snn.Leaky(beta=torch.tensor([b]),
                                                  threshold=torch.ones(1)))
        theirs = np.float32((1 - 1e-4 / node.tau)[0]) == b  # snnTorch's import arithmetic
        own += theirs
        ok = np.float32(neuron_params("n", node, 1e-4)["alpha"]) == b
        ours += ok
        if b >= 0.625:
            n_hi += 1
            ours_hi += ok
            own_hi += theirs
    # and the other way: sparsegrad's float64 tau through snnTorch's importer arithmetic
    back = sum(np.float32((1 - 1e-4 / sg_nir._lif_node("n", float(a), 1.0, (1,), 1e-4, {}).tau)[0])
               == a for a in betas)
    return {"betas": int(betas.size), "snntorch_import_exact": int(own),
            "sparsegrad_export_snntorch_import_exact": int(back),
            "snntorch_import_exact_ge_0.625": int(own_hi),
            "sparsegrad_exact": int(ours), "betas_ge_0.625": n_hi,
            "sparsegrad_exact_ge_0.625": int(ours_hi)}


def snn_subtract_reset():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), snn.Leaky(beta=torch.full((20,), 0.9),
                                                     threshold=torch.ones(20), init_hidden=True))
    with torch.no_grad():
        net[0].weight.mul_(3)
    x = _x(50, 8, 10)
    ref = _step_snn(net, x)
    g = export_to_nir(net, torch.zeros(10))
    back = _step_imported(import_from_nir(copy.deepcopy(g)), x)
    ours, err = _sg(g, x)
    return {"original_spikes": int(ref.sum()), "exported_v_reset": float(g.nodes["1"].v_reset[0]),
            "snntorch_reimport_differing": _diff(back, ref),
            "sparsegrad_from_nir_differing_from_original": _diff(ours, ref),
            "sparsegrad_vs_snntorch_reimport_differing": _diff(ours, back),
            "note": "the export writes NIR's reset-to-v_reset LIF for a subtract-reset Leaky"}


def snn_synaptic():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 20), snn.Synaptic(
        alpha=torch.full((20,), 0.7), beta=torch.full((20,), 0.9), threshold=torch.ones(20),
        init_hidden=True, reset_mechanism="zero"))
    x = _x(50, 8, 10, seed=1)
    ref = _step_snn(net, x)
    g = export_to_nir(net, torch.zeros(10))
    back = _step_imported(import_from_nir(copy.deepcopy(g)), x)
    ours, err = _sg(g, x)
    return {"original_spikes": int(ref.sum()), "snntorch_reimport_spikes": int(back.sum()),
            "snntorch_reimport_differing": _diff(back, ref),
            "sparsegrad_from_nir_differing_from_original": _diff(ours, ref),
            "sparsegrad_vs_snntorch_reimport_differing": _diff(ours, back), "sparsegrad": err,
            "note": "the original's zero reset is delayed (reset_delay=True); the file's CubaLIF "
                    "and snnTorch's re-import are not"}


def snn_recurrent():
    torch.manual_seed(2)
    rl = snn.RLeaky(beta=0.9, linear_features=16, init_hidden=True, reset_mechanism="zero",
                    reset_delay=False)
    net = nn.Sequential(nn.Linear(10, 16), rl)
    x = _x(50, 8, 10, seed=2)
    ref = _step_snn(net, x)
    g = export_to_nir(net, torch.zeros(10))
    back = _step_imported(import_from_nir(copy.deepcopy(g)), x)
    ours, err = _sg(g, x)
    return {"original_spikes": int(ref.sum()), "snntorch_reimport_differing": _diff(back, ref),
            "sparsegrad_from_nir_differing": _diff(ours, ref),
            "sparsegrad": err,
            "note": "snnTorch's importer wires the sub-graph input into w_rec "
                    "(its LIF receives W_rec (x + S[t-1]) instead of x + W_rec S[t-1])"}


def snn_if():
    n = 12
    torch.manual_seed(3)
    w = torch.randn(n, 10)
    g = nir.NIRGraph(nodes={"input": nir.Input(input_type=np.array([10])),
                            "a": nir.Linear(weight=w.numpy()),
                            "if": nir.IF(r=np.ones(n, np.float32),
                                         v_threshold=np.full(n, 2.0, np.float32)),
                            "output": nir.Output(output_type=np.array([n]))},
                     edges=[("input", "a"), ("a", "if"), ("if", "output")])
    x = _x(50, 8, 10, seed=3)
    back = _step_imported(import_from_nir(copy.deepcopy(g)), x)
    ours, _ = _sg(g, x)
    return {"nir_meaning_spikes": int(ours.sum()), "snntorch_import_spikes": int(back.sum()),
            "snntorch_import_differing": _diff(back, ours),
            "note": "snnTorch imports nir.IF as a Leaky with beta = 0.9"}


def norse_lifbox():
    import norse.torch as norse
    from norse.torch.utils.export_nir import to_nir as norse_to_nir
    from norse.torch.utils.import_nir import from_nir as norse_from_nir
    torch.manual_seed(4)
    net = norse.SequentialState(nn.Linear(10, 16), norse.LIFBoxCell())
    with torch.no_grad():
        net[0].weight.mul_(20)
    x = _x(50, 8, 10, seed=4)
    with torch.no_grad():
        ref, _ = net(x)
    g = norse_to_nir(net, torch.zeros(1, 10), dt=1e-3)
    lif = [n for n in g.nodes.values() if isinstance(n, nir.LIF)][0]
    back_net = norse_from_nir(g, dt=1e-3)
    state, back = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            z, state = back_net(x[t], state)
            back.append(z)
    back = torch.stack(back)
    ours, err = _sg(g, x, dt=1e-3)
    return {"original_tau_mem_s": 1.0 / float(net[1].p.tau_mem_inv),
            "exported_tau_s": float(np.asarray(lif.tau).ravel()[0]),
            "original_spikes": int(ref.sum()), "norse_reimport_spikes": int(back.sum()),
            "norse_reimport_differing": _diff(back, ref), "sparsegrad": err}


def main(out=None):
    warnings.filterwarnings("ignore")
    result = {"versions": {"nir": nir.version, "snntorch": snn.__version__},
              "snntorch_beta_round_trip": beta_sweep(),
              "snntorch_subtract_reset_leaky": snn_subtract_reset(),
              "snntorch_synaptic": snn_synaptic(),
              "snntorch_rleaky": snn_recurrent(),
              "snntorch_if_import": snn_if(),
              "norse_lifbox": norse_lifbox()}
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    main(ap.parse_args().out)
