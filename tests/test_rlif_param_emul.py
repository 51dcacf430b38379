"""The recurrent layer's tensor-parameter CUDA kernels (rlif_param_*: per-neuron alpha and
threshold, the synaptic current, the traces of learnable parameters; csrc/cuda/recurrent.cuh,
recurrent_host.h), run on the CPU through the host emulation (tests/test_cuda_emul.py builds it).

Forward outputs equal the CPU op's bit for bit; gradients the CPU op's and the reference's
autograd to 1e-10 in float64; every output is bit-identical whatever the launch geometry and the
order in which the emulated threads run.
"""
import itertools
import math

import pytest
import torch

from sparsegrad import reference as ref
from conftest import TOL
from test_cuda_emul import CSRC, EMUL_SOURCE, emul, launch  # noqa: F401  (pytest fixtures)
from test_recurrent import RESETS, rlif_problem
from test_recurrent_emul import GRAD_NAMES, SHAPES, state_for, upstream

cpu_ops = torch.ops.sparsegrad
NAMES = ("rlif_param_forward", "rlif_param_backward_sparse", "rlif_param_backward_dense")
FWD_NAMES = ["spikes", "v_final", "syn_final", "act_cnt", "act_idx", "act_sg", "act_p", "act_q",
             "act_u", "tan_last", "ev_cnt", "ev_idx", "ev_val", "spk_bits", "stats"]
PARAM_GRAD_NAMES = GRAD_NAMES + ["dsyn_init", "d_alpha", "d_threshold", "d_alpha_syn"]


def params_for(n, dtype, syn, seed=0):
    g = torch.Generator().manual_seed(seed + 50)
    alpha = (0.6 + 0.35 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    theta = (0.5 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    alpha_syn = (0.3 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    return alpha, theta, alpha_syn if syn else None


def syn_state(B, n, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, generator=g, dtype=torch.float64) * 0.3).to(dtype)


def fwd_args(x, w, r, b, state, params, *, b_th=0.3, slope=5.0, sparse=True,
             surrogate="fast_sigmoid", reset="subtract", need=True):
    v0, s0, syn0 = state
    alpha, theta, alpha_syn = params
    return (x, w, r, b, v0, s0, syn0 if alpha_syn is not None else None, None, None, alpha,
            theta, alpha_syn, b_th, slope, sparse, surrogate, reset, need)


def bwd_args(fwd, x, w, r, s0, upstream_grads, params, *, sparse, reset="subtract",
             prev=(None, None), need_dsyn=True, need=True):
    gS, gV, gsyn = upstream_grads
    (spikes, _, _, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, ev_cnt, ev_idx,
     ev_val, bits, _) = fwd
    alpha, _, alpha_syn = params
    syn = alpha_syn is not None
    flags = (True,) * 6 + (need_dsyn and syn, need)
    gsyn = gsyn if syn else None
    if sparse:
        return (gS, gV, gsyn, w, r, s0, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
                ev_cnt, ev_idx, ev_val, bits, prev[0], prev[1], alpha, alpha_syn, reset, *flags)
    return (gS, gV, gsyn, x, w, r, s0, spikes, act_sg, act_p, act_q, act_u, tan_last, alpha,
            alpha_syn, reset, *flags)


def run_bwd(ops, args, sparse):
    return (ops.rlif_param_backward_sparse if sparse else ops.rlif_param_backward_dense)(*args)


def problem(shape, dtype, syn, seed):
    T, B, n_in, n = shape
    x, w, r, b = rlif_problem(*shape, dtype=dtype, binary=T % 2 == 1, seed=seed)
    v0, s0 = state_for(shape, dtype, seed=seed + 1)
    state = (v0, s0, syn_state(B, n, dtype, seed + 2))
    gS, gV = upstream(T, B, n, dtype, seed=seed + 3)
    return x, w, r, b, state, params_for(n, dtype, syn, seed), (gS, gV, syn_state(B, n, dtype, seed + 4))


def test_emul_rlif_param_schemas_sources_and_registration(emul):
    for name in NAMES:
        mine = str(getattr(emul, name).default._schema).replace("sparsegrad_emul::", "")
        theirs = str(getattr(cpu_ops, name).default._schema).replace("sparsegrad::", "")
        assert mine == theirs
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsegrad_emul::{name}", "CPU")
        assert f'm.impl("{name}"' in (CSRC / "cuda" / "sparsegrad_cuda.cu").read_text()
        assert f'm.impl("{name}"' in EMUL_SOURCE.read_text()


def test_emul_rlif_param_launches_one_kernel_per_step(emul):
    shape = (7, 3, 5, 4)
    x, w, r, b, state, params, _ = problem(shape, torch.float64, True, 1)
    before = emul.launch_counters()[0]
    emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params, sparse=False))
    assert emul.launch_counters()[0] - before == 2 + 7  # events count + fill, one per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("syn", [False, True])
