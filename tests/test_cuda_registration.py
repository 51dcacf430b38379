"""The CUDA kernels are compiled and registered for every op that has a CPU kernel.

With SPARSEGRAD_REQUIRE_CUDA=1 in the environment (CI sets it) a build without CUDA kernels is an
error here, so CI proves on every run that csrc/cuda compiles and links. Otherwise a CPU-only build
skips, saying why.
"""
import os

import pytest
import torch

import sparsegrad

REQUIRED = os.environ.get("SPARSEGRAD_REQUIRE_CUDA", "0") == "1"


def _sparsegrad_ops():
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsegrad::"))
    assert names, "no sparsegrad ops registered"
    return names


def _require_cuda_build():
    info = sparsegrad.build_info()
    if REQUIRED:
        assert info["cuda_compiled"], (
            "SPARSEGRAD_REQUIRE_CUDA=1 but sparsegrad._C was built without its CUDA kernels "
            f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); rebuild with "
            "CUDA_HOME pointing at nvcc")
    if not info["cuda_compiled"]:
        pytest.skip("sparsegrad._C was built without CUDA kernels (CPU-only torch or no nvcc); "
                    "set SPARSEGRAD_REQUIRE_CUDA=1 to make this an error")
    return info


def test_cuda_kernels_registered_for_every_op():
    _require_cuda_build()
    with_cpu = [n for n in _sparsegrad_ops() if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    assert len(with_cpu) >= 5
    missing = [n for n in with_cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
               and n.split("::")[1] not in sparsegrad.ops.CPU_ONLY_OPS]  # the fused CPU layer op
    assert not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
    assert all(sparsegrad.ops.registered_kernels("CUDA").values())
    assert sparsegrad.build_info()["cuda_kernels_registered"]


def test_cuda_build_info_lists_the_architectures():
    info = _require_cuda_build()
    archs = [a for a in info["cuda_archs"].replace(",", ";").replace(" ", ";").split(";") if a]
    assert archs, "cuda_archs is empty in a CUDA build"
    expected = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if expected and REQUIRED:
        assert info["cuda_archs"] == expected


def test_cpu_only_build_reports_missing_cuda_kernel_clearly():
    """Without CUDA kernels the dispatcher itself refuses CUDA tensors (no silent CPU fallback)."""
    if sparsegrad.build_info()["cuda_compiled"]:
        pytest.skip("CUDA kernels are compiled in")
    assert not any(sparsegrad.ops.registered_kernels("CUDA").values())
