"""sparsegrad vs other spiking-network libraries on the same hidden layer, same inputs.

Peers (optional imports; a missing one is reported as skipped): plain PyTorch autograd
(common.pytorch_lif, the same model as sparsegrad.reference), snnTorch `Leaky`, SpikingJelly `LIFNode` (multi-step), Norse `LIF`. Each peer is fed
by an nn.Linear applied to the whole sequence at once holding the same weights (snnTorch then
steps over current.unbind(0): indexing current[t] would add an O(T^2) backward), with the surrogate closest to sparsegrad's fast sigmoid that the peer offers. Before
timing, every peer's forward spikes are compared with sparsegrad's on a small problem, and the
agreement is reported (SpikingJelly and Norse implement slightly different reset rules; see
PEER_NOTES).

    python benchmarks/bench_peers.py --json benchmarks/results/peers.json
"""
from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PEERS = ("snntorch", "spikingjelly", "norse")
PEER_NOTES = {
    "snntorch": "snn.Leaky(beta=alpha, threshold=1, reset_mechanism='subtract', "
                "spike_grad=fast_sigmoid(slope=100)): the same model and surrogate as sparsegrad",
    "spikingjelly": "neuron.LIFNode(step_mode='m', tau=1/(1-alpha), decay_input=False, "
                    "v_reset=None, detach_reset=True, surrogate SoftSign(alpha=100) = 50/(100|u|+1)^2,"
                    " the fast sigmoid up to a constant factor). Its soft reset subtracts the "
                    "threshold before the leak, so the subtracted threshold decays too: spikes "
                    "after a neuron's first spike can differ from sparsegrad's",
    "norse": "norse.torch.LIF with an instantaneous synapse (tau_syn_inv=1/dt) and "
             "tau_mem_inv=(1-alpha)/dt, input scaled by 1/(1-alpha) so that the membrane update "
             "equals sparsegrad's; Norse resets to v_reset=0 (not by subtraction) and its "
             "SuperSpike surrogate is 1/(|u|+1)^2 (slope fixed at 1 in this version)",
}
CONFIGS = [("shd 700->200", "shd", 200), ("fmnist 784->200", "fmnist", 200)]
BATCHES = (64,)
QUICK = dict(steps=20, n_out=24, batches=(4,))
CHECK = dict(steps=60, batch=4)


def peer_version(name):
    """(version, None) if the peer imports, else (None, reason)."""
    try:
        module = __import__(name)
    except Exception as exc:  # any import failure means "skipped", never a crash
        return None, f"{type(exc).__name__}: {exc}"
    version = getattr(module, "__version__", None)
    if version is None:  # e.g. SpikingJelly 2.x: ask the installed distribution
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name)
        except Exception:  # noqa: BLE001 - only a label
            version = "unknown"
    return version, None


def _linear(weight, bias):
    fc = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype,
                         device=weight.device)
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return fc


def _spikingjelly_selected(device) -> str:
    """The kernel SpikingJelly >= 2 picked for its LIF on this GPU (private API: best effort)."""
    try:
        from spikingjelly._ops.lif import _selection

        diag = _selection.diagnostics(device)
        return f"automatic: {diag['implementation']}" + (
            f" (unavailable: {', '.join(sorted(diag['unavailable']))})" if diag["unavailable"]
            else "")
    except Exception as exc:  # noqa: BLE001 - only a label
        return f"automatic (selection not readable: {type(exc).__name__})"


