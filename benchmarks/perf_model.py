"""Performance model of sparsegrad's ops: the bytes each must move, the arithmetic it must do,
and the resulting floor on a GPU (docs/cuda.md, "Performance model").

One function per op returns a `Cost`: bytes read and written (by term), floating-point operations
(by term) and the floor max(bytes / bandwidth, flops / peak) on a `Machine` (default: an H100 SXM,
3.35 TB/s HBM3, ~60 TFLOP/s fp32 without tensor cores). "Must" means: what any implementation of
the op's contract has to do, with the tensors at the op boundary as they are (a dense float x is
read whole to find its events; a dense dx is written whole), every intermediate kept on chip
(registers, shared memory, L2: the weight matrices of these layers fit in an H100's 50 MB L2), and
the cheaper of the algorithms the op may choose. Measured times divided by these floors say how far
a kernel is from the hardware; they are lower bounds, never targets that can be met exactly.

Counting rules (float32 values, int32 indices and row counts as in the op contract, CONTRACT.md §2):
- a dense [T, B, N] float tensor read or written: T·B·N·4 bytes;
- dL/dS read only at the |A| active entries: whole 32-byte sectors, so a fraction
  1 − (1 − a)^8 of the dense tensor's bytes at active fraction a (`gathered_bytes`);
- a CSR over the B·T rows: 4 bytes per row (its count) + 4 per index (+ 4 per value);
- a multiply-add counts as 2 flops, an add as 1; the membrane update, the fire test and the
  surrogate are a few flops per entry (`FLOPS_STEP`, `FLOPS_SURROGATE`).

    python benchmarks/perf_model.py                      # both tables (SHD layer, large layer)
    python benchmarks/perf_model.py --markdown           # the docs table
    python benchmarks/perf_model.py --docs docs/cuda.md  # rewrite the table between the markers

The GPU benchmarks (bench_layer.py, bench_sweeps.py) call `layer_floors` with the sizes and counts
they measured and store measured time / floor in their JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Dict, Optional

F32 = 4      # bytes per float32 value
IDX = 4      # bytes per int32 index
CNT = 4      # bytes per int32 row count (*_cnt)
I64 = 8      # bytes per int64 (argmax_t, stats)
SECTOR = 32  # bytes per DRAM/L2 sector: the unit a scattered read costs
FLOPS_STEP = 4       # alpha*V + I - theta*S and the fire test, per (t, b, j)
FLOPS_SURROGATE = 5  # |V - theta| < b_th and the surrogate, per entry it is evaluated at

BEGIN, END = "<!-- perf-model:begin -->", "<!-- perf-model:end -->"


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    bandwidth: float  # bytes / s
    flops: float      # flop / s (fp32, no tensor cores)


H100 = Machine("H100 SXM (3.35 TB/s, 60 TFLOP/s fp32)", 3.35e12, 60e12)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer's sizes and activity. Counts (nnz input entries, active entries, output spikes,
    producer active entries) default to the rates times the sizes; pass measured ones instead."""
    name: str
    steps: int
    batch: int
    n_in: int
    n_out: int
    input_rate: float = 0.02
    active_fraction: float = 0.04
    spike_rate: float = 0.02
    binary_input: bool = True
    nnz: Optional[int] = None
    active: Optional[int] = None
    spikes: Optional[int] = None
    producer_active: Optional[int] = None  # |A_prev|, when x came from a sparse layer

    @property
    def rows(self) -> int:
        return self.steps * self.batch

    @property
    def x_entries(self) -> int:
        return self.rows * self.n_in

    @property
    def out_entries(self) -> int:
        return self.rows * self.n_out

    @property
    def n_nnz(self) -> int:
        return self.nnz if self.nnz is not None else round(self.input_rate * self.x_entries)

    @property
    def n_active(self) -> int:
        return (self.active if self.active is not None
                else round(self.active_fraction * self.out_entries))

    @property
    def n_spikes(self) -> int:
        return self.spikes if self.spikes is not None else round(self.spike_rate * self.out_entries)

    @property
    def n_producer(self) -> int:
        # a producer of n_in neurons with this layer's active fraction, unless measured
        return (self.producer_active if self.producer_active is not None
                else round(self.active_fraction * self.x_entries))


