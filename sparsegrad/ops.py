"""Thin wrappers over torch.ops.sparsegrad.*: fake (shape-only) kernels and autograd.

The schemas live in csrc/ops.cpp; the device kernels in csrc/cpu and csrc/cuda. Each backward here
calls another registered op, so torch.compile can trace through training steps.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.sparsegrad

DW_ROUTES = {"auto": 0, "events": 1, "active": 2}
REDUCTIONS = ("max", "sum", "mean", "none")


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes only. Compact tensors have data-dependent lengths (unbacked sizes).
# --------------------------------------------------------------------------------------------
def _dynamic(ctx):
    return ctx.new_dynamic_size()


def rst_bits_fake(like, T, B, n, reset):
    """Shape of the reset bits (reset="zero" only): int32 [T, B, ceil(n/32)], else [0]."""
    if reset == "zero":
        return like.new_empty(T, B, (n + 31) // 32, dtype=torch.int32)
    return like.new_empty(0, dtype=torch.int32)


@torch.library.register_fake("sparsegrad::lif_forward")
def _lif_forward_fake(x, weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha, threshold, b_th,
                      slope, sparse, surrogate="fast_sigmoid", reset="subtract"):
    T, B, _ = x.shape
    n_out = weight.shape[0]
    ctx = torch.library.get_ctx()
    spikes = x.new_empty(T, B, n_out)
    v_final = x.new_empty(B, n_out)
    if sparse:
        act_cnt = x.new_empty(B * T, dtype=torch.int32)
        n_active = _dynamic(ctx)
        act_idx = x.new_empty(n_active, dtype=torch.int32)
        act_sg = x.new_empty(n_active)
        ev_cnt, ev_idx, ev_val = _events_fake(x, ctx)
    else:
        act_cnt = x.new_empty(0, dtype=torch.int32)
        act_idx = x.new_empty(0, dtype=torch.int32)
        act_sg = x.new_empty(T, B, n_out)
        ev_cnt = x.new_empty(0, dtype=torch.int32)
        ev_idx = x.new_empty(0, dtype=torch.int32)
        ev_val = x.new_empty(0)
    rst_bits = rst_bits_fake(x, T, B, n_out, reset)
    stats = x.new_empty(3, dtype=torch.int64)
    return spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst_bits, stats


def _events_fake(x, ctx):
    T, B, _ = x.shape
    ev_cnt = x.new_empty(B * T, dtype=torch.int32)
    ev_idx = x.new_empty(_dynamic(ctx), dtype=torch.int32)
    ev_val = x.new_empty(_dynamic(ctx))  # empty when x is binary
    return ev_cnt, ev_idx, ev_val


def _grads_fake(x_shape, like, weight, need_dx, need_dw, need_db):
    dx = like.new_empty(x_shape) if need_dx else like.new_empty(0)
    dw = like.new_empty(weight.shape) if need_dw else like.new_empty(0)
    db = like.new_empty(weight.shape[0]) if need_db else like.new_empty(0)
    return dx, dw, db


@torch.library.register_fake("sparsegrad::lif_backward_sparse")
def _lif_backward_sparse_fake(grad_spikes, grad_v_final, weight, act_cnt, act_idx, act_sg, ev_cnt,
                              ev_idx, ev_val, prev_cnt, prev_idx, rst_bits, alpha, need_dx, need_dw,
                              need_db, need_dv, dw_route):
    T, B, _ = grad_spikes.shape
    dx, dw, db = _grads_fake((T, B, weight.shape[1]), grad_spikes, weight, need_dx, need_dw, need_db)
    dv = grad_spikes.new_empty(B, weight.shape[0]) if need_dv else grad_spikes.new_empty(0)
    return dx, dw, db, dv


@torch.library.register_fake("sparsegrad::lif_backward_dense")
def _lif_backward_dense_fake(grad_spikes, grad_v_final, x, weight, sg, rst_bits, alpha, need_dx,
                             need_dw, need_db, need_dv):
    T, B, _ = grad_spikes.shape
    dx, dw, db = _grads_fake(x.shape, grad_spikes, weight, need_dx, need_dw, need_db)
    dv = grad_spikes.new_empty(B, weight.shape[0]) if need_dv else grad_spikes.new_empty(0)
    return dx, dw, db, dv


@torch.library.register_fake("sparsegrad::li_readout_forward")
def _li_readout_forward_fake(x, weight, bias, x_act_cnt, x_act_idx, alpha, reduce):
    T, B, _ = x.shape
    n_out = weight.shape[0]
    ctx = torch.library.get_ctx()
    out = x.new_empty(T, B, n_out) if reduce == "none" else x.new_empty(B, n_out)
    argmax_t = x.new_empty((B, n_out) if reduce == "max" else (0,), dtype=torch.int64)
    ev_cnt, ev_idx, ev_val = _events_fake(x, ctx)
    return out, argmax_t, ev_cnt, ev_idx, ev_val


@torch.library.register_fake("sparsegrad::li_readout_backward")
def _li_readout_backward_fake(grad_out, argmax_t, weight, ev_cnt, ev_idx, ev_val, prev_cnt,
                              prev_idx, num_steps, alpha, reduce, need_dx, need_dw, need_db):
    B = grad_out.shape[-2]
    return _grads_fake((num_steps, B, weight.shape[1]), grad_out, weight, need_dx, need_dw, need_db)


@torch.library.register_fake("sparsegrad::lif_neuron_forward")
def _lif_neuron_forward_fake(current, v_init, s_init, alpha, threshold, b_th, slope, sparse,
                             surrogate="fast_sigmoid", reset="subtract", return_mem=False,
                             dynamics="leaky", tau=2.0, v_reset=0.0, detach_reset=True):
    T, B, N = current.shape
    ctx = torch.library.get_ctx()
    spikes = current.new_empty(T, B, N)
    v_final = current.new_empty(B, N)
    if sparse:
        act_cnt = current.new_empty(B * T, dtype=torch.int32)
        n_active = _dynamic(ctx)
        act_idx = current.new_empty(n_active, dtype=torch.int32)
        act_sg = current.new_empty(n_active)
    else:
        act_cnt = current.new_empty(0, dtype=torch.int32)
        act_idx = current.new_empty(0, dtype=torch.int32)
        act_sg = current.new_empty(T, B, N)
    act_rg = (current.new_empty(act_sg.shape) if dynamics != "leaky" and not detach_reset
              else current.new_empty(0))
    rst_bits = (current.new_empty(T, B, (N + 31) // 32, dtype=torch.int32) if reset == "zero"
                else current.new_empty(0, dtype=torch.int32))
    mem = current.new_empty(T, B, N) if return_mem else current.new_empty(0)
    stats = current.new_empty(3, dtype=torch.int64)
    return spikes, v_final, act_cnt, act_idx, act_sg, act_rg, rst_bits, mem, stats


@torch.library.register_fake("sparsegrad::lif_neuron_backward")
def _lif_neuron_backward_fake(grad_spikes, grad_v_final, grad_mem, act_cnt, act_idx, act_sg,
                              act_rg, rst_bits, alpha, sparse, need_dv, dynamics="leaky",
                              input_scale=1.0):
    T, B, N = grad_spikes.shape
    dv = grad_spikes.new_empty(B, N) if need_dv else grad_spikes.new_empty(0)
    return grad_spikes.new_empty(T, B, N), dv


@torch.library.register_fake("sparsegrad::lif_neuron_param_forward")
def _lif_neuron_param_forward_fake(current, v_init, s_init, syn_init, alpha, threshold, alpha_syn,
                                   b_th, slope, sparse, surrogate, reset, return_mem, need_dalpha,
                                   need_dthreshold, need_dalpha_syn):
    T, B, N = current.shape
    ctx = torch.library.get_ctx()
    new = current.new_empty
    spikes, v_final = new(T, B, N), new(B, N)
    syn_final = new(B, N) if alpha_syn is not None else new(0)
    if sparse:
        n_active = _dynamic(ctx)
        act_cnt = new(B * T, dtype=torch.int32)
        act_idx = new(n_active, dtype=torch.int32)
        act_sg = new(n_active)
    else:
        act_cnt = new(0, dtype=torch.int32)
        act_idx = new(0, dtype=torch.int32)
        act_sg = new(T, B, N)
    entries = T * B * N if (not sparse or return_mem) else act_idx.shape[0]
    need_u = need_dalpha_syn and alpha_syn is not None
    act_p = new(entries) if need_dalpha else new(0)
    act_q = new(entries) if need_dthreshold and reset == "subtract" else new(0)
    act_u = new(entries) if need_u else new(0)
    tan_last = new(4, B, N) if (need_dalpha or need_dthreshold or need_u) else new(0)
    rst_bits = rst_bits_fake(current, T, B, N, reset)
    mem = new(T, B, N) if return_mem else new(0)
    stats = new(3, dtype=torch.int64)
    return (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
            rst_bits, mem, stats)


@torch.library.register_fake("sparsegrad::lif_param_forward")
def _lif_param_forward_fake(x, weight, bias, v_init, s_init, syn_init, alpha, threshold,
                            alpha_syn, b_th, slope, sparse, surrogate, reset, return_mem,
                            need_dalpha, need_dthreshold, need_dalpha_syn):
    T, B, _ = x.shape
    current = x.new_empty(T, B, weight.shape[0])
    neuron = _lif_neuron_param_forward_fake(
        current, v_init, s_init, syn_init, alpha, threshold, alpha_syn, b_th, slope, sparse,
        surrogate, reset, return_mem, need_dalpha, need_dthreshold, need_dalpha_syn)
    return neuron + _events_fake(x, torch.library.get_ctx())


@torch.library.register_fake("sparsegrad::lif_neuron_param_backward")
def _lif_neuron_param_backward_fake(grad_spikes, grad_v_final, grad_syn_final, grad_mem, act_cnt,
                                    act_idx, act_sg, act_p, act_q, act_u, tan_last, rst_bits,
                                    alpha, alpha_syn, sparse, dense_traces, need_dv, need_dsyn,
                                    need_dalpha, need_dthreshold, need_dalpha_syn):
    T, B, N = grad_spikes.shape
    new = grad_spikes.new_empty
    return (new(T, B, N),) + tuple(new(B, N) if f else new(0) for f in (
        need_dv, need_dsyn, need_dalpha, need_dthreshold, need_dalpha_syn))


@torch.library.register_fake("sparsegrad::lif_param_backward")
def _lif_param_backward_fake(grad_spikes, grad_v_final, grad_syn_final, grad_mem, act_cnt, act_idx,
                             act_sg, act_p, act_q, act_u, tan_last, rst_bits, alpha, alpha_syn,
                             weight, ev_cnt, ev_idx, ev_val, prev_cnt, prev_idx, sparse,
                             dense_traces, need_dx, need_dw, need_db, need_dv, need_dsyn,
                             need_dalpha, need_dthreshold, need_dalpha_syn):
    T, B, N = grad_spikes.shape
    new = grad_spikes.new_empty
    return _grads_fake((T, B, weight.shape[1]), grad_spikes, weight, need_dx, need_dw,
                       need_db) + tuple(new(B, N) if f else new(0) for f in (
                           need_dv, need_dsyn, need_dalpha, need_dthreshold, need_dalpha_syn))


@torch.library.register_fake("sparsegrad::rlif_forward")
def _rlif_forward_fake(x, weight, rec_weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha,
                       threshold, b_th, slope, sparse, surrogate="fast_sigmoid", reset="subtract"):
    T, B, _ = x.shape
    n_out = weight.shape[0]
    ctx = torch.library.get_ctx()
    spikes = x.new_empty(T, B, n_out)
    v_final = x.new_empty(B, n_out)
    if sparse:
        act_cnt = x.new_empty(B * T, dtype=torch.int32)
        n_active = _dynamic(ctx)
        act_idx = x.new_empty(n_active, dtype=torch.int32)
        act_sg = x.new_empty(n_active)
        ev_cnt = x.new_empty(B * T, dtype=torch.int32)
        ev_idx = x.new_empty(_dynamic(ctx), dtype=torch.int32)
        ev_val = x.new_empty(_dynamic(ctx))  # empty when x is binary
    else:
        act_cnt = x.new_empty(0, dtype=torch.int32)
        act_idx = x.new_empty(0, dtype=torch.int32)
        act_sg = x.new_empty(T, B, n_out)
        ev_cnt = x.new_empty(0, dtype=torch.int32)
        ev_idx = x.new_empty(0, dtype=torch.int32)
        ev_val = x.new_empty(0)
    spk_bits = x.new_empty(T, B, (n_out + 31) // 32, dtype=torch.int32)
    stats = x.new_empty(3, dtype=torch.int64)
    return spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, stats


def _rlif_grads_fake(T, B, like, weight, need_dx, need_dw, need_drec, need_db, need_dv, need_ds):
    n_out, n_in = weight.shape
    dx, dw, db = _grads_fake((T, B, n_in), like, weight, need_dx, need_dw, need_db)
    drec = like.new_empty(n_out, n_out) if need_drec else like.new_empty(0)
    dv = like.new_empty(B, n_out) if need_dv else like.new_empty(0)
    ds = like.new_empty(B, n_out) if need_ds else like.new_empty(0)
    return dx, dw, drec, db, dv, ds


@torch.library.register_fake("sparsegrad::rlif_backward_sparse")
def _rlif_backward_sparse_fake(grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt,
                               act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, prev_cnt,
                               prev_idx, alpha, reset, need_dx, need_dw, need_drec, need_db,
                               need_dv, need_ds):
    T, B, _ = grad_spikes.shape
    return _rlif_grads_fake(T, B, grad_spikes, weight, need_dx, need_dw, need_drec, need_db,
                            need_dv, need_ds)


@torch.library.register_fake("sparsegrad::rlif_backward_dense")
def _rlif_backward_dense_fake(grad_spikes, grad_v_final, x, weight, rec_weight, s_init, spikes, sg,
                              alpha, reset, need_dx, need_dw, need_drec, need_db, need_dv,
                              need_ds):
    T, B, _ = grad_spikes.shape
    return _rlif_grads_fake(T, B, grad_spikes, weight, need_dx, need_dw, need_drec, need_db,
                            need_dv, need_ds)


@torch.library.register_fake("sparsegrad::rlif_param_forward")
def _rlif_param_forward_fake(x, weight, rec_weight, bias, v_init, s_init, syn_init, x_act_cnt,
                             x_act_idx, alpha, threshold, alpha_syn, b_th, slope, sparse,
                             surrogate="fast_sigmoid", reset="subtract", need_dparams=False):
    (spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits,
     stats) = _rlif_forward_fake(x, weight, rec_weight, bias, v_init, s_init, x_act_cnt,
                                 x_act_idx, 0.5, 1.0, b_th, slope, sparse, surrogate, reset)
    T, B, _ = x.shape
    n_out = weight.shape[0]
    new = x.new_empty
    syn = alpha_syn is not None
    syn_final = new(B, n_out) if syn else new(0)
    entries = act_idx.shape[0] if sparse else T * B * n_out
    shape = (entries,) if sparse else (T, B, n_out)
    if need_dparams:
        traces = (new(shape), new(shape), new(shape) if syn else new(0), new(4, B, n_out))
    else:
        traces = (new(0), new(0), new(0), new(0))
    return (spikes, v_final, syn_final, act_cnt, act_idx, act_sg) + traces + \
        (ev_cnt, ev_idx, ev_val, spk_bits, stats)


def _rlif_param_grads_fake(grad_spikes, weight, alpha_syn, flags, need_dsyn, need_dparams):
    T, B, _ = grad_spikes.shape
    n_out = weight.shape[0]
    new = grad_spikes.new_empty
    syn = alpha_syn is not None
    extra = (new(B, n_out) if syn and need_dsyn else new(0),
             new(B, n_out) if need_dparams else new(0),
             new(B, n_out) if need_dparams else new(0),
             new(B, n_out) if need_dparams and syn else new(0))
    return _rlif_grads_fake(T, B, grad_spikes, weight, *flags) + extra


@torch.library.register_fake("sparsegrad::rlif_param_backward_sparse")
def _rlif_param_backward_sparse_fake(grad_spikes, grad_v_final, grad_syn_final, weight,
                                     rec_weight, s_init, act_cnt, act_idx, act_sg, act_p, act_q,
                                     act_u, tan_last, ev_cnt, ev_idx, ev_val, spk_bits, prev_cnt,
                                     prev_idx, alpha, alpha_syn, reset, need_dx, need_dw,
                                     need_drec, need_db, need_dv, need_ds, need_dsyn,
                                     need_dparams):
    return _rlif_param_grads_fake(grad_spikes, weight, alpha_syn, (
        need_dx, need_dw, need_drec, need_db, need_dv, need_ds), need_dsyn, need_dparams)


@torch.library.register_fake("sparsegrad::rlif_param_backward_dense")
def _rlif_param_backward_dense_fake(grad_spikes, grad_v_final, grad_syn_final, x, weight,
                                    rec_weight, s_init, spikes, sg, act_p, act_q, act_u, tan_last,
                                    alpha, alpha_syn, reset, need_dx, need_dw, need_drec, need_db,
                                    need_dv, need_ds, need_dsyn, need_dparams):
    return _rlif_param_grads_fake(grad_spikes, weight, alpha_syn, (
        need_dx, need_dw, need_drec, need_db, need_dv, need_ds), need_dsyn, need_dparams)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# The saved form of compact tensors: indices and per-row counts lie in [0, N], so they are kept
# in the narrowest integer type that holds N (uint8 up to 255, int16 up to 32767) between the
# forward and the backward, and widened back to the ops' int32 when the backward runs. A sparse
# layer's saved active set is also what its spikes carry for the next layer, which then saves
# the same tensors (one allocation for both). (Issue 13: a 200->200 hidden layer then saves
# 3 % of dense BPTT's bytes instead of 6 % -- 8 % counting the producer's set.)
# --------------------------------------------------------------------------------------------
SAVED_SET_ATTR = "_sparsegrad_saved_active_set"


def _saved_index(t, bound):
    if t is None or t.dtype not in (torch.int32, torch.int16, torch.uint8):
        return t
    if bound <= 255:
        return t.to(torch.uint8)
    if bound <= 32767:
        return t.to(torch.int16)
    return t.to(torch.int32)


def _widen(t):
    return t if t is None or t.dtype == torch.int32 else t.to(torch.int32)


def _lif_setup_context(ctx, inputs, output):
    (x, weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha, threshold, b_th, slope, sparse,
     *_kinds) = inputs
    spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst_bits, stats = output
    ctx.alpha = alpha
    ctx.sparse = sparse
    ctx.has_bias = bias is not None
    ctx.has_v_init = v_init is not None
    ctx.has_prev = x_act_cnt is not None
    ctx.has_rst = rst_bits.numel() > 0
    ctx.spikes_shape = spikes.shape
    ctx.mark_non_differentiable(act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, rst_bits, stats)
    # Unused outputs get None, not zero tensors: a zero dL/dV_final would make the sparse
    # backward walk every step, and zero-filling them costs time.
    ctx.set_materialize_grads(False)
    if sparse:
        # Compact data only: no dense [T, B, N] float tensor is kept for the backward.
        n_out, n_in = weight.shape
        act_set = (_saved_index(act_cnt, n_out), _saved_index(act_idx, n_out))
        saved = [weight, *act_set, act_sg, _saved_index(ev_cnt, n_in), _saved_index(ev_idx, n_in),
                 ev_val]
        if ctx.has_prev:
            saved += [_saved_index(x_act_cnt, n_in), _saved_index(x_act_idx, n_in)]
        if not torch.compiler.is_compiling():
            setattr(spikes, SAVED_SET_ATTR, act_set)  # functional.attach_active_set passes it on
    else:
        saved = [weight, act_sg, x]
    if ctx.has_rst:
        saved.append(rst_bits)
    ctx.save_for_backward(*saved)


def _lif_backward(ctx, grad_spikes, grad_v_final, *unused):
    n_inputs = 14
    if grad_spikes is None and grad_v_final is None:
        return (None,) * n_inputs
    if grad_spikes is None:
        grad_spikes = grad_v_final.new_zeros(ctx.spikes_shape)
    need_dx, need_dw, need_db, need_dv = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[2],
        ctx.has_v_init and ctx.needs_input_grad[3],
    )
    saved = list(ctx.saved_tensors)
    rst_bits = saved.pop() if ctx.has_rst else None
    if ctx.sparse:
        weight, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, *prev = saved
        prev_cnt, prev_idx = prev if prev else (None, None)
        dx, dw, db, dv = _ops.lif_backward_sparse.default(
            grad_spikes, grad_v_final, weight, _widen(act_cnt), _widen(act_idx), act_sg,
            _widen(ev_cnt), _widen(ev_idx), ev_val, _widen(prev_cnt), _widen(prev_idx), rst_bits,
            ctx.alpha, need_dx, need_dw, need_db, need_dv, DW_ROUTES["auto"])
    else:
        weight, sg, x = saved
        dx, dw, db, dv = _ops.lif_backward_dense.default(
            grad_spikes, grad_v_final, x, weight, sg, rst_bits, ctx.alpha, need_dx, need_dw,
            need_db, need_dv)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dv if need_dv else None) + (None,) * (n_inputs - 4)


torch.library.register_autograd("sparsegrad::lif_forward", _lif_backward,
                                setup_context=_lif_setup_context)


def _readout_setup_context(ctx, inputs, output):
    x, weight, bias, x_act_cnt, x_act_idx, alpha, reduce = inputs
    out, argmax_t, ev_cnt, ev_idx, ev_val = output
    ctx.alpha = alpha
    ctx.reduce = reduce
    ctx.num_steps = x.shape[0]
    ctx.has_bias = bias is not None
    ctx.has_prev = x_act_cnt is not None
    ctx.mark_non_differentiable(argmax_t, ev_cnt, ev_idx, ev_val)
    ctx.set_materialize_grads(False)
    n_in = weight.shape[1]
    saved = [weight, argmax_t, _saved_index(ev_cnt, n_in), _saved_index(ev_idx, n_in), ev_val]
    if ctx.has_prev:
        saved += [_saved_index(x_act_cnt, n_in), _saved_index(x_act_idx, n_in)]
    ctx.save_for_backward(*saved)


def _readout_backward(ctx, grad_out, *unused):
    if grad_out is None:
        return (None,) * 7
    weight, argmax_t, ev_cnt, ev_idx, ev_val, *prev = ctx.saved_tensors
    prev_cnt, prev_idx = prev if prev else (None, None)
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _ops.li_readout_backward.default(
        grad_out, argmax_t, weight, _widen(ev_cnt), _widen(ev_idx), ev_val, _widen(prev_cnt),
        _widen(prev_idx), ctx.num_steps, ctx.alpha, ctx.reduce, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None)


torch.library.register_autograd("sparsegrad::li_readout_forward", _readout_backward,
                                setup_context=_readout_setup_context)


_NEURON_INPUTS = 15


def _lif_neuron_setup_context(ctx, inputs, output):
    current, v_init, s_init, alpha, threshold, b_th, slope, sparse = inputs[:8]
    reset = inputs[9] if len(inputs) > 9 else "subtract"
    dynamics = inputs[11] if len(inputs) > 11 else "leaky"
    tau = inputs[12] if len(inputs) > 12 else 2.0
    detach_reset = inputs[14] if len(inputs) > 14 else True
    # From the arguments, not from the outputs' sizes (which are data-dependent under tracing).
    ctx.has_rg = dynamics != "leaky" and not detach_reset
    ctx.has_rst = reset == "zero"
    spikes, v_final, act_cnt, act_idx, act_sg, act_rg, rst_bits, mem, stats = output
    ctx.alpha = alpha
    ctx.sparse = sparse
    ctx.dynamics = dynamics
    ctx.input_scale = 1.0 / tau if dynamics == "sj_lif_decay_input" else 1.0
    ctx.has_v_init = v_init is not None
    ctx.spikes_shape = spikes.shape
    ctx.mark_non_differentiable(act_cnt, act_idx, act_sg, act_rg, rst_bits, stats)
    ctx.set_materialize_grads(False)
    # Sparse mode keeps the active set (and, for reset="zero", one bit per entry): no dense
    # float [T, B, N] tensor. Dense mode keeps the surrogate everywhere, as dense BPTT does.
    ctx.save_for_backward(act_cnt, act_idx, act_sg, act_rg, rst_bits)


def _lif_neuron_backward(ctx, grad_spikes, grad_v_final, *rest):
    grad_mem = rest[5]  # after act_cnt, act_idx, act_sg, act_rg, rst_bits
    if grad_mem is not None and grad_mem.numel() == 0:  # return_mem=False: mem is an empty [0]
        grad_mem = None
    if grad_spikes is None and grad_v_final is None and grad_mem is None:
        return (None,) * _NEURON_INPUTS
    act_cnt, act_idx, act_sg, act_rg, rst_bits = ctx.saved_tensors
    if grad_spikes is None:
        like = grad_v_final if grad_v_final is not None else grad_mem
        grad_spikes = like.new_zeros(ctx.spikes_shape)
    need_dv = ctx.has_v_init and ctx.needs_input_grad[1]
    grad_current, dv = _ops.lif_neuron_backward.default(
        grad_spikes, grad_v_final, grad_mem, act_cnt, act_idx, act_sg,
        act_rg if ctx.has_rg else None, rst_bits if ctx.has_rst else None,
        ctx.alpha, ctx.sparse, need_dv, ctx.dynamics, ctx.input_scale)
    return ((grad_current if ctx.needs_input_grad[0] else None), (dv if need_dv else None)) + \
        (None,) * (_NEURON_INPUTS - 2)


torch.library.register_autograd("sparsegrad::lif_neuron_forward", _lif_neuron_backward,
                                setup_context=_lif_neuron_setup_context)


_PARAM_NEURON_INPUTS = 16


def _lif_neuron_param_setup_context(ctx, inputs, output):
    (current, v_init, s_init, syn_init, alpha, threshold, alpha_syn, b_th, slope, sparse,
     surrogate, reset, return_mem, need_dalpha, need_dthreshold, need_dalpha_syn) = inputs
    (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
     rst_bits, mem, stats) = output
    ctx.sparse = sparse
    ctx.dense_traces = (not sparse) or return_mem
    ctx.has_rst = reset == "zero"
    ctx.has_syn = alpha_syn is not None
    ctx.has_v_init = v_init is not None
    ctx.has_syn_init = syn_init is not None
    ctx.traced = (need_dalpha, need_dthreshold, need_dalpha_syn and alpha_syn is not None)
    ctx.spikes_shape = spikes.shape
    ctx.mark_non_differentiable(act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, rst_bits,
                                stats)
    ctx.set_materialize_grads(False)
    # Sparse mode: the active set with its surrogate and the traces P, Q, U there (plus their
    # last values [B, N]); no dense float [T, B, N] tensor unless return_mem (the membrane
    # returned is dense anyway) or the dense backward.
    ctx.save_for_backward(act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, rst_bits, alpha,
                          alpha_syn if alpha_syn is not None else alpha.new_empty(0))


def _lif_neuron_param_backward(ctx, grad_spikes, grad_v_final, grad_syn_final, *rest):
    grad_mem = rest[8]  # after act_cnt .. rst_bits
    if grad_mem is not None and grad_mem.numel() == 0:
        grad_mem = None
    if not ctx.has_syn:
        grad_syn_final = None
    if grad_spikes is None and grad_v_final is None and grad_mem is None and grad_syn_final is None:
        return (None,) * _PARAM_NEURON_INPUTS
    (act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, rst_bits, alpha,
     alpha_syn) = ctx.saved_tensors
    if grad_spikes is None:
        like = next(g for g in (grad_v_final, grad_mem, grad_syn_final) if g is not None)
        grad_spikes = like.new_zeros(ctx.spikes_shape)
    need = ctx.needs_input_grad
    need_dv = ctx.has_v_init and need[1]
    need_dsyn = ctx.has_syn_init and need[3]
    need_da, need_dth, need_das = (ctx.traced[0] and need[4], ctx.traced[1] and need[5],
                                   ctx.traced[2] and need[6])
    gc, dv, dsyn, da, dth, das = _ops.lif_neuron_param_backward.default(
        grad_spikes, grad_v_final, grad_syn_final, grad_mem, act_cnt, act_idx, act_sg, act_p,
        act_q, act_u, tan_last, rst_bits if ctx.has_rst else None, alpha,
        alpha_syn if ctx.has_syn else None, ctx.sparse, ctx.dense_traces, need_dv, need_dsyn,
        need_da, need_dth, need_das)
    # the kernel returns one row per batch element (no reduction across its tasks)
    return ((gc if need[0] else None), (dv if need_dv else None), None,
            (dsyn if need_dsyn else None), (da.sum(0) if need_da else None),
            (dth.sum(0) if need_dth else None), (das.sum(0) if need_das else None)) + \
        (None,) * (_PARAM_NEURON_INPUTS - 7)


torch.library.register_autograd("sparsegrad::lif_neuron_param_forward", _lif_neuron_param_backward,
                                setup_context=_lif_neuron_param_setup_context)


def _rlif_setup_context(ctx, inputs, output):
    (x, weight, rec_weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha, threshold, b_th,
     slope, sparse, *kinds) = inputs
    (spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, stats) = output
    ctx.alpha = alpha
    ctx.reset = kinds[1] if len(kinds) > 1 else "subtract"
    ctx.sparse = sparse
    ctx.has_bias = bias is not None
    ctx.has_v_init = v_init is not None
    ctx.has_s_init = s_init is not None
    ctx.has_prev = x_act_cnt is not None
    ctx.spikes_shape = spikes.shape
    ctx.mark_non_differentiable(act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, stats)
    ctx.set_materialize_grads(False)
    # s_init is [B, N]: the initial spikes feed step 0 through R (and reset it).
    state = [s_init] if s_init is not None else []
    if sparse:
        # Compact data only: no dense [T, B, N] float tensor is kept for the backward.
        saved = [weight, rec_weight, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits]
        if ctx.has_prev:
            saved += [x_act_cnt, x_act_idx]
    else:
        saved = [weight, rec_weight, x, spikes, act_sg]
    ctx.save_for_backward(*(saved + state))


def _rlif_backward(ctx, grad_spikes, grad_v_final, *unused):
    n_inputs = 15
    if grad_spikes is None and grad_v_final is None:
        return (None,) * n_inputs
    if grad_spikes is None:
        grad_spikes = grad_v_final.new_zeros(ctx.spikes_shape)
    need = ctx.needs_input_grad
    need_dx, need_dw, need_drec = need[0], need[1], need[2]
    need_db = ctx.has_bias and need[3]
    need_dv = ctx.has_v_init and need[4]
    need_ds = ctx.has_s_init and need[5]
    saved = list(ctx.saved_tensors)
    s_init = saved.pop() if ctx.has_s_init else None
    if ctx.sparse:
        weight, rec_weight, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, *prev = saved
        prev_cnt, prev_idx = prev if prev else (None, None)
        grads = _ops.rlif_backward_sparse.default(
            grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg,
            ev_cnt, ev_idx, ev_val, spk_bits, _widen(prev_cnt), _widen(prev_idx), ctx.alpha,
            ctx.reset, need_dx,
            need_dw, need_drec, need_db, need_dv, need_ds)
    else:
        weight, rec_weight, x, spikes, sg = saved
        grads = _ops.rlif_backward_dense.default(
            grad_spikes, grad_v_final, x, weight, rec_weight, s_init, spikes, sg, ctx.alpha,
            ctx.reset, need_dx, need_dw, need_drec, need_db, need_dv, need_ds)
    flags = (need_dx, need_dw, need_drec, need_db, need_dv, need_ds)
    return tuple(g if f else None for g, f in zip(grads, flags)) + (None,) * (n_inputs - 6)


torch.library.register_autograd("sparsegrad::rlif_forward", _rlif_backward,
                                setup_context=_rlif_setup_context)


_RLIF_PARAM_INPUTS = 18


def _rlif_param_setup_context(ctx, inputs, output):
    (x, weight, rec_weight, bias, v_init, s_init, syn_init, x_act_cnt, x_act_idx, alpha,
     threshold, alpha_syn, b_th, slope, sparse, surrogate, reset, need_dparams) = inputs
    (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, ev_cnt,
     ev_idx, ev_val, spk_bits, stats) = output
    ctx.reset = reset
    ctx.sparse = sparse
    ctx.need_dparams = need_dparams
    ctx.has_bias = bias is not None
    ctx.has_v_init = v_init is not None
    ctx.has_s_init = s_init is not None
    ctx.has_syn = alpha_syn is not None
    ctx.has_syn_init = syn_init is not None
    ctx.has_prev = x_act_cnt is not None
    ctx.spikes_shape = spikes.shape
    ctx.mark_non_differentiable(act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, ev_cnt,
                                ev_idx, ev_val, spk_bits, stats)
    ctx.set_materialize_grads(False)
    # Sparse mode: the active set with its surrogate and (learnable parameters) the traces P, Q,
    # U there, the input events and the spike bits; no dense [T, B, N] float tensor.
    params = [alpha, alpha_syn if alpha_syn is not None else alpha.new_empty(0)]
    traces = [act_p, act_q, act_u, tan_last]
    state = [s_init] if s_init is not None else []
    if sparse:
        saved = [weight, rec_weight, act_cnt, act_idx, act_sg, *traces, ev_cnt, ev_idx, ev_val,
                 spk_bits, *params]
        if ctx.has_prev:
            saved += [x_act_cnt, x_act_idx]
    else:
        saved = [weight, rec_weight, x, spikes, act_sg, *traces, *params]
    ctx.save_for_backward(*(saved + state))


def _rlif_param_backward(ctx, grad_spikes, grad_v_final, grad_syn_final, *unused):
    if not ctx.has_syn:
        grad_syn_final = None
    if grad_spikes is None and grad_v_final is None and grad_syn_final is None:
        return (None,) * _RLIF_PARAM_INPUTS
    if grad_spikes is None:
        like = grad_v_final if grad_v_final is not None else grad_syn_final
        grad_spikes = like.new_zeros(ctx.spikes_shape)
    need = ctx.needs_input_grad
    flags = (need[0], need[1], need[2], ctx.has_bias and need[3], ctx.has_v_init and need[4],
             ctx.has_s_init and need[5])
    need_dsyn = ctx.has_syn_init and need[6]
    need_da, need_dth = ctx.need_dparams and need[9], ctx.need_dparams and need[10]
    need_das = ctx.need_dparams and ctx.has_syn and need[11]
    need_dparams = need_da or need_dth or need_das
    saved = list(ctx.saved_tensors)
    s_init = saved.pop() if ctx.has_s_init else None
    if ctx.sparse:
        (weight, rec_weight, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last, ev_cnt,
         ev_idx, ev_val, spk_bits, alpha, alpha_syn, *prev) = saved
        prev_cnt, prev_idx = prev if prev else (None, None)
        grads = _ops.rlif_param_backward_sparse.default(
            grad_spikes, grad_v_final, grad_syn_final, weight, rec_weight, s_init, act_cnt,
            act_idx, act_sg, act_p, act_q, act_u, tan_last, ev_cnt, ev_idx, ev_val, spk_bits,
            _widen(prev_cnt), _widen(prev_idx), alpha, alpha_syn if ctx.has_syn else None, ctx.reset, *flags,
            need_dsyn, need_dparams)
    else:
        (weight, rec_weight, x, spikes, sg, act_p, act_q, act_u, tan_last, alpha,
         alpha_syn) = saved
        grads = _ops.rlif_param_backward_dense.default(
            grad_spikes, grad_v_final, grad_syn_final, x, weight, rec_weight, s_init, spikes, sg,
            act_p, act_q, act_u, tan_last, alpha, alpha_syn if ctx.has_syn else None, ctx.reset,
            *flags, need_dsyn, need_dparams)
    dx, dw, drec, db, dv, ds, dsyn, da, dth, das = grads
    out = tuple(g if f else None for g, f in zip((dx, dw, drec, db, dv, ds), flags))
    # the kernels return the parameter gradients per batch element (no reduction across tasks)
    out += (dsyn if need_dsyn else None, None, None, da.sum(0) if need_da else None,
            dth.sum(0) if need_dth else None, das.sum(0) if need_das else None)
    return out + (None,) * (_RLIF_PARAM_INPUTS - len(out))


torch.library.register_autograd("sparsegrad::rlif_param_forward", _rlif_param_backward,
                                setup_context=_rlif_param_setup_context)


# --------------------------------------------------------------------------------------------
# Direct entry points (no validation beyond the C++ checks; see sparsegrad.functional)
# --------------------------------------------------------------------------------------------
def lif_forward(x, weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha: float,
                threshold: float, b_th: float, slope: float, sparse: bool,
                surrogate: str = "fast_sigmoid", reset: str = "subtract"):
    return _ops.lif_forward.default(x, weight, bias, v_init, s_init, x_act_cnt, x_act_idx,
                                    float(alpha), float(threshold), float(b_th), float(slope),
                                    bool(sparse), surrogate, reset)


def li_readout_forward(x, weight, bias, x_act_cnt, x_act_idx, alpha: float, reduce: str):
    return _ops.li_readout_forward.default(x, weight, bias, x_act_cnt, x_act_idx, float(alpha),
                                           reduce)

def rlif_forward(x, weight, rec_weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha: float,
                 threshold: float, b_th: float, slope: float, sparse: bool,
                 surrogate: str = "fast_sigmoid", reset: str = "subtract"):
    return _ops.rlif_forward.default(x, weight, rec_weight, bias, v_init, s_init, x_act_cnt,
                                     x_act_idx, float(alpha), float(threshold), float(b_th),
                                     float(slope), bool(sparse), surrogate, reset)



def rlif_param_forward(x, weight, rec_weight, bias, v_init, s_init, syn_init, x_act_cnt,
                       x_act_idx, alpha, threshold, alpha_syn, b_th: float, slope: float,
                       sparse: bool, surrogate: str = "fast_sigmoid", reset: str = "subtract",
                       need_dparams: bool = False):
    """The recurrent layer with per-neuron alpha, threshold ([N] tensors) and optional alpha_syn
    (CPU and CUDA kernels)."""
    return _ops.rlif_param_forward.default(
        x, weight, rec_weight, bias, v_init, s_init, syn_init, x_act_cnt, x_act_idx, alpha,
        threshold, alpha_syn, float(b_th), float(slope), bool(sparse), surrogate, reset,
        bool(need_dparams))


def lif_neuron_forward(current, v_init, s_init, alpha: float, threshold: float, b_th: float,
                       slope: float, sparse: bool, surrogate: str = "fast_sigmoid",
                       reset: str = "subtract", return_mem: bool = False, dynamics: str = "leaky",
                       tau: float = 2.0, v_reset: float = 0.0, detach_reset: bool = True):
    return _ops.lif_neuron_forward.default(current, v_init, s_init, float(alpha), float(threshold),
                                           float(b_th), float(slope), bool(sparse), surrogate,
                                           reset, bool(return_mem), dynamics, float(tau),
                                           float(v_reset), bool(detach_reset))


def lif_neuron_param_forward(current, v_init, s_init, syn_init, alpha, threshold, alpha_syn,
                             b_th: float, slope: float, sparse: bool, surrogate: str = "fast_sigmoid",
                             reset: str = "subtract", return_mem: bool = False,
                             need_dalpha: bool = False, need_dthreshold: bool = False,
                             need_dalpha_syn: bool = False):
    """The neuron op with per-neuron alpha, threshold ([N] tensors) and optional alpha_syn."""
    return _ops.lif_neuron_param_forward.default(
        current, v_init, s_init, syn_init, alpha, threshold, alpha_syn, float(b_th), float(slope),
        bool(sparse), surrogate, reset, bool(return_mem), bool(need_dalpha), bool(need_dthreshold),
        bool(need_dalpha_syn))


def lif_param_forward(x, weight, bias, v_init, s_init, syn_init, alpha, threshold, alpha_syn,
                      b_th: float, slope: float, sparse: bool, surrogate: str = "fast_sigmoid",
                      reset: str = "subtract", return_mem: bool = False,
                      need_dalpha: bool = False, need_dthreshold: bool = False,
                      need_dalpha_syn: bool = False):
    """Linear + the tensor-parameter neuron, fused (CPU): lif_neuron_param_forward's outputs
    for the current x W^T + b (never stored), then x's events (ev_cnt, ev_idx, ev_val)."""
    return _ops.lif_param_forward.default(
        x, weight, bias, v_init, s_init, syn_init, alpha, threshold, alpha_syn, float(b_th),
        float(slope), bool(sparse), surrogate, reset, bool(return_mem), bool(need_dalpha),
        bool(need_dthreshold), bool(need_dalpha_syn))


