"""Shared machinery of the benchmark scripts: arguments, timing, memory, inputs, weights, JSON.

Every script builds its parser with `make_parser`, times with `measure`, counts saved-for-backward
bytes with `saved_bytes`, measures the peak memory of a step with `peak_memory`, draws inputs with
`spike_input` / `dataset_input`, scales weights to a target firing rate with `calibrate_layer`,
and writes results with `write_json`. Nothing here is specific to one script.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Typical input statistics of the paper's three datasets, as drawn by `dataset_input`.
#   fmnist: latency code, every pixel above the background fires once (about half of them),
#           so the rate is ~0.5 / T per step.
#   nmnist: DVS events binned at 1 ms, ~1 % of the 1156 channels per bin.
#   shd:    cochlea events binned at 2 ms, ~2 % of the 700 channels per bin.
DATASETS = {
    "fmnist": dict(n_in=784, steps=100, classes=10, code="latency", fire_prob=0.5),
    "nmnist": dict(n_in=1156, steps=300, classes=10, code="rate", rate=0.01),
    "shd": dict(n_in=700, steps=500, classes=20, code="rate", rate=0.02),
}
# The paper's hidden-layer settings (Perez-Nieves & Goodman 2021): membrane decay and threshold.
ALPHA = 0.95
THRESHOLD = 1.0
SLOPE = 100.0
B_TH = 0.2
TARGET_RATE = 0.02  # hidden output spikes per neuron per step (the 1-5 % band's middle)


# ----------------------------------------------------------------------------- arguments

def make_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to run (cuda needs a GPU and sparsegrad's CUDA kernels)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure to PATH")
    p.add_argument("--quick", action="store_true",
                   help="tiny CI-sized problems: checks that the script runs, not speed")
    return p


def setup(args) -> tuple:
    """Validate common arguments; returns (device, dtype)."""
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: torch.cuda.is_available() is False on this machine. Run the same "
                "command on a machine with a GPU and a CUDA build of torch and sparsegrad.")
        import sparsegrad
        if not sparsegrad.build_info().get("cuda_kernels_registered", False):
            raise SystemExit("--device cuda: sparsegrad was built without its CUDA kernels; "
                             "rebuild it with nvcc available (see README)")
    torch.manual_seed(args.seed)
    # One allocator setting for every method's timings (peak_memory changes it while measuring).
    _mallopt_timing_setting()
    return device, getattr(torch, args.dtype)


# ----------------------------------------------------------------------------- timing

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_s) -> dict:
    """Median and spread (quartiles, IQR, min, max) of samples in seconds, reported in ms."""
    ms = sorted(1e3 * s for s in samples_s)
    if not ms:
        return dict(median=math.nan, q1=math.nan, q3=math.nan, iqr=math.nan, min=math.nan,
                    max=math.nan, n=0)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return dict(median=statistics.median(ms), q1=q1, q3=q3, iqr=q3 - q1, min=ms[0], max=ms[-1],
                n=len(ms), samples=ms)


# torch.OutOfMemoryError is torch >= 2.5; torch.cuda.OutOfMemoryError exists in every supported torch.
_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", None),
                     getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)} - {None})


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_ERRORS) or "out of memory" in str(exc).lower()


def inf_summary() -> dict:
    return dict(median=math.inf, q1=math.inf, q3=math.inf, iqr=0.0, min=math.inf,
                max=math.inf, n=0, samples=[])


def profile_step(step, name, steps=3, top=25):
    """Self CPU time per op and input shapes (torch.profiler), ms per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    rows = sorted(((e.self_cpu_time_total / 1e3 / steps, e.count / steps, e.key,
                    str(e.input_shapes)[:70])
                   for e in prof.key_averages(group_by_input_shape=True)), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{name}: self CPU time per step {total:.1f} ms (torch.profiler, {steps} steps)")
    for ms, calls, key, shapes in rows[:top]:
        print(f"  {ms:7.2f} ms  {calls:4.1f} calls  {key[:48]:48s} {shapes}")
    return dict(total_ms=total, ops=[dict(ms=r[0], calls=r[1], op=r[2], shapes=r[3])
                                     for r in rows[:top]])


def weight_reset(params) -> Callable[[], None]:
    """A reset for measure(): puts the parameters back to their values now. Training steps on a
    benchmark's fixed batch move the firing rates (random labels drove a synaptic SHD network
    from 2 % to 18 % spikes in ten Adam steps), and a sparse method's cost follows the rates:
    every timed step should run the same network."""
    params = list(params)
    start = [p.detach().clone() for p in params]

    def reset():
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    return reset


def measure_interleaved(cases: Dict[str, tuple], *, device, repeats: int, warmup: int = 1
                        ) -> Dict[str, Dict[str, dict]]:
    """measure() for several methods in alternation: round r times one repetition of every case
    (name -> (forward, backward, reset)), so that a slow period of a shared machine falls on all
    of them alike and their ratios stay meaningful. Returns {name: measure()'s result}."""
    samples = {name: ([], [], []) for name in cases}
    for rep in range(warmup + repeats):
        for name, (forward, backward, reset) in cases.items():
            one = measure(forward, backward, device=device, repeats=1, warmup=0, reset=reset)
            if rep >= warmup:
                for acc, key in zip(samples[name], ("forward", "backward", "total")):
                    acc.append(one[key]["median"] / 1e3)
    return {name: {"forward": summarize(f), "backward": summarize(b), "total": summarize(t)}
            for name, (f, b, t) in samples.items()}


def measure(forward: Callable[[], object], backward: Optional[Callable[[object], None]] = None,
            *, device, repeats: int, warmup: int = 1,
            reset: Optional[Callable[[], None]] = None) -> Dict[str, dict]:
    """Time forward() and backward(forward()) separately, `repeats` times after `warmup` runs.

    reset() runs untimed before every repetition (e.g. to drop accumulated .grad). The device is
    synchronised around each phase. Returns {"forward", "backward", "total"} summaries in ms; an
    out-of-memory error gives inf instead of a crash.
    """
    fwd, bwd, tot = [], [], []
    try:
        for rep in range(warmup + repeats):
            if reset is not None:
                reset()
            synchronize(device)
            t0 = time.perf_counter()
            out = forward()
            synchronize(device)
            t1 = time.perf_counter()
            if backward is not None:
                backward(out)
                synchronize(device)
            t2 = time.perf_counter()
            del out
            if rep >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                tot.append(t2 - t0)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc) and not isinstance(exc, MemoryError):
            raise
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return {"forward": inf_summary(), "backward": inf_summary(), "total": inf_summary(),
                "error": "out of memory"}
    result = {"forward": summarize(fwd), "total": summarize(tot)}
    if backward is not None:
        result["backward"] = summarize(bwd)
    return result


