"""sparsegrad: fast spiking-network training for PyTorch.

Fused LIF forward kernels and a sparse surrogate-gradient backward that works only where the
membrane is near threshold (Perez-Nieves & Goodman, 2021), plus spike-count losses that train
networks to spike less (Allred et al., 2020).
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch/libc10, which sparsegrad._C links against)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "sparsegrad's compiled extension sparsegrad._C could not be loaded. Build it with "
        "`pip install --no-build-isolation -e .` against the torch you have installed "
        f"(original error: {exc})") from exc

from . import ops, functional, reference, nn  # noqa: E402
from .functional import lif_layer, lif, rlif_layer, li_readout, LIFState, LIFStats  # noqa: E402

__version__ = _C.build_info()["version"]

__all__ = ["lif_layer", "lif", "rlif_layer", "li_readout", "LIFState", "LIFStats", "nn", "functional", "reference",
           "ops", "show_config", "build_info", "convert", "losses", "data", "to_nir", "from_nir"]

# Optional parts load on first use, so that importing sparsegrad needs only torch and numpy.
_LAZY_MODULES = {"losses", "data", "train", "guard", "nir"}
_LAZY_ATTRS = {"convert": ("conversion", "convert"),
               "to_nir": ("nir", "to_nir"), "from_nir": ("nir", "from_nir")}  # need `nir`


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'sparsegrad' has no attribute {name!r}")


def build_info() -> dict:
    """How the compiled extension was built (version, torch, threads, CUDA)."""
    import torch

    info = dict(_C.build_info())
    info["num_threads"] = torch.get_num_threads()
    info["cuda_kernels_registered"] = all(ops.registered_kernels("CUDA").values())
    return info


def show_config() -> None:
    """Print the build configuration; include it in bug reports."""
    import torch

    info = build_info()
    lines = [f"sparsegrad {info['version']}",
             f"  built against torch  {info['torch_version']} (running {torch.__version__})",
             f"  CPU parallel backend {info['parallel_backend']}, {info['num_threads']} threads",
             f"  CUDA kernels         {'compiled' if info['cuda_compiled'] else 'not compiled'}"
             + (f" for archs {info['cuda_archs']}" if info['cuda_compiled'] else ""),
             f"  CUDA device present  {torch.cuda.is_available()}"]
    print("\n".join(lines))