SHD = Layer("SHD layer (T=500, B=64, 700→200)", 500, 64, 700, 200)
LARGE = Layer("large layer (T=1000, B=256, 4096→4096)", 1000, 256, 4096, 4096)
LAYERS = (SHD, LARGE)


@dataclasses.dataclass
class Cost:
    op: str
    bytes: Dict[str, float]
    flops: Dict[str, float]
    machine: Machine = H100

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def memory_s(self) -> float:
        return self.total_bytes / self.machine.bandwidth

    @property
    def compute_s(self) -> float:
        return self.total_flops / self.machine.flops

    @property
    def floor_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    def as_dict(self) -> dict:
        return dict(op=self.op, bytes=self.total_bytes, flops=self.total_flops,
                    memory_ms=1e3 * self.memory_s, compute_ms=1e3 * self.compute_s,
                    floor_ms=1e3 * self.floor_s, bound=self.bound, machine=self.machine.name,
                    bytes_terms=dict(self.bytes), flops_terms=dict(self.flops))


def gathered_bytes(entries: int, fraction: float, elem: int = F32, sector: int = SECTOR) -> float:
    """Bytes read when only a random `fraction` of a dense tensor of `entries` elements is needed:
    every sector holding at least one of them is read whole."""
    fraction = min(max(fraction, 0.0), 1.0)
    per_sector = max(sector // elem, 1)
    return entries * elem * (1.0 - (1.0 - fraction) ** per_sector)


def _csr(rows: int, entries: int, values: bool = False) -> float:
    return rows * CNT + entries * (IDX + (F32 if values else 0))


def _events(layer: Layer) -> float:
    return _csr(layer.rows, layer.n_nnz, values=not layer.binary_input)


def _current_flops(layer: Layer) -> float:
    """x[t] W^T: one add per (input event, output neuron), or a GEMM, whichever is cheaper."""
    per_event = (2 if not layer.binary_input else 1) * layer.n_nnz * layer.n_out
    return min(per_event, 2.0 * layer.x_entries * layer.n_out)


def _weight(layer: Layer) -> float:
    return layer.n_out * layer.n_in * F32


# ----------------------------------------------------------------------------- ops

def lif_forward(layer: Layer, sparse: bool = True, reset: str = "subtract",
                machine: Machine = H100) -> Cost:
    """Fused Linear→LIF forward: spikes, v_final, the input events, and the compact active set
    with its surrogate (sparse) or the dense surrogate (dense backward mode)."""
    b = {"x (dense input)": layer.x_entries * F32, "weight": _weight(layer),
         "spikes": layer.out_entries * F32, "v_final": layer.batch * layer.n_out * F32,
         "input events": _events(layer)}
    if sparse:
        b["active set + surrogate"] = _csr(layer.rows, layer.n_active, values=True)
    else:
        b["surrogate (dense)"] = layer.out_entries * F32
    if reset == "zero":
        b["rst_bits"] = layer.rows * math.ceil(layer.n_out / 32) * 4
    f = {"current": _current_flops(layer), "membrane": FLOPS_STEP * layer.out_entries,
         "surrogate": FLOPS_SURROGATE * (layer.n_active if sparse else layer.out_entries)}
    return Cost(f"lif_forward ({'sparse' if sparse else 'dense'})", b, f, machine)


def lif_backward_sparse(layer: Layer, need_dx: bool = False, machine: Machine = H100) -> Cost:
    """Sparse backward: deltas at the active entries, the reverse-time trace G (on chip, lazily
    decayed), dW through the input events or the active entries (the cheaper), db, and dx on the
    producer's active set (`need_dx`; the dx tensor itself is dense and written whole)."""
    frac = layer.n_active / max(layer.out_entries, 1)
    b = {"dL/dS at active entries": gathered_bytes(layer.out_entries, frac),
         "active set + surrogate": _csr(layer.rows, layer.n_active, values=True),
         "input events": _events(layer),
         "dW + db": _weight(layer) + layer.n_out * F32}
    f = {"deltas + trace": 5.0 * layer.n_active,
         "dW": 2.0 * min(layer.n_nnz * layer.n_out, layer.n_active * layer.n_in)}
    if need_dx:
        b["weight (for dx)"] = _weight(layer)
        b["producer active set"] = _csr(layer.rows, layer.n_producer)
        b["dx (dense output)"] = layer.x_entries * F32
        f["dx on producer set"] = 2.0 * layer.n_producer * layer.n_out
    return Cost("lif_backward_sparse", b, f, machine)


def lif_backward_dense(layer: Layer, need_dx: bool = False, machine: Machine = H100) -> Cost:
    """Dense surrogate BPTT: reverse scan over every entry, dW = Gᵀx and dx = G W as GEMMs."""
    b = {"dL/dS": layer.out_entries * F32, "surrogate (dense)": layer.out_entries * F32,
         "x (dense input)": layer.x_entries * F32, "dW + db": _weight(layer) + layer.n_out * F32}
    f = {"reverse scan": 3.0 * layer.out_entries,
         "dW GEMM": 2.0 * layer.x_entries * layer.n_out}
    if need_dx:
        b["weight (for dx)"] = _weight(layer)
        b["dx (dense output)"] = layer.x_entries * F32
        f["dx GEMM"] = 2.0 * layer.x_entries * layer.n_out
    return Cost("lif_backward_dense", b, f, machine)


def li_readout_forward(layer: Layer, reduce: str = "max", machine: Machine = H100) -> Cost:
    """Leaky-integrator readout: current, the leaky integration, the reduction over time."""
    out = layer.out_entries if reduce == "none" else layer.batch * layer.n_out
    b = {"x (dense input)": layer.x_entries * F32, "weight": _weight(layer), "output": out * F32,
         "input events": _events(layer)}
    if reduce == "max":
        b["argmax_t"] = layer.batch * layer.n_out * I64
    f = {"current": _current_flops(layer), "integrate + reduce": 3.0 * layer.out_entries}
    return Cost(f"li_readout_forward ({reduce})", b, f, machine)


def li_readout_backward(layer: Layer, reduce: str = "max", need_dx: bool = False,
                        machine: Machine = H100) -> Cost:
    """Readout backward: dW through the input events with the closed-form trace, db, dx on the
    producer's active set."""
    grad = layer.out_entries if reduce == "none" else layer.batch * layer.n_out
    b = {"dL/dout": grad * F32, "input events": _events(layer),
         "dW + db": _weight(layer) + layer.n_out * F32}
    if reduce == "max":
        b["argmax_t"] = layer.batch * layer.n_out * I64
    f = {"trace": 2.0 * layer.out_entries, "dW": 2.0 * layer.n_nnz * layer.n_out}
    if need_dx:
        b["weight (for dx)"] = _weight(layer)
        b["producer active set"] = _csr(layer.rows, layer.n_producer)
        b["dx (dense output)"] = layer.x_entries * F32
        f["dx on producer set"] = 2.0 * layer.n_producer * layer.n_out
    return Cost(f"li_readout_backward ({reduce})", b, f, machine)


def lif_neuron_forward(layer: Layer, reset: str = "subtract", machine: Machine = H100) -> Cost:
    """The LIF neuron alone (`sparsegrad.lif`, DESIGN.md §3b) on a dense current [T, B, N_out]:
    spikes, v_final, the compact active set, and rst_bits for reset="zero"."""
    b = {"current (dense input)": layer.out_entries * F32, "spikes": layer.out_entries * F32,
         "v_final": layer.batch * layer.n_out * F32,
         "active set + surrogate": _csr(layer.rows, layer.n_active, values=True)}
    if reset == "zero":
        b["rst_bits"] = layer.rows * math.ceil(layer.n_out / 32) * 4
    f = {"membrane": FLOPS_STEP * layer.out_entries,
         "surrogate": FLOPS_SURROGATE * layer.n_active}
    return Cost("lif (neuron) forward", b, f, machine)


def lif_neuron_backward(layer: Layer, reset: str = "subtract", machine: Machine = H100) -> Cost:
    """dL/dcurrent = G, the reverse-time trace of the deltas: a dense output written whole."""
    frac = layer.n_active / max(layer.out_entries, 1)
    b = {"dL/dS at active entries": gathered_bytes(layer.out_entries, frac),
         "active set + surrogate": _csr(layer.rows, layer.n_active, values=True),
         "dL/dcurrent (dense output)": layer.out_entries * F32}
    if reset == "zero":
        b["rst_bits"] = layer.rows * math.ceil(layer.n_out / 32) * 4
    f = {"deltas": 2.0 * layer.n_active, "trace": 2.0 * layer.out_entries}
    return Cost("lif (neuron) backward", b, f, machine)


def rlif_forward(layer: Layer, sparse: bool = True, machine: Machine = H100) -> Cost:
    """Recurrent LIF layer (`sparsegrad.rlif_layer`, DESIGN.md §3b): lif_forward plus the
    recurrent current S[t−1]Rᵀ (one add per spike and output neuron) and the spikes kept as
    indices for dR."""
    base = lif_forward(layer, sparse=sparse, machine=machine)
    b = dict(base.bytes)
    b["rec_weight"] = layer.n_out * layer.n_out * F32
    b["spike indices (for dR)"] = _csr(layer.rows, layer.n_spikes)
    f = dict(base.flops)
    f["recurrent current"] = 1.0 * layer.n_spikes * layer.n_out
    return Cost(f"rlif_forward ({'sparse' if sparse else 'dense'})", b, f, machine)


def rlif_backward_sparse(layer: Layer, need_dx: bool = False, machine: Machine = H100) -> Cost:
    """G[t] = αG[t+1] + σ'(V[t])(e[t] + G[t+1]R): (G[t+1]R) at the active entries only, dR at
    the spikes, dW at the input events, dx on the producer's active set."""
    base = lif_backward_sparse(layer, need_dx=need_dx, machine=machine)
    b = dict(base.bytes)
    b["rec_weight"] = layer.n_out * layer.n_out * F32
    b["spike indices"] = _csr(layer.rows, layer.n_spikes)
    b["dR"] = layer.n_out * layer.n_out * F32
    f = dict(base.flops)
    f["dW"] = 2.0 * layer.n_nnz * layer.n_out  # G is dense through the recurrence: events route
    f["G[t+1]R at active entries"] = 2.0 * layer.n_active * layer.n_out
    f["dR at spikes"] = 2.0 * layer.n_spikes * layer.n_out
    return Cost("rlif_backward_sparse", b, f, machine)


# ----------------------------------------------------------------------------- tables

def table_rows(layer: Layer, machine: Machine = H100):
    """(label, Cost) for every op at `layer`."""
    return [
        ("lif_forward, sparse", lif_forward(layer, True, machine=machine)),
        ("lif_forward, dense", lif_forward(layer, False, machine=machine)),
        ("lif_backward_sparse", lif_backward_sparse(layer, machine=machine)),
        ("lif_backward_sparse, dx on producer set", lif_backward_sparse(layer, True, machine)),
        ("lif_backward_dense", lif_backward_dense(layer, machine=machine)),
        ("lif_backward_dense, with dx", lif_backward_dense(layer, True, machine)),
        ("li_readout_forward (max)", li_readout_forward(layer, machine=machine)),
        ("li_readout_backward (max)", li_readout_backward(layer, machine=machine)),
        ("lif (neuron op) forward", lif_neuron_forward(layer, machine=machine)),
        ("lif (neuron op) backward", lif_neuron_backward(layer, machine=machine)),
        ("rlif_forward, sparse", rlif_forward(layer, machine=machine)),
        ("rlif_backward_sparse", rlif_backward_sparse(layer, machine=machine)),
    ]


def _fmt_bytes(v: float) -> str:
    return f"{v / 1e6:.3g} MB" if v < 1e9 else f"{v / 1e9:.3g} GB"


def _fmt_flops(v: float) -> str:
    return f"{v / 1e9:.3g} GFLOP"


def _fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.3g} µs" if us < 1000 else f"{us / 1e3:.3g} ms"


