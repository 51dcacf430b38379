"""The host emulation's barriers, shared memory and warp collectives (csrc/cuda/emulation.h).

A test-only extension (csrc/emul/collectives_test.cpp) runs small kernels through the emulation:
each collective is compared with its CUDA definition computed here in Python, in every thread
order; kernels written with their barriers give the same result in every order, and the same
kernels without one give a wrong result in some order (a missing __syncthreads / __syncwarp is
caught); undefined behaviour (divergent collectives, a lane that exits before a collective, a
barrier some thread never reaches, a shuffle from outside the mask, a full mask on a partial
warp) is reported as an error. Select with `pytest -k emul`.
"""
import hashlib
import os
import tempfile

import pytest
import torch

from test_cuda_emul import CSRC

SOURCE = CSRC / "emul" / "collectives_test.cpp"
ORDERS = [(0, 0), (1, 0), (2, 1), (2, 2), (2, 3)]  # (order, seed): forward, reverse, shuffled x3


@pytest.fixture(scope="module")
def emul_tests():
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.sparsegrad_emul_tests, "run"):
        h = hashlib.sha256(torch.__version__.encode())
        for f in [SOURCE, CSRC / "lif_math.h", CSRC / "cuda" / "emulation.h", CSRC / "cuda" / "kernel_common.cuh"]:
            h.update(f.read_bytes())
        base = os.environ.get("SPARSEGRAD_EMUL_BUILD_DIR") or os.path.join(
            tempfile.gettempdir(), f"sparsegrad_emul_{os.getuid()}")
        path = os.path.join(base, "collectives_" + h.hexdigest()[:16])
        os.makedirs(path, exist_ok=True)
        load(name="sparsegrad_emul_tests", sources=[str(SOURCE)], extra_include_paths=[str(CSRC)],
             extra_cflags=["-O1"], build_directory=path, is_python_module=False, verbose=False)
    return torch.ops.sparsegrad_emul_tests


def run(ops, name, inp, blocks, threads, order=0, seed=0, param=0, barrier=True):
    out, arrivals = ops.run(name, torch.as_tensor(inp, dtype=torch.int64), blocks, threads, order, seed,
                            param, barrier)
    return out.tolist(), arrivals


def inputs(n, seed=0, high=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-high, high, (n,), generator=g)


def predicates(n, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p).long()


def per_warp(values, fn):
    """fn(warp values) -> lane results, over consecutive warps of 32."""
    out = []
    for w in range(0, len(values), 32):
        out += fn(values[w:w + 32])
    return out


# ------------------------------------------------------------------ missing barriers are caught
@pytest.mark.parametrize("name,blocks,threads", [("block_reverse", 3, 96), ("block_reverse", 1, 40),
                                                 ("block_shift_in_place", 2, 64),
                                                 ("warp_rotate", 2, 64), ("warp_tree_sum", 2, 96)])
def test_emul_missing_barrier_is_caught(emul_tests, name, blocks, threads):
    """With its barrier the kernel gives the right result in every order; without it, some order
    gives a wrong one (the emulation switches threads only at barriers and collectives, and shared
    memory starts as 0xFF bytes, so a read that races its write sees the wrong value)."""
    x = inputs(blocks * threads, seed=threads).tolist()
    want = []
    for b in range(blocks):
        blk = x[b * threads:(b + 1) * threads]
        if name == "block_reverse":
            want += blk[::-1]
        elif name == "block_shift_in_place":
            want += [0] + blk[:-1]
        elif name == "warp_rotate":
            want += per_warp(blk, lambda v: v[1:] + v[:1])
        else:
            want += per_warp(blk, lambda v: [sum(v)] + [0] * (len(v) - 1))
    wrong_orders = 0
    for order, seed in ORDERS:
        got, arrivals = run(emul_tests, name, x, blocks, threads, order, seed, barrier=True)
        assert got == want, (name, order, seed)
        assert arrivals > 0
        got, _ = run(emul_tests, name, x, blocks, threads, order, seed, barrier=False)
        wrong_orders += got != want
    assert wrong_orders > 0, f"{name}: no thread order exposes the missing barrier"


def test_emul_same_configuration_same_interleaving(emul_tests):
    """Deterministic: a racy kernel gives the same (wrong) result for the same order and seed."""
    x = inputs(128).tolist()
    results = {tuple(run(emul_tests, "block_shift_in_place", x, 1, 128, 2, 5, barrier=False)[0]) for _ in range(3)}
    assert len(results) == 1


