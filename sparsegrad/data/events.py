"""Event datasets through tonic, read from local files only: N-MNIST and SHD.

tonic's dataset classes download when their files (or the archives beside them) are missing. Here
they are subclassed so that they read the extracted files straight from ``root`` and raise a
FileNotFoundError naming the files instead of downloading. Events are binned as in Perez-Nieves &
Goodman (2021): a bin k holds the events with floor(t / dt) == k, bins >= T are dropped, and every
entry is clipped to 1 (several events of one channel in one bin count once).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ._deps import require

__all__ = ["EventDataset", "bin_events", "load_nmnist", "load_shd", "NMNIST_BIN_US",
           "NMNIST_T", "SHD_BIN_US", "SHD_T"]

NMNIST_BIN_US, NMNIST_T, NMNIST_SIZE = 1000, 300, 34   # 1 ms bins, 300 ms, 34x34 sensor
SHD_BIN_US, SHD_T, SHD_CHANNELS = 2000, 500, 700       # 2 ms bins, 1 s, 700 channels


def bin_events(t_us, channel, num_channels: int, T: int, bin_us: float) -> torch.Tensor:
    """Events (time in microseconds, channel) -> binary spikes [T, num_channels] float32."""
    t_us = np.asarray(t_us, dtype=np.float64)
    channel = np.asarray(channel, dtype=np.int64)
    k = np.floor(t_us / bin_us).astype(np.int64)
    keep = (k >= 0) & (k < T) & (channel >= 0) & (channel < num_channels)
    out = torch.zeros(T, num_channels, dtype=torch.float32)
    out[torch.from_numpy(k[keep]), torch.from_numpy(channel[keep])] = 1.0
    return out


class EventDataset(torch.utils.data.Dataset):
    """Wraps a tonic dataset; item i -> (binned spikes [T, N_in] float32, label int)."""

    def __init__(self, tonic_dataset, to_frame, num_inputs: int, num_classes: int, T: int):
        self.source = tonic_dataset
        self._to_frame = to_frame
        self.num_inputs = num_inputs
        self.num_classes = num_classes
        self.T = T

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        events, label = self.source[i]
        return self._to_frame(events), int(label)


def _nmnist_frame(events):
    channel = events["y"].astype(np.int64) * NMNIST_SIZE + events["x"].astype(np.int64)
    channel[(events["x"] >= NMNIST_SIZE) | (events["y"] >= NMNIST_SIZE)] = -1
    return bin_events(events["t"], channel, NMNIST_SIZE * NMNIST_SIZE, NMNIST_T, NMNIST_BIN_US)


def _shd_frame(events):
    return bin_events(events["t"], events["x"], SHD_CHANNELS, SHD_T, SHD_BIN_US)


def _local_class(base, root: str, has_files, missing_message):
    """A subclass of a tonic dataset that reads ``root`` itself and never downloads."""

    class Local(base):
        location_on_system = property(lambda self: root, lambda self, value: None)

        def _check_exists(self):
            return has_files(self)

        def download(self):
            raise FileNotFoundError(missing_message(self))

    Local.__name__ = Local.__qualname__ = f"Local{base.__name__}"
    return Local


def load_nmnist(root: str, split: str = "train") -> EventDataset:
    """N-MNIST from ``root``/Train and ``root``/Test (folders 0..9 of .bin files), 1,156 inputs.

    1 ms bins, T = 300, both polarities merged into one channel per pixel (y*34 + x), clipped to 1.
    ``root``/NMNIST/Train (tonic's own layout) is accepted as well.
    """
    tonic = require("tonic", "the N-MNIST loader")
    if root is None:
        raise ValueError("dataset 'nmnist' needs root= (the folder holding N-MNIST's Train/ and "
                         "Test/ folders of .bin files)")
    folder = "Train" if split == "train" else "Test"
    base_dir = root
    if not os.path.isdir(os.path.join(root, folder)) \
            and os.path.isdir(os.path.join(root, "NMNIST", folder)):
        base_dir = os.path.join(root, "NMNIST")

    def has_files(ds):
        d = os.path.join(base_dir, ds.folder_name)
        return os.path.isdir(d) and any(f.endswith(".bin") for _, _, fs in os.walk(d) for f in fs)

    def message(ds):
        return (f"N-MNIST {split} split not found: expected {os.path.join(base_dir, folder)}/ "
                f"holding the folders 0/ .. 9/ of .bin event files, as extracted from the "
                f"dataset's Train.zip / Test.zip (put Train/ and Test/ directly in {root!r}). "
                f"Nothing is downloaded.")

    cls = _local_class(tonic.datasets.NMNIST, base_dir, has_files, message)
    ds = cls(base_dir, train=(split == "train"))
    return EventDataset(ds, _nmnist_frame, NMNIST_SIZE * NMNIST_SIZE, 10, NMNIST_T)


def load_shd(root: str, split: str = "train") -> EventDataset:
    """SHD from ``root``/shd_train.h5 and ``root``/shd_test.h5 (HDF5 as distributed), 700 inputs.

    2 ms bins, T = 500, 700 channels, clipped to 1; 20 classes. ``root``/SHD/ is accepted too.
    """
    tonic = require("tonic", "the SHD loader")
    require("h5py", "the SHD loader")
    if root is None:
        raise ValueError("dataset 'shd' needs root= (the folder holding shd_train.h5 and "
                         "shd_test.h5)")
    fname = f"shd_{'train' if split == 'train' else 'test'}.h5"
    base_dir = root
    if not os.path.isfile(os.path.join(root, fname)) \
            and os.path.isfile(os.path.join(root, "SHD", fname)):
        base_dir = os.path.join(root, "SHD")

    def has_files(ds):
        return os.path.isfile(os.path.join(base_dir, ds.data_filename))

    def message(ds):
        return (f"SHD {split} split not found: expected {os.path.join(base_dir, fname)} (the "
                f"dataset's HDF5 file, unzipped: shd_train.h5 and shd_test.h5 directly in "
                f"{root!r}). Nothing is downloaded.")

    cls = _local_class(tonic.datasets.SHD, base_dir, has_files, message)
    ds = cls(base_dir, train=(split == "train"))
    return EventDataset(ds, _shd_frame, SHD_CHANNELS, 20, SHD_T)
