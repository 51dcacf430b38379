"""Turn the benchmark JSON files into PNG plots and markdown tables.

Reads every JSON a bench_*.py script wrote into --results (layer.json, network.json, ...;
several runs of one script may sit side by side, e.g. layer-1thread.json), writes <stem>.png
next to each and results.md with every table; --docs PATH also replaces the
part of PATH between the markers `<!-- results:begin -->` and `<!-- results:end -->` with the
same tables, so the docs page always shows what the JSON holds.

    python benchmarks/report.py --results benchmarks/results --docs docs/benchmarks.md

GPU results live in benchmarks/results/gpu/, one set per GPU model, the file names carrying the
model: <model>-summary.json (scripts/gpu_check.sh's summary), <model>-layer.json,
<model>-network.json, <model>-peers.json, <model>-sweeps.json (e.g. h100-summary.json). They
make the GPU section of the docs page (between `<!-- gpu-results:begin -->` and
`<!-- gpu-results:end -->`); with none there, the section says that nothing was measured on a GPU
yet. To commit the results of a GPU run:

    bash scripts/gpu_check.sh                    # on the GPU machine; results in $OUT or runs/gpu-check
    python benchmarks/report.py --add-gpu-run runs/gpu-check --docs docs/benchmarks.md
    git add benchmarks/results/gpu docs/benchmarks.md

--add-gpu-run DIR copies DIR/{summary,layer,network,peers,sweeps}.json to
benchmarks/results/gpu/<model>-*.json (the model from summary.json's gpu_model, e.g. "h100";
--gpu-model overrides it) and then regenerates everything as above. Copying the files by hand
under those names and running the report is the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
NAMES = ("layer", "network", "peers", "sweeps", "recurrent")
GPU_FILES = ("summary",) + NAMES
GPU_NOT_MEASURED = ("Not yet measured on a GPU. On a GPU machine run `bash scripts/gpu_check.sh` "
                    "(it builds, tests, times and sanitises everything in under 7 minutes), then "
                    "`python benchmarks/report.py --add-gpu-run runs/gpu-check --docs "
                    "docs/benchmarks.md` and commit `benchmarks/results/gpu/`.")


def _f(v):
    """JSON stores inf/nan as strings; read every number back as a float."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def ms(summary):
    med = _f(summary["median"])
    if math.isinf(med):
        return "OOM"
    half = _f(summary.get("iqr", 0)) / 2
    return f"{med:.1f} ± {half:.1f}" if med < 1000 else f"{med:.0f} ± {half:.0f}"


def mb(v):
    v = _f(v)
    if math.isnan(v):
        return "–"
    return "OOM" if math.isinf(v) else f"{v / 2**20:.2f}"


def x(v, digits=1):
    v = _f(v)
    return "–" if math.isnan(v) else f"{v:.{digits}f}×"


def pct(v, digits=2):
    v = _f(v)
    return "–" if math.isnan(v) else f"{100 * v:.{digits}f} %"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_line(data):
    m = data["machine"]
    gpu = (f"GPU {m['gpu']} (sm {m.get('gpu_capability', '?')}, CUDA {m.get('cuda')}), host "
           if m.get("gpu") else "")
    return (f"{gpu}{m.get('cpu')} ({m.get('logical_cpus')} logical CPUs), torch {m.get('torch')}, "
            f"{m.get('torch_threads')} threads, device {m.get('device')}, dtype "
            f"{data['settings'].get('dtype')}, {data['settings'].get('repeats')} repeats, "
            f"{m.get('date_utc')} UTC"
            + (f", load average {m['load_average']:.2f}" if m.get("load_average") is not None else "")
            + f". Command: `{m.get('command')}`")