# ------------------------------------------------------------------------- each collective
@pytest.mark.parametrize("order,seed", ORDERS)
def test_emul_ballot_any_all(emul_tests, order, seed):
    for p in (0.0, 0.5, 1.0):
        pr = predicates(96, seed=seed, p=p).tolist()
        got, arrivals = run(emul_tests, "ballot", pr, 1, 96, order, seed)
        assert arrivals == 96
        assert got == per_warp(pr, lambda v: [sum(b << i for i, b in enumerate(v))] * 32)
        got, _ = run(emul_tests, "any_all", pr, 1, 96, order, seed)
        assert got == per_warp(pr, lambda v: [int(any(v)) + 2 * int(all(v))] * 32)


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("param", [0, 1, 5, 16, 31])
def test_emul_shuffles(emul_tests, order, seed, param):
    x = inputs(64, seed=param).tolist()
    idx = per_warp(x, lambda v: [v[(l * 7 + param) % 32] for l in range(32)])
    up = per_warp(x, lambda v: [v[l - param] if l >= param else v[l] for l in range(32)])
    down = per_warp(x, lambda v: [v[l + param] if l + param < 32 else v[l] for l in range(32)])
    xor = per_warp(x, lambda v: [v[l ^ param] for l in range(32)])
    d8 = param % 8
    down8 = per_warp(x, lambda v: [v[l + d8] if l % 8 + d8 < 8 else v[l] for l in range(32)])
    idx16 = per_warp(x, lambda v: [v[(l & ~15) + param % 16] for l in range(32)])
    for name, want, p in [("shfl_idx", idx, param), ("shfl_up", up, param), ("shfl_down", down, param),
                          ("shfl_xor", xor, param), ("shfl_down_w8", down8, d8), ("shfl_idx_w16", idx16, param)]:
        got, _ = run(emul_tests, name, x, 2, 32, order, seed, param=p)
        assert got == want, name
    got, _ = run(emul_tests, "shfl_double", x, 2, 32, order, seed)
    assert got == per_warp(x, lambda v: [v[l ^ 1] for l in range(32)])


@pytest.mark.parametrize("order,seed", ORDERS)
def test_emul_syncthreads_count_and_or(emul_tests, order, seed):
    for p in (0.0, 0.3, 1.0):
        pr = predicates(3 * 70, seed=seed, p=p).tolist()  # 70 threads: not whole warps, allowed here
        got, _ = run(emul_tests, "sync_count", pr, 3, 70, order, seed)
        want = []
        for b in range(3):
            blk = pr[b * 70:(b + 1) * 70]
            want += [sum(blk) + 1000 * int(all(blk)) + 2000 * int(any(blk))] * 70
        assert got == want


def test_emul_bit_intrinsics(emul_tests):
    vals = [0, 1, 2, 3, 0x80000000, 0xffffffff, 0x00f0, 12345678, 1 << 20] + list(range(100, 123))
    got, _ = run(emul_tests, "bit_ops", vals, 1, 32)

    def ffs(v):
        return (v & -v).bit_length()

    assert got == [bin(v).count("1") + 100 * ffs(v) + 10000 * (32 - v.bit_length()) for v in vals]


@pytest.mark.parametrize("order,seed", ORDERS)
def test_emul_disjoint_masks_in_one_warp(emul_tests, order, seed):
    """Odd and even lanes run different collectives on disjoint masks at the same time."""
    x = predicates(32, seed=seed).tolist()
    got, _ = run(emul_tests, "half_warp_masks", x, 1, 32, order, seed)
    odd_ballot = sum(x[l] << l for l in range(1, 32, 2))
    assert got == [odd_ballot if l & 1 else x[l ^ 2] for l in range(32)]


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_emul_block_sum(emul_tests, order, seed, threads):
    """kernel_common.cuh's block_sum (used by the forward's per-block spike counts)."""
    blocks = 3
    x = inputs(blocks * threads, seed=threads, high=1 << 40).tolist()
    got, _ = run(emul_tests, "block_sum", x, blocks, threads, order, seed)
    for b in range(blocks):
        blk = got[b * threads:(b + 1) * threads]
        assert blk[0] == sum(x[b * threads:(b + 1) * threads])
        assert blk[1:] == [-7] * (threads - 1)


# ----------------------------------------------------------------------- undefined behaviour
@pytest.mark.parametrize("name,threads,message", [
    ("divergent_collectives", 32, "divergent collectives"),
    ("lane_exits", 32, "exited without joining"),
    ("barrier_skipped", 64, "exited without reaching it"),
    ("shfl_outside_mask", 32, "not in the mask"),
    ("full_mask_any", 40, "do not exist in this block"),
])
@pytest.mark.parametrize("order,seed", ORDERS[:3])
def test_emul_reports_undefined_behaviour(emul_tests, name, threads, message, order, seed):
    with pytest.raises(RuntimeError, match=message):
        run(emul_tests, name, [1] * threads, 1, threads, order, seed)
    # the emulation is usable again after the error
    got, _ = run(emul_tests, "ballot", [1] * 32, 1, 32, order, seed)
    assert got == [0xffffffff] * 32
