"""Encoders and loaders, on small files written here in each dataset's real on-disk format."""
import gzip
import math
import os
import struct
import urllib.request

import numpy as np
import pytest
import torch

import sparsegrad  # noqa: F401  (loads the extension before the data package)
from sparsegrad.data import (collate_time_major, get_dataset, latency_encode, latency_times,
                             read_idx)


# ----------------------------------------------------------------------------- latency encoding
def test_latency_times_formula():
    x = np.array([1.0, 0.5, 0.25, 0.2, 0.1, 0.0, 0.2000001])
    t = latency_times(x, T=100, tau_eff=20.0, threshold=0.2)
    assert t[0] == math.floor(20 * math.log(1.0 / 0.8))      # 4
    assert t[1] == math.floor(20 * math.log(0.5 / 0.3))      # 10
    assert t[2] == math.floor(20 * math.log(0.25 / 0.05))    # 32
    assert list(t[3:6]) == [100, 100, 100]                   # at or below threshold: silent
    assert t[6] == 100                                       # fires after T: dropped
    # brighter fires earlier; dt rescales
    assert latency_times([0.9], T=100)[0] < latency_times([0.6], T=100)[0]
    assert latency_times([1.0], T=100, tau_eff=20.0, dt=2.0)[0] == math.floor(10 * math.log(1.25))


def test_latency_encode_one_spike_per_pixel():
    g = np.random.RandomState(0)
    imgs = g.rand(5, 30)
    s = latency_encode(imgs, T=100)
    assert s.shape == (100, 5, 30) and s.dtype == torch.float32
    per_pixel = s.sum(0)
    assert per_pixel.max() == 1
    times = latency_times(imgs, T=100)
    assert torch.equal(per_pixel.bool(), torch.from_numpy(times < 100))
    b, i = 3, int(np.argmax(times[3] < 100))
    assert s[times[b, i], b, i] == 1
    assert latency_encode(imgs[0], T=100).shape == (100, 30)
    with pytest.raises(ValueError, match="images"):
        latency_encode(imgs * 255)
    with pytest.raises(ValueError, match="T"):
        latency_times(imgs, T=0)


# ----------------------------------------------------------------------------- digits
def test_digits_builtin_split():
    train = get_dataset("digits")
    test = get_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    assert (train.T, train.num_inputs, train.num_classes) == (100, 64, 10)
    x, y = train[0]
    assert x.shape == (100, 64) and x.dtype == torch.float32 and isinstance(y, int)
    assert x.sum(0).max() <= 1 and x.sum() > 5
    # fixed split: same items every time, train and test disjoint, all 1797 images used
    from sklearn.datasets import load_digits
    data = load_digits().data
    all_codes = [tuple(r) for r in latency_times(data / 16.0, T=100).tolist()]
    train_codes = [tuple(r) for r in train.times.tolist()]
    test_codes = [tuple(r) for r in test.times.tolist()]
    assert sorted(train_codes + test_codes) == sorted(all_codes)
    assert torch.equal(get_dataset("digits")[17][0], train[17][0])
    assert set(test.labels.tolist()) == set(range(10))


def test_collate_time_major():
    ds = get_dataset("digits", split="test")
    x, y = collate_time_major([ds[i] for i in range(7)])
    assert x.shape == (100, 7, 64) and y.shape == (7,) and y.dtype == torch.long
    assert torch.equal(x[:, 3], ds[3][0])
    with pytest.raises(ValueError, match="empty"):
        collate_time_major([])


def test_get_dataset_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        get_dataset("digits", split="valid")


# ----------------------------------------------------------------------------- Fashion-MNIST IDX
def _write_idx(path, arr, compress):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if compress:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_idx(tmp_path, compress):
    g = np.random.RandomState(1)
    sets = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = g.randint(0, 256, size=(n, 28, 28))
        labels = g.randint(0, 10, size=n)
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), imgs, compress)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), labels, compress)
        sets[prefix] = (imgs, labels)
    suffix = ".gz" if compress else ""
    assert np.array_equal(read_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{suffix}")),
                          sets["t10k"][1])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = get_dataset("fmnist", root=tmp_path, split=split)
        imgs, labels = sets[prefix]
        assert len(ds) == len(labels) and ds.num_inputs == 784 and ds.T == 100
        for i in range(len(ds)):
            x, y = ds[i]
            assert y == labels[i]
            times = latency_times(imgs[i].reshape(-1) / 255.0, T=100)
            expected = torch.zeros(101, 784)
            expected[times, np.arange(784)] = 1
            assert torch.equal(x, expected[:100])