def test_emul_rlif_param_forward_equals_cpu(emul, dtype, shape, reset, syn):
    x, w, r, b, state, params, _ = problem(shape, dtype, syn, sum(shape))
    for sparse, with_state, need in itertools.product((True, False), (False, True), (False, True)):
        st = state if with_state else (None, None, None)
        args = fwd_args(x, w, r, b, st, params, sparse=sparse, reset=reset, surrogate="sigmoid",
                        need=need)
        got, want = emul.rlif_param_forward(*args), cpu_ops.rlif_param_forward(*args)
        for name, g, c in zip(FWD_NAMES, got, want):
            where = f"{name} (sparse={sparse}, state={with_state}, need={need})"
            assert g.dtype == c.dtype and g.shape == c.shape, where
            assert torch.equal(g, c), f"{where} differs"
    if shape[0] > 3:
        assert want[0].sum() > 0, "the problem never spikes"


def _reference_grads(x, w, r, b, state, params, upstream_grads, *, sparse, reset, surrogate):
    """dL/d(x, W, R, b, V0, S0, syn0, alpha, theta, alpha_syn) by the reference's autograd."""
    alpha_syn = params[2]
    leaves = [t.clone().requires_grad_() for t in (x, w, r, b, *state, *params[:2])]
    a_syn = alpha_syn.clone().requires_grad_() if alpha_syn is not None else None
    st = tuple(leaves[4:7]) if alpha_syn is not None else tuple(leaves[4:6])
    spk, fin = ref.rlif_layer(*leaves[:4], alpha=leaves[7], threshold=leaves[8], alpha_syn=a_syn,
                              b_th=0.3 if sparse else math.inf, slope=5.0, surrogate=surrogate,
                              reset=reset, state=st, return_state=True)
    gS, gV, gsyn = upstream_grads
    loss = (spk * gS).sum() + (fin[0] * gV).sum()
    if alpha_syn is not None:
        loss = loss + (fin[2] * gsyn).sum()
    wrt = leaves[:6] + ([leaves[6]] if alpha_syn is not None else []) + leaves[7:]
    wrt += [a_syn] if a_syn is not None else []
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("syn", [False, True])
def test_emul_rlif_param_backward_matches_cpu_and_reference(emul, shape, reset, sparse, syn):
    dtype = torch.float64
    x, w, r, b, state, params, up = problem(shape, dtype, syn, sum(shape) + 1)
    fwd = cpu_ops.rlif_param_forward(*fwd_args(x, w, r, b, state, params, sparse=sparse,
                                               reset=reset, surrogate="atan"))
    args = bwd_args(fwd, x, w, r, state[1], up, params, sparse=sparse, reset=reset)
    got, want = run_bwd(emul, args, sparse), run_bwd(cpu_ops, args, sparse)
    if shape[0] > 3:  # a problem with spikes, active entries and parameter gradients
        assert fwd[0].sum() > 0 and 0 < fwd[4].numel() < fwd[0].numel() or not sparse
        assert all(want[k].abs().sum() > 0 for k in ((7, 8, 9) if syn else (7, 8)))
    for name, g, c in zip(PARAM_GRAD_NAMES, got, want):
        assert g.shape == c.shape, name
        torch.testing.assert_close(g, c, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    ref_grads = _reference_grads(x, w, r, b, state, params, up, sparse=sparse, reset=reset,
                                 surrogate="atan")
    mine = list(got[:6]) + ([got[6]] if syn else []) + [got[7].sum(0), got[8].sum(0)]
    mine += [got[9].sum(0)] if syn else []
    names = GRAD_NAMES + (["dsyn_init"] if syn else []) + ["d_alpha", "d_threshold"]
    names += ["d_alpha_syn"] if syn else []
    for name, g, want_g in zip(names, mine, ref_grads):
        torch.testing.assert_close(g, want_g, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("syn", [False, True])
def test_emul_rlif_param_sparse_with_infinite_band_equals_dense(emul, reset, syn):
    shape = (9, 3, 11, 8)
    x, w, r, b, state, params, up = problem(shape, torch.float64, syn, 21)
    out = []
    for sparse in (True, False):
        fwd = emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params, sparse=sparse,
                                                reset=reset, b_th=math.inf))
        out.append(run_bwd(emul, bwd_args(fwd, x, w, r, state[1], up, params, sparse=sparse,
                                          reset=reset), sparse))
    for name, s, d in zip(PARAM_GRAD_NAMES, *out):
        torch.testing.assert_close(s, d, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


def test_emul_rlif_param_without_wanted_gradients_returns_empty(emul):
    """need_dparams / need_dsyn false: those outputs are empty, the rest unchanged; no traces are
    kept by a forward that does not need them."""
    shape = (6, 2, 5, 4)
    x, w, r, b, state, params, up = problem(shape, torch.float64, True, 4)
    fwd = emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params, need=False))
    assert all(t.numel() == 0 for t in fwd[6:10])
    fwd_keep = emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params, need=True))
    full = emul.rlif_param_backward_sparse(*bwd_args(fwd_keep, x, w, r, state[1], up, params,
                                                     sparse=True))
    none = emul.rlif_param_backward_sparse(*bwd_args(fwd, x, w, r, state[1], up, params,
                                                     sparse=True, need=False, need_dsyn=False))
    assert all(t.numel() == 0 for t in none[6:])
    for a, c in zip(none[:6], full[:6]):
        assert torch.equal(a, c)