def markdown(layers=LAYERS, machine: Machine = H100) -> str:
    lines = [f"Floors on an {machine.name}; inputs 2 % nonzero (binary), 4 % of the layer's "
             "entries active, 2 % output spikes, float32. Generated by "
             "`python benchmarks/perf_model.py --docs docs/cuda.md`.", ""]
    for layer in layers:
        lines += [f"**{layer.name}**, {layer.n_nnz:,} input events, {layer.n_active:,} active "
                  f"entries, {layer.n_spikes:,} spikes:", "",
                  "| op | bytes | flops | memory time | compute time | floor | bound |",
                  "|---|---|---|---|---|---|---|"]
        for label, c in table_rows(layer, machine):
            lines.append(f"| {label} | {_fmt_bytes(c.total_bytes)} | {_fmt_flops(c.total_flops)} "
                         f"| {_fmt_time(c.memory_s)} | {_fmt_time(c.compute_s)} | "
                         f"**{_fmt_time(c.floor_s)}** | {c.bound} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def layer_floors(steps, batch, n_in, n_out, *, nnz, active, spikes, producer_active=None,
                 binary_input=True, machine: Machine = H100) -> dict:
    """Floors (ms) of the four fused-layer phases a benchmark times, at measured counts:
    {"sparse": {"forward", "backward", "total"}, "dense": {...}} plus the inputs."""
    layer = Layer("measured", steps, batch, n_in, n_out, binary_input=binary_input,
                  nnz=int(nnz), active=int(active), spikes=int(spikes),
                  producer_active=None if producer_active is None else int(producer_active))
    need_dx = producer_active is not None
    out = {}
    for mode in ("sparse", "dense"):
        fwd = lif_forward(layer, sparse=mode == "sparse", machine=machine)
        bwd = (lif_backward_sparse(layer, need_dx, machine) if mode == "sparse"
               else lif_backward_dense(layer, need_dx, machine))
        out[mode] = dict(forward=1e3 * fwd.floor_s, backward=1e3 * bwd.floor_s,
                         total=1e3 * (fwd.floor_s + bwd.floor_s),
                         forward_bound=fwd.bound, backward_bound=bwd.bound)
    out["machine"] = machine.name
    out["counts"] = dict(steps=steps, batch=batch, n_in=n_in, n_out=n_out, nnz=int(nnz),
                         active=int(active), spikes=int(spikes), producer_active=producer_active,
                         need_dx=need_dx)
    return out


def over_floor(measured_ms, floor_ms) -> float:
    """measured / floor; nan when either is missing or not finite."""
    try:
        m, f = float(measured_ms), float(floor_ms)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(m) and math.isfinite(f)) or f <= 0:
        return math.nan
    return m / f


def write_docs(path: str) -> None:
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"--docs: {path} lacks the markers {BEGIN} ... {END}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + markdown() + END + tail)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="print the docs table")
    p.add_argument("--docs", metavar="PATH", help="rewrite the table between the markers in PATH")
    args = p.parse_args(argv)
    if args.docs:
        write_docs(args.docs)
    elif args.markdown:
        sys.stdout.write(markdown())
    else:
        for layer in LAYERS:
            print(f"\n== {layer.name}: {layer.n_nnz:,} input events, {layer.n_active:,} active, "
                  f"{layer.n_spikes:,} spikes  (floors on {H100.name})")
            for label, c in table_rows(layer):
                print(f"  {label:42s} {_fmt_bytes(c.total_bytes):>9s} {_fmt_flops(c.total_flops):>13s}"
                      f"  floor {_fmt_time(c.floor_s):>9s} ({c.bound})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