# ----------------------------------------------------------------------------- memory

def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr(), s.nbytes())


def saved_bytes(fn: Callable[[], object], exclude=()) -> tuple:
    """Run fn() and count the bytes autograd saves for backward (torch.autograd.graph.
    saved_tensors_hooks); each storage counts once, tensors sharing storage with `exclude`
    (parameters, alive anyway) are not counted. Returns (fn's result, bytes, number of tensors)."""
    skip = {_storage_key(t) for t in exclude}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = _storage_key(t)
            if key not in skip:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()), len(seen)


_libc = None
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere). A small fixed threshold makes every large
    block an mmap that is returned to the OS on free, so resident memory tracks live tensors."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        return bool(_libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except OSError:
        return False


def _mallopt_timing_setting() -> None:
    """glibc's dynamic allocator setting as it settles in a long-running training process: the
    mmap threshold at its 32 MiB maximum and, as glibc sets it alongside, the trim threshold at
    twice that. (Fixing the mmap threshold alone leaves the trim threshold at 128 KiB, so every
    large free returns pages to the OS and every large allocation page-faults them back: a
    zero-filled 25 MiB gradient then costs ~6 ms instead of ~1 ms, for every method alike.)"""
    if _mallopt_mmap_threshold(32 * 1024 * 1024):
        _libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def _malloc_trim() -> bool:
    """Return free heap pages to the OS, so that reusing them shows up in the RSS again."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(step: Callable[[], None], device) -> dict:
    """Peak memory a step adds above what was allocated before it, in bytes.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact, allocator-level).
    CPU: peak resident set size (VmHWM after resetting it via /proc/self/clear_refs) minus the RSS
    before the step, with free heap pages returned to the OS first (malloc_trim) and glibc's mmap
    threshold fixed at 64 KiB while measuring, so that what the step allocates shows up in the
    RSS and what it frees leaves it. Pages the OS counts: close to, not exactly, tensor bytes.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(peak_bytes=peak - base, method="torch.cuda.max_memory_allocated")
    fixed = _mallopt_mmap_threshold(64 * 1024)
    _malloc_trim()
    try:
        base = _proc_status_kib("VmRSS")
        if base is None or not _reset_peak_rss():
            return dict(peak_bytes=None, method="unavailable (needs Linux /proc)")
        step()
        hwm = _proc_status_kib("VmHWM")
        return dict(peak_bytes=max(0, hwm - base) * 1024,
                    method="RSS high-water mark delta (mmap threshold 64 KiB)" if fixed
                    else "RSS high-water mark delta")
    finally:
        if fixed:
            _mallopt_timing_setting()
        gc.collect()


