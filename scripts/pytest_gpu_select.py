"""pytest plugin for scripts/gpu_check.sh: select the test cases that exercise CUDA kernels.

    python -m pytest -p pytest_gpu_select --gpu-select cuda   # (scripts/ on PYTHONPATH)

--gpu-select cuda: every CUDA case of the suite, so that one run on a GPU machine collects all of
  them (with no -x, every failure is reported):
  - device-parametrised cases whose device parameter is "cuda" (or "cuda:N");
  - tests that are not device-parametrised and say "cuda" in their name, or live in a test_cuda*
    module, or carry a skipif marker whose reason mentions CUDA or a GPU (a CUDA-only test with
    any name: `needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA
    device")`);
  - minus the emulation tests (they run the CUDA kernel bodies on the CPU: not GPU work).
--gpu-select emul: what a machine without a GPU runs in their place: the emulated CUDA kernels
  (every test whose id contains "emul", as `pytest -k emul` selects) and the CPU cases of the
  device-parametrised tests.
Never tests/test_gpu_check.py itself (it runs gpu_check.sh, which runs this selection).
"""
from __future__ import annotations

import re

import pytest

_DEVICE_PARAM = re.compile(r"^(cuda|cpu)(:\d+)?$")
_GPU_REASON = re.compile(r"cuda|gpu", re.IGNORECASE)


def pytest_addoption(parser):
    parser.addoption("--gpu-select", choices=("cuda", "emul"), default=None,
                     help="select the CUDA cases (on a GPU) or their CPU stand-ins (emulation "
                          "and CPU device cases); see scripts/pytest_gpu_select.py")
    parser.addoption("--gpu-select-log", default=None, metavar="PATH",
                     help="append 'outcome<TAB>nodeid' per test as it finishes, so a run killed "
                          "by a timeout still says what passed and failed")


def pytest_runtest_logreport(report):
    path = getattr(pytest_runtest_logreport, "path", None)
    if not path:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" else (
            "skipped" if report.skipped else "error")
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    with open(path, "a") as f:
        f.write(f"{outcome}\t{report.nodeid}\n")


def pytest_configure(config):
    # under pytest-xdist only the controller writes the log (it sees every worker's reports)
    worker = hasattr(config, "workerinput")
    pytest_runtest_logreport.path = None if worker else config.getoption("--gpu-select-log", default=None)


def _device_params(item):
    """The device values among the item's parameters ("cuda", "cpu"), or [] if none."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return []
    found = []
    for value in callspec.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            s = str(v)
            if _DEVICE_PARAM.match(s):
                found.append(s.split(":")[0])
    return found


def _skips_without_gpu(item) -> bool:
    for mark in item.iter_markers("skipif"):
        if _GPU_REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    return False


def is_emulation(item) -> bool:
    return "emul" in item.nodeid.lower()


def is_cuda_case(item) -> bool:
    if is_emulation(item):
        return False
    devices = _device_params(item)
    if devices:
        return "cuda" in devices
    module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return ("cuda" in item.name.lower() or module.startswith("test_cuda")
            or _skips_without_gpu(item))


def is_emul_case(item) -> bool:
    return is_emulation(item) or "cpu" in _device_params(item)


def pytest_collection_modifyitems(config, items):
    mode = config.getoption("--gpu-select")
    if mode is None:
        return
    want = is_cuda_case if mode == "cuda" else is_emul_case
    keep, drop = [], []
    for item in items:
        own = item.nodeid.split("::", 1)[0].endswith("test_gpu_check.py")
        (keep if want(item) and not own else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_report_header(config):
    mode = config.getoption("--gpu-select")
    return f"gpu-select: {mode}" if mode else None