def test_emul_rlif_param_dx_on_producer_active_set(emul):
    shape = (11, 4, 13, 9)
    x, w, r, b, state, params, up = problem(shape, torch.float64, True, 5)
    fwd = cpu_ops.rlif_param_forward(*fwd_args(x, w, r, b, state, params))
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 11, 13, generator=g) < 0.3  # a producer's active set, rows b*T + t
    prev = (mask.sum(-1).reshape(-1).to(torch.int32), mask.reshape(-1, 13).nonzero()[:, 1].to(torch.int32))
    full = bwd_args(fwd, x, w, r, state[1], up, params, sparse=True)
    part = bwd_args(fwd, x, w, r, state[1], up, params, sparse=True, prev=prev)
    on_set = mask.transpose(0, 1)  # [T, B, N_in]
    for ops in (emul, cpu_ops):
        got_full, got_part = ops.rlif_param_backward_sparse(*full), ops.rlif_param_backward_sparse(*part)
        torch.testing.assert_close(got_part[0][on_set], got_full[0][on_set], **TOL[torch.float64])
        for a, c in zip(got_part[1:], got_full[1:]):
            assert torch.equal(a, c)
    assert torch.count_nonzero(emul.rlif_param_backward_sparse(*part)[0][~on_set]) == 0


@pytest.mark.parametrize("order,threads,max_blocks", [("reverse", 32, 2), ("shuffled", 7, 3),
                                                      ("shuffled", 64, 1)])
@pytest.mark.parametrize("sparse", [True, False])
def test_emul_rlif_param_determinism_across_thread_orders(emul, launch, order, threads, max_blocks,
                                                          sparse):
    """Every output, forward and backward, is bit-identical whatever the launch geometry and the
    order the emulated threads run in (float32, where summation order would show)."""
    dtype = torch.float32
    shape = (12, 5, 30, 40)
    x, w, r, b, state, params, up = problem(shape, dtype, True, 8)

    def run():
        fwd = emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params, sparse=sparse, reset="zero"))
        return list(fwd) + list(run_bwd(emul, bwd_args(fwd, x, w, r, state[1], up, params,
                                                       sparse=sparse, reset="zero"), sparse))

    launch()
    want = run()
    launch(order=order, threads=threads, max_blocks=max_blocks, seed=11)
    got = run()
    for name, a, c in zip(FWD_NAMES + PARAM_GRAD_NAMES, got, want):
        assert torch.equal(a, c), f"{name} depends on the thread order"


def test_emul_rlif_param_host_checks_name_the_argument(emul):
    shape = (4, 2, 5, 3)
    x, w, r, b, state, params, up = problem(shape, torch.float64, True, 9)
    alpha, theta, alpha_syn = params
    with pytest.raises(RuntimeError, match="rlif_param_forward: argument 'alpha'"):
        emul.rlif_param_forward(*fwd_args(x, w, r, b, state, (alpha[:2], theta, alpha_syn)))
    with pytest.raises(RuntimeError, match="rlif_param_forward: argument 'alpha_syn'"):
        emul.rlif_param_forward(*fwd_args(x, w, r, b, state, (alpha, theta, alpha_syn.float())))
    fwd = emul.rlif_param_forward(*fwd_args(x, w, r, b, state, params))
    args = list(bwd_args(fwd, x, w, r, state[1], up, params, sparse=True))
    args[9] = args[9][:-1]  # act_p shorter than the active set
    with pytest.raises(RuntimeError, match="rlif_param_backward_sparse: argument 'act_p'"):
        emul.rlif_param_backward_sparse(*args)
    args = list(bwd_args(fwd, x, w, r, state[1], up, params, sparse=True))
    args[6] = args[6][:-1]  # act_cnt too short
    with pytest.raises(RuntimeError, match="rlif_param_backward_sparse: argument 'act_cnt'"):
        emul.rlif_param_backward_sparse(*args)