def guarded_peak_memory(step, device) -> dict:
    try:
        return peak_memory(step, device)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc) and not isinstance(exc, MemoryError):
            raise
        return dict(peak_bytes=math.inf, method="out of memory")


# ----------------------------------------------------------------------------- inputs, weights

def spike_input(steps, batch, n_in, rate, *, generator, dtype=torch.float32, device="cpu"):
    """Bernoulli(rate) binary spikes [steps, batch, n_in]."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    x = torch.rand(steps, batch, n_in, generator=generator) < rate
    return x.to(dtype=dtype, device=device)


def latency_input(steps, batch, n_in, fire_prob, *, generator, dtype=torch.float32, device="cpu"):
    """Latency code: each input fires at most once (with probability fire_prob) at a uniformly
    drawn step, as a bright pixel of an intensity-to-latency coded image does."""
    x = torch.zeros(steps, batch, n_in)
    fires = torch.rand(batch, n_in, generator=generator) < fire_prob
    when = torch.randint(0, steps, (batch, n_in), generator=generator)
    b, i = fires.nonzero(as_tuple=True)
    x[when[b, i], b, i] = 1.0
    return x.to(dtype=dtype, device=device)


def dataset_input(name, batch, *, generator, steps=None, n_in=None, dtype=torch.float32,
                  device="cpu"):
    """Input drawn at the typical rate of dataset `name` (see DATASETS); steps/n_in override
    the dataset's sizes for the smaller variants."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    d = DATASETS[name]
    steps = d["steps"] if steps is None else steps
    n_in = d["n_in"] if n_in is None else n_in
    if d["code"] == "latency":
        return latency_input(steps, batch, n_in, d["fire_prob"], generator=generator,
                             dtype=dtype, device=device)
    return spike_input(steps, batch, n_in, d["rate"], generator=generator, dtype=dtype,
                       device=device)


def spike_rate(x: torch.Tensor) -> float:
    return float((x != 0).sum()) / max(x.numel(), 1)


def calibrate_layer(x, n_out, *, generator, target_rate=TARGET_RATE, alpha=ALPHA,
                    threshold=THRESHOLD, alpha_syn=None, max_batch=16, iters=18):
    """Weights [n_out, n_in] ~ N(0, 1) * scale with the scale searched (bisection in log space,
    on the reference forward of up to max_batch samples of x) so that the layer (with the
    synaptic current alpha_syn, if given) fires at about target_rate spikes per neuron per
    step. Returns (weight, bias, measured rate on the sample)."""
    from sparsegrad import reference as ref

    n_in = x.shape[-1]
    base = torch.randn(n_out, n_in, generator=generator).to(dtype=x.dtype, device=x.device)
    bias = torch.zeros(n_out, dtype=x.dtype, device=x.device)
    sample = x[:, :max_batch]

    def rate(scale):
        with torch.no_grad():
            return float(ref.lif_layer(sample, base * scale, bias, alpha=alpha,
                                       threshold=threshold, alpha_syn=alpha_syn).mean())

    lo, hi = 1e-4, 1e-4
    while rate(hi) < target_rate and hi < 1e4:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if rate(mid) < target_rate:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.02:
            break
    scale = hi
    return base * scale, bias, rate(scale)


# ----------------------------------------------------------------------------- checks

def assert_spikes_match(name, got, want, max_fraction=1e-3) -> int:
    """Spike trains must agree up to a few float round-off flips near threshold; returns the
    number of differing entries and raises when more than max_fraction differ."""
    diff = int((got != want).sum())
    if diff > max_fraction * max(want.numel(), 1):
        raise AssertionError(f"{name}: {diff} of {want.numel()} spikes differ from the reference")
    return diff


