"""scripts/gpu_check.sh and its helpers run here, without a GPU, so they cannot rot.

The main test runs `bash scripts/gpu_check.sh --cpu --no-build --quick` (the extension built in
place, tiny benchmark sizes, a small test subset) into a temporary folder and checks the exit
status, the files and the summary keys. The others cover what a CPU run does not reach: the GPU
mode on a machine without a GPU, the compute-sanitizer wrapper (with a stand-in sanitizer), the
op-coverage check of gpu_sanitize.py, and the test selection of pytest_gpu_select.py.
No timing thresholds.
"""
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import gpu_check_helper  # noqa: E402

SUMMARY_KEYS = {"device", "torch", "tests_passed", "tests_failed", "sanitizer_errors",
                "sanitizer_ran", "sanitize_cases_failed", "complete", "tests_workers",
                "budget_seconds", "steps_pending",
                "bwd_speedup_vs_pytorch_shd", "step_speedup_vs_snntorch_shd",
                "peak_mem_ratio_vs_snntorch_shd", "steps", "targets", "over_floor_shd",
                "gpu_model", "mode", "exit_code"}
OUT_FILES = {"summary.json", "summary.txt", "layer.json", "network.json", "peers.json",
             "sweeps.json", "logs.tar.gz"}


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path),
               SPARSEGRAD_WHEEL_SITE=str(tmp_path / "site"), MAX_JOBS="2")
    env.pop("SPARSEGRAD_REQUIRE_CUDA", None)
    env.update(extra)
    return env


def _run_check(tmp_path, *flags, **env):
    return subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), *flags], cwd=ROOT,
                          env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --cpu path; a GPU machine runs the real one")
