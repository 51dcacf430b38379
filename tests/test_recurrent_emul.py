"""The recurrent layer's CUDA kernels (csrc/cuda/recurrent.cuh, recurrent_host.h), run on the CPU
through the host emulation (tests/test_cuda_emul.py builds it; select with `pytest -k emul`).

Forward outputs must equal the CPU kernels' bit for bit, gradients the CPU kernels' and the
reference's to 1e-10 in float64, and every output must be bit-identical whatever the launch
geometry and the order in which the emulated threads run (no float atomics, one writer per output).
"""
import math

import pytest
import torch

from sparsegrad import reference as ref
from conftest import TOL, assert_spikes_match, layer_membrane
from test_cuda_emul import CSRC, EMUL_SOURCE, emul, launch  # noqa: F401  (pytest fixtures)
from test_recurrent import RESETS, rlif_problem

cpu_ops = torch.ops.sparsegrad
FWD_NAMES = ["spikes", "v_final", "act_cnt", "act_idx", "act_sg", "ev_cnt", "ev_idx", "ev_val",
             "spk_bits", "stats"]
GRAD_NAMES = ["dx", "dweight", "drec_weight", "dbias", "dv_init", "ds_init"]
SHAPES = [(1, 1, 1, 1), (1, 4, 6, 5), (9, 1, 7, 3), (13, 5, 17, 11), (6, 3, 40, 37), (4, 37, 9, 7)]
ALL_GRADS = (True,) * 6


def fwd_args(x, w, r, b, v0=None, s0=None, *, alpha=0.9, threshold=1.0, b_th=0.3, slope=5.0,
             sparse=True, surrogate="fast_sigmoid", reset="subtract", producer=(None, None)):
    return (x, w, r, b, v0, s0, producer[0], producer[1], alpha, threshold, b_th, slope, sparse,
            surrogate, reset)


