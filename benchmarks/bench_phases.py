"""Where the time of the SHD layers goes: each phase of the CPU kernels beside its floor.

The floor of a phase is the larger of its memory time (bytes read / this machine's read
bandwidth + bytes written / its non-temporal write bandwidth) and its compute time (float adds
in 16-lane vectors / this machine's add rate with operands from L1), with the bandwidths and add
rates measured here by probes of the same kind as the kernels (torch.ops.sparsegrad_profile):
  read bandwidth     x.sum() over 256 MiB
  write bandwidth    non-temporal stores over 256 MiB (the kernels' output stores)
  add rate, L1       sums of random whole rows of an L1-sized table, 16-lane adds (the floor)
  add rate, L2 rows  the same with L2-sized tables: W^T of the 700->200 layer (the event-driven
                     current) and a tile group's G buffer (the backward's event sums); reported
                     as what random L2 rows cost, not used for the floor
The phases are timed inside the kernels (phase_profile.h) on the SHD-like hidden layers
(T=500, B=64, 700->200 fed by 2 % input spikes, and the 200->200 layer fed by the first one's
spikes with dx on its active set). 1 thread by default; the floors scale with the threads only
where the machine's bandwidth does.

    python benchmarks/bench_phases.py --json benchmarks/results/phases-1thread.json --docs docs/design.md
"""
from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROBE_BYTES = 256 * 2**20
QUICK = dict(steps=40, batch=8, n_out=24)


# ----------------------------------------------------------------------------- machine probes

def _median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine_rates(repeats=5, quick=False):
    import sparsegrad  # noqa: F401  (loads the library that registers sparsegrad_profile)
    prof = torch.ops.sparsegrad_profile
    n = (PROBE_BYTES if not quick else 16 * 2**20) // 4
    x = torch.rand(n)
    y = torch.empty(n)
    read = n * 4 / _median_time(lambda: x.sum(), repeats)
    write = n * 4 / _median_time(lambda: prof.stream_zero(y), repeats)
    del x, y
    gen = torch.Generator().manual_seed(0)

    def add_rate(rows, width, n_idx):
        table = torch.randn(rows, width, generator=gen)
        idx = torch.randint(0, rows, (n_idx,), generator=gen, dtype=torch.int32)
        reps = 4
        t = _median_time(lambda: prof.gather_add(table, idx, reps), repeats)
        return reps * n_idx * width / t  # float adds per second

    n_idx = 50_000 if quick else 400_000
    return dict(
        read_bytes_per_s=read,
        nt_write_bytes_per_s=write,
        adds_per_s_l2_wt=add_rate(700, 208, n_idx),    # W^T of the 700->200 layer: 582 KB
        adds_per_s_l2_g=add_rate(500, 112, n_idx),     # a tile group's G buffer: 224 KB
        adds_per_s_l1=add_rate(16, 208, n_idx),        # 13 KB: L1
    )


# ----------------------------------------------------------------------------- phases

def run_layer(problem, threads, repeats, warmup):
    import sparsegrad.functional as sgf
    prof = torch.ops.sparsegrad_profile
    names = list(prof.phase_names())
    x = problem.x.detach().clone().requires_grad_(problem.needs_dx)
    w = problem.weight.detach().clone().requires_grad_(True)
    b = problem.bias.detach().clone().requires_grad_(True)
    inputs = [t for t in (x, w, b) if t.requires_grad]

    def fwd():
        return sgf.lif_layer_with_stats(x, w, b, alpha=common.ALPHA, b_th=common.B_TH,
                                        backward="sparse", producer=problem.producer)

    rows, fwd_t, bwd_t, dense_t = [], [], [], []
    prof.enable(True)
    try:
        for rep in range(warmup + repeats):
            prof.reset()
            t0 = time.perf_counter()
            s, _, stats, _ = fwd()
            t1 = time.perf_counter()
            torch.autograd.grad(s, inputs, problem.grad)
            t2 = time.perf_counter()
            if rep >= warmup:
                rows.append(prof.read().tolist())
                fwd_t.append(t1 - t0)
                bwd_t.append(t2 - t1)
    finally:
        prof.enable(False)
    with torch.no_grad():
        for rep in range(warmup + repeats):
            t0 = time.perf_counter()
            sgf.lif_layer_with_stats(x, w, b, alpha=common.ALPHA, backward="dense")
            if rep >= warmup:
                dense_t.append(time.perf_counter() - t0)
    phases = {}
    for k, name in enumerate(names):
        ms = [1e-6 * r[k][0] for r in rows]
        calls = rows[-1][k][1]
        if calls:
            phases[name] = dict(ms=statistics.median(ms), calls=calls)
    s, _, stats, act = fwd()
    return dict(phases=phases, forward_ms=1e3 * statistics.median(fwd_t),
                backward_ms=1e3 * statistics.median(bwd_t),
                dense_forward_ms=1e3 * statistics.median(dense_t),
                nnz=int(stats.input_nonzeros), active=int(stats.active_count),
                spikes=int(stats.spike_count), act=act)


