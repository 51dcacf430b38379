"""Latency (time-to-first-spike) encoding of analog images, as in Perez-Nieves & Goodman (2021).

A pixel of intensity x in [0, 1] is a constant current into a leaky integrator with effective time
constant tau_eff; it fires once, when its potential reaches the threshold:

    t(x) = tau_eff * ln(x / (x - threshold))     for x > threshold, no spike otherwise

discretised as floor(t / dt) (the paper's code casts to int), kept only when < T. Bright pixels
fire first; at most one spike per pixel.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["latency_times", "latency_encode", "times_to_spikes"]


def latency_times(images, *, T: int = 100, tau_eff: float = 20.0, threshold: float = 0.2,
                  dt: float = 1.0) -> np.ndarray:
    """Spike step of every pixel (int32, same shape as ``images``); ``T`` means no spike.

    images: array-like in [0, 1]. tau_eff and dt in the same unit (ms: the paper's 20 ms and 1 ms).
    """
    x = np.asarray(images, dtype=np.float64)
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    for name, v in (("tau_eff", tau_eff), ("dt", dt)):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not np.isfinite(threshold) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
        raise ValueError("images must hold intensities in [0, 1] (divide 8-bit images by 255)")
    fires = x > threshold
    safe = np.where(fires, x, 1.0)
    with np.errstate(divide="ignore"):
        t = tau_eff / dt * np.log(safe / (safe - threshold))
    steps = np.where(fires, np.floor(t), T)
    steps = np.minimum(steps, T)
    return steps.astype(np.int32)


def times_to_spikes(times, T: int, dtype=torch.float32) -> torch.Tensor:
    """One sample's spike steps [N_in] (T = silent) -> dense spikes [T, N_in]."""
    times = torch.as_tensor(np.asarray(times), dtype=torch.long)
    n = times.shape[-1]
    out = torch.zeros(T + 1, n, dtype=dtype)  # row T collects the silent pixels, then dropped
    out[times.clamp(max=T), torch.arange(n)] = 1
    return out[:T]


def latency_encode(images, *, T: int = 100, tau_eff: float = 20.0, threshold: float = 0.2,
                   dt: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Images [M, N_in] (or one image [N_in]) in [0, 1] -> spikes [T, M, N_in] (or [T, N_in])."""
    x = np.asarray(images, dtype=np.float64)
    single = x.ndim == 1
    x2 = x.reshape(1, -1) if single else x.reshape(x.shape[0], -1)
    times = latency_times(x2, T=T, tau_eff=tau_eff, threshold=threshold, dt=dt)
    spikes = torch.stack([times_to_spikes(t, T, dtype) for t in times], dim=1)
    return spikes[:, 0] if single else spikes
