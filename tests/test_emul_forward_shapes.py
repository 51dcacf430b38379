"""The GPU forward's parallel shapes, in the host emulation (docs/cuda.md "Forward").

The forward walks take their input current either inside the walk (the event path, row pointer
carried a step ahead) or from event currents precomputed by event_current_kernel
(split_event_current), load the currents kWalkAhead steps at a time, count spikes per block
(block_sum) and compact rows a warp at a time (ballots). Whatever the walk mode, the thread order
and the block size, every output must equal the CPU op's bit for bit. Select with `pytest -k emul`.
"""
import pytest
import torch

from conftest import random_problem
from test_cuda_emul import FWD_NAMES, assert_all_equal, emul, launch, lif_args  # noqa: F401 (fixtures)

cpu_ops = torch.ops.sparsegrad
WALK_MODES = {"auto": 0, "fused": 1, "split": 2}
# T = 1, T below / at / above kWalkAhead (8), B*N_out not a multiple of 32, N above 32 (several
# ballot chunks per row), N_in = 1
SHAPES = [(1, 1, 1, 1), (7, 3, 40, 5), (8, 2, 33, 70), (19, 5, 65, 9), (4, 37, 1, 3)]


@pytest.fixture
def walk_mode(emul):
    def set_mode(name):
        emul.set_walk_mode(WALK_MODES[name])
    yield set_mode
    emul.set_walk_mode(0)


@pytest.mark.parametrize("mode", list(WALK_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate,binary", [(0.05, True), (0.15, False), (0.5, True)])
def test_emul_forward_walk_modes_match_cpu(emul, walk_mode, mode, dtype, shape, rate, binary):
    x, w, b = random_problem(*shape, rate=rate, binary=binary, dtype=dtype, seed=sum(shape))
    walk_mode(mode)
    v0 = torch.randn(shape[1], shape[3], dtype=dtype)
    for sparse in (True, False):
        for reset in ("subtract", "zero"):
            args = lif_args(x, w, b, v0=v0, sparse=sparse) + ("fast_sigmoid", reset)
            assert_all_equal(emul.lif_forward(*args), cpu_ops.lif_forward(*args), FWD_NAMES)
    for reduce in ("max", "sum", "mean", "none"):
        got = emul.li_readout_forward(x, w, b, None, None, 0.8, reduce)
        want = cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, reduce)
        assert_all_equal(got, want, ["out", "argmax", "ev_cnt", "ev_idx", "ev_val"])


@pytest.mark.parametrize("order,threads,max_blocks,seed", [("reverse", 1, 0, 0), ("shuffled", 7, 2, 1),
                                                           ("shuffled", 100, 1, 2), ("forward", 64, 3, 0)])
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_emul_forward_shapes_any_geometry(emul, launch, walk_mode, order, threads, max_blocks, seed, mode):
    """Block sizes that are not whole warps (rounded up for the warp kernels), capped grids (the
    grid-stride and warp-stride loops wrap, several blocks' partial counts) and thread orders."""
    x, w, b = random_problem(11, 9, 70, 37, rate=0.08, seed=5)
    want = cpu_ops.lif_forward(*lif_args(x, w, b))
    want_ro = cpu_ops.li_readout_forward(x, w, b, None, None, 0.8, "max")
    walk_mode(mode)
    launch(order, threads, max_blocks, seed=seed)
    assert_all_equal(emul.lif_forward(*lif_args(x, w, b)), want, FWD_NAMES)
    assert_all_equal(emul.li_readout_forward(x, w, b, None, None, 0.8, "max"), want_ro,
                     ["out", "argmax", "ev_cnt", "ev_idx", "ev_val"])


def test_emul_split_mode_precomputes_the_event_currents(emul, walk_mode):
    """The split mode really launches event_current_kernel (one more launch, T*B*N_out more
    threads); at test sizes the H100 rule (auto) splits, since the walk is far below the 270k
    threads an H100 holds."""
    x, w, b = random_problem(6, 4, 50, 10, rate=0.05, seed=2)
    counts = {}
    for mode in WALK_MODES:
        walk_mode(mode)
        before = emul.launch_counters()
        emul.lif_forward(*lif_args(x, w, b))
        after = emul.launch_counters()
        counts[mode] = (after[0] - before[0], after[1] - before[1])
    assert counts["split"][0] == counts["fused"][0] + 1
    assert counts["split"][1] == counts["fused"][1] + 256  # 240 currents: one block of 256
    assert counts["auto"] == counts["split"]


def test_emul_gpu_launch_rules(emul):
    """The geometry the GPU launcher picks (kernel_common.cuh), at the sizes docs/cuda.md's model
    uses: an H100 (132 SMs, 270,336 resident threads)."""
    sms, resident = 132, 132 * 2048
    # SHD layer walk: 64 * 200 = 12,800 threads -> blocks of 64, 200 blocks; split
    assert emul.launch_rules(12800, sms, resident) == [64, 200, 256, 50, 1]
    # the readout (64 * 20): blocks of 64
    assert emul.launch_rules(1280, sms, resident) == [64, 20, 256, 5, 1]
    # large layer walk: 256 * 4096 threads -> blocks of 256, 4096 blocks; not split
    assert emul.launch_rules(256 * 4096, sms, resident) == [256, 4096, 256, 4096, 0]
    # in between: 128 threads when that still gives >= 2 blocks per SM
    assert emul.launch_rules(264 * 128, sms, resident)[:2] == [128, 264]
    # the grid is capped (grid-stride loops cover the rest)
    assert emul.launch_rules(1 << 40, sms, resident)[1] == 65535