def lines_touched(act_cnt, act_idx, lane_floats=16):
    """Distinct 64-byte lines of a [rows, N] float32 tensor read at the active entries."""
    rows = torch.repeat_interleave(torch.arange(act_cnt.numel()), act_cnt.long())
    return int(torch.unique(rows * 4096 + act_idx.long() // lane_floats).numel())


def floors(info, rates, s=4):
    """Bytes, vector adds and floor (ms) per phase for one layer (see the module docstring)."""
    T, B, I, O = info["T"], info["B"], info["I"], info["O"]
    nnz, A, A_prev = info["nnz"], info["active"], info["active_prev"]
    W = 16 * math.ceil(O / 16)
    rows = T * B
    lines = info["grad_lines"]
    R, Wr = rates["read_bytes_per_s"], rates["nt_write_bytes_per_s"]
    l2w, l2g, l1 = rates["adds_per_s_l2_wt"], rates["adds_per_s_l2_g"], rates["adds_per_s_l1"]
    p = {}

    def add(name, read=0, write=0, adds=0, rate=l1, what=""):  # compute floor: operands in L1
        mem = read / R + write / Wr
        comp = adds / rate if adds else 0.0
        p[name] = dict(read_bytes=read, write_bytes=write, adds=adds,
                       floor_ms=1e3 * max(mem, comp), memory_ms=1e3 * mem, compute_ms=1e3 * comp,
                       bound="memory" if mem >= comp else "compute", what=what)

    add("fwd.scan", read=rows * I * s, write=nnz * (4 + s),
        what=f"read x [T,B,N_in] once ({rows * I * s / 1e6:.1f} MB), events to scratch")
    add("fwd.gather_events", read=nnz * 8, write=nnz * 4,
        what="events copied into the CSR (b-major)")
    add("fwd.rows", read=nnz * 4, write=rows * O * s + A * 8,
        adds=nnz * W + rows * W * 12,
        what=f"current: nnz*N_out = {nnz * W / 1e6:.0f} M adds of W^T rows; recurrence, spike, "
             f"active test ~12 ops per neuron-step; spikes {rows * O * s / 1e6:.1f} MB out")
    add("fwd.gather_active", read=A * 8, write=A * 8, what="active set copied into the CSR")
    add("bwd.setup", read=rows * 4 * (3 if A_prev else 2) + (A + nnz + A_prev) * 4,
        what="offsets from counts, index range checks")
    add("bwd.deltas", read=lines * 64 + A * 8, write=A * 4,
        what=f"dL/dS read at the active entries: {lines * 64 / 1e6:.1f} MB of lines touched")
    add("bwd.regroup", read=nnz * 4 + rows * 8, write=nnz * 4 + B * I * 8,
        what="events grouped by input (a counting sort per element)")
    groups = max(math.ceil(W / 16 / 8), min(W // 16, 2))
    add("bwd.walk", write=rows * W * s, adds=rows * W * 6 + A_prev * W * 2 + A_prev * groups * 16,
        what="reverse walks (decay, inject, db, G buffer)"
                      + (f"; dx parts: |A_prev|*N_out = {A_prev * W / 1e6:.0f} M mul-adds" if A_prev else ""))
    add("bwd.event_sums", adds=nnz * W,
        what=f"dW^T: nnz*N_out = {nnz * W / 1e6:.0f} M adds of G rows (L2)")
    if A_prev:
        add("bwd.dx_write", read=A_prev * groups * 4, write=rows * I * s,
            what=f"dx [T,B,N_in] written once ({rows * I * s / 1e6:.1f} MB)")
    return p


def layer_info(problem, res):
    T, B, I = problem.x.shape
    O = problem.weight.shape[0]
    act_cnt, act_idx = (t.long() for t in res["act"])
    prev = problem.producer
    return dict(T=T, B=B, I=I, O=O, nnz=res["nnz"], active=res["active"],
                active_prev=int(prev[1].numel()) if prev is not None else 0,
                grad_lines=lines_touched(act_cnt, act_idx))


def table_rows(label, res, fl):
    out = []
    tot_floor = tot_meas = 0.0
    for name, f in fl.items():
        meas = res["phases"].get(name, {}).get("ms", float("nan"))
        tot_floor += f["floor_ms"]
        tot_meas += 0.0 if math.isnan(meas) else meas
        star = "*" if name in ("bwd.walk", "bwd.event_sums") else ""
        out.append([label, name + star, f"{(f['read_bytes'] + f['write_bytes']) / 1e6:.1f}",
                    f"{f['adds'] / 1e6:.0f}" if f["adds"] else "-", f["bound"],
                    f"{f['floor_ms']:.2f}", f"{meas:.2f}",
                    f"{meas / f['floor_ms']:.1f}x" if f["floor_ms"] > 0 and not math.isnan(meas) else "-",
                    f["what"]])
    return out, tot_floor, tot_meas


def markdown(payload):
    r = payload["rates"]
    m = payload["machine"]
    lines = [
        f"Measured with `{m['command']}` on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"torch {m['torch']}, {m['torch_threads']} thread(s), {m['date_utc']} UTC"
        + (f", load average {payload['load_average']:.2f}" if payload.get("load_average") is not None else "")
        + ".",
        "",
        f"This machine: read {r['read_bytes_per_s'] / 1e9:.1f} GB/s, non-temporal write "
        f"{r['nt_write_bytes_per_s'] / 1e9:.1f} GB/s; float adds in 16-lane vectors summing "
        f"random whole rows of a table: {r['adds_per_s_l1'] / 1e9:.1f} G/s from L1 (the compute "
        f"floor), {r['adds_per_s_l2_wt'] / 1e9:.1f} G/s from a 582 KB table (W^T at 700->200), "
        f"{r['adds_per_s_l2_g'] / 1e9:.1f} G/s from a 224 KB one (a tile group's G buffer). "
        f"Floor = max(memory time, compute time); phases marked * are summed over threads.",
        "",
        "| layer | phase | MB moved | M adds | bound | floor ms | measured ms | measured / floor | what |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lay in payload["layers"]:
        for row in lay["table"]:
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for lay in payload["layers"]:
        lines.append(
            f"- **{lay['label']}**: phases sum to {lay['phase_ms']:.1f} ms against a floor of "
            f"{lay['floor_ms']:.1f} ms; the ops as autograd calls them: forward {lay['forward_ms']:.1f} ms "
            f"(sparsegrad's dense forward {lay['dense_forward_ms']:.1f} ms), backward "
            f"{lay['backward_ms']:.1f} ms.")
    return "\n".join(lines)


def update_docs(path, text):
    with open(path) as f:
        doc = f.read()
    begin, end = "<!-- phases:begin -->", "<!-- phases:end -->"
    if begin not in doc:
        raise SystemExit(f"{path}: no '{begin}' marker")
    doc = re.sub(re.escape(begin) + r".*?" + re.escape(end), begin + "\n" + text + "\n" + end,
                 doc, flags=re.S)
    with open(path, "w") as f:
        f.write(doc)
    print(f"updated {path}")


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--docs", default=None, metavar="PATH",
                        help="replace the section between the phases markers of PATH (docs/design.md)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_phases.py times the CPU kernels' phases: --device cpu only")
    if args.threads is None:
        args.threads = 1
    device, dtype = common.setup(args)
    if dtype != torch.float32:
        raise SystemExit("bench_phases.py: --dtype float32 only (the probes are float32)")
    rates = machine_rates(repeats=args.repeats, quick=args.quick)
    print("machine: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in rates.items()))
    layers = []
    for label, second in (("shd 700->200", False), ("shd 200->200", True)):
        kw = dict(steps=QUICK["steps"]) if args.quick else {}
        batch = QUICK["batch"] if args.quick else 64
        n_out = QUICK["n_out"] if args.quick else 200
        problem = common.make_layer_problem("shd", batch, n_out, second_layer=second, dtype=dtype,
                                            seed=args.seed, **kw)
        res = run_layer(problem, args.threads, args.repeats, args.warmup)
        info = layer_info(problem, res)
        fl = floors(info, rates)
        rows, tot_floor, tot_meas = table_rows(label, res, fl)
        common.print_table(["layer", "phase", "MB", "M adds", "bound", "floor ms", "measured ms",
                            "meas/floor", "what"], rows)
        print(f"{label}: phases {tot_meas:.1f} ms, floor {tot_floor:.1f} ms; forward "
              f"{res['forward_ms']:.1f} ms (dense {res['dense_forward_ms']:.1f}), backward "
              f"{res['backward_ms']:.1f} ms\n")
        layers.append(dict(label=label, info=info, phases=res["phases"], floors=fl, table=rows,
                           floor_ms=tot_floor, phase_ms=tot_meas, forward_ms=res["forward_ms"],
                           backward_ms=res["backward_ms"], dense_forward_ms=res["dense_forward_ms"],
                           problem=problem.info))
    payload = common.result_header("bench_phases", args, device)
    try:
        payload["load_average"] = os.getloadavg()[0]
    except OSError:
        payload["load_average"] = None
    payload.update(rates=rates, layers=layers)
    text = markdown(payload)
    print(text)
    common.write_json(args.json, payload)
    if args.docs:
        update_docs(args.docs, text)
    return payload


if __name__ == "__main__":
    main()
