"""One hidden LIF layer: dense PyTorch autograd vs sparsegrad dense vs sparsegrad sparse.

Dense baselines: "pytorch" is plain PyTorch BPTT of the same model written efficiently (one
F.linear, a loop over current.unbind(0)); "reference" is sparsegrad.reference.lif_layer, the
same model written the same way for readability (timed up to --reference-max-batch). Ratios use
"pytorch".
For each configuration (the paper's Fashion-MNIST and SHD layers, batch 64 and 256) it prints
forward, backward and forward+backward time (median ± half the IQR over --repeats), the bytes
saved for backward (torch.autograd.graph.saved_tensors_hooks, parameters excluded), the peak
memory of one forward+backward step, the measured spike rates and the active fraction, then the
ratios against sparse. Correctness is checked against sparsegrad.reference before any timing.

    python benchmarks/bench_layer.py --json benchmarks/results/layer.json
    python benchmarks/bench_layer.py --quick            # CI-sized
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (label, dataset, n_out, second_layer): SHD's 200->200 layer is fed by a 700->200 sparse layer.
CONFIGS = [
    ("fmnist 784->200", "fmnist", 200, False),
    ("shd 700->200", "shd", 200, False),
    ("shd 200->200", "shd", 200, True),
]
BATCHES = (64, 256)
QUICK = dict(steps=20, n_out=24, batches=(4,))
# Core issue check: SHD-like layer 700->200, T=500, B=64.
CHECK_CONFIG = ("shd 700->200", 64)
TARGETS = dict(bwd_vs_reference=40.0, bwd_vs_dense=5.0, saved_fraction=0.05)


def run_config(label, dataset, n_out, second_layer, batch, args, device, dtype, steps=None):
    problem = common.make_layer_problem(dataset, batch, n_out, steps=steps,
                                        second_layer=second_layer, dtype=dtype, device=device,
                                        seed=args.seed)
    check = common.check_sparsegrad_layer(problem.x, problem.weight, problem.bias)
    methods = list(common.LAYER_METHODS)
    if batch <= args.reference_max_batch:
        methods.append("reference")
    rows, spikes = {}, {}
    for method in methods:
        rows[method], spikes[method] = common.bench_layer_method(
            method, problem, device=device, repeats=args.repeats, warmup=args.warmup)
    # Same inputs, same model: the forward spikes of all agree (float round-off aside).
    for method in methods[1:]:
        rows[method]["spike_mismatches_vs_pytorch"] = common.assert_spikes_match(
            method, spikes[method], spikes["pytorch"])
    ref, dense, sparse = (rows[m] for m in common.LAYER_METHODS)
    med = lambda row, phase: row["times"][phase]["median"]  # noqa: E731
    ratios = dict(
        bwd_pytorch_over_sparse=common.ratio(med(ref, "backward"), med(sparse, "backward")),
        bwd_dense_over_sparse=common.ratio(med(dense, "backward"), med(sparse, "backward")),
        fwd_pytorch_over_sparse=common.ratio(med(ref, "forward"), med(sparse, "forward")),
        total_pytorch_over_sparse=common.ratio(med(ref, "total"), med(sparse, "total")),
        saved_sparse_over_pytorch=common.ratio(sparse["saved_bytes"], ref["saved_bytes"]),
        peak_sparse_over_pytorch=common.ratio(sparse.get("peak_bytes"), ref.get("peak_bytes")),
    )
    if "reference" in rows:
        ratios["bwd_reference_over_sparse"] = common.ratio(med(rows["reference"], "backward"),
                                                           med(sparse, "backward"))
    return dict(label=label, batch=batch, problem=problem.info, correctness=check,
                methods=rows, ratios=ratios, device=str(device),
                **common.layer_floor_report(problem, rows))


def print_config(res):
    info = res["problem"]
    print(f"\n== {res['label']}  T={info['steps']} B={res['batch']}  input rate "
          f"{100 * info['input_rate']:.2f}%  (weights calibrated to "
          f"{100 * info['calibration_rate']:.2f}% output spikes)")
    rows = []
    for m, r in res["methods"].items():
        t = r["times"]
        rows.append([m, common.fmt_ms(t["forward"]), common.fmt_ms(t["backward"]),
                     common.fmt_ms(t["total"]), common.fmt_mb(r["saved_bytes"]),
                     common.fmt_mb(r.get("peak_bytes")), f"{100 * r['spike_rate']:.2f}",
                     f"{100 * r['active_fraction']:.2f}"])
    common.print_table(["method", "fwd ms", "bwd ms", "fwd+bwd ms", "saved MB", "peak MB",
                        "spike %", "active %"], rows)
    r = res["ratios"]
    extra = (f" (reference / sparse: {r['bwd_reference_over_sparse']:.1f}x)"
             if "bwd_reference_over_sparse" in r else "")
    print(f"ratios: backward pytorch/sparse {r['bwd_pytorch_over_sparse']:.1f}x{extra}, "
          f"sparsegrad dense/sparse {r['bwd_dense_over_sparse']:.1f}x; forward pytorch/sparse "
          f"{r['fwd_pytorch_over_sparse']:.1f}x; fwd+bwd pytorch/sparse "
          f"{r['total_pytorch_over_sparse']:.1f}x; saved sparse/pytorch "
          f"{100 * r['saved_sparse_over_pytorch']:.2f}%; peak sparse/pytorch "
          f"{100 * r['peak_sparse_over_pytorch']:.1f}%")
    if res.get("over_floor"):
        print(common.fmt_over_floor(res["over_floor"], res.get("device", "cpu")))


def evaluate_checks(results):
    """The core issue's targets, on the SHD-like 700->200 layer at B=64 (if it was run)."""
    for res in results:
        if (res["label"], res["batch"]) == CHECK_CONFIG:
            r = res["ratios"]
            checks = {
                "sparse backward >= 40x dense PyTorch autograd backward (pytorch)": (
                    r["bwd_pytorch_over_sparse"], r["bwd_pytorch_over_sparse"]
                    >= TARGETS["bwd_vs_reference"]),
                "sparse backward >= 5x sparsegrad dense backward": (
                    r["bwd_dense_over_sparse"], r["bwd_dense_over_sparse"]
                    >= TARGETS["bwd_vs_dense"]),
                "sparse saved bytes <= 5% of dense PyTorch autograd's": (
                    r["saved_sparse_over_pytorch"], r["saved_sparse_over_pytorch"]
                    <= TARGETS["saved_fraction"]),
            }
            if "bwd_reference_over_sparse" in r:
                v = r["bwd_reference_over_sparse"]
                checks["sparse backward >= 40x sparsegrad.reference backward"] = (
                    v, v >= TARGETS["bwd_vs_reference"])
            return {k: dict(value=v, met=bool(ok)) for k, (v, ok) in checks.items()}
    return {}


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="subset of configuration labels' datasets, e.g. shd")
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--reference-max-batch", type=int, default=64,
                        help="time sparsegrad.reference as written only up to this batch")
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    configs = [c for c in CONFIGS if args.configs is None or c[1] in args.configs]
    if not configs:
        parser.error(f"--configs: none of {args.configs} is one of "
                     f"{sorted({c[1] for c in CONFIGS})}")
    batches = args.batches or (QUICK["batches"] if args.quick else BATCHES)
    results = []
    for label, dataset, n_out, second in configs:
        for batch in batches:
            if args.quick:
                res = run_config(label, dataset, QUICK["n_out"], second, batch, args, device,
                                 dtype, steps=QUICK["steps"])
            else:
                res = run_config(label, dataset, n_out, second, batch, args, device, dtype)
            print_config(res)
            results.append(res)
    checks = evaluate_checks(results)
    if checks:
        print("\ncore issue check (SHD-like 700->200, T=500, B=64):")
        for name, c in checks.items():
            print(f"  {'MET ' if c['met'] else 'MISS'} {name}: {c['value']:.3g}")
    payload = common.result_header("bench_layer", args, device)
    payload.update(results=results, checks=checks)
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