def test_gpu_check_cpu_quick_writes_every_file_and_key(tmp_path):
    p = _run_check(tmp_path, "--cpu", "--no-build", "--quick")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    out = tmp_path / "out"
    files = {f.name for f in out.iterdir()}
    # the device tool brings back at most 8 files, no folders
    assert files == OUT_FILES and all((out / f).is_file() for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "cpu" and summary["quick"] is True and summary["ok"] is True
    assert summary["torch"] == torch.__version__
    assert summary["tests_passed"] > 0 and summary["tests_failed"] == 0
    assert summary["sanitizer_errors"] is None  # --cpu: compute-sanitizer does not run
    assert summary["sanitizer_ran"] is False and summary["sanitize_cases_failed"] == 0
    assert summary["complete"] is True and summary["steps_pending"] == []
    assert summary["tests_workers"] >= 1
    assert summary["sanitize_cases"] > 0 and summary["sanitize_ops_not_called"] == []
    for key in ("bwd_speedup_vs_pytorch_shd", "step_speedup_vs_snntorch_shd",
                "peak_mem_ratio_vs_snntorch_shd"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["targets_judged"] is False  # GPU targets are judged on a GPU, full size only
    assert set(summary["over_floor_shd"]) == {"sparse_forward", "sparse_backward",
                                              "dense_forward", "dense_backward"}
    steps = summary["steps"]
    # in order of value: the sanitizer last
    assert list(steps) == ["versions", "build", "tests", "bench_layer", "bench_network",
                           "bench_peers", "bench_sweeps", "sanitize"]
    assert all(s["status"] == "pass" and s["seconds"] >= 0 for s in steps.values())
    for name in ("layer", "network", "peers", "sweeps"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["script"] == f"bench_{name}" and data["machine"]["device"] == "cpu"
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"junit.xml", "versions.json", "sanitize-cases.json", "steps.tsv"} <= names
    assert {f"{s}.log" for s in steps} <= names
    # the summary table is what the script prints last
    last = p.stdout.strip().splitlines()
    assert last[-1].startswith("RESULT: PASS (exit 0)")
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == last[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_gpu_mode_without_gpu_fails_with_a_summary(tmp_path):
    p = _run_check(tmp_path, "--no-build", "--quick")
    assert p.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "gpu" and summary["ok"] is False
    assert summary["steps"]["versions"]["status"] == "fail"
    assert all(s["status"] == "skipped" for n, s in summary["steps"].items() if n != "versions")
    assert "--cpu" in p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("RESULT: FAIL (exit 1)")


def test_budget_too_small_records_steps_not_started(tmp_path):
    p = _run_check(tmp_path, "--cpu", "--no-build", "--quick", "--budget", "40")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert p.returncode == 1 and summary["ok"] is False
    assert "no_time" in {s["status"] for s in summary["steps"].values()}
    assert summary["total_seconds"] < 60


def test_parse_sanitizer_summaries():
    parse = gpu_check_helper.parse_sanitizer
    assert parse("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n") == \
        dict(errors=0, warnings=None)
    assert parse("========= ERROR SUMMARY: 3 errors\n")["errors"] == 3
    assert parse("========= RACECHECK SUMMARY: 5 hazards displayed (2 errors, 3 warnings)") == \
        dict(errors=2, warnings=3)
    assert parse("Traceback ... killed")["errors"] is None  # no summary: not a clean 0


def _fake_sanitizer(tmp_path, errors, refuse):
    """A stand-in compute-sanitizer: refuses the options in `refuse`, otherwise runs the
    program after its options and prints a summary with `errors` errors."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "compute-sanitizer"

    def case(opt):
        return (f'echo "Error: unrecognized option {opt}" >&2; exit 1' if opt in refuse
                else "shift")

    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        args=()
        while [ $# -gt 0 ]; do
          case "$1" in
            --kernel-name) {case("--kernel-name")} ;;
            --report-api-errors) {case("--report-api-errors")} ;;
            --tool|--error-exitcode|--print-limit) shift ;;
            *) args+=("$1") ;;
          esac
          shift
        done
        "${{args[@]}}"
        prc=$?
        echo "========= ERROR SUMMARY: {errors} errors"
        [ {errors} -eq 0 ] || exit 99
        exit $prc
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(bindir)


@pytest.mark.parametrize("errors,refuse", [(0, ()), (4, ()), (0, ("--kernel-name",)),
                                           (0, ("--report-api-errors",)),
                                           (0, ("--report-api-errors", "--kernel-name"))])
def test_sanitize_wrapper_counts_errors_and_falls_back(tmp_path, errors, refuse):
    bindir = _fake_sanitizer(tmp_path, errors, refuse)
    record = tmp_path / "r.json"
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"])
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "gpu_check_helper.py"), "sanitize",
                        "--tool", "racecheck", "--kernel-filter", "sparsegrad", "--json",
                        str(record), "--", sys.executable, "-c", "print('kernels ran')"],
                       env=env, capture_output=True, text=True, timeout=60)
    r = json.loads(record.read_text())
    assert "kernels ran" in p.stdout
    assert r["errors"] == errors and (p.returncode == 0) == (errors == 0)
    assert r["kernel_filter"] == (None if "--kernel-name" in refuse else "sparsegrad")
    assert r["options_dropped"] == list(refuse)


def test_sanitizer_ran_is_false_when_it_could_not_watch_the_program():
    ran = gpu_check_helper.sanitizer_ran
    summary = "========= ERROR SUMMARY: 0 errors\n"
    assert ran(summary, 0)
    assert ran("  ok   lif_layer float32 sparse\n  FAIL rlif_layer float16: x\n" + summary, 0)
    assert not ran("========= Error: Device not supported\n" + summary, 0)
    assert not ran("========= Target application terminated before first instrumented API call\n"
                   + summary, 0)
    # every case failed (the first allocation already did): nothing was watched
    assert not ran("  FAIL lif_layer float32 sparse: RuntimeError: CUDA error\n"
                   "  FAIL lif_layer float64 sparse: RuntimeError: CUDA error\n" + summary, 0)
    assert not ran("Traceback ... killed", None)


@pytest.mark.parametrize("program,want_rc,failed", [("print('  ok   a')", 0, False),
                                                    ("import sys; print('  ok   a'); sys.exit(1)", 1, True)])
def test_sanitize_wrapper_keeps_case_failures_apart(tmp_path, program, want_rc, failed):
    """A case that fails makes the step fail but is not a sanitizer error (errors stay 0)."""
    bindir = _fake_sanitizer(tmp_path, 0, ())
    record = tmp_path / "r.json"
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"])
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "gpu_check_helper.py"), "sanitize",
                        "--tool", "memcheck", "--json", str(record), "--", sys.executable, "-c",
                        program], env=env, capture_output=True, text=True, timeout=60)
    r = json.loads(record.read_text())
    assert r["errors"] == 0 and r["ran"] is True and r["program_failed"] is failed
    assert p.returncode == want_rc


def test_gpu_sanitize_fails_loudly_on_an_op_it_does_not_call(monkeypatch, tmp_path, capsys):
    import gpu_sanitize

    real = gpu_sanitize.registered_ops
    monkeypatch.setattr(gpu_sanitize, "registered_ops",
                        lambda: real() + ["sparsegrad::brand_new_op"])
    report = tmp_path / "cases.json"
    rc = gpu_sanitize.main(["--device", "cpu", "--size", "tiny", "--dtypes", "float32",
                            "--json", str(report)])
    assert rc == 2
    assert "sparsegrad::brand_new_op" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["ops_not_called"] == ["sparsegrad::brand_new_op"]
    assert data["cases_failed"] == 0
    # every real op ran, the sparse backward on both dW routes
    assert set(real()) <= set(data["ops_called"])
    assert any("dw_route=events" in c["case"] for c in data["results"])
    assert any("dw_route=active" in c["case"] for c in data["results"])


@pytest.mark.parametrize("route", ["events", "active"])
def test_gpu_sanitize_forces_the_dw_route(route):
    """The dispatch mode hands the sparse backward the forced dw_route, and the gradient is the
    same on either route."""
    import sparsegrad
    from gpu_sanitize import DW_ROUTES, OpRecorder

    x = (torch.rand(6, 2, 9, dtype=torch.float64) < 0.3).double()
    w = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(sparsegrad.lif_layer(x, w, alpha=0.9, b_th=10.0).sum(), [w])
    rec = OpRecorder()
    rec.force = {"dw_route": DW_ROUTES[route]}
    with rec:
        got, = torch.autograd.grad(sparsegrad.lif_layer(x, w, alpha=0.9, b_th=10.0).sum(), [w])
    assert rec.calls == {"sparsegrad::lif_forward": 1, "sparsegrad::lif_backward_sparse": 1}
    assert rec.forced == {"sparsegrad::lif_backward_sparse": {"dw_route": DW_ROUTES[route]}}
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


SELECT_TESTS = '''
import pytest, torch
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_param(device): pass

@pytest.mark.parametrize("device,dtype", [("cpu", 1), ("cuda:0", 1)])
def test_param_pair(device, dtype): pass

@needs_gpu
def test_any_name_needing_a_gpu(): pass

def test_stream_cuda(): pass

def test_emul_kernel(): pass

def test_plain(): pass
'''


@pytest.mark.parametrize("mode,want", [
    ("cuda", {"test_param[cuda]", "test_param_pair[cuda:0-1]", "test_any_name_needing_a_gpu",
              "test_stream_cuda"}),
    ("emul", {"test_param[cpu]", "test_param_pair[cpu-1]", "test_emul_kernel"}),
])
def test_pytest_gpu_select(tmp_path, mode, want):
    (tmp_path / "test_sample.py").write_text(SELECT_TESTS)
    env = dict(os.environ, PYTHONPATH=SCRIPTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "pytest_gpu_select", "--gpu-select",
                        mode, "--collect-only", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                        "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    got = {line.split("::", 1)[1] for line in p.stdout.splitlines() if "::" in line}
    assert got == want, p.stdout + p.stderr


def test_gpu_model_names():
    assert gpu_check_helper.gpu_model("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_check_helper.gpu_model("NVIDIA H200") == "h200"
    assert gpu_check_helper.gpu_model("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_check_helper.gpu_model("Some Card") == "some-card"


def test_progress_log_counts_a_killed_pytest(tmp_path):
    log = tmp_path / "p.tsv"
    log.write_text("passed\ta::x\nfailed\ta::y\nskipped\ta::z\nerror\ta::w\npassed\ta::v\n")
    got = gpu_check_helper.parse_progress(str(log))
    assert (got["tests_passed"], got["tests_failed"], got["tests_skipped"]) == (2, 2, 1)
    assert got["failed_tests"] == ["a::y", "a::w"] and "did not finish" in got["tests_note"]
    assert gpu_check_helper.parse_progress(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("shared", [False, True])
def test_gpu_mode_plan_dry_run(tmp_path, shared):
    """The GPU-mode commands, which never run here, are planned as intended and are valid bash
    (SPARSEGRAD_GPU_CHECK_DRY_RUN=1 syntax-checks them with bash -n and runs nothing);
    racecheck/synccheck are planned exactly when a CUDA source uses shared memory or barriers
    outside comments."""
    src = tmp_path / "cuda"
    src.mkdir()
    (src / "a.cuh").write_text("// no __syncthreads here, no __shared__ either\n__global__ void k() {}\n")
    if shared:
        (src / "b.cuh").write_text("__global__ void k2() { __shared__ float buf[32]; }\n")
    p = _run_check(tmp_path, SPARSEGRAD_GPU_CHECK_DRY_RUN="1", SPARSEGRAD_GPU_CHECK_CUDA_SRC=str(src))
    assert p.returncode == 0, p.stdout + p.stderr
    plan = dict(line.split("\t", 1) for line in
                (tmp_path / "out" / "dry-run.tsv").read_text().splitlines())
    want = ["versions", "build", "tests", "bench_layer", "bench_network", "bench_peers",
            "bench_sweeps", "sanitize_memcheck"]
    want += ["sanitize_racecheck", "sanitize_synccheck"] if shared else []
    assert list(plan) == want
    assert " -n 2 " in plan["tests"]  # pytest-xdist, one worker per core (MAX_JOBS=2 here)
    assert "--trim" in plan["sanitize_memcheck"]
    assert "TORCH_CUDA_ARCH_LIST='9.0'" in plan["build"] and "SPARSEGRAD_REQUIRE_CUDA=1" in plan["build"]
    assert "build_ext --inplace" in plan["build"]
    assert "--gpu-select cuda -m ''" in plan["tests"] and " -x" not in plan["tests"]
    assert "--junitxml" in plan["tests"]
    assert "--tool memcheck" in plan["sanitize_memcheck"]
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in plan["sanitize_memcheck"]
    assert "gpu_sanitize.py" in plan["sanitize_memcheck"]
    for b in ("layer", "network", "peers", "sweeps"):
        assert "--device cuda" in plan[f"bench_{b}"] and f"{b}.json" in plan[f"bench_{b}"]
    assert "--batches 64" in plan["bench_layer"] and "--sweeps b_th" in plan["bench_sweeps"]
    assert "--settings shd" in plan["bench_network"]
    assert "fail" not in p.stdout  # bash -n accepted every command


def test_gpu_sanitize_trim_still_calls_every_op(tmp_path):
    """--trim (what memcheck runs): every registered op, the SpikingJelly dynamics and every dtype
    still run, in far fewer cases than the full set."""
    import gpu_sanitize

    report = tmp_path / "cases.json"
    assert gpu_sanitize.main(["--device", "cpu", "--size", "tiny", "--trim", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["trim"] is True and data["ops_not_called"] == [] and data["cases_failed"] == 0
    # (on the CPU: 125 of the full 544; on CUDA the CPU-only ops' 12 cases drop out)
    assert len(data["dtypes"]) == 4 and data["cases"] < 130
    names = [c["case"] for c in data["results"]]
    for word in ("spikingjelly neuron float32 sparse sj_lif", "sj_if", "float16", "bfloat16",
                 "dw_route=events", "dw_route=active", "reset=zero"):
        assert any(word in n for n in names), word