def check_sparsegrad_layer(x, weight, bias, *, alpha=ALPHA, b_th=B_TH, producer=None,
                           batch=4) -> dict:
    """Before timing: sparsegrad's forward spikes and dW/db/dx, dense and sparse, must equal the
    reference's on a batch slice of the benchmark problem, in float64 (exact up to round-off)."""
    import sparsegrad
    from sparsegrad import reference as ref
    from sparsegrad.functional import lif_layer_with_stats

    xs = x[:, :batch].detach().double()
    w = weight.detach().double()
    b = bias.detach().double()
    g = torch.Generator().manual_seed(123)
    grad = torch.randn(x.shape[0], xs.shape[1], w.shape[0], generator=g).to(xs.device, xs.dtype)
    report = {}
    for mode in ("dense", "sparse"):
        grads = {}
        for impl in ("reference", "sparsegrad"):
            xi = xs.clone().requires_grad_(True)
            wi = w.clone().requires_grad_(True)
            bi = b.clone().requires_grad_(True)
            if impl == "reference":
                s = ref.lif_layer(xi, wi, bi, alpha=alpha, b_th=b_th, backward=mode)
            else:
                s = sparsegrad.lif_layer(xi, wi, bi, alpha=alpha, b_th=b_th, backward=mode)
            s.backward(grad)
            grads[impl] = (s.detach(), wi.grad, bi.grad, xi.grad)
        if mode == "dense":
            grads_dense = grads["reference"]
        spikes_diff = assert_spikes_match(f"sparsegrad {mode} forward", grads["sparsegrad"][0],
                                          grads["reference"][0], max_fraction=0.0)
        for label, got, want in zip(("dW", "db", "dx"), grads["sparsegrad"][1:],
                                    grads["reference"][1:]):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"sparsegrad {mode} {label}: {m}")
        report[mode] = dict(spike_mismatches=spikes_diff, grads="match (float64, rtol 1e-7)")
    # the plain-PyTorch baseline is the same model as the reference, gradients included
    xi, wi, bi = (t.clone().requires_grad_(True) for t in (xs, w, b))
    s = pytorch_lif(xi, wi, bi, alpha=alpha)
    s.backward(grad)
    assert_spikes_match("pytorch baseline", s.detach(), grads_dense[0], max_fraction=0.0)
    for label, got, want in zip(("dW", "db", "dx"), (wi.grad, bi.grad, xi.grad), grads_dense[1:]):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"pytorch baseline {label}: {m}")
    report["pytorch"] = dict(spike_mismatches=0, grads="match the reference (float64)")
    return report


# ----------------------------------------------------------------------------- floors

def layer_floor_report(problem, rows, spikes_key="sparsegrad_sparse") -> dict:
    """Measured time over the performance-model floor (benchmarks/perf_model.py, an H100's) of
    sparsegrad's fused layer, at the counts this run measured: {"floors": ..., "over_floor":
    {"sparse_forward", "sparse_backward", "dense_forward", "dense_backward"}}."""
    import perf_model

    ref_row = rows.get(spikes_key) or next(iter(rows.values()))
    T, B, n_in = problem.x.shape
    n_out = problem.weight.shape[0]
    binary = bool(((problem.x == 0) | (problem.x == 1)).all())
    floors = perf_model.layer_floors(
        T, B, n_in, n_out, nnz=ref_row["input_nonzeros"],
        active=rows["sparsegrad_sparse"]["active_entries"] if "sparsegrad_sparse" in rows
        else ref_row["active_entries"],
        spikes=round(ref_row["spike_rate"] * T * B * n_out),
        producer_active=problem.producer[1].numel() if problem.producer is not None else None,
        binary_input=binary)
    over = {}
    for mode in ("sparse", "dense"):
        row = rows.get(f"sparsegrad_{mode}")
        if row is None:
            continue
        for phase in ("forward", "backward"):
            over[f"{mode}_{phase}"] = perf_model.over_floor(row["times"][phase]["median"],
                                                            floors[mode][phase])
    return dict(floors=floors, over_floor=over)


def fmt_over_floor(over: dict, device) -> str:
    parts = [f"{k.replace('_', ' ')} {v:.3g}x" for k, v in over.items() if math.isfinite(v)]
    where = "" if torch.device(device).type == "cuda" else " (a CPU run: the floor is an H100's)"
    return "measured / H100 floor (benchmarks/perf_model.py)" + where + ": " + ", ".join(parts)


# ----------------------------------------------------------------------------- results