def checks_md(checks):
    if not checks:
        return ""
    lines = ["", "Targets:"]
    for name, c in checks.items():
        lines.append(f"- {'**met**' if c['met'] else '**missed**'}: {name} "
                     f"(measured {_f(c['value']):.3g})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- markdown

def layer_md(data):
    rows = []
    for res in data["results"]:
        info = res["problem"]
        for m, r in res["methods"].items():
            t = r["times"]
            rows.append([f"{res['label']} T={info['steps']} B={res['batch']}", m,
                         ms(t["forward"]), ms(t["backward"]), ms(t["total"]),
                         mb(r["saved_bytes"]), mb(r.get("peak_bytes")),
                         pct(r["spike_rate"]), pct(r["active_fraction"])])
    ratio_rows = []
    for res in data["results"]:
        q = res["ratios"]
        ratio_rows.append([f"{res['label']} T={res['problem']['steps']} B={res['batch']}",
                           pct(res["problem"]["input_rate"]),
                           x(q["bwd_pytorch_over_sparse"]), x(q["bwd_dense_over_sparse"]),
                           x(q.get("bwd_reference_over_sparse")),
                           x(q["fwd_pytorch_over_sparse"]), x(q.get("fwd_sparse_over_dense"), 2),
                           x(q["total_pytorch_over_sparse"]),
                           pct(q["saved_sparse_over_pytorch"]),
                           pct(q["peak_sparse_over_pytorch"], 1)])
    return "\n".join([
        "### One hidden layer (`bench_layer.py`)", "", machine_line(data), "",
        table(["layer", "method", "forward ms", "backward ms", "fwd+bwd ms", "saved MB",
               "peak MB", "spikes", "active"], rows), "",
        table(["layer", "input rate", "bwd pytorch / sparse", "bwd sg dense / sparse",
               "bwd reference / sparse", "fwd pytorch / sparse", "fwd sparse / sg dense",
               "fwd+bwd pytorch / sparse",
               "saved sparse / pytorch", "peak sparse / pytorch"], ratio_rows),
        checks_md(data.get("checks")), floor_md(data), "",
        "![layer](../benchmarks/results/layer.png)"])


def floor_md(data):
    """Measured time over the performance-model floor (benchmarks/perf_model.py), when the JSON
    has it (bench_layer.py writes it since the model exists)."""
    rows = []
    for res in data["results"]:
        over = res.get("over_floor")
        if not over:
            continue
        fl = res["floors"]
        rows.append([f"{res['label']} T={res['problem']['steps']} B={res['batch']}"]
                     + [f"{_f(fl[m][p]) * 1e3:.3g} µs / {x(over.get(f'{m}_{p}'), 0)}"
                        for m in ("sparse", "dense") for p in ("forward", "backward")])
    if not rows:
        return ""
    return "\n".join(["", "Floor of each phase on an H100 (bytes and flops it must move and do, "
                      "`benchmarks/perf_model.py`, docs/cuda.md) and measured time / floor:", "",
                      table(["layer", "sparse forward", "sparse backward", "dense forward",
                             "dense backward"], rows)])


def network_md(data):
    rows = []
    for res in data["results"]:
        info = res["problem"]
        for m, r in res["methods"].items():
            t, q = r["times"], res["ratios"].get(m, {})
            act = r.get("active_fractions")
            rows.append([f"{res['label']} {info['n_in']}-{info['hidden']}-{info['hidden']}-"
                         f"{info['classes']} T={info['steps']} B={res['batch']}", m,
                         ms(t["forward"]), ms(t["backward"]), ms(t["total"]),
                         mb(r["saved_bytes"]), mb(r["peak_bytes"]),
                         " / ".join(pct(a, 1) for a in act) if act else "–",
                         x(q.get("step_over_sparse"))])
    return "\n".join([
        "### Training step (`bench_network.py`)", "", machine_line(data), "",
        "forward = network + loss; backward = loss.backward() + Adam step.", "",
        table(["setting", "network", "forward ms", "backward+Adam ms", "step ms", "saved MB",
               "peak MB", "active l1 / l2", "step / sparse step"], rows),
        checks_md(data.get("checks")), "", "![network](../benchmarks/results/network.png)"])


def peers_md(data):
    rows = []
    for res in data["results"]:
        info = res["problem"]
        for m, r in res["methods"].items():
            t, q = r["times"], res["ratios"][m]
            name = f"{m} {r['version']}" if "version" in r else m
            rows.append([f"{res['label']} T={info['steps']} B={res['batch']}", name,
                         ms(t["forward"]), ms(t["backward"]), ms(t["total"]),
                         mb(r["saved_bytes"]), mb(r.get("peak_bytes")),
                         x(q["bwd_over_sparse"]), x(q["total_over_sparse"])])
        for peer, why in res.get("skipped", {}).items():
            rows.append([f"{res['label']} T={info['steps']} B={res['batch']}", peer,
                         "skipped", why, "", "", "", "", ""])
    agree = []
    for res in data["results"]:
        for peer, c in res.get("peer_checks", {}).items():
            agree.append([res["label"], peer, f"{c['spike_mismatches']} / {c['entries']}",
                          f"{c['spikes_peer']} vs {c['spikes_sparsegrad']}"])
    notes = "\n".join(f"- **{k}**: {v}" for k, v in data.get("peer_notes", {}).items())
    return "\n".join([
        "### Other libraries (`bench_peers.py`)", "", machine_line(data), "",
        table(["layer", "method", "forward ms", "backward ms", "fwd+bwd ms", "saved MB",
               "peak MB", "bwd / sparse bwd", "fwd+bwd / sparse"], rows), "",
        "Forward agreement with sparsegrad before timing (small slice of the same problem):", "",
        table(["layer", "peer", "differing spike entries", "spikes peer vs sparsegrad"], agree),
        "", notes, checks_md(data.get("checks")), "", "![peers](../benchmarks/results/peers.png)"])


def sweeps_md(data):
    rows = []
    for p in data["points"]:
        m = p["methods"]
        s = m["sparsegrad_sparse"]
        d = m.get("sparsegrad_dense")
        rows.append([p["sweep"], f"{p['value']:g}", f"T={p['steps']} B={p['batch']} "
                     f"{p['n_in']}->{p['hidden']} b_th={p['b_th']:g}",
                     pct(p["active_fraction"]), p["active_entries"],
                     ms(s["times"]["backward"]), ms(d["times"]["backward"]) if d else "as above",
                     mb(s["saved_bytes"]), mb(d["saved_bytes"]) if d else "as above",
                     mb(s.get("peak_bytes")), mb(d.get("peak_bytes")) if d else "as above"])
    fit_rows = []
    for k, f in data["fits"].items():
        if "slope" in f:
            ll = f.get("loglog_slope")
            fit_rows.append([k, f["n"], f"{1e6 * _f(f['slope']):.3g}",
                             f"{_f(f['intercept']):.3g}", f"{_f(f['r2']):.3f}",
                             "–" if ll is None else f"{_f(ll):.2f}"])
    return "\n".join([
        "### Scaling sweeps (`bench_sweeps.py`)", "", machine_line(data), "",
        table(["sweep", "value", "layer", "active", "active entries", "sparse bwd ms",
               "dense bwd ms", "sparse saved MB", "dense saved MB", "sparse peak MB",
               "dense peak MB"], rows), "",
        "Straight-line fit of sparse backward time against active entries (log-log slope 1 "
        "means time proportional to active entries):", "",
        table(["points", "n", "ms per million active entries", "intercept ms", "R²",
               "log-log slope"], fit_rows), "",
        "![sweeps](../benchmarks/results/sweeps.png)"])


# ----------------------------------------------------------------------------- plots

def _bars(ax, groups, series, values, ylabel, log=True):
    import numpy as np

    width = 0.8 / max(len(series), 1)
    pos = np.arange(len(groups))
    for k, s in enumerate(series):
        vals = [values.get((g, s), math.nan) for g in groups]
        ax.bar(pos + (k - (len(series) - 1) / 2) * width, vals, width, label=s)
    ax.set_xticks(pos)
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_layer(data, path, plt):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups, series, bwd, saved = [], [], {}, {}
    for res in data["results"]:
        g = f"{res['label']}\nT={res['problem']['steps']} B={res['batch']}"
        groups.append(g)
        for m, r in res["methods"].items():
            series.append(m) if m not in series else None
            bwd[(g, m)] = _f(r["times"]["backward"]["median"])
            saved[(g, m)] = _f(r["saved_bytes"]) / 2**20
    _bars(axes[0], groups, series, bwd, "backward ms (median)")
    axes[0].set_title("hidden-layer backward time")
    _bars(axes[1], groups, series, saved, "saved for backward, MB")
    axes[1].set_title("saved-for-backward memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_network(data, path, plt):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    groups, series, vals = [], [], {}
    for res in data["results"]:
        g = f"{res['label']} T={res['problem']['steps']}\nB={res['batch']}"
        groups.append(g)
        for m, r in res["methods"].items():
            series.append(m) if m not in series else None
            vals[(g, m)] = _f(r["times"]["total"]["median"])
    _bars(ax, groups, series, vals, "training step ms (median)")
    ax.set_title("2 hidden LIF layers + readout + loss + Adam")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_peers(data, path, plt):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, phase in zip(axes, ("backward", "total")):
        groups, series, vals = [], [], {}
        for res in data["results"]:
            g = f"{res['label']}\nT={res['problem']['steps']} B={res['batch']}"
            groups.append(g)
            for m, r in res["methods"].items():
                series.append(m) if m not in series else None
                vals[(g, m)] = _f(r["times"][phase]["median"])
        _bars(ax, groups, series, vals, f"{'fwd+bwd' if phase == 'total' else phase} ms")
        ax.set_title(f"{'forward+backward' if phase == 'total' else phase}, one hidden layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(data, path, plt):
    import numpy as np

    points = data["points"]
    sweeps = list(dict.fromkeys(p["sweep"] for p in points))
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    ax = axes[0, 0]
    for s in sweeps:
        mine = [p for p in points if p["sweep"] == s]
        ax.plot([p["active_entries"] for p in mine],
                [_f(p["methods"]["sparsegrad_sparse"]["times"]["backward"]["median"])
                 for p in mine], "o", label=f"vs {s}")
    f = data["fits"].get("b_th") or data["fits"].get("all", {})
    if "slope" in f:
        xs = np.linspace(0, max(p["active_entries"] for p in points), 50)
        ax.plot(xs, _f(f["intercept"]) + _f(f["slope"]) * xs, "k--", lw=1,
                label=f"linear fit (b_th sweep), R²={_f(f['r2']):.2f}")
    ax.set_xlabel("active entries |A|")
    ax.set_ylabel("sparse backward ms")
    ax.set_title("sparse backward time vs active entries")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax, s in zip(list(axes.flat)[1:], sweeps):
        mine = [p for p in points if p["sweep"] == s]
        xs = [p["active_fraction"] * 100 if s == "b_th" else p["value"] for p in mine]
        ax.plot(xs, [_f(p["methods"]["sparsegrad_sparse"]["times"]["backward"]["median"])
                     for p in mine], "o-", label="sparsegrad sparse")
        for m, style in (("sparsegrad_dense", "s--"), ("pytorch", "^:")):
            have = [(xv, p) for xv, p in zip(xs, mine) if m in p["methods"]]
            if s == "b_th" and have:  # dense cost does not depend on b_th: a flat line
                ax.axhline(_f(have[0][1]["methods"][m]["times"]["backward"]["median"]),
                           ls="--" if m == "sparsegrad_dense" else ":", color="C1"
                           if m == "sparsegrad_dense" else "C2", label=m.replace("_", " "))
            elif have:
                ax.plot([h[0] for h in have],
                        [_f(h[1]["methods"][m]["times"]["backward"]["median"]) for h in have],
                        style, label=m.replace("_", " "))
        ax.set_xlabel("active % (set by b_th)" if s == "b_th" else s)
        ax.set_ylabel("backward ms")
        ax.set_yscale("log")
        if s == "b_th":
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"backward vs {s}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes.flat[-1] if len(sweeps) < 5 else None
    if ax is not None:
        for k, s in enumerate(sweeps):
            mine = [p for p in points if p["sweep"] == s]
            ax.plot([p["active_entries"] for p in mine],
                    [_f(p["methods"]["sparsegrad_sparse"]["saved_bytes"]) / 2**20 for p in mine],
                    "o", color=f"C{k}", label=f"sparse, vs {s}")
            dense = [p for p in mine if "sparsegrad_dense" in p["methods"]]
            ax.plot([p["active_entries"] for p in dense],
                    [_f(p["methods"]["sparsegrad_dense"]["saved_bytes"]) / 2**20 for p in dense],
                    "x", color=f"C{k}", label=f"sg dense, vs {s}")
        ax.set_xlabel("active entries |A|")
        ax.set_ylabel("saved for backward, MB")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title("saved-for-backward memory")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MARKDOWN = {"layer": layer_md, "network": network_md, "peers": peers_md, "sweeps": sweeps_md}
PLOTS = {"layer": plot_layer, "network": plot_network, "peers": plot_peers, "sweeps": plot_sweeps}


def _add_recurrent():  # bench_recurrent.py's tables and plot live in report_recurrent.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import report_recurrent

    MARKDOWN["recurrent"] = report_recurrent.recurrent_md
    PLOTS["recurrent"] = report_recurrent.plot_recurrent


_add_recurrent()


# ----------------------------------------------------------------------------- GPU results

_GPU_NAME = re.compile(r"^([a-z0-9][a-z0-9._]*(?:-[a-z0-9._]+)*?)-(%s)\.json$" % "|".join(GPU_FILES))


def gpu_runs(gpu_dir) -> dict:
    """{model: {kind: data}} from <gpu_dir>/<model>-<kind>.json, models and kinds in order."""
    runs = {}
    if not os.path.isdir(gpu_dir):
        return runs
    for fname in sorted(os.listdir(gpu_dir)):
        m = _GPU_NAME.match(fname)
        if not m:
            continue
        with open(os.path.join(gpu_dir, fname)) as f:
            runs.setdefault(m.group(1), {})[m.group(2)] = json.load(f)
    return {k: dict(sorted(v.items(), key=lambda kv: GPU_FILES.index(kv[0])))
            for k, v in runs.items()}


def gpu_summary_md(model, s) -> str:
    def val(v, unit):
        v = _f(v)
        if math.isnan(v):
            return "–"
        return f"{100 * v:.1f} %" if unit == "%" else f"{v:.3g}×"

    head = [["device", f"{s.get('device')} (`{model}`)"],
            ["software", f"torch {s.get('torch')} (CUDA {s.get('torch_cuda')}), driver "
                         f"{s.get('driver')}, nvcc {s.get('nvcc')}, Python {s.get('python')}"],
            ["run", f"{s.get('date_utc', '?')} UTC, "
                    f"{'quick sizes' if s.get('quick') else 'full sizes'}, "
                    f"{_f(s.get('total_seconds')):.0f} s, exit {s.get('exit_code')}"],
            ["tests (CUDA cases)", f"{s.get('tests_passed')} passed, {s.get('tests_failed')} "
                                   f"failed, {s.get('tests_skipped')} skipped"
             + (": " + ", ".join(f"`{t}`" for t in s.get("failed_tests", [])[:10])
                if s.get("failed_tests") else "")],
            ["compute-sanitizer errors", _sanitizer_cell(s)]]
    targets = [[t.get("label"), val(t.get("value"), "%" if "mem" in k else "x"), t.get("target"),
                "**met**" if t.get("met") else "**missed**" if t.get("met") is False else "–"]
               for k, t in (s.get("targets") or {}).items()]
    over = s.get("over_floor_shd") or {}
    steps = [[n, st.get("status"), f"{_f(st.get('seconds')):.1f}", st.get("note", "")]
             for n, st in (s.get("steps") or {}).items()]
    parts = [table(["", ""], head), "", f"Targets ({s.get('shd_layer')}; network "
             f"{s.get('shd_network')}):", "",
             table(["target", "measured", "target", "verdict"], targets)]
    if over:
        parts += ["", "SHD layer, measured time / H100 floor (`benchmarks/perf_model.py`): "
                  + ", ".join(f"{k.replace('_', ' ')} {val(v, 'x')}" for k, v in over.items())]
    parts += ["", "What ran (scripts/gpu_check.sh steps):", "",
              table(["step", "status", "seconds", "note"], steps)]
    return "\n".join(parts)


def _sanitizer_cell(s) -> str:
    tools = s.get("sanitizer")
    if not isinstance(tools, dict):
        return f"{s.get('sanitizer_errors')} ({tools})"
    return f"{s.get('sanitizer_errors')} (" + ", ".join(
        f"{k}: {v.get('errors')}" for k, v in tools.items() if isinstance(v, dict)) + ")"


def gpu_md(gpu_dir) -> str:
    runs = gpu_runs(gpu_dir)
    if not runs:
        return GPU_NOT_MEASURED
    parts = []
    for model, kinds in runs.items():
        summary = kinds.get("summary")
        title = (summary or {}).get("device") or model
        parts.append(f"### {title} (`benchmarks/results/gpu/{model}-*.json`)")
        if summary:
            parts.append(gpu_summary_md(model, summary))
        for kind in NAMES:
            if kind in kinds:
                stem = f"{model}-{kind}"
                t, body = MARKDOWN[kind](kinds[kind]).split("\n", 1)
                parts.append(f"#{t}, `gpu/{stem}.json`\n"
                             + body.replace(f"results/{kind}.png", f"results/gpu/{stem}.png"))
    return "\n\n".join(parts)


def add_gpu_run(run_dir, gpu_dir, model=None) -> list:
    """Copy a gpu_check.sh run's JSON into gpu_dir as <model>-<kind>.json."""
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary_path):
        raise SystemExit(f"--add-gpu-run: {summary_path} does not exist")
    with open(summary_path) as f:
        summary = json.load(f)
    if model is None:
        if summary.get("mode") != "gpu" or not summary.get("gpu_model"):
            raise SystemExit(f"--add-gpu-run: {summary_path} is not from a GPU run (mode "
                             f"{summary.get('mode')!r}); pass --gpu-model to file it anyway")
        model = summary["gpu_model"]
    if not re.match(r"^[a-z0-9][a-z0-9._]*$", model):
        raise SystemExit(f"--gpu-model must be lower-case letters/digits, got {model!r}")
    os.makedirs(gpu_dir, exist_ok=True)
    copied = []
    for kind in GPU_FILES:
        src = os.path.join(run_dir, f"{kind}.json")
        if os.path.exists(src):
            dst = os.path.join(gpu_dir, f"{model}-{kind}.json")
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


def _replace_between(doc, begin, end, text, path):
    if begin not in doc or end not in doc:
        raise SystemExit(f"--docs: {path} lacks the markers {begin} ... {end}")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + text + end + tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "results"),
                   help="folder holding layer.json, network.json, peers.json, sweeps.json")
    p.add_argument("--docs", default=None, metavar="PATH",
                   help="markdown file whose results section (between the markers) to replace")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--add-gpu-run", metavar="DIR", default=None,
                   help="first copy a scripts/gpu_check.sh run's JSON (DIR = its $OUT) into "
                        "<results>/gpu/<model>-*.json")
    p.add_argument("--gpu-model", default=None,
                   help="file name prefix for --add-gpu-run (default: summary.json's gpu_model)")
    args = p.parse_args(argv)
    gpu_dir = os.path.join(args.results, "gpu")
    copied = add_gpu_run(args.add_gpu_run, gpu_dir, args.gpu_model) if args.add_gpu_run else []
    # Every <stem>.json written by a bench_*.py script (e.g. layer.json, layer-1thread.json),
    # in the order layer, network, peers, sweeps, then by file name.
    found = {}
    for fname in sorted(os.listdir(args.results)):
        if fname.endswith(".json"):
            with open(os.path.join(args.results, fname)) as f:
                data = json.load(f)
            kind = str(data.get("script", "")).replace("bench_", "")
            if kind in NAMES:
                found[fname[:-5]] = (kind, data)
    if not found:
        raise SystemExit(f"--results: no benchmark JSON ({'/'.join(NAMES)}) in {args.results}")
    found = dict(sorted(found.items(), key=lambda kv: (NAMES.index(kv[1][0]), kv[0])))
    sections = []
    for stem, (kind, data) in found.items():
        title, body = MARKDOWN[kind](data).split("\n", 1)
        sections.append(f"{title}, `{stem}.json`\n"
                        + body.replace(f"results/{kind}.png", f"results/{stem}.png"))
    text = "\n\n".join(sections) + "\n"
    gpu_text = gpu_md(gpu_dir) + "\n"
    out_md = os.path.join(args.results, "results.md")
    with open(out_md, "w") as f:
        f.write("# Benchmark results\n\n" + text.replace("../benchmarks/results/", "")
                + "\n## GPU\n\n" + gpu_text.replace("../benchmarks/results/", ""))
    written = copied + [out_md]
    if not args.no_plots:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for stem, (kind, data) in found.items():
            path = os.path.join(args.results, f"{stem}.png")
            PLOTS[kind](data, path, plt)
            written.append(path)
        for model, kinds in gpu_runs(gpu_dir).items():
            for kind, data in kinds.items():
                if kind in PLOTS:
                    path = os.path.join(gpu_dir, f"{model}-{kind}.png")
                    PLOTS[kind](data, path, plt)
                    written.append(path)
    if args.docs:
        with open(args.docs) as f:
            doc = f.read()
        doc = _replace_between(doc, BEGIN, END, text, args.docs)
        if GPU_BEGIN in doc:
            doc = _replace_between(doc, GPU_BEGIN, GPU_END, gpu_text, args.docs)
        else:
            print(f"note: {args.docs} has no {GPU_BEGIN} marker; the GPU section is only in "
                  f"{out_md}")
        with open(args.docs, "w") as f:
            f.write(doc)
        written.append(args.docs)
    for w in written:
        print(f"wrote {w}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