def peer_runner(name, problem, *, alpha=common.ALPHA, slope=common.SLOPE, x=None):
    """(forward, backward, reset, params) for a peer, fed by nn.Linear with problem's weights.
    forward() -> (spikes [T,B,N], None)."""
    fc = _linear(problem.weight, problem.bias)
    x = problem.x if x is None else x
    x = x.detach().clone().requires_grad_(problem.needs_dx)
    info = {}
    if name == "snntorch":
        import snntorch as snn
        from snntorch import surrogate

        lif = snn.Leaky(beta=alpha, threshold=common.THRESHOLD, reset_mechanism="subtract",
                        spike_grad=surrogate.fast_sigmoid(slope=slope)).to(x.device)

        def forward():
            current = fc(x)
            mem = lif.init_leaky()
            spikes = []
            for c in current.unbind(0):  # not current[t]: see common.pytorch_lif
                spk, mem = lif(c, mem)
                spikes.append(spk)
            # snnTorch's surrogates return float32 spikes; a no-op unless x is float64
            return torch.stack(spikes).to(current.dtype), None

    elif name == "spikingjelly":
        from spikingjelly.activation_based import functional as sjf
        from spikingjelly.activation_based import neuron, surrogate

        kwargs = dict(tau=1.0 / (1.0 - alpha), decay_input=False, v_threshold=common.THRESHOLD,
                      v_reset=None, detach_reset=True, step_mode="m",
                      surrogate_function=surrogate.SoftSign(alpha=slope))
        if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
            # SpikingJelly < 2: choose the backend (its fastest GPU one is cupy); >= 2 selects
            # its fastest kernel (native CUDA, Triton or torch) by itself.
            kwargs["backend"] = "cupy" if x.is_cuda else "torch"
        info["backend"] = kwargs.get("backend", "automatic")
        node = neuron.LIFNode(**kwargs).to(x.device)
        try:  # a backend that cannot run here (e.g. no cupy) falls back to torch, said so
            with torch.no_grad():
                sjf.reset_net(node)
                node(fc(x[:2]))
                sjf.reset_net(node)
        except Exception as exc:
            if kwargs.get("backend", "torch") == "torch":
                raise
            info["backend_error"] = f"{kwargs['backend']}: {type(exc).__name__}: {exc}"[:300]
            kwargs["backend"] = info["backend"] = "torch"
            node = neuron.LIFNode(**kwargs).to(x.device)
        if info["backend"] == "automatic" and x.is_cuda:
            info["backend"] = _spikingjelly_selected(x.device)

        def forward():
            sjf.reset_net(node)
            return node(fc(x)), None

    elif name == "norse":
        import norse.torch as nt

        dt = 1e-3
        on = dict(device=x.device)
        p = nt.LIFParameters(tau_syn_inv=torch.as_tensor(1.0 / dt, **on),
                             tau_mem_inv=torch.as_tensor((1.0 - alpha) / dt, **on),
                             v_leak=torch.as_tensor(0.0, **on),
                             v_th=torch.as_tensor(common.THRESHOLD, **on),
                             v_reset=torch.as_tensor(0.0, **on), method="super",
                             alpha=torch.as_tensor(slope, **on))
        lif = nt.LIF(p, dt=dt).to(x.device)
        scale = 1.0 / (1.0 - alpha)

        def forward():
            spikes, _ = lif(fc(x) * scale)
            return spikes, None
    else:
        raise ValueError(f"peer must be one of {PEERS}, got {name!r}")

    def backward(out):
        out[0].backward(problem.grad)

    def reset():
        for t in (x, fc.weight, fc.bias):
            t.grad = None

    return (forward, backward, reset, (fc.weight, fc.bias)), info


def check_peer(name, problem):
    """Forward spikes of the peer vs sparsegrad (sparse) on a small slice of the problem; for
    snnTorch, which implements the identical model, also dW against the reference's dense dW."""
    import sparsegrad
    from sparsegrad import reference as ref

    steps, batch = min(CHECK["steps"], problem.x.shape[0]), min(CHECK["batch"], problem.x.shape[1])
    small = common.LayerProblem(problem.x[:steps, :batch], problem.weight, problem.bias,
                                problem.grad[:steps, :batch])
    (forward, backward, reset, (w, _)), _ = peer_runner(name, small)
    out = forward()
    backward(out)
    ours = sparsegrad.lif_layer(small.x, small.weight, small.bias, alpha=common.ALPHA)
    mismatches = int((out[0].detach() != ours).sum())
    result = dict(entries=ours.numel(), spike_mismatches=mismatches,
                  mismatch_fraction=mismatches / ours.numel(),
                  spikes_sparsegrad=int(ours.sum()), spikes_peer=int(out[0].detach().sum()))
    if name == "snntorch":
        wr = small.weight.detach().clone().requires_grad_(True)
        ref.lif_layer(small.x, wr, small.bias, alpha=common.ALPHA,
                      backward="dense").backward(small.grad)
        err = float((w.grad - wr.grad).abs().max() / wr.grad.abs().max().clamp_min(1e-30))
        result["dW_max_rel_error_vs_reference_dense"] = err
        if mismatches > 1e-3 * ours.numel() or err > 1e-3:
            raise AssertionError(f"snnTorch should implement sparsegrad's model exactly, but "
                                 f"{mismatches} spikes differ and dW differs by {err:.2e}")
    return result


