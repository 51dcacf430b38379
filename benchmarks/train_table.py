"""The spike-count schedule table of docs/training.md: one training run per schedule, same seed.

Runs ``python -m sparsegrad.train`` (in-process) with the given architecture and flags for
``--spike-loss none`` (sparse and dense backward) and every schedule of sparsegrad.losses, then
prints a markdown table (last-epoch test accuracy, spikes per test sample, active fractions, the
change against the sparse run without a spike loss) and writes every run's records as JSON.

    python benchmarks/train_table.py --arch conv --json benchmarks/results/train-conv.json
    python benchmarks/train_table.py --arch conv --surrogate triangle \\
        --json benchmarks/results/train-conv-triangle.json

Extra flags after ``--`` go to every run (e.g. ``-- --epochs 10``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _runs(schedules, with_dense):
    runs = [("none", ["--spike-loss", "none"])]
    if with_dense:
        runs.append(("none, --backward dense", ["--spike-loss", "none", "--backward", "dense"]))
    runs += [(s, ["--spike-loss", s]) for s in schedules]
    return runs


def _reusable(folder, parsed):
    """The records of a finished run in folder made with exactly these arguments, else None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "metrics.json")) as f:
            records = json.load(f)
    except (OSError, ValueError):
        return None
    wanted = vars(parsed)
    same = all(config.get(k) == v for k, v in wanted.items() if k not in ("no_plots", "no_progress"))
    return records if same and len(records) == parsed.epochs else None


def table(rows) -> str:
    base = rows[0]
    lines = ["| `--spike-loss` | σ0 | test acc (%) | Δ acc (points) | spikes / sample | Δ spikes "
             "| active % per layer |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        last = r["records"][-1]
        acc, spk = 100 * last["test_acc"], last["spikes_per_sample"]
        b_acc = 100 * base["records"][-1]["test_acc"]
        b_spk = base["records"][-1]["spikes_per_sample"]
        d_acc = "–" if r is base else f"{acc - b_acc:+.2f}"
        d_spk = "–" if r is base else f"{100 * (spk / b_spk - 1):+.0f} %"
        sigma = "–" if r["sigma0"] is None else f"{r['sigma0']:g}"
        act = " / ".join(f"{100 * a:.2f}" for a in last["active_fraction"])
        lines.append(f"| {r['name']} | {sigma} | {acc:.2f} | {d_acc} | {spk:.0f} | {d_spk} | "
                     f"{act} |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    raw = list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="conv")
    p.add_argument("--surrogate", default=None)
    p.add_argument("--out", default=None, help="run folders (default runs/table-<arch>)")
    p.add_argument("--json", default=None)
    p.add_argument("--no-dense", action="store_true", help="skip the --backward dense run")
    p.add_argument("--schedules", nargs="+", default=None)
    p.add_argument("--reuse", action="store_true",
                   help="take a run's records from its folder when it was made with the same "
                        "arguments (runs are deterministic: same seed, same bits)")
    args = p.parse_args(argv)

    from sparsegrad import train
    from sparsegrad.losses import SCHEDULES

    schedules = args.schedules or list(SCHEDULES)
    out = args.out or os.path.join("runs", f"table-{args.arch}"
                                   + (f"-{args.surrogate}" if args.surrogate else ""))
    common = ["--arch", args.arch, "--no-progress", "--no-plots"] + extra
    if args.surrogate:
        common += ["--surrogate", args.surrogate]
    rows = []
    for name, flags in _runs(schedules, not args.no_dense):
        folder = os.path.join(out, name.split(",")[0] + ("-dense" if "dense" in name else ""))
        cli = common + flags + ["--out", folder]
        print(f"== {name}: python -m sparsegrad.train {' '.join(cli)}", flush=True)
        t0 = time.perf_counter()
        parsed = train.build_parser().parse_args(cli)
        records = _reusable(folder, parsed) if args.reuse else None
        if records is not None:
            print(f"   (reused {folder}/metrics.json: made with the same arguments)", flush=True)
        else:
            records = train.run(parsed)
        with open(os.path.join(folder, "config.json")) as f:
            sigma0 = json.load(f)["sigma0_used"]
        rows.append(dict(name=name, cli=cli, sigma0=sigma0, records=records,
                         wall_s=time.perf_counter() - t0))
    text = table(rows)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(command="python benchmarks/train_table.py " + " ".join(raw),
                           table=text, runs=rows), f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
