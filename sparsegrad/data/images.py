"""Image datasets, latency-encoded: scikit-learn's digits (built in) and Fashion-MNIST (IDX files)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from ._deps import require
from .encoding import latency_times, times_to_spikes

__all__ = ["LatencyImageDataset", "read_idx", "load_digits", "load_fmnist", "FMNIST_FILES",
           "DIGITS_TEST_SIZE", "DIGITS_SPLIT_SEED"]

# IDX element types (the third byte of the magic number).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DIGITS_TEST_SIZE = 360   # of 1,797 images: a fixed 80 / 20 split
DIGITS_SPLIT_SEED = 0


class LatencyImageDataset(torch.utils.data.Dataset):
    """Images stored as one spike step per pixel; item i -> (spikes [T, N_in] float32, label int)."""

    def __init__(self, times: np.ndarray, labels: np.ndarray, T: int, classes=None):
        times = np.asarray(times)
        labels = np.asarray(labels)
        if times.ndim != 2 or labels.ndim != 1 or times.shape[0] != labels.shape[0]:
            raise ValueError(f"times must be [M, N_in] and labels [M], got {times.shape} and "
                             f"{labels.shape}")
        self.times = times.astype(np.int16 if T < 32767 else np.int32)
        self.labels = labels.astype(np.int64)
        self.T = int(T)
        self.num_inputs = times.shape[1]
        self.num_classes = int(labels.max()) + 1 if classes is None else len(classes)
        self.classes = classes

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return times_to_spikes(self.times[i], self.T), int(self.labels[i])


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed), e.g. MNIST / Fashion-MNIST images or labels."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if ndim else 1
    if len(data) - header < count * dtype.itemsize:
        raise ValueError(f"{path}: holds {len(data) - header} data bytes, header says "
                         f"{count * dtype.itemsize} (shape {shape})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: str, name: str):
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw")):
        for candidate in (name, name + ".gz"):
            p = os.path.join(folder, candidate)
            if os.path.isfile(p):
                return p
    return None


def load_fmnist(root: str, split: str = "train", *, T: int = 100, tau_eff: float = 20.0,
                threshold: float = 0.2) -> LatencyImageDataset:
    """Fashion-MNIST from its IDX files in ``root`` (raw or .gz), latency-encoded (784 inputs)."""
    if root is None:
        raise ValueError("dataset 'fmnist' needs root= (the folder holding the four IDX files: "
                         + ", ".join(sum(FMNIST_FILES.values(), ())) + ", raw or .gz)")
    names = FMNIST_FILES[split]
    paths = [_find(root, n) for n in names]
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split: {', '.join(missing)} (or the same name + '.gz') not "
            f"found in {root!r}. Put the dataset's IDX files there as distributed: "
            + ", ".join(n + ".gz" for n in sum(FMNIST_FILES.values(), ()))
            + " (gzip or uncompressed). Nothing is downloaded.")
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST files disagree: images {images.shape}, labels "
                         f"{labels.shape} (expected [M, 28, 28] and [M])")
    flat = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    times = latency_times(flat, T=T, tau_eff=tau_eff, threshold=threshold)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    return LatencyImageDataset(times, labels, T, classes)


def _digits_arrays():
    """(pixels [1797, 64] float64 in 0..16, labels [1797] int64) of scikit-learn's digits.

    Read straight from the CSV that scikit-learn ships (importing sklearn itself takes seconds);
    falls back to sklearn.datasets.load_digits if that file is not where it usually is.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        require("sklearn", "the built-in digits dataset")
    for folder in spec.submodule_search_locations or []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            if table.shape == (1797, 65):
                return table[:, :64], table[:, 64].astype(np.int64)
    bunch = require("sklearn.datasets", "the built-in digits dataset").load_digits()
    return (np.asarray(bunch.data, dtype=np.float64),
            np.asarray(bunch.target, dtype=np.int64))


def load_digits(split: str = "train", *, T: int = 100, tau_eff: float = 20.0,
                threshold: float = 0.2) -> LatencyImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped with it; no download), 64 inputs.

    Intensities 0..16 are scaled to [0, 1] and latency-encoded. Fixed split: a permutation with
    seed 0; its first 360 images are the test set, the other 1,437 the training set.
    """
    data, labels = _digits_arrays()
    images = data / 16.0
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(labels.shape[0])
    idx = np.sort(perm[:DIGITS_TEST_SIZE] if split == "test" else perm[DIGITS_TEST_SIZE:])
    times = latency_times(images[idx], T=T, tau_eff=tau_eff, threshold=threshold)
    return LatencyImageDataset(times, labels[idx], T, [str(i) for i in range(10)])
