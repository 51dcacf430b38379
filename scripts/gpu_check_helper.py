"""The Python half of scripts/gpu_check.sh (not meant to be run by hand).

    gpu_check_helper.py versions --mode gpu|cpu --json PATH
        print the GPU, driver, CUDA and torch versions; exit 1 in gpu mode without a GPU
    gpu_check_helper.py arch
        print the visible GPU's architecture for TORCH_CUDA_ARCH_LIST ("9.0")
    gpu_check_helper.py sanitize --tool TOOL --json PATH [--kernel-filter S] -- CMD...
        run CMD under compute-sanitizer, count the errors it reports, write them to PATH with
        ran: false when the sanitizer could not run the program (device not supported, a failed
        first allocation, no summary); the program's own failures (a case that raised) are
        recorded apart (program_failed), never counted as sanitizer errors
    gpu_check_helper.py summary --steps TSV --work DIR --out DIR --mode gpu|cpu [--quick]
        [--partial] [--budget S]
        write OUT/summary.json and OUT/summary.txt from the steps' records, logs and benchmark
        JSON; print the table; exit 0 if every check passed, else 1. --partial: written after
        each step (complete: false), quietly
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

# The GPU targets at the SHD layer / network (DESIGN.md §7).
TARGETS = {
    "bwd_speedup_vs_pytorch_shd": (">=", 40.0, "sparse backward vs plain-PyTorch BPTT, SHD layer"),
    "step_speedup_vs_snntorch_shd": (">=", 20.0, "training step vs snnTorch, SHD network"),
    "peak_mem_ratio_vs_snntorch_shd": ("<=", 0.30, "peak memory / snnTorch's, SHD network"),
}
BENCH_FILES = ("layer", "network", "peers", "sweeps")


def _run(cmd, timeout=30):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- versions

def cmd_versions(args) -> int:
    import torch

    info = dict(mode=args.mode, python=platform.python_version(), platform=platform.platform(),
                torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), cpu=_cpu_model(),
                logical_cpus=os.cpu_count())
    rc, out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                    "--format=csv,noheader"])
    info["nvidia_smi"] = out if rc == 0 else None
    info["driver"] = None
    if rc == 0 and out:
        fields = [f.strip() for f in out.splitlines()[0].split(",")]
        info["driver"] = fields[1] if len(fields) > 1 else None
    if info["driver"] is None and torch.cuda.is_available():
        try:  # the CUDA driver API version (e.g. 13000), when nvidia-smi is missing
            info["driver"] = f"CUDA driver API {torch._C._cuda_getDriverVersion()}"
        except Exception:  # noqa: BLE001 - private, best effort
            pass
    nvcc = shutil.which("nvcc") or next((p for p in (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),)
        if os.path.exists(p)), None)
    if nvcc:
        rc, out = _run([nvcc, "--version"])
        m = re.search(r"release ([\d.]+), (V[\d.]+)", out or "")
        info["nvcc"] = f"{m.group(1)} ({m.group(2)})" if m else out.splitlines()[-1] if out else None
    else:
        info["nvcc"] = None
    sanitizer = _compute_sanitizer()
    info["compute_sanitizer"] = sanitizer
    if sanitizer:
        rc, out = _run([sanitizer, "--version"])
        info["compute_sanitizer_version"] = out.splitlines()[-1] if out else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0),
                    capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu: {info['cpu']}"
    info["gpu_model"] = gpu_model(info["device"]) if torch.cuda.is_available() else None
    for k in ("device", "driver", "torch", "torch_cuda", "nvcc", "compute_sanitizer_version",
              "python", "logical_cpus"):
        print(f"{k:26s} {info.get(k)}")
    if info.get("nvidia_smi"):
        print(info["nvidia_smi"])
    with open(args.json, "w") as f:
        json.dump(info, f, indent=1)
    if args.mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU (torch.cuda.is_available() is False). On a machine "
              "without a GPU run `bash scripts/gpu_check.sh --cpu`.", file=sys.stderr)
        return 1
    return 0


def gpu_model(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100": the file-name prefix of committed GPU results."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name or "")
    if m:
        return m.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "gpu").lower()).strip("-")
    return slug or "gpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            p = os.path.join(home, "bin", "compute-sanitizer")
            if os.path.exists(p):
                return p
    return None


def cmd_arch(args) -> int:
    import torch

    if not torch.cuda.is_available():
        return 1
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    print(";".join(f"{a}.{b}" for a, b in caps))
    return 0


# ----------------------------------------------------------------------------- sanitizer

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")
# compute-sanitizer ran but could not watch the program: not "0 errors"
_COULD_NOT_RUN = re.compile(r"device not supported|not supported on this device|"
                            r"CUDA_ERROR_NOT_SUPPORTED|unable to (launch|attach|initialize)|"
                            r"target application terminated before first instrumented api call",
                            re.IGNORECASE)
_CASE_LINE = re.compile(r"^\s+(ok|FAIL)\s{1,4}\S", re.MULTILINE)


def sanitizer_ran(text: str, errors) -> bool:
    """Whether compute-sanitizer watched the program run: it printed a summary, said nothing of
    an unsupported device, and, when the program is gpu_sanitize.py (it prints one line per
    case), at least one case passed (all failing means the first allocation already failed)."""
    if errors is None or _COULD_NOT_RUN.search(text):
        return False
    cases = _CASE_LINE.findall(text)
    return not cases or "ok" in cases
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s*"
                           r"\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")


def parse_sanitizer(text: str) -> dict:
    """Errors (and racecheck warnings) from compute-sanitizer's summary lines; errors None when
    no summary line was printed (the run did not finish, or the options were refused)."""
    errors = warnings = None
    for m in _ERROR_SUMMARY.finditer(text):
        errors = (errors or 0) + int(m.group(1))
    for m in _RACE_SUMMARY.finditer(text):
        errors = (errors or 0) + int(m.group(2))
        warnings = (warnings or 0) + int(m.group(3))
    return dict(errors=errors, warnings=warnings)


def cmd_sanitize(args) -> int:
    sanitizer = _compute_sanitizer()
    record = dict(tool=args.tool, errors=None, warnings=None, rc=None, kernel_filter=None,
                  options_dropped=[], ran=False, program_failed=None)
    if sanitizer is None:
        record["note"] = "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        print(record["note"], file=sys.stderr)
        _write(args.json, record)
        return 1
    base = [sanitizer, "--tool", args.tool, "--error-exitcode", "99", "--print-limit", "100"]
    # Optional options, dropped one at a time (last first) if this compute-sanitizer refuses
    # them: a run that prints no summary at all did not get to run the program.
    optional = [("--report-api-errors", ["--report-api-errors", "no"])]
    if args.kernel_filter:
        optional.append(("--kernel-name", ["--kernel-name", f"kns={args.kernel_filter}"]))
    cmd = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    while True:
        full = base + [a for _, opt in optional for a in opt] + cmd
        print("+ " + " ".join(full), flush=True)
        p = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(p.stdout)
        sys.stdout.flush()
        parsed = parse_sanitizer(p.stdout)
        record.update(parsed, rc=p.returncode,
                      kernel_filter=args.kernel_filter
                      if any(n == "--kernel-name" for n, _ in optional) else None)
        if parsed["errors"] is not None or not optional:
            break
        named = [k for k, (n, _) in enumerate(optional) if n in p.stdout]
        name, _ = optional.pop(named[0] if named else -1)  # the refused one, if it says which
        record["options_dropped"].append(name)
        print(f"gpu_check: compute-sanitizer {args.tool} printed no summary; retrying without "
              f"{name}", flush=True)
    record["ran"] = sanitizer_ran(p.stdout, record["errors"])
    # --error-exitcode 99 is the sanitizer's; any other non-zero exit is the program's (a case
    # that raised or gave non-finite values: gpu_sanitize.py's exit 1), not a sanitizer error
    record["program_failed"] = record["rc"] not in (0, 99)
    if not record["ran"]:
        record["errors"] = None
        record["note"] = ("compute-sanitizer could not run the program (unsupported device, a "
                          "failed first allocation, or no summary): sanitizer_ran false")
    _write(args.json, record)
    if not record["ran"]:
        print(f"gpu_check: compute-sanitizer {args.tool} did not run the program "
              f"(rc {record['rc']})", file=sys.stderr)
        return 1
    return 0 if record["errors"] == 0 and not record["program_failed"] else 1


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- summary

def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _num(v):
    v = _f(v)
    return v if math.isfinite(v) else None  # JSON null: not measured (or out of memory)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def parse_junit(path) -> dict:
    out = dict(tests_passed=None, tests_failed=None, tests_skipped=None, tests_total=None,
               failed_tests=[])
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return out
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failures = errors = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failures += int(s.get("failures", 0))
        errors += int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
    out.update(tests_total=total, tests_failed=failures + errors, tests_skipped=skipped,
               tests_passed=total - failures - errors - skipped)
    out["failed_tests"] = out["failed_tests"][:50]
    return out


def parse_progress(path) -> dict:
    """Counts from pytest_gpu_select's per-test log: what finished before pytest was killed."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed = []
    try:
        with open(path) as f:
            for line in f:
                outcome, _, nodeid = line.rstrip("\n").partition("\t")
                if outcome in counts:
                    counts[outcome] += 1
                    if outcome in ("failed", "error"):
                        failed.append(nodeid)
    except OSError:
        return {}
    return dict(tests_passed=counts["passed"], tests_failed=counts["failed"] + counts["error"],
                tests_skipped=counts["skipped"],
                tests_total=sum(counts.values()), failed_tests=failed[:50],
                tests_note="pytest did not finish: counts from the per-test progress log")