def test_fmnist_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        get_dataset("fmnist", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        get_dataset("fmnist")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x08\x03junk")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="IDX"):
        get_dataset("fmnist", root=tmp_path, split="test")


# ----------------------------------------------------------------------------- N-MNIST .bin
def _nmnist_bytes(events):
    """Encode (x, y, p, t_us) events in N-MNIST's 40-bit format, written from its spec:
    byte 0 x, byte 1 y, byte 2 bit 7 polarity, bits 22..0 of bytes 2-4 the time in microseconds."""
    out = bytearray()
    for x, y, p, t in events:
        assert t < 2 ** 23
        out += bytes([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF])
    return bytes(out)


def _nmnist_sample(rng, n=60):
    xs = rng.randint(0, 34, n)
    ys = rng.randint(0, 34, n)
    ps = rng.randint(0, 2, n)
    ts = np.sort(rng.randint(0, 320_000, n))  # some beyond T = 300 ms
    ev = list(zip(xs.tolist(), ys.tolist(), ps.tolist(), ts.tolist()))
    ev.append((5, 6, 0, 1500))   # the same pixel twice in one bin, both polarities:
    ev.append((5, 6, 1, 1900))   # merged and clipped to one spike at bin 1
    return ev


def _expected_nmnist(events):
    x = torch.zeros(300, 34 * 34)
    for ex, ey, _, t in events:
        if t // 1000 < 300:
            x[t // 1000, ey * 34 + ex] = 1
    return x


@pytest.mark.parametrize("layout", ["flat", "tonic"])
def test_nmnist_bin_files(tmp_path, layout):
    rng = np.random.RandomState(2)
    base = tmp_path if layout == "flat" else tmp_path / "NMNIST"
    written = {}
    for folder in ("Train", "Test"):
        for label in (0, 3, 7):
            d = base / folder / str(label)
            d.mkdir(parents=True)
            for k in range(2):
                ev = _nmnist_sample(rng)
                (d / f"{k:05d}.bin").write_bytes(_nmnist_bytes(ev))
                written[(folder, label, k)] = ev
    for split, folder in (("train", "Train"), ("test", "Test")):
        ds = get_dataset("nmnist", root=tmp_path, split=split)
        assert len(ds) == 6 and ds.num_inputs == 1156 and ds.T == 300
        items = [ds[i] for i in range(len(ds))]
        # tonic walks folders in sorted order, files sorted within each
        keys = [(folder, label, k) for label in (0, 3, 7) for k in range(2)]
        for (x, y), key in zip(items, keys):
            assert y == key[1]
            assert x.shape == (300, 1156)
            assert torch.equal(x, _expected_nmnist(written[key]))
        assert items[0][0][1, 6 * 34 + 5] == 1
    xb, yb = collate_time_major(items)
    assert xb.shape == (300, 6, 1156)


def test_nmnist_missing_no_download(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a loader tried to use the network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(FileNotFoundError, match="Train"):
        get_dataset("nmnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="shd_test.h5"):
        get_dataset("shd", root=tmp_path, split="test")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- SHD HDF5
def _write_shd(path, samples, labels):
    import h5py
    with h5py.File(path, "w") as f:
        vf = h5py.vlen_dtype(np.dtype("float32"))
        vu = h5py.vlen_dtype(np.dtype("uint16"))
        times = f.create_dataset("spikes/times", (len(samples),), dtype=vf)
        units = f.create_dataset("spikes/units", (len(samples),), dtype=vu)
        for i, (t, u) in enumerate(samples):
            times[i] = np.asarray(t, dtype=np.float32)
            units[i] = np.asarray(u, dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        f.create_dataset("extra/keys", data=np.array([f"digit-{i}".encode() for i in range(20)]))
        f.create_dataset("extra/speaker", data=np.arange(len(samples), dtype=np.uint16))


def test_shd_h5_files(tmp_path):
    rng = np.random.RandomState(3)
    data = {}
    for split in ("train", "test"):
        samples, labels = [], []
        for i in range(4):
            n = 80
            t = np.sort(rng.uniform(0, 1.1, n)).astype(np.float32)  # seconds; some past 1 s
            u = rng.randint(0, 700, n)
            t = np.append(t, [0.0101, 0.0103])   # same channel, same 2 ms bin (bin 5)
            u = np.append(u, [42, 42])
            samples.append((t, u))
            labels.append(int(rng.randint(0, 20)))
        _write_shd(str(tmp_path / f"shd_{split}.h5"), samples, labels)
        data[split] = (samples, labels)
    for split in ("train", "test"):
        ds = get_dataset("shd", root=tmp_path, split=split)
        assert len(ds) == 4 and ds.num_inputs == 700 and ds.T == 500 and ds.num_classes == 20
        samples, labels = data[split]
        for i in range(4):
            x, y = ds[i]
            assert y == labels[i]
            expected = torch.zeros(500, 700)
            t, u = samples[i]
            # tonic converts seconds to integer microseconds; bins are 2 ms wide
            t_us = (t.astype(np.float64) * 1e6).astype(np.int64)
            k = t_us // 2000
            keep = k < 500
            expected[k[keep], u[keep]] = 1
            assert torch.equal(x, expected)
            assert x[5, 42] == 1
            assert x.max() == 1


def test_lazy_attribute():
    assert sparsegrad.data.get_dataset is get_dataset
