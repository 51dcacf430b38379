"""How the sparse backward scales: backward time and memory vs b_th (activity), hidden size, T
and batch, on an SHD-like hidden layer (700 inputs at ~2 % rate, weights calibrated to ~2 %
output spikes at every size). sparsegrad dense (and with --with-pytorch plain PyTorch autograd)
run at every point as the dense baseline. A straight-line fit of sparse backward time
against active entries tells whether the cost is linear in them.

    python benchmarks/bench_sweeps.py --json benchmarks/results/sweeps.json
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BASE = dict(dataset="shd", steps=500, batch=64, hidden=200)
SWEEPS = {
    "b_th": [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "hidden": [100, 200, 500, 1000],
    "steps": [100, 200, 500, 1000],
    "batch": [16, 32, 64, 128, 256],
}
QUICK_BASE = dict(dataset="shd", steps=20, batch=4, hidden=24)
QUICK_SWEEPS = {"b_th": [0.05, 0.2, 1.0], "hidden": [16, 32], "steps": [10, 20], "batch": [2, 4]}


def linear_fit(xs, ys) -> dict:
    """Least squares y = a + b x, its R^2, and the log-log slope (1 = proportional)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if math.isfinite(float(y)) and math.isfinite(float(x))]
    n = len(pts)
    if n < 2:
        return dict(n=n)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    syy = sum((p[1] - my) ** 2 for p in pts)
    if sxx == 0:
        return dict(n=n)
    slope = sxy / sxx
    r2 = (sxy * sxy / (sxx * syy)) if syy > 0 else 1.0
    pos = [(math.log(x), math.log(y)) for x, y in pts if x > 0 and y > 0]
    loglog = None
    if len(pos) >= 2:
        lx = sum(p[0] for p in pos) / len(pos)
        ly = sum(p[1] for p in pos) / len(pos)
        vx = sum((p[0] - lx) ** 2 for p in pos)
        loglog = sum((p[0] - lx) * (p[1] - ly) for p in pos) / vx if vx > 0 else None
    return dict(n=n, intercept=my - slope * mx, slope=slope, r2=r2, loglog_slope=loglog)


def run_point(sweep, value, base, args, device, dtype, problem=None):
    """One sweep point; problems are reused along the b_th sweep (only b_th changes)."""
    cfg = dict(base)
    if sweep != "b_th":
        cfg[sweep] = value
    b_th = value if sweep == "b_th" else common.B_TH
    if problem is None:
        problem = common.make_layer_problem(cfg["dataset"], cfg["batch"], cfg["hidden"],
                                            steps=cfg["steps"], dtype=dtype, device=device,
                                            seed=args.seed)
    # correctness at this point's b_th before timing (float64, batch slice)
    correctness = common.check_sparsegrad_layer(problem.x, problem.weight, problem.bias,
                                                b_th=b_th)
    methods = ["sparsegrad_sparse"]
    if sweep != "b_th" or value == args_first_bth(args):
        # the dense baselines do not depend on b_th: measure them once on that sweep
        methods.append("sparsegrad_dense")
        if args.with_pytorch:
            methods.append("pytorch")
    rows = {}
    for m in methods:
        rows[m], _ = common.bench_layer_method(m, problem, device=device, b_th=b_th,
                                               repeats=args.repeats, warmup=args.warmup)
    sparse = rows["sparsegrad_sparse"]
    point = dict(sweep=sweep, value=value, b_th=b_th, steps=cfg["steps"], batch=cfg["batch"],
                 hidden=cfg["hidden"], n_in=problem.x.shape[2],
                 input_nonzeros=sparse["input_nonzeros"],
                 active_entries=sparse["active_entries"],
                 active_fraction=sparse["active_fraction"], spike_rate=sparse["spike_rate"],
                 correctness=correctness, methods=rows)
    floor = common.layer_floor_report(problem, rows)
    point["floor_sparse_backward_ms"] = floor["floors"]["sparse"]["backward"]
    point["over_floor"] = floor["over_floor"]
    return point, problem


def args_first_bth(args):
    return args._sweeps["b_th"][0] if args._sweeps.get("b_th") else None


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--with-pytorch", action="store_true",
                        help="also time plain PyTorch autograd at every point (slower)")
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    base = QUICK_BASE if args.quick else BASE
    grid = QUICK_SWEEPS if args.quick else SWEEPS
    args._sweeps = {k: grid[k] for k in args.sweeps}
    points, fits = [], {}
    for sweep, values in args._sweeps.items():
        problem = None
        print(f"\n== backward vs {sweep}  (base: T={base['steps']} B={base['batch']} "
              f"700->{base['hidden']}, b_th={common.B_TH})")
        rows = []
        for value in values:
            point, p = run_point(sweep, value, base, args, device, dtype,
                                 problem if sweep == "b_th" else None)
            problem = p
            points.append(point)
            m = point["methods"]
            rows.append([f"{value:g}", f"{100 * point['active_fraction']:.2f}",
                         f"{point['active_entries']}",
                         common.fmt_ms(m["sparsegrad_sparse"]["times"]["backward"]),
                         common.fmt_ms(m["sparsegrad_dense"]["times"]["backward"])
                         if "sparsegrad_dense" in m else "(as above)",
                         common.fmt_mb(m["sparsegrad_sparse"]["saved_bytes"]),
                         common.fmt_mb(m["sparsegrad_sparse"].get("peak_bytes")),
                         f"{point['over_floor']['sparse_backward']:.3g}x"])
        common.print_table([sweep, "active %", "active entries", "sparse bwd ms",
                            "dense bwd ms", "sparse saved MB", "sparse peak MB",
                            "bwd / H100 floor"], rows)
        mine = [p for p in points if p["sweep"] == sweep]
        fits[sweep] = linear_fit([p["active_entries"] for p in mine],
                                 [p["methods"]["sparsegrad_sparse"]["times"]["backward"]["median"]
                                  for p in mine])
    fits["all"] = linear_fit([p["active_entries"] for p in points],
                             [p["methods"]["sparsegrad_sparse"]["times"]["backward"]["median"]
                              for p in points])
    print("\nsparse backward ms vs active entries (linear fit; log-log slope 1 = proportional):")
    for k, f in fits.items():
        if "slope" in f:
            ll = f"{f['loglog_slope']:.2f}" if f.get("loglog_slope") is not None else "-"
            print(f"  {k:7s} {1e6 * f['slope']:.3g} ms per million active entries, intercept "
                  f"{f['intercept']:.3g} ms, R^2 {f['r2']:.3f}, log-log slope {ll}")
    payload = common.result_header("bench_sweeps", args, device)
    payload["settings"].pop("_sweeps", None)
    payload.update(base=base, sweeps=args._sweeps, points=points, fits=fits)
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