def read_steps(path):
    steps = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    name, status, rc, seconds = parts[:4]
                    steps[name] = dict(status=status, rc=None if rc == "" else int(rc),
                                       seconds=round(_f(seconds), 1),
                                       note=parts[4] if len(parts) > 4 else "")
    except OSError:
        pass
    return steps


def _shd_layer(layer):
    for res in (layer or {}).get("results", []):
        if str(res.get("label", "")).startswith("shd 700->"):
            return res
    return None


def _shd_network(network):
    for res in (network or {}).get("results", []):
        if res.get("label") == "shd":
            return res
    return None


def key_figures(out_dir) -> dict:
    layer = _load(os.path.join(out_dir, "layer.json"))
    network = _load(os.path.join(out_dir, "network.json"))
    fig = dict(bwd_speedup_vs_pytorch_shd=None, step_speedup_vs_snntorch_shd=None,
               peak_mem_ratio_vs_snntorch_shd=None, over_floor_shd=None, shd_layer=None,
               shd_network=None)
    res = _shd_layer(layer)
    if res:
        fig["bwd_speedup_vs_pytorch_shd"] = _num(res["ratios"].get("bwd_pytorch_over_sparse"))
        fig["over_floor_shd"] = {k: _num(v) for k, v in (res.get("over_floor") or {}).items()}
        p = res["problem"]
        fig["shd_layer"] = (f"{p['n_in']}->{p['n_out']} T={p['steps']} B={res['batch']}, "
                            f"active {100 * _f(res['methods']['sparsegrad_sparse']['active_fraction']):.2f} %")
    res = _shd_network(network)
    if res:
        p = res["problem"]
        fig["shd_network"] = (f"{p['n_in']}-{p['hidden']}-{p['hidden']}-{p['classes']} "
                              f"T={p['steps']} B={res['batch']}")
        snn = res.get("ratios", {}).get("snntorch")
        if snn:
            fig["step_speedup_vs_snntorch_shd"] = _num(snn.get("step_over_sparse"))
            fig["peak_mem_ratio_vs_snntorch_shd"] = _num(snn.get("peak_sparse_over_this"))
        else:
            fig["snntorch"] = res.get("skipped", {}).get("snntorch", "not run")
    return fig


