"""Build sparsegrad._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc
is found. Environment:
  SPARSEGRAD_REQUIRE_CUDA=1   fail instead of silently building CPU-only
  SPARSEGRAD_NO_CUDA=1        build the CPU kernels only, even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST        defaults to the visible GPUs' architectures, else "8.0;9.0"
  CUDA_HOME                   defaults to /usr/local/cuda when it exists
  SPARSEGRAD_PORTABLE=1       build without -march=native (for binaries copied to other CPUs)
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not cuda_home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        cuda_home = "/usr/local/cuda"
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return cuda_home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _cuda_include_dirs():
    """The pip CUDA 13 wheels keep cusparse.h & co. under site-packages/nvidia/cu13/include."""
    dirs = []
    for entry in sys.path:
        candidate = os.path.join(entry, "nvidia", "cu13", "include")
        if os.path.isdir(candidate) and candidate not in dirs:
            dirs.append(candidate)
    return dirs


def _extensions():
    require_cuda = os.environ.get("SPARSEGRAD_REQUIRE_CUDA", "0") == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cuda_home = _find_nvcc()
    skip_cuda = os.environ.get("SPARSEGRAD_NO_CUDA", "0") == "1"
    use_cuda = (not skip_cuda and torch.version.cuda is not None and cuda_home is not None
                and bool(cuda_sources))
    if require_cuda and not use_cuda:
        raise RuntimeError(
            "SPARSEGRAD_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found at {cuda_home!r}, "
            f"{len(cuda_sources)} CUDA sources. Install the CUDA build of torch and set CUDA_HOME."
        )
    define_macros = [
        ("SPARSEGRAD_VERSION", f'"{VERSION}"'),
        ("SPARSEGRAD_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # -ffp-contract=off: no fused multiply-adds, so results do not depend on the vector width.
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    if os.environ.get("SPARSEGRAD_PORTABLE", "0") != "1":
        cxx_flags.append("-march=native")  # source builds: use this CPU's vector units
    extra_link = ["-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if not use_cuda:
        return [
            CppExtension(
                "sparsegrad._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=extra_link,
            )
        ]
    os.environ["CUDA_HOME"] = cuda_home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        # The visible GPUs' architectures, else (CI, build machines) sm_80 + sm_90. torch's build
        # helpers fail without a list when no GPU is visible; setting it also records it.
        caps = []
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps) or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_inc = _cuda_include_dirs()
    if cuda_inc:
        os.environ.setdefault("CUDA_INC_PATH", cuda_inc[0])
    define_macros += [("SPARSEGRAD_WITH_CUDA", None), ("SPARSEGRAD_CUDA_ARCHS", f'"{archs}"')]
    return [
        CUDAExtension(
            "sparsegrad._C",
            sources + cuda_sources,
            include_dirs=include_dirs + cuda_inc,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                # --fmad=false: no contracted multiply-adds, so the LIF recurrence rounds
                # exactly as on the CPU (spikes agree bit for bit given the same currents).
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"],
            },
            extra_link_args=extra_link,
        )
    ]


setup(
    name="sparsegrad",
    version=VERSION,
    packages=find_packages(include=["sparsegrad", "sparsegrad.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
