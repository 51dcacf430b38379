"""report.py's part for benchmarks/bench_recurrent.py (recurrent.json): markdown and plot."""
from __future__ import annotations


def recurrent_md(data):
    import report as R  # (imported here: report.py imports this module)

    rows, ratio_rows = [], []
    for res in data["results"]:
        info = res["problem"]
        if res["label"] == "layer":
            setting = (f"layer {info['n_in']}->{info['n_out']} (+{info['n_out']}->{info['n_out']}) "
                       f"T={info['steps']} B={info['batch']}")
        else:
            setting = (f"network {info['n_in']}-{info['hidden']}r-{info['hidden']}r-"
                       f"{info['classes']} T={info['steps']} B={info['batch']}")
        for m, r in res["methods"].items():
            t, q = r["times"], res["ratios"].get(m, {})
            act = r.get("active_fractions") or ([r["active_fraction"]] if "active_fraction" in r else None)
            cpu = r.get("cpu_ms") or {}
            rows.append([setting, m, R.ms(t["forward"]), R.ms(t["backward"]), R.ms(t["total"]),
                         " / ".join(f"{R._f(cpu[k]):.1f}" for k in ("forward", "backward"))
                         if cpu else "–",
                         R.mb(r["saved_bytes"]), R.mb(r.get("peak_bytes")),
                         " / ".join(R.pct(a, 1) for a in act) if act else "–",
                         R.x(q.get("bwd_over_sparse")), R.x(q.get("step_over_sparse")),
                         R.x(q.get("cpu_bwd_over_sparse")), R.x(q.get("cpu_step_over_sparse")),
                         R.pct(q.get("saved_sparse_over_this"))])
        load = res.get("load_average")
        if load:
            ratio_rows.append(f"- {res['label']}: 1-minute load average {R._f(load[0]):.1f} when "
                              f"it finished")
    return "\n".join([
        "### Recurrent layers (`bench_recurrent.py`)", "", R.machine_line(data), "",
        "layer: forward, then backward of a fixed random dL/dS; network: forward = network + "
        "loss, backward = loss.backward() + Adam step. Wall times are medians; CPU times "
        "(`time.process_time` with 1 thread, min over the repeats) do not depend on other jobs' "
        "load. The ratio columns divide each method's time by sparsegrad_sparse's "
        "(same run; wall, then CPU), and sparse's saved bytes by each method's.", "",
        R.table(["setting", "method", "forward ms", "backward ms", "step ms",
                 "1-thread CPU fwd / bwd ms", "saved MB", "peak MB", "active", "bwd / sparse",
                 "step / sparse", "CPU bwd / sparse", "CPU step / sparse",
                 "saved sparse / this"], rows),
        "", *ratio_rows,
        R.checks_md(data.get("checks")), "", "![recurrent](../benchmarks/results/recurrent.png)"])


def plot_recurrent(data, path, plt):
    import report as R

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, res in zip(axes, data["results"]):
        groups, series, vals = ["forward", "backward", "step"], [], {}
        for m, r in res["methods"].items():
            series.append(m)
            for g, phase in zip(groups, ("forward", "backward", "total")):
                vals[(g, m)] = R._f(r["times"][phase]["median"])
        R._bars(ax, groups, series, vals, "ms (median)")
        ax.set_title(f"recurrent {res['label']}, T={res['problem']['steps']} "
                     f"B={res['problem']['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