def evaluate_targets(fig) -> dict:
    out = {}
    for key, (op, target, label) in TARGETS.items():
        v = fig.get(key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        shown = f"{100 * target:g} %" if key.startswith("peak_mem") else f"{target:g}x"
        out[key] = dict(label=label, value=v, target=f"{op} {shown}", met=met)
    return out


def _fmt(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "%":
        return f"{100 * v:.1f} %"
    return f"{v:.3g}{unit}"


def cmd_summary(args) -> int:
    steps = read_steps(args.steps)
    versions = _load(os.path.join(args.work, "versions.json")) or {}
    junit = parse_junit(os.path.join(args.work, "junit.xml"))
    if junit["tests_total"] is None:
        junit.update(parse_progress(os.path.join(args.work, "tests-progress.tsv")))
    sanitizers = {}
    for name in sorted(os.listdir(args.work)) if os.path.isdir(args.work) else []:
        m = re.match(r"sanitizer-(\w+)\.json$", name)
        if m:
            sanitizers[m.group(1)] = _load(os.path.join(args.work, name)) or {}
    coverage = _load(os.path.join(args.work, "sanitize-cases.json")) or {}
    gpu = args.mode == "gpu"
    # sanitizer_ran: every sanitizer run watched the program; without a run (--cpu, no time, a
    # device it does not support) the errors are unknown (null), never 0
    ran = gpu and bool(sanitizers) and all(v.get("ran", v.get("errors") is not None)
                                           for v in sanitizers.values())
    if ran:
        sanitizer_errors = sum(int(v.get("errors") or 0) for v in sanitizers.values())
    else:
        sanitizer_errors = None
    fig = key_figures(args.out)
    targets = evaluate_targets(fig)
    failed_steps = [n for n, s in steps.items() if s["status"] not in ("pass", "skipped")]
    planned = [n for n in (args.planned or "").split(",") if n]
    pending = [n for n in planned if n not in steps] if args.partial else []
    missed = [k for k, t in targets.items() if t["met"] is False or (gpu and t["met"] is None)]
    # The GPU targets are judged on a GPU at full size only; --cpu and --quick report them.
    judged = gpu and not args.quick
    ok = not failed_steps and not pending and (not judged or not missed)
    summary = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        device=versions.get("device"), gpu_model=versions.get("gpu_model"),
        mode=args.mode, quick=bool(args.quick), torch=versions.get("torch"),
        torch_cuda=versions.get("torch_cuda"), driver=versions.get("driver"),
        nvcc=versions.get("nvcc"), python=versions.get("python"),
        tests_passed=junit["tests_passed"], tests_failed=junit["tests_failed"],
        tests_skipped=junit["tests_skipped"], failed_tests=junit["failed_tests"],
        tests_note=junit.get("tests_note"),
        sanitizer_errors=sanitizer_errors, sanitizer_ran=ran,
        sanitizer={k: dict(errors=v.get("errors"), warnings=v.get("warnings"), rc=v.get("rc"),
                           ran=v.get("ran"), program_failed=v.get("program_failed"),
                           kernel_filter=v.get("kernel_filter")) for k, v in sanitizers.items()}
        if gpu else "skipped (--cpu: no GPU); the op-coverage script ran on the CPU",
        sanitize_trimmed=coverage.get("trim"),
        tests_workers=_read_int(os.path.join(args.work, "tests-workers.txt")),
        sanitize_cases=coverage.get("cases"), sanitize_cases_failed=coverage.get("cases_failed"),
        sanitize_ops_not_called=coverage.get("ops_not_called"),
        sanitize_dtypes=coverage.get("dtypes"),
        bwd_speedup_vs_pytorch_shd=fig["bwd_speedup_vs_pytorch_shd"],
        step_speedup_vs_snntorch_shd=fig["step_speedup_vs_snntorch_shd"],
        peak_mem_ratio_vs_snntorch_shd=fig["peak_mem_ratio_vs_snntorch_shd"],
        over_floor_shd=fig["over_floor_shd"], shd_layer=fig["shd_layer"],
        shd_network=fig["shd_network"], snntorch=fig.get("snntorch", "ran"),
        targets=targets, targets_judged=judged,
        steps=steps, failed_steps=failed_steps,
        total_seconds=round(sum(s["seconds"] for s in steps.values()), 1),
        budget_seconds=args.budget, complete=not args.partial, steps_pending=pending,
        ok=ok, exit_code=0 if ok else 1,
        files=sorted(os.listdir(args.out)) + ["summary.json", "summary.txt"],
    )
    summary["files"] = sorted(set(summary["files"]))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = render_table(summary)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    if not args.partial:
        print(text)
    return summary["exit_code"]


def render_table(s) -> str:
    lines = [f"== sparsegrad gpu_check: mode {s['mode']}{' (quick)' if s['quick'] else ''}, "
             f"{s['device']}, torch {s['torch']} (CUDA {s['torch_cuda'] or 'n/a'}), driver "
             f"{s['driver'] or 'n/a'}, nvcc {s['nvcc'] or 'n/a'}"]
    lines.append(f"{'step':18s} {'status':8s} {'seconds':>8s}  note")
    for name, st in s["steps"].items():
        lines.append(f"{name:18s} {st['status']:8s} {st['seconds']:8.1f}  {st['note']}"[:150])
    tests = (f"tests: {s['tests_passed']} passed, {s['tests_failed']} failed, "
             f"{s['tests_skipped']} skipped")
    if s["failed_tests"]:
        tests += " (first failures: " + ", ".join(t.split("::")[-1] for t in s["failed_tests"][:3]) + ")"
    lines.append(tests)
    lines.append(f"sanitizer errors: {s['sanitizer_errors']}"
                 + ("" if s["mode"] == "gpu" else " (skipped: --cpu)")
                 + ("" if s["sanitizer_ran"] else " (sanitizer did not run)")
                 + f"; op-coverage cases {s['sanitize_cases']}, failed {s['sanitize_cases_failed']}, "
                   f"ops not called {s['sanitize_ops_not_called']}")
    for key, t in s["targets"].items():
        unit = "%" if "ratio" in key else "x"
        verdict = ("met" if t["met"] else "MISSED" if t["met"] is False else "n/a") \
            if s["targets_judged"] else "(not judged: " + ("--quick" if s["quick"] else "CPU") + ")"
        lines.append(f"{t['label']:46s} {_fmt(t['value'], unit):>9s}  target {t['target']:9s} {verdict}")
    if s.get("over_floor_shd"):
        lines.append("SHD layer, measured / H100 floor: " + ", ".join(
            f"{k.replace('_', ' ')} {_fmt(v)}x" for k, v in s["over_floor_shd"].items()))
    if not s["complete"]:
        lines.append("(partial: written after a step; still to run: "
                     + (", ".join(s["steps_pending"]) or "the summary") + ")")
    lines.append(f"RESULT: {'PASS' if s['ok'] else 'FAIL'} (exit {s['exit_code']})"
                 + (f"; failed steps: {', '.join(s['failed_steps'])}" if s["failed_steps"] else "")
                 + f"; total {s['total_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions")
    v.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    v.add_argument("--json", required=True)
    sub.add_parser("arch")
    s = sub.add_parser("sanitize")
    s.add_argument("--tool", required=True, choices=("memcheck", "racecheck", "synccheck",
                                                     "initcheck"))
    s.add_argument("--json", required=True)
    s.add_argument("--kernel-filter", default=None)
    s.add_argument("cmd", nargs=argparse.REMAINDER)
    m = sub.add_parser("summary")
    m.add_argument("--steps", required=True)
    m.add_argument("--work", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    m.add_argument("--quick", action="store_true")
    m.add_argument("--partial", action="store_true")
    m.add_argument("--planned", default="", help="comma-separated steps of the plan")
    m.add_argument("--budget", type=float, default=None)
    args = p.parse_args(argv)
    return {"versions": cmd_versions, "arch": cmd_arch, "sanitize": cmd_sanitize,
            "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