def state_for(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, n = shape[1], shape[3]
    return (torch.randn(B, n, generator=g).to(dtype), (torch.rand(B, n, generator=g) < 0.4).to(dtype))


def upstream(T, B, n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, n, generator=g).to(dtype), torch.randn(B, n, generator=g).to(dtype)


def backward_args(fwd_out, x, w, r, s0, gS, gV, *, sparse, alpha=0.9, reset="subtract",
                  prev=(None, None), need=ALL_GRADS):
    spikes, _, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, _ = fwd_out
    if sparse:
        return (gS, gV, w, r, s0, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, prev[0],
                prev[1], alpha, reset, *need)
    return (gS, gV, x, w, r, s0, spikes, act_sg, alpha, reset, *need)


def run_backward(ops, args, sparse):
    return (ops.rlif_backward_sparse if sparse else ops.rlif_backward_dense)(*args)


def test_emul_rlif_schemas_and_sources(emul):
    for name in ("rlif_forward", "rlif_backward_sparse", "rlif_backward_dense"):
        mine = str(getattr(emul, name).default._schema).replace("sparsegrad_emul::", "")
        theirs = str(getattr(cpu_ops, name).default._schema).replace("sparsegrad::", "")
        assert mine == theirs
    include = '#include "cuda/recurrent_host.h"'
    assert include in EMUL_SOURCE.read_text()
    assert include in (CSRC / "cuda" / "sparsegrad_cuda.cu").read_text()
    assert '#include "cuda/recurrent.cuh"' in (CSRC / "cuda" / "recurrent_host.h").read_text()


def test_emul_rlif_launches_one_kernel_per_step(emul):
    x, w, r, b = rlif_problem(7, 3, 5, 4)
    before = emul.launch_counters()[0]
    emul.rlif_forward(*fwd_args(x, w, r, b, sparse=False))
    assert emul.launch_counters()[0] - before == 2 + 7  # events count + fill, one per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset", RESETS)
def test_emul_rlif_forward_equals_cpu(emul, dtype, shape, reset):
    x, w, r, b = rlif_problem(*shape, dtype=dtype, binary=shape[0] % 2 == 1, seed=sum(shape))
    for sparse in (True, False):
        for state in (None, state_for(shape, dtype)):
            args = fwd_args(x, w, r, b, *(state or (None, None)), sparse=sparse, reset=reset,
                            surrogate="sigmoid")
            got, want = emul.rlif_forward(*args), cpu_ops.rlif_forward(*args)
            for name, g, c in zip(FWD_NAMES, got, want):
                assert g.dtype == c.dtype and g.shape == c.shape, name
                assert torch.equal(g, c), f"{name} differs (sparse={sparse})"
    if dtype == torch.float64:
        want = ref.rlif_layer(x, w, r, b, alpha=0.9, reset=reset, state=state)
        assert_spikes_match(got[0], want, layer_membrane(x, w, b, want, 0.9, reset=reset, state=state,
                                                         rec_weight=r))  # events vs GEMM


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("sparse", [True, False])
def test_emul_rlif_backward_matches_cpu_and_reference(emul, shape, reset, sparse):
    dtype = torch.float64
    x, w, r, b = rlif_problem(*shape, seed=sum(shape) + 1)
    v0, s0 = state_for(shape, dtype, seed=2)
    fwd = cpu_ops.rlif_forward(*fwd_args(x, w, r, b, v0, s0, sparse=sparse, reset=reset,
                                         surrogate="atan"))
    gS, gV = upstream(shape[0], shape[1], shape[3], dtype)
    args = backward_args(fwd, x, w, r, s0, gS, gV, sparse=sparse, reset=reset)
    got, want = run_backward(emul, args, sparse), run_backward(cpu_ops, args, sparse)
    for name, g, c in zip(GRAD_NAMES, got, want):
        torch.testing.assert_close(g, c, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    # and the reference's autograd
    leaves = [t.clone().requires_grad_() for t in (x, w, r, b, v0, s0)]
    spk, (vf, _) = ref.rlif_layer(*leaves[:4], alpha=0.9, b_th=0.3 if sparse else math.inf,
                                  slope=5.0, surrogate="atan", reset=reset,
                                  state=(leaves[4], leaves[5]), return_state=True)
    ((spk * gS).sum() + (vf * gV).sum()).backward()
    for name, g, leaf in zip(["dx", "dweight", "drec_weight", "dbias", "dv_init", "ds_init"], got,
                             [leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5]]):
        torch.testing.assert_close(g, leaf.grad, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_emul_rlif_dx_on_producer_active_set(emul):
    """With the producer's active set, dx equals the full dx there (the emulated CUDA op computes
    it only there; the CPU op may compute it everywhere when that is cheaper)."""
    x, w, r, b = rlif_problem(11, 4, 13, 9, seed=5)
    fwd = cpu_ops.rlif_forward(*fwd_args(x, w, r, b))
    gS, gV = upstream(11, 4, 9, torch.float64)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 11, 13, generator=g) < 0.3  # a producer's active set, rows b*T + t
    prev_cnt = mask.sum(-1).reshape(-1).to(torch.int32)
    prev_idx = mask.reshape(-1, 13).nonzero()[:, 1].to(torch.int32)
    full = backward_args(fwd, x, w, r, None, gS, gV, sparse=True)
    part = backward_args(fwd, x, w, r, None, gS, gV, sparse=True, prev=(prev_cnt, prev_idx))
    for ops in (emul, cpu_ops):
        dx_full = ops.rlif_backward_sparse(*full)[0]
        dx_part = ops.rlif_backward_sparse(*part)[0]
        on_set = mask.transpose(0, 1)  # [T, B, N_in]
        torch.testing.assert_close(dx_part[on_set], dx_full[on_set], **TOL[torch.float64])
        if ops is emul:
            assert torch.count_nonzero(dx_part[~on_set]) == 0


@pytest.mark.parametrize("order,threads,max_blocks", [("forward", 0, 0), ("reverse", 32, 2),
                                                      ("shuffled", 7, 3), ("shuffled", 64, 1)])
@pytest.mark.parametrize("sparse", [True, False])
def test_emul_rlif_determinism_across_thread_orders(emul, launch, order, threads, max_blocks, sparse):
    """Every output, forward and backward, is bit-identical whatever the launch geometry and the
    order the emulated threads run in (float32, where summation order would show)."""
    dtype = torch.float32
    x, w, r, b = rlif_problem(12, 5, 30, 40, rate=0.2, dtype=dtype, seed=8)
    v0, s0 = state_for((12, 5, 30, 40), dtype)
    gS, gV = upstream(12, 5, 40, dtype)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(5, 12, 30, generator=g) < 0.3
    prev = (mask.sum(-1).reshape(-1).to(torch.int32), mask.reshape(-1, 30).nonzero()[:, 1].to(torch.int32))

    def run():
        fwd = emul.rlif_forward(*fwd_args(x, w, r, b, v0, s0, sparse=sparse, reset="zero"))
        out = list(fwd)
        out += run_backward(emul, backward_args(fwd, x, w, r, s0, gS, gV, sparse=sparse, reset="zero"), sparse)
        if sparse:
            out += emul.rlif_backward_sparse(*backward_args(fwd, x, w, r, s0, gS, gV, sparse=True,
                                                            reset="zero", prev=prev))
        return out

    launch()
    want = run()
    launch(order=order, threads=threads, max_blocks=max_blocks, seed=11)
    got = run()
    for k, (a, c) in enumerate(zip(got, want)):
        assert torch.equal(a, c), f"output {k} depends on the thread order"


def test_emul_rlif_host_checks_name_the_argument(emul):
    x, w, r, b = rlif_problem(4, 2, 5, 3)
    with pytest.raises(RuntimeError, match="rlif_forward: argument 'rec_weight'"):
        emul.rlif_forward(*fwd_args(x, w, r[:, :2], b))
    fwd = emul.rlif_forward(*fwd_args(x, w, r, b))
    gS, gV = upstream(4, 2, 3, torch.float64)
    args = list(backward_args(fwd, x, w, r, None, gS, gV, sparse=True))
    args[5] = args[5][:-1]  # act_cnt too short
    with pytest.raises(RuntimeError, match="rlif_backward_sparse: argument 'act_cnt'"):
        emul.rlif_backward_sparse(*args)


def test_emul_neuron_and_rlif_inconsistent_compact_tensors_raise(emul):
    """lif_neuron_backward and rlif_backward_sparse check their compact tensors on the device as
    the LIF ops do (prepare_csr: no host synchronisation, NaN gradients on a GPU): in the
    emulation, which takes that same path, an error naming them, never an out-of-bounds access.
    The CPU ops refuse the same tensors on the host."""
    from test_cuda_emul import _run_isolated
    out = _run_isolated(emul, """
        import torch
        from test_recurrent import rlif_problem
        from test_recurrent_emul import backward_args, fwd_args, upstream
        cpu = torch.ops.sparsegrad

        def changed(t, k, v):
            t = t.clone()
            t[k] = v
            return t

        def moved(cnt, r, d):
            cnt = cnt.clone()
            cnt[r] += d
            cnt[r + 1] -= d
            return cnt

        raised = 0
        T, B, n_in, n = 6, 3, 8, 5
        x, w, r, b = rlif_problem(T, B, n_in, n, rate=0.5, seed=3)
        f = emul.rlif_forward(*fwd_args(x, w, r, b, b_th=10.0))  # every entry active
        gS, gV = upstream(T, B, n, torch.float64)
        prev_cnt = torch.full((B * T,), n_in, dtype=torch.int32)
        prev_idx = torch.arange(n_in, dtype=torch.int32).repeat(B * T)
        good = list(backward_args(f, x, w, r, None, gS, gV, sparse=True, prev=(prev_cnt, prev_idx)))
        act_cnt, act_idx, ev_cnt, ev_idx = good[5], good[6], good[8], good[9]
        bad = {  # name: (argument position, tensor, word in the message)
            "act_cnt total": (5, changed(act_cnt, -1, act_cnt[-1] - 1), "act_cnt"),
            "act_cnt negative": (5, changed(act_cnt, 4, -3), "act_cnt"),
            "act_cnt huge": (5, changed(act_cnt, 2, 2**30), "act_cnt"),
            "act_cnt moved": (5, moved(act_cnt, 3, 1), "act_cnt/act_idx"),
            "act_idx too large": (6, changed(act_idx, 7, n), "act_cnt/act_idx"),
            "act_idx negative": (6, changed(act_idx, 0, -1), "act_cnt/act_idx"),
            "ev_cnt total": (8, changed(ev_cnt, -1, ev_cnt[-1] + 3), "ev_cnt"),
            "ev_idx too large": (9, changed(ev_idx, 2, n_in + 100), "ev_cnt/ev_idx"),
            "ev_idx negative": (9, changed(ev_idx, 2, -7), "ev_cnt/ev_idx"),
            "prev_cnt total": (12, changed(prev_cnt, -1, 10**6), "prev_cnt"),
            "prev_idx too large": (13, changed(prev_idx, 5, n_in), "prev_cnt/prev_idx"),
        }
        for name, (pos, tensor, word) in bad.items():
            args = list(good)
            args[pos] = tensor
            for ops in (emul, cpu):
                try:
                    ops.rlif_backward_sparse(*args)
                except RuntimeError as e:
                    prefix = word.split("_")[0] + "_"  # the CSR's count or index tensor
                    assert prefix + "cnt" in str(e) or prefix + "idx" in str(e), (name, str(e))
                    raised += 1
                    continue
                raise AssertionError(f"rlif {name}: no error")
        emul.rlif_backward_sparse(*good)  # the consistent tensors pass

        cur = torch.randn(T, B, n, dtype=torch.float64) + 0.8
        nf = emul.lif_neuron_forward(cur, None, None, 0.9, 1.0, 10.0, 5.0, True)  # all active
        n_cnt, n_idx, n_sg = nf[2], nf[3], nf[4]
        g = torch.randn(T, B, n, dtype=torch.float64)
        nbad = {
            "act_cnt total": (3, changed(n_cnt, -1, n_cnt[-1] - 1)),
            "act_cnt negative": (3, changed(n_cnt, 4, -3)),
            "act_cnt huge": (3, changed(n_cnt, 2, 2**30)),
            "act_cnt moved": (3, moved(n_cnt, 3, 1)),
            "act_idx too large": (4, changed(n_idx, 7, n)),
            "act_idx negative": (4, changed(n_idx, 0, -1)),
            "act_idx huge": (4, changed(n_idx, 1, 2**31 - 1)),
        }
        for name, (pos, tensor) in nbad.items():
            args = [g, g[0], None, n_cnt, n_idx, n_sg, None, None, 0.9, True, True]
            args[pos] = tensor
            for ops in (emul, cpu):
                try:
                    ops.lif_neuron_backward(*args)
                except RuntimeError as e:
                    assert "act_cnt" in str(e) or "act_idx" in str(e), (name, str(e))
                    raised += 1
                    continue
                raise AssertionError(f"neuron {name}: no error")
        emul.lif_neuron_backward(g, g[0], None, n_cnt, n_idx, n_sg, None, None, 0.9, True, True)
        print("raised", raised)
    """)
    assert "raised 36" in out, out


def test_emul_dense_backwards_refuse_x_with_other_time_and_batch(emul):
    T, B, n_in, n = 5, 3, 4, 6
    x, w, r, b = rlif_problem(T, B, n_in, n)
    g = torch.randn(T, B, n, dtype=x.dtype)
    sg = torch.rand(T, B, n, dtype=x.dtype)
    bad = x.transpose(0, 1).contiguous()  # [B, T, N_in]: the same numel
    with pytest.raises(RuntimeError, match="lif_backward_dense: argument 'x'"):
        emul.lif_backward_dense(g, None, bad, w, sg, None, 0.9, True, True, True, True)
    with pytest.raises(RuntimeError, match="rlif_backward_dense: argument 'x'"):
        emul.rlif_backward_dense(g, None, bad, w, r, None, (sg > 0.5).to(x.dtype), sg, 0.9, "subtract",
                                 True, True, True, True, True, True)
