"""Lazy imports of optional dependencies with an actionable error."""
from __future__ import annotations

import importlib

_PIP_NAME = {"sklearn": "scikit-learn", "h5py": "h5py", "tonic": "tonic",
             "matplotlib": "matplotlib", "tqdm": "tqdm"}


def require(module: str, what: str):
    """Import ``module`` or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip_name = _PIP_NAME.get(module.split(".")[0], module)
        raise ImportError(
            f"{what} needs the optional package '{pip_name}', which is not installed. "
            f"Install the extras with `pip install sparsegrad[all]` (or `pip install {pip_name}`)."
        ) from exc