def registered_kernels(dispatch_key: str = "CPU") -> dict:
    """Which sparsegrad ops have a kernel for `dispatch_key` ("CPU", "CUDA")."""
    names = ["lif_forward", "lif_backward_sparse", "lif_backward_dense", "li_readout_forward",
             "li_readout_backward", "lif_neuron_forward", "lif_neuron_backward", "lif_neuron_param_forward",
             "lif_neuron_param_backward", "rlif_forward",
             "rlif_backward_sparse", "rlif_backward_dense"]
    return {n: torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsegrad::{n}", dispatch_key)
            for n in names}



# --------------------------------------------------------------------------------------------
# Convolutions of spike sequences (issue 20; csrc/cpu/conv_cpu.cpp, csrc/cuda/conv.cuh): shapes
# only, for tracing. Autograd is sparsegrad/conv.py's _ConvPool.
# --------------------------------------------------------------------------------------------
def _conv_out_hw(in_shape, weight, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (in_shape[1] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (in_shape[2] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


@torch.library.register_fake("sparsegrad::spike_pack")
def _spike_pack_fake(x):
    n, m = x.shape
    return x.new_empty((n, (m + 31) // 32), dtype=torch.int32), x.new_empty((2,), dtype=torch.int64)


def _pooled_fake(like, n, c, ho, wo, pool, k):
    hp, wp = (ho, wo) if pool == "none" else (ho // k, wo // k)
    out = like.new_empty((n, c, hp, wp))
    idx = like.new_empty((n, c, hp, wp) if pool == "max" else (0,), dtype=torch.uint8)
    return out, idx


@torch.library.register_fake("sparsegrad::spike_conv2d_forward")
def _spike_conv2d_forward_fake(bits, weight, bias, in_shape, stride, padding, dilation, groups,
                               pool, pool_k):
    ho, wo = _conv_out_hw(in_shape, weight, stride, padding, dilation)
    return _pooled_fake(weight, bits.shape[0], weight.shape[0], ho, wo, pool, pool_k)


@torch.library.register_fake("sparsegrad::conv_pool2d")
def _conv_pool2d_fake(y, pool, pool_k):
    return _pooled_fake(y, y.shape[0], y.shape[1], y.shape[2], y.shape[3], pool, pool_k)


@torch.library.register_fake("sparsegrad::spike_conv2d_backward")
def _spike_conv2d_backward_fake(grad_out, pool_idx, bits, weight, in_shape, stride, padding,
                                dilation, groups, pool, pool_k, prev_cnt, prev_idx, num_steps,
                                need_dx, need_dw, need_db, need_grad_conv):
    n = grad_out.shape[0]
    ho, wo = _conv_out_hw(in_shape, weight, stride, padding, dilation)
    empty = weight.new_empty((0,))
    return (weight.new_empty((n, *in_shape)) if need_dx else empty,
            weight.new_empty(weight.shape) if need_dw else empty,
            weight.new_empty((weight.shape[0],)) if need_db else empty,
            weight.new_empty((n, weight.shape[0], ho, wo)) if need_grad_conv else empty)


#: The recurrent layer with tensor parameters (issue 18): CPU kernels (csrc/cpu/rlif_cpu.cpp)
#: and CUDA kernels (csrc/cuda/recurrent.cuh, recurrent_host.h).
RLIF_PARAM_OPS = ("rlif_param_forward", "rlif_param_backward_sparse", "rlif_param_backward_dense")

#: Ops with a CPU kernel and no CUDA kernel (tests/test_cuda_registration.py and
#: scripts/gpu_sanitize.py exempt exactly these): the fused tensor-parameter layer forward and
#: backward (on CUDA the tensor-parameter lif_layer runs li_readout_forward and
#: lif_neuron_param_forward, then lif_neuron_param_backward and li_readout_backward, in their
#: place). The convolution ops have CUDA kernels (issue 20, csrc/cuda/conv.cuh).
CPU_ONLY_OPS: tuple = ("lif_param_forward", "lif_param_backward")


@torch.library.register_fake("sparsegrad::conv_unpool2d")
def _conv_unpool2d_fake(grad, pool_idx, pool, pool_k, h, w):
    return grad.new_empty((grad.shape[0], grad.shape[1], h, w))