def run_config(label, dataset, n_out, batch, args, device, dtype, steps=None):
    problem = common.make_layer_problem(dataset, batch, n_out, steps=steps, dtype=dtype,
                                        device=device, seed=args.seed)
    correctness = common.check_sparsegrad_layer(problem.x, problem.weight, problem.bias)
    rows, skipped, checks = {}, {}, {}
    for method in ("pytorch", "sparsegrad_sparse", "sparsegrad_dense"):
        rows[method], _ = common.bench_layer_method(method, problem, device=device,
                                                    repeats=args.repeats, warmup=args.warmup)
    for peer in args.peers:
        version, reason = peer_version(peer)
        if version is None:
            skipped[peer] = reason
            print(f"  {peer}: skipped ({reason})")
            continue
        checks[peer] = check_peer(peer, problem)
        runner, info = peer_runner(peer, problem)
        rows[peer], _ = common.bench_runner(peer, runner, problem, device=device,
                                            repeats=args.repeats, warmup=args.warmup)
        rows[peer].update(version=version, note=PEER_NOTES[peer], **info)
    sparse_bwd = rows["sparsegrad_sparse"]["times"]["backward"]["median"]
    sparse_tot = rows["sparsegrad_sparse"]["times"]["total"]["median"]
    ratios = {m: dict(bwd_over_sparse=common.ratio(r["times"]["backward"]["median"], sparse_bwd),
                      total_over_sparse=common.ratio(r["times"]["total"]["median"], sparse_tot),
                      saved_sparse_over_this=common.ratio(
                          rows["sparsegrad_sparse"]["saved_bytes"], r["saved_bytes"]))
              for m, r in rows.items()}
    return dict(label=label, batch=batch, problem=problem.info, correctness=correctness,
                peer_checks=checks, skipped=skipped, methods=rows, ratios=ratios)


def print_config(res):
    info = res["problem"]
    print(f"\n== {res['label']}  T={info['steps']} B={res['batch']}  input rate "
          f"{100 * info['input_rate']:.2f}%")
    rows = []
    for m, r in res["methods"].items():
        t, q = r["times"], res["ratios"][m]
        rows.append([m, common.fmt_ms(t["forward"]), common.fmt_ms(t["backward"]),
                     common.fmt_ms(t["total"]), common.fmt_mb(r["saved_bytes"]),
                     common.fmt_mb(r.get("peak_bytes")), f"{100 * r['spike_rate']:.2f}",
                     f"{q['bwd_over_sparse']:.1f}x", f"{q['total_over_sparse']:.1f}x"])
    common.print_table(["method", "fwd ms", "bwd ms", "fwd+bwd ms", "saved MB", "peak MB",
                        "spike %", "bwd / sparse", "fwd+bwd / sparse"], rows)
    for peer, c in res["peer_checks"].items():
        print(f"  {peer} vs sparsegrad forward: {c['spike_mismatches']} of {c['entries']} spikes "
              f"differ ({c['spikes_peer']} vs {c['spikes_sparsegrad']} spikes)")
    for peer, why in res["skipped"].items():
        print(f"  {peer}: skipped ({why})")


def evaluate_checks(results, device):
    """Issue 5: at SHD-like 700->200 B=64, sparse backward >= 40x snnTorch's and the reference's.
    The 40x is the paper's GPU figure: checked on a GPU only."""
    if torch.device(device).type != "cuda":
        return {}
    for res in results:
        if res["label"] == "shd 700->200" and res["batch"] == 64:
            out = {}
            for m in ("pytorch", "snntorch"):
                if m in res["ratios"]:
                    v = res["ratios"][m]["bwd_over_sparse"]
                    out[f"sparse backward >= 40x {m} backward"] = dict(value=v, met=v >= 40.0)
            return out
    return {}


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=None,
                        help="subset of the layers' datasets, e.g. shd")
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    batches = args.batches or (QUICK["batches"] if args.quick else BATCHES)
    versions = {p: peer_version(p)[0] for p in PEERS}
    results = []
    configs = [c for c in CONFIGS if args.configs is None or c[1] in args.configs]
    if not configs:
        parser.error(f"--configs: none of {args.configs} is one of {[c[1] for c in CONFIGS]}")
    for label, dataset, n_out in configs[:1] if args.quick else configs:
        for batch in batches:
            if args.quick:
                res = run_config(label, dataset, QUICK["n_out"], batch, args, device, dtype,
                                 steps=QUICK["steps"])
            else:
                res = run_config(label, dataset, n_out, batch, args, device, dtype)
            print_config(res)
            results.append(res)
    checks = evaluate_checks(results, device)
    if checks:
        print("\nissue 5 check (SHD-like 700->200, T=500, B=64):")
        for name, c in checks.items():
            print(f"  {'MET ' if c['met'] else 'MISS'} {name}: {c['value']:.3g}")
    payload = common.result_header("bench_peers", args, device)
    payload.update(peer_versions=versions, peer_notes=PEER_NOTES, results=results, checks=checks)
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