def machine_info(device) -> dict:
    info = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith(".py") else None,
        python=platform.python_version(), platform=platform.platform(),
        machine=platform.machine(), cpu=_cpu_model(), logical_cpus=os.cpu_count(),
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        device=str(device),
    )
    # allocator switches that change CPU timings (THP_MEM_ALLOC_ENABLE=1: PyTorch backs large CPU
    # tensors with 2 MB pages, so a fresh large tensor costs far fewer page faults)
    info["allocator_env"] = {k: v for k, v in sorted(os.environ.items())
                             if k == "THP_MEM_ALLOC_ENABLE" or k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    try:  # 1-minute load average as the run ends: other jobs on the machine skew the timings
        info["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import sparsegrad
        info["sparsegrad"] = {k: (v if isinstance(v, (str, int, float, bool, type(None)))
                                  else str(v)) for k, v in sparsegrad.build_info().items()}
    except ImportError as exc:  # the scripts need it, but metadata must not be what fails
        info["sparsegrad"] = f"not importable: {exc}"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _jsonable(obj):
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return str(obj)  # JSON has no inf/nan; report.py reads them back with float()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
    print(f"wrote {path}")


def result_header(script: str, args, device) -> dict:
    return dict(script=script, machine=machine_info(device),
                settings={k: v for k, v in vars(args).items() if k != "json"})


# ----------------------------------------------------------------------------- printing

def fmt_ms(summary: Optional[dict]) -> str:
    if not summary:
        return "-"
    med = summary["median"]
    if math.isinf(med):
        return "OOM"
    return f"{med:.1f}±{summary['iqr'] / 2:.1f}" if med < 1000 else f"{med:.0f}±{summary['iqr'] / 2:.0f}"


def fmt_mb(nbytes) -> str:
    if nbytes is None:
        return "-"
    if isinstance(nbytes, float) and math.isinf(nbytes):
        return "OOM"
    return f"{nbytes / 2**20:.2f}"


def ratio(a, b) -> float:
    """a / b for medians or byte counts; nan when undefined."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    if b == 0 or math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def print_table(headers, rows) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- one hidden layer

class LayerProblem:
    """A hidden LIF layer's inputs: x [T,B,N_in], weight, bias, the upstream gradient dL/dS, and
    for a second hidden layer the producer's active set (x are then a sparse layer's spikes and
    dx is requested, as inside a network)."""

    def __init__(self, x, weight, bias, grad, producer=None, info=None):
        self.x, self.weight, self.bias, self.grad = x, weight, bias, grad
        self.producer = producer
        self.needs_dx = producer is not None
        self.info = info or {}


def make_layer_problem(dataset, batch, n_out, *, steps=None, n_in=None, second_layer=False,
                       target_rate=TARGET_RATE, dtype=torch.float32, device="cpu", seed=0):
    """Input at dataset's rate, weights calibrated to target_rate output spikes. second_layer:
    the layer is n_out -> n_out, fed by the spikes of a calibrated sparse first layer."""
    import sparsegrad.functional as sgf

    gen = torch.Generator().manual_seed(seed)
    x = dataset_input(dataset, batch, generator=gen, steps=steps, n_in=n_in, dtype=dtype)
    info = dict(dataset=dataset, steps=x.shape[0], batch=batch, n_in=x.shape[2], n_out=n_out,
                input_rate=spike_rate(x), target_rate=target_rate, second_layer=second_layer)
    producer = None
    if second_layer:
        w1, b1, r1 = calibrate_layer(x, n_out, generator=gen, target_rate=target_rate)
        with torch.no_grad():
            x1, _, _, producer = sgf.lif_layer_with_stats(
                x.to(device), w1.to(device), b1.to(device), alpha=ALPHA, backward="sparse")
        x = x1.detach().cpu()
        info.update(n_in=n_out, producer_layer=f"{info['n_in']}->{n_out} sparse LIF",
                    input_rate=spike_rate(x))
    weight, bias, calib = calibrate_layer(x, n_out, generator=gen, target_rate=target_rate)
    info["calibration_rate"] = calib
    grad = torch.randn(x.shape[0], batch, n_out, generator=gen).to(dtype)
    return LayerProblem(x.to(device), weight.to(device), bias.to(device), grad.to(device),
                        producer, info)


# Plain PyTorch BPTT of DESIGN.md §2, written as an efficient PyTorch user would: one F.linear
# over the whole sequence, then a Python loop over current.unbind(0) (indexing current[t] in the
# loop instead would make autograd materialise a zero-filled [T,B,N] gradient per step, an
# O(T^2 B N) backward that would flatter any speed-up). sparsegrad.reference is written the same
# way; "pytorch" is the baseline the ratios use, "reference" times that file.

def pytorch_lif(x, weight, bias=None, *, alpha, threshold=THRESHOLD, slope=SLOPE,
                b_th=math.inf):
    """Dense surrogate BPTT (b_th=inf) of the LIF layer; equal to sparsegrad.reference."""
    from sparsegrad import reference as ref

    current = torch.nn.functional.linear(x, weight, bias)
    v = current.new_zeros(current.shape[1:])
    s = current.new_zeros(current.shape[1:])
    spikes = []
    for c in current.unbind(0):
        v = alpha * v + c - threshold * s.detach()
        s = ref.spike(v - threshold, slope, b_th)
        spikes.append(s)
    return torch.stack(spikes)


def pytorch_li_readout(x, weight, bias=None, *, alpha):
    """Leaky-integrator readout, max over time; equal to sparsegrad.reference.li_readout."""
    current = torch.nn.functional.linear(x, weight, bias)
    u = torch.zeros_like(current[0])
    trace = []
    for c in current.unbind(0):
        u = alpha * u + (1.0 - alpha) * c
        trace.append(u)
    return torch.stack(trace).max(dim=0).values


LAYER_METHODS = ("pytorch", "sparsegrad_dense", "sparsegrad_sparse")


def layer_runner(method, problem, *, b_th=B_TH, alpha=ALPHA):
    """(forward, backward, reset, leaves) for one method on one problem. forward() returns
    (spikes, LIFStats or None). "pytorch" and "reference" are plain PyTorch autograd with the
    dense surrogate (see pytorch_lif); "sparsegrad_dense" / "_sparse" are the fused kernels."""
    import sparsegrad.functional as sgf
    from sparsegrad import reference as ref

    x = problem.x.detach().clone().requires_grad_(problem.needs_dx)
    w = problem.weight.detach().clone().requires_grad_(True)
    b = problem.bias.detach().clone().requires_grad_(True)

    if method == "pytorch":
        def forward():
            return pytorch_lif(x, w, b, alpha=alpha), None
    elif method == "reference":
        def forward():
            return ref.lif_layer(x, w, b, alpha=alpha, b_th=b_th, backward="dense"), None
    elif method in ("sparsegrad_dense", "sparsegrad_sparse"):
        mode = method.split("_")[1]
        producer = problem.producer if mode == "sparse" else None

        def forward():
            s, _, stats, _ = sgf.lif_layer_with_stats(x, w, b, alpha=alpha, b_th=b_th,
                                                      backward=mode, producer=producer)
            return s, stats
    else:
        raise ValueError(f"method must be one of {LAYER_METHODS + ('reference',)}, "
                         f"got {method!r}")

    def backward(out):
        out[0].backward(problem.grad)

    def reset():
        for t in (x, w, b):
            t.grad = None

    return forward, backward, reset, (w, b)


def bench_layer_method(method, problem, *, device, repeats, warmup, b_th=B_TH,
                       memory=True) -> tuple:
    return bench_runner(method, layer_runner(method, problem, b_th=b_th), problem,
                        device=device, repeats=repeats, warmup=warmup, memory=memory)


def bench_runner(name, runner, problem, *, device, repeats, warmup, memory=True) -> tuple:
    """Times, saved-for-backward bytes, peak memory of fwd+bwd, spike rate and active fraction
    of one (forward, backward, reset, params) runner; returns (row, forward spikes)."""
    forward, backward, reset, params = runner
    times = measure(forward, backward, device=device, repeats=repeats, warmup=warmup,
                    reset=reset)
    reset()
    (spikes, stats), nbytes, ntensors = saved_bytes(forward, exclude=params)
    entries = spikes.numel()
    row = dict(method=name, times=times, saved_bytes=nbytes, saved_tensors=ntensors,
               spike_rate=spike_rate(spikes),
               active_entries=int(stats.active_count) if stats is not None else entries,
               active_fraction=stats.active_fraction if stats is not None else 1.0,
               input_nonzeros=int((problem.x != 0).sum()))
    spikes = spikes.detach()
    del stats
    if memory:
        reset()

        def step():
            backward(forward())

        mem = guarded_peak_memory(step, device)
        row["peak_bytes"], row["peak_method"] = mem["peak_bytes"], mem["method"]
    reset()
    return row, spikes
