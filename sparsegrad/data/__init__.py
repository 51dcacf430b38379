"""Datasets for spiking networks: latency-encoded images and binned event streams.

``get_dataset(name, root=None, split="train")`` for name in digits / fmnist / nmnist / shd returns
a torch Dataset of ``(x [T, N_in] float32, label int)``; ``collate_time_major`` stacks a batch into
``([T, B, N_in], labels [B])``. Nothing is ever downloaded: see docs/training.md for where to put
the files.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .encoding import latency_encode, latency_times, times_to_spikes
from .images import LatencyImageDataset, load_digits, load_fmnist, read_idx
from .events import EventDataset, bin_events, load_nmnist, load_shd

__all__ = ["get_dataset", "collate_time_major", "DATASETS", "latency_encode", "latency_times",
           "times_to_spikes", "read_idx", "bin_events", "LatencyImageDataset", "EventDataset",
           "load_digits", "load_fmnist", "load_nmnist", "load_shd"]

DATASETS = ("digits", "fmnist", "nmnist", "shd")
SPLITS = ("train", "test")


def get_dataset(name: str, root: str = None, split: str = "train"):
    """A torch Dataset of (x [T, N_in] float32 spikes, label int).

    digits: scikit-learn's 8x8 digits, latency-encoded (T=100, 64 inputs, 10 classes); no files.
    fmnist: Fashion-MNIST IDX files in ``root``, latency-encoded (T=100, 784 inputs, 10 classes).
    nmnist: N-MNIST Train/ and Test/ in ``root`` (T=300 1-ms bins, 1156 inputs, 10 classes).
    shd:    shd_train.h5 / shd_test.h5 in ``root`` (T=500 2-ms bins, 700 inputs, 20 classes).
    The dataset has attributes ``T``, ``num_inputs`` and ``num_classes``.
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = name.lower()
    if root is not None:
        root = str(root)
    if name == "digits":
        return load_digits(split)
    if name == "fmnist":
        return load_fmnist(root, split)
    if name == "nmnist":
        return load_nmnist(root, split)
    return load_shd(root, split)


def collate_time_major(batch: List[Tuple[torch.Tensor, int]]):
    """[(x [T, N_in], label), ...] -> (x [T, B, N_in], labels int64 [B])."""
    if len(batch) == 0:
        raise ValueError("batch is empty")
    xs, ys = zip(*batch)
    return torch.stack(xs, dim=1), torch.as_tensor(ys, dtype=torch.long)
