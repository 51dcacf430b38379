"""Functional API: lif_layer and li_readout, with argument checking a user can act on."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from . import ops

__all__ = ["lif_layer", "li_readout", "LIFState", "LIFStats", "lif_layer_with_stats", "lif",
           "lif_with_stats", "SURROGATES", "RESETS", "rlif_layer", "rlif_layer_with_stats",
           "surrogate_mass_kept", "auto_b_th", "AUTO_B_TH_SHARE"]

# float16 / bfloat16 run with float32 state and sums, results in the input dtype (csrc/low_precision.h)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Surrogate derivatives dS/dV and resets (csrc/lif_math.h; docs/surrogates.md names the peers' ones).
SURROGATES = ("fast_sigmoid", "atan", "sigmoid", "triangle")
RESETS = ("subtract", "zero", "none")
# Attribute under which a sparse layer's output spikes carry its active set (per-row counts and
# indices over rows b*T + t).
_ACTIVE_SET_ATTR = "_sparsegrad_active_set"


class LIFState(tuple):
    """Membrane potential, last spikes and (with a synaptic current) the synaptic current, each
    [B, N_out] (or [B, *] for sparsegrad.lif).

    ``LIFState(v, s)`` or ``LIFState(v, s, syn)``; fields ``v``, ``s``, ``syn`` (None without a
    synaptic current). It unpacks as ``v, s = state`` when ``syn`` is None and as
    ``v, s, syn = state`` otherwise, so code written for the two-field state keeps working.
    """

    __slots__ = ()

    def __new__(cls, v, s, syn=None):
        return tuple.__new__(cls, (v, s) if syn is None else (v, s, syn))

    def __getnewargs__(self):
        return tuple(self)

    @property
    def v(self) -> torch.Tensor:
        return self[0]

    @property
    def s(self) -> torch.Tensor:
        return self[1]

    @property
    def syn(self) -> Optional[torch.Tensor]:
        return self[2] if len(self) > 2 else None

    def __repr__(self):
        return f"LIFState(v={self.v!r}, s={self.s!r}, syn={self.syn!r})"


class LIFStats(NamedTuple):
    """Per-call statistics from the forward kernel (int64 scalar tensors; no host sync made)."""

    spike_count: torch.Tensor
    active_count: torch.Tensor
    input_nonzeros: torch.Tensor
    numel: int  # T * B * N_out

    @property
    def active_fraction(self) -> float:
        return float(self.active_count) / max(self.numel, 1)

    @property
    def spike_rate(self) -> float:
        return float(self.spike_count) / max(self.numel, 1)


def _check_tensor(name, t, rank, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of x ({dtype}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put them on one device")


def _check_scalar(name, value, low, high, low_open, allow_inf=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {value}")
    return value


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast gives matrix products on this device type, or None when it is off."""
    try:  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # older spelling of the same query
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def autocast_inputs(x, *tensors):
    """Under torch.autocast, a layer with a matrix product runs in autocast's dtype, as nn.Linear
    does: x and the other floating tensors (weights, bias, state) are cast to it (differentiably;
    gradients reach float32 parameters in float32). Outside autocast they come back unchanged."""
    if not isinstance(x, torch.Tensor):
        return (x,) + tensors
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return (x,) + tensors

    def cast(t):
        if isinstance(t, (tuple, list)):
            return type(t)(cast(u) for u in t)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    return tuple(cast(t) for t in (x,) + tensors)


def _check_linear(x, weight, bias, what="x"):
    _check_tensor(what, x, 3)
    if x.shape[0] == 0:
        raise ValueError(f"{what} must have at least one time step, got shape {tuple(x.shape)}")
    _check_tensor("weight", weight, 2, x.dtype, x.device)
    if weight.shape[1] != x.shape[2]:
        raise ValueError(
            f"weight must be [N_out, N_in] with N_in = {what}.shape[2] = {x.shape[2]}, "
            f"got weight of shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# b_th="auto" keeps this share of the surrogate's mass inside |V - theta| < b_th (docs/surrogates.md)
AUTO_B_TH_SHARE = 0.95


def surrogate_mass_kept(surrogate: str, slope: float, b_th: float) -> float:
    """Share of the surrogate's mass (its integral over u = V - theta) where |u| < b_th."""
    _check_choice("surrogate", surrogate, SURROGATES)
    k, b = float(slope), float(b_th)
    if math.isinf(b):
        return 1.0
    if surrogate == "fast_sigmoid":          # 1/(k|u|+1)^2, mass 2/k
        return k * b / (k * b + 1.0)
    if surrogate == "atan":                  # (k/2)/(1+(pi k u/2)^2), mass 1
        return 2.0 / math.pi * math.atan(math.pi * k * b / 2.0)
    if surrogate == "sigmoid":               # k s(ku)(1-s(ku)), mass 1
        return math.tanh(k * b / 2.0)
    return 1.0 - max(0.0, 1.0 - k * b) ** 2  # triangle k max(0, 1-k|u|), mass 1


def auto_b_th(surrogate: str, slope: float, share: float = AUTO_B_TH_SHARE) -> float:
    """The smallest b_th keeping `share` of the surrogate's mass (the inverse of the above)."""
    _check_choice("surrogate", surrogate, SURROGATES)
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    k = _check_scalar("slope", slope, 0.0, math.inf, low_open=True)
    if surrogate == "fast_sigmoid":
        return share / ((1.0 - share) * k)
    if surrogate == "atan":
        return 2.0 / (math.pi * k) * math.tan(math.pi / 2.0 * share)
    if surrogate == "sigmoid":
        return 2.0 / k * math.atanh(share)
    return (1.0 - math.sqrt(1.0 - share)) / k


def check_lif_args(alpha, threshold, b_th, slope, backward, surrogate="fast_sigmoid",
                   reset="subtract"):
    """Validate LIF hyper-parameters; returns (alpha, threshold, b_th, slope) as floats."""
    if backward not in ("sparse", "dense"):
        raise ValueError(f"backward must be 'sparse' or 'dense', got {backward!r}")
    _check_choice("surrogate", surrogate, SURROGATES)
    _check_choice("reset", reset, RESETS)
    alpha = _check_scalar("alpha", alpha, 0.0, 1.0, low_open=False)
    threshold = _check_scalar("threshold", threshold, 0.0, math.inf, low_open=True)
    b_th = _check_scalar("b_th", b_th, 0.0, math.inf, low_open=True, allow_inf=True)
    slope = _check_scalar("slope", slope, 0.0, math.inf, low_open=True)
    return alpha, threshold, b_th, slope


def check_state(state, x, B, n, reset, what="N_out"):
    """Validate state=(V, S), each [B, n] like x; returns (v, s) or (None, None).

    Under reset="zero" the backward reads S as spikes, so S must hold only 0 and 1 there.
    """
    if state is None:
        return None, None
    if isinstance(state, (tuple, list)) and len(state) == 3 and state[2] is None:
        state = state[:2]  # a LIFState(v, s, syn=None) given as a plain triple
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"state must be a (v, s) pair of [B, {what}] tensors or None (this layer "
                        f"has no synaptic current, so no syn)")
    v_init, s_init = state
    for name, t in (("state.v", v_init), ("state.s", s_init)):
        _check_tensor(name, t, 2, x.dtype, x.device)
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name} must have shape [{B}, {n}], got {tuple(t.shape)}")
    if reset == "zero" and not bool(((s_init == 0) | (s_init == 1)).all()):
        raise ValueError("state.s must hold only spikes (0 or 1) with reset='zero'")
    return v_init, s_init


def producer_active_set(x: torch.Tensor, time_major: bool = True):
    """The active set attached to x by the sparse layer that produced it, or (None, None).

    Only an exact output of a sparse layer carries it: any op applied to the spikes makes a new
    tensor without it, and the backward then computes dx everywhere (always correct).
    """
    if torch.compiler.is_compiling():
        return None, None
    meta = getattr(x, _ACTIVE_SET_ATTR, None)
    if meta is None:
        return None, None
    cnt, idx, shape, meta_time_major = meta
    if meta_time_major != time_major or tuple(x.shape) != shape:
        return None, None
    return cnt, idx


def attach_active_set(spikes: torch.Tensor, cnt, idx, time_major: bool = True):
    if not torch.compiler.is_compiling():
        setattr(spikes, _ACTIVE_SET_ATTR, (cnt, idx, tuple(spikes.shape), time_major))


class _LinearParamLIF(torch.autograd.Function):
    """Linear + LIF with tensor (per-neuron, learnable) alpha / threshold or a synaptic current:
    the current x W^T + b by x's events, then the tensor-parameter neuron.

    On the CPU one op (lif_param_forward) scans x into its events once and sums each row's
    current from them inside the neuron's walk, so no [T, B, N] current is stored; on CUDA
    (no fused kernel yet) the current is li_readout_forward's with alpha = 0 and reduce
    "none" (U[t] = I[t]), then lif_neuron_param_forward runs on it. Either way the events
    (the CSR the fused layer saves) are what the backward keeps of x. Also saved: the neuron op's active set
    with its surrogate and traces (sparse mode), the weight and the parameters, and the
    producer's active set when x came from a sparse sparsegrad layer: no dense [T, B, N] float
    tensor in sparse mode. The backward's G_I = dL/dI goes from the neuron's reverse walk to
    the tiled events walk of li_readout_backward (alpha = 0: the walk's trace is G_I itself):
    dW by x's events (nnz(x) * N_out), db, and dx only at the producer's active set
    (|A_prev| * N_out). On the CPU one op does both (lif_param_backward), so G_I is never
    stored, with the two ops' bits; CUDA, and dx wanted without a producer (dx = G_I W, one
    matrix product, needs G_I whole), run lif_neuron_param_backward and then the readout op."""

    @staticmethod
    def forward(ctx, x, weight, bias, v_init, s_init, syn_init, a_row, th_row, as_row, b_th,
                slope, sparse, surrogate, reset, need, return_mem=False, x_cnt=None, x_idx=None):
        T, B, n_in = x.shape
        n_out = weight.shape[0]
        if x.device.type == "cpu":  # fused: the current is summed per row, never stored
            (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
             rst_bits, mem, stats, ev_cnt, ev_idx, ev_val) = ops.lif_param_forward(
                x, weight, bias, v_init, s_init, syn_init, a_row, th_row, as_row, b_th, slope,
                sparse, surrogate, reset, return_mem, *need)
        else:  # (no fused CUDA kernel yet: ops.CPU_ONLY_OPS) the current, then the neuron
            current, _argmax, ev_cnt, ev_idx, ev_val = ops._ops.li_readout_forward.default(
                x, weight, bias, None, None, 0.0, "none")
            (spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_p, act_q, act_u, tan_last,
             rst_bits, mem, stats) = ops.lif_neuron_param_forward(
                current, v_init, s_init, syn_init, a_row, th_row, as_row, b_th, slope, sparse,
                surrogate, reset, return_mem, *need)
            del current
        # sparse: the active set and its traces; dense: the surrogate and traces everywhere.
        # Indices are kept as narrow as their bound allows (ops._saved_index); the spikes carry
        # the same saved set to the next layer (ops.SAVED_SET_ATTR), one allocation for both.
        act_set = (ops._saved_index(act_cnt, n_out), ops._saved_index(act_idx, n_out))
        has_prev = x_cnt is not None
        prev = ([ops._saved_index(x_cnt, n_in), ops._saved_index(x_idx, n_in)] if has_prev
                else [])
        ctx.save_for_backward(weight, ops._saved_index(ev_cnt, n_in),
                              ops._saved_index(ev_idx, n_in), ev_val, tan_last, rst_bits, a_row,
                              as_row if as_row is not None else a_row.new_empty(0), *act_set,
                              act_sg, act_p, act_q, act_u, *prev)
        if sparse and not torch.compiler.is_compiling():
            setattr(spikes, ops.SAVED_SET_ATTR, act_set)
        ctx.cfg = (T, B, n_in, sparse, reset == "zero", as_row is not None, bias is not None,
                   v_init is not None, syn_init is not None, has_prev, tuple(need), return_mem)
        # the events are returned too (unused by the callers): under torch.compile their
        # data-dependent sizes must reach the traced region's outputs
        ctx.mark_non_differentiable(act_cnt, act_idx, stats, ev_idx, ev_val)
        ctx.set_materialize_grads(False)
        return spikes, v_final, syn_final, mem, act_cnt, act_idx, stats, ev_idx, ev_val

    @staticmethod
    def backward(ctx, g_spikes, g_v, g_syn, g_mem, *_):
        (T, B, n_in, sparse, has_rst, has_syn, has_bias, has_v, has_syn0, has_prev, traced,
         return_mem) = ctx.cfg
        (weight, ev_cnt, ev_idx, ev_val, tan_last, rst_bits, a_row, as_row, act_cnt, act_idx,
         act_sg, act_p, act_q, act_u, *prev) = ctx.saved_tensors
        n_out = weight.shape[0]
        none = (None,) * 18
        if not has_syn:
            g_syn = None
        if not return_mem:
            g_mem = None
        if g_spikes is None and g_v is None and g_syn is None and g_mem is None:
            return none
        if g_spikes is None:
            g_spikes = weight.new_zeros(T, B, n_out)
        need = ctx.needs_input_grad
        need_dv, need_dsyn = has_v and need[3], has_syn0 and need[5]
        n_da, n_dth, n_das = traced[0] and need[6], traced[1] and need[7], traced[2] and need[8]
        need_dx, need_dw, need_db = need[0], need[1], has_bias and need[2]
        rst = rst_bits if has_rst else None
        asyn = as_row if has_syn else None
        prev_cnt, prev_idx = (ops._widen(t) for t in prev) if has_prev else (None, None)
        neuron_args = (g_spikes, g_v, g_syn, g_mem, ops._widen(act_cnt), ops._widen(act_idx),
                       act_sg, act_p, act_q, act_u, tan_last, rst, a_row, asyn)
        events = (ops._widen(ev_cnt), ops._widen(ev_idx), ev_val)
        if weight.device.type == "cpu" and (has_prev or not need_dx):
            # fused (lif_param_backward): dL/dI goes from the neuron's walk to the tiled walk
            # row by row, never stored; the same bits as the two ops below
            dx, dw, db, dv, dsyn, da, dth, das = ops._ops.lif_param_backward.default(
                *neuron_args, weight, *events, prev_cnt, prev_idx, sparse,
                not sparse or return_mem, need_dx, need_dw, need_db, need_dv, need_dsyn, n_da,
                n_dth, n_das)
        else:  # CUDA, or dx wanted everywhere (no producer: gc @ W needs gc whole)
            gc, dv, dsyn, da, dth, das = ops._ops.lif_neuron_param_backward.default(
                *neuron_args, sparse, not sparse or return_mem, need_dv, need_dsyn, n_da, n_dth,
                n_das)
            dx = dw = db = None
            dx_walk = need_dx and has_prev
            if T == 0:
                dx = gc.new_zeros(0, B, n_in) if need_dx else None
                dw = weight.new_zeros(weight.shape) if need_dw else None
                db = weight.new_zeros(n_out) if need_db else None
            elif need_dw or need_db or dx_walk:
                # alpha = 0: the readout's reverse walk has G_I itself as its trace
                dx, dw, db = ops._ops.li_readout_backward.default(
                    gc, ev_cnt.new_empty(0, dtype=torch.long), weight, *events, prev_cnt,
                    prev_idx, T, 0.0, "none", dx_walk, need_dw, need_db)
            if need_dx and not dx_walk and T > 0:  # no producer: dx read everywhere
                dx = (gc.reshape(T * B, n_out) @ weight).reshape(T, B, n_in)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                dv if need_dv else None, None, dsyn if need_dsyn else None,
                da.sum(0) if n_da else None, dth.sum(0) if n_dth else None,
                das.sum(0) if n_das else None) + (None,) * 9


def _layer_params(alpha, threshold, alpha_syn, x, n_out):
    """Checked layer parameters (float, or a tensor of shape [] or [N_out])."""
    out = []
    for name, value, low, high, low_open in (("alpha", alpha, 0.0, 1.0, False),
                                             ("threshold", threshold, 0.0, math.inf, True),
                                             ("alpha_syn", alpha_syn, 0.0, 1.0, False)):
        if isinstance(value, torch.Tensor) and tuple(value.shape) not in ((), (n_out,)):
            raise ValueError(f"{name} must be a float or a tensor of shape [] or [N_out] = "
                             f"[{n_out}], got shape {list(value.shape)}")
        out.append(_neuron_param(name, value, (n_out,), x, low, high, low_open,
                                 allow_none=name == "alpha_syn"))
    return out


def _checked_layer_args(alpha, threshold, alpha_syn, b_th, slope, backward, surrogate, reset, x,
                        n_out):
    """A layer's neuron arguments checked: (alpha, threshold, alpha_syn, b_th, slope), the
    parameters floats or tensors of shape [] or [N_out] (alpha_syn may be None)."""
    alpha, threshold, alpha_syn = _layer_params(alpha, threshold, alpha_syn, x, n_out)
    _, _, b_th, slope = check_lif_args(
        0.5 if isinstance(alpha, torch.Tensor) else alpha,
        1.0 if isinstance(threshold, torch.Tensor) else threshold, b_th, slope, backward,
        surrogate, reset)
    return alpha, threshold, alpha_syn, b_th, slope


def _param_layer(x, weight, bias, alpha, threshold, alpha_syn, b_th, slope, surrogate, reset,
                 sparse, v_init, s_init, syn_init, x_cnt=None, x_idx=None):
    """Linear + LIF with tensor parameters / a synaptic current; returns (spikes, v_final,
    syn_final or None, act_cnt, act_idx, stats) in x's dtype."""
    T, B, _ = x.shape
    n_out = weight.shape[0]
    kd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def k(t):
        return None if t is None else t.to(kd)

    rows = [_neuron_row(p, (n_out,), n_out, kd, x.device) if p is not None else None
            for p in (alpha, threshold, alpha_syn)]
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and r is not None and r.requires_grad) for r in rows)
    spikes, v_final, syn_final, _mem, act_cnt, act_idx, stats, _ev_idx, _ev_val = _LinearParamLIF.apply(
        k(x), k(weight), k(bias), k(v_init), k(s_init), k(syn_init), rows[0], rows[1], rows[2],
        b_th, slope, sparse, surrogate, reset, need, False, x_cnt, x_idx)
    if kd != x.dtype:
        spikes, v_final, syn_final = (t.to(x.dtype) for t in (spikes, v_final, syn_final))
    return spikes, v_final, syn_final if alpha_syn is not None else None, act_cnt, act_idx, stats


def _check_syn_state(syn_init, x, B, n_out):
    """The state's synaptic current (None without one): [B, N_out] like x."""
    if syn_init is not None:
        _check_tensor("state.syn", syn_init, 2, x.dtype, x.device)
        if tuple(syn_init.shape) != (B, n_out):
            raise ValueError(f"state.syn must have shape [{B}, {n_out}], got "
                             f"{tuple(syn_init.shape)}")
    return syn_init


def _split_state(state, alpha_syn):
    """state as (v, s) for check_state and the syn part (None without one)."""
    if state is None:
        return None, None
    if alpha_syn is not None and isinstance(state, (tuple, list)) and len(state) == 3:
        return tuple(state[:2]), state[2]
    return state, None


def lif_layer_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state=None,
    producer: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    alpha_syn=None,
):
    """lif_layer returning (spikes, LIFState, LIFStats, (act_cnt, act_idx)).

    producer: the (cnt, idx) active set of the sparse layer that made x, if known.
    """
    if producer is None:  # before any autocast copy of x, which would not carry it
        producer = producer_active_set(x)
    state, syn_init = _split_state(state, alpha_syn)
    x, weight, bias, state, syn_init = autocast_inputs(x, weight, bias, state, syn_init)
    _check_linear(x, weight, bias)
    T, B, _ = x.shape
    n_out = weight.shape[0]
    alpha, threshold, alpha_syn, b_th, slope = _checked_layer_args(
        alpha, threshold, alpha_syn, b_th, slope, backward, surrogate, reset, x, n_out)
    tensor_params = alpha_syn is not None or any(isinstance(p, torch.Tensor)
                                                  for p in (alpha, threshold))
    v_init, s_init = check_state(state, x, B, n_out, reset)
    syn_init = _check_syn_state(syn_init, x, B, n_out)
    x_cnt, x_idx = producer
    sparse = backward == "sparse"
    syn_final = None
    if tensor_params:
        spikes, v_final, syn_final, act_cnt, act_idx, stats = _param_layer(
            x, weight, bias, alpha, threshold, alpha_syn, b_th, slope, surrogate, reset, sparse,
            v_init, s_init, syn_init, x_cnt, x_idx)
        if sparse:
            attach_active_set(spikes, *getattr(spikes, ops.SAVED_SET_ATTR, (act_cnt, act_idx)))
    else:
        (spikes, v_final, act_cnt, act_idx, _sg, _ec, _ei, _ev, _rst, stats) = ops.lif_forward(
            x, weight, bias, v_init, s_init, x_cnt, x_idx, alpha, threshold, b_th, slope, sparse,
            surrogate, reset)
        if sparse:
            # the set as the layer saved it (ops.SAVED_SET_ATTR), so that the next layer saves
            # the same tensors
            attach_active_set(spikes, *getattr(spikes, ops.SAVED_SET_ATTR, (act_cnt, act_idx)))
    state_out = LIFState(v_final, spikes[-1], syn_final)
    stats_out = LIFStats(stats[0], stats[1], stats[2], T * B * n_out)
    return spikes, state_out, stats_out, (act_cnt, act_idx)


def lif_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state=None,
    return_state: bool = False,
    alpha_syn=None,
):
    """Fused linear + leaky integrate-and-fire layer over a whole sequence.

    x [T, B, N_in] (time-major), weight [N_out, N_in], bias [N_out] -> spikes [T, B, N_out].

        I[t] = x[t] @ weight.T + bias
        V[t] = alpha*V[t-1] + I[t] - threshold*S[t-1]     reset="subtract" (default)
        V[t] = alpha*(1 - S[t-1])*V[t-1] + I[t]           reset="zero"
        V[t] = alpha*V[t-1] + I[t]                        reset="none"
        S[t] = H(V[t] - threshold)                        (S[t-1] detached in every reset)

    The surrogate dS/dV (u = V - threshold, a = slope) is "fast_sigmoid" 1/(a|u|+1)^2 (default),
    "atan" (a/2)/(1+(pi/2*a*u)^2), "sigmoid" a*sig(a*u)*(1-sig(a*u)) or "triangle"
    a*max(0, 1-a|u|) (docs/surrogates.md). backward="sparse" (default) uses it only where
    |u| < b_th, doing work proportional to those entries; backward="dense" uses it everywhere
    (standard surrogate BPTT). state=(V, S) continues a sequence; with return_state=True the
    result is (spikes, LIFState(V[T-1], S[T-1])).

    alpha and threshold may also be tensors of shape [] or [N_out] (per-neuron), learnable
    (requires_grad) in both backward modes; alpha_syn (float or tensor like alpha, default None)
    adds the synaptic current syn[t] = alpha_syn*syn[t-1] + I[t] that V integrates in place of
    I[t], and state / LIFState carry syn. Those compute the current x W^T + b from x's events
    and then run the tensor-parameter neuron op (sparsegrad.lif's kernels); the backward saves
    x's events and the neuron's active set with its traces (no dense float tensor) and takes dW
    by x's events and dx at the producer's active set from dL/dI (docs/design.md, "Layers and
    the readout with tensor parameters"). Float parameters run the fused kernels.
    """
    spikes, state_out, _, _ = lif_layer_with_stats(
        x, weight, bias, alpha=alpha, threshold=threshold, b_th=b_th, surrogate=surrogate,
        slope=slope, reset=reset, backward=backward, state=state, alpha_syn=alpha_syn)
    if return_state:
        return spikes, state_out
    return spikes


# ------------------------------------------------------------------------------------------
# Recurrent LIF layer
# ------------------------------------------------------------------------------------------
def rlif_layer_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    rec_weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state=None,
    producer: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    alpha_syn=None,
):
    """rlif_layer returning (spikes, LIFState, LIFStats, (act_cnt, act_idx))."""
    if producer is None:  # before any autocast copy of x, which would not carry it
        producer = producer_active_set(x)
    state, syn_init = _split_state(state, alpha_syn)
    x, weight, rec_weight, bias, state, syn_init = autocast_inputs(x, weight, rec_weight, bias,
                                                                   state, syn_init)
    _check_linear(x, weight, bias)
    T, B, _ = x.shape
    n_out = weight.shape[0]
    alpha, threshold, alpha_syn, b_th, slope = _checked_layer_args(
        alpha, threshold, alpha_syn, b_th, slope, backward, surrogate, reset, x, n_out)
    tensor_params = alpha_syn is not None or any(isinstance(p, torch.Tensor)
                                                  for p in (alpha, threshold))
    _check_tensor("rec_weight", rec_weight, 2, x.dtype, x.device)
    if tuple(rec_weight.shape) != (n_out, n_out):
        raise ValueError(f"rec_weight must be [N_out, N_out] = [{n_out}, {n_out}], got "
                         f"{tuple(rec_weight.shape)}")
    v_init, s_init = check_state(state, x, B, n_out, reset)
    syn_init = _check_syn_state(syn_init, x, B, n_out)
    x_cnt, x_idx = producer
    sparse = backward == "sparse"
    syn_final = None
    if tensor_params:
        # per-neuron rows in the kernel's dtype (float32 for half types)
        kd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

        def k(t):
            return None if t is None else t.to(kd)

        rows = [_neuron_row(p, (n_out,), n_out, kd, x.device) if p is not None else None
                for p in (alpha, threshold, alpha_syn)]
        need = bool(torch.is_grad_enabled() and any(r is not None and r.requires_grad
                                                    for r in rows))
        (spikes, v_final, syn_final, act_cnt, act_idx, _sg, _p, _q, _u, _tl, _ec, _ei, _ev,
         _bits, stats) = ops.rlif_param_forward(
            k(x), k(weight), k(rec_weight), k(bias), k(v_init), k(s_init), k(syn_init), x_cnt,
            x_idx, rows[0], rows[1], rows[2], b_th, slope, sparse, surrogate, reset, need)
        if kd != x.dtype:
            spikes, v_final, syn_final = (t.to(x.dtype) for t in (spikes, v_final, syn_final))
        if alpha_syn is None:
            syn_final = None
    else:
        (spikes, v_final, act_cnt, act_idx, _sg, _ec, _ei, _ev, _bits, stats) = ops.rlif_forward(
            x, weight, rec_weight, bias, v_init, s_init, x_cnt, x_idx, alpha, threshold, b_th,
            slope, sparse, surrogate, reset)
    if sparse:
        attach_active_set(spikes, act_cnt, act_idx)
    state_out = LIFState(v_final, spikes[-1], syn_final)
    stats_out = LIFStats(stats[0], stats[1], stats[2], T * B * n_out)
    return spikes, state_out, stats_out, (act_cnt, act_idx)


def rlif_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    rec_weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state=None,
    return_state: bool = False,
    alpha_syn=None,
):
    """Fused linear + recurrent leaky integrate-and-fire layer over a whole sequence.

    x [T, B, N_in] (time-major), weight [N_out, N_in], rec_weight [N_out, N_out], bias [N_out]
    -> spikes [T, B, N_out]:

        V[t] = alpha*V[t-1] + x[t] @ weight.T + bias + S[t-1] @ rec_weight.T - threshold*S[t-1]
        S[t] = H(V[t] - threshold)

    (reset="subtract"; "zero" uses alpha*(1 - S[t-1])*V[t-1] and no subtraction, "none" neither).
    The reset uses S detached, the recurrent input does not: gradients flow through S[t-1] @ R.T,
    as in snnTorch's RLeaky. backward="sparse" (default) propagates the surrogate only where
    |V - threshold| < b_th, with work proportional to those entries, the spikes and the input
    events; backward="dense" is standard surrogate BPTT. state=(V, S) continues a sequence (S feeds
    the first step through rec_weight and carries gradient); return_state=True also returns
    LIFState(V[T-1], S[T-1]).

    alpha and threshold may also be tensors of shape [] or [N_out] (per neuron), learnable
    (requires_grad) in both backward modes; alpha_syn (float or tensor like alpha, default None)
    adds the synaptic current syn[t] = alpha_syn*syn[t-1] + I[t], I[t] the whole input current
    above (recurrent input included), which V integrates in place of I[t]; state and the
    returned LIFState then carry syn (state=(V, S, syn)). Tensor values are used as given (no
    range check, as in sparsegrad.lif). Those run the tensor-parameter kernels (CPU and
    CUDA), which keep the traces P = dV/dalpha,
    Q = -dV/dthreshold, U = dV/dalpha_syn at the active entries only (docs/design.md §3c).
    """
    spikes, state_out, _, _ = rlif_layer_with_stats(
        x, weight, rec_weight, bias, alpha=alpha, threshold=threshold, b_th=b_th,
        surrogate=surrogate, slope=slope, reset=reset, backward=backward, state=state,
        alpha_syn=alpha_syn)
    if return_state:
        return spikes, state_out
    return spikes


def li_readout(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha,
    reduce: str = "max",
    producer: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Leaky-integrator readout U[t] = alpha*U[t-1] + (1-alpha)*(x[t] @ weight.T + bias).

    reduce = "max" | "sum" | "mean" over time -> [B, N_out]; "none" -> [T, B, N_out].
    alpha: a float, or a tensor of shape [] or [N_out] (per output, learnable if it requires
    grad; its values are used as given).
    """
    if producer is None:
        producer = producer_active_set(x)
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_linear(x, weight, bias)
    if reduce not in ops.REDUCTIONS:
        raise ValueError(f"reduce must be one of {ops.REDUCTIONS}, got {reduce!r}")
    if isinstance(alpha, torch.Tensor):
        return _readout_tensor_alpha(x, weight, bias, alpha, reduce, producer)
    alpha = _check_scalar("alpha", alpha, 0.0, 1.0, low_open=False)
    out, *_ = ops.li_readout_forward(x, weight, bias, producer[0], producer[1], alpha, reduce)
    return out


def _readout_tensor_alpha(x, weight, bias, alpha, reduce, producer=(None, None)):
    """The readout with a tensor alpha ([] or [N_out], learnable): U is the membrane of the
    tensor-parameter neuron (reset "none", no threshold) driven by (1 - alpha)*(x W^T + b),
    the factor folded into the weight and bias so that autograd carries dL/dalpha through it
    too; x is saved by its events and dx kept to the producer's set, as in lif_layer's tensor
    path."""
    T, B, _ = x.shape
    n_out = weight.shape[0]
    (alpha,) = [p for p in _layer_params(alpha, 1.0, None, x, n_out)[:1]]
    kd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    a_row = _neuron_row(alpha, (n_out,), n_out, kd, x.device)
    keep = 1.0 - a_row
    w = weight.to(kd) * keep[:, None]
    b = bias.to(kd) * keep if bias is not None else None
    never = torch.full((n_out,), math.inf, dtype=kd, device=x.device)  # never fires, never active
    need = (bool(torch.is_grad_enabled() and a_row.requires_grad), False, False)
    _s, _v, _syn, mem, _c, _i, _st, _ei, _ev = _LinearParamLIF.apply(
        x.to(kd), w, b, None, None, None, a_row, never, None, 1.0, 1.0, True, "fast_sigmoid",
        "none", need, True, producer[0], producer[1])
    mem = mem.to(x.dtype)
    if reduce == "max":
        return mem.max(dim=0).values
    if reduce == "sum":
        return mem.sum(dim=0)
    if reduce == "mean":
        return mem.mean(dim=0)
    return mem


# --------------------------------------------------------------------------------------------
# The LIF neuron alone (after any per-step layer)
# --------------------------------------------------------------------------------------------
def _neuron_param(name, value, features, current, low, high, low_open, allow_none=False):
    """A neuron parameter: a float (checked against its range) or a floating tensor that broadcasts
    to one step's per-sample shape `features` (its values are not checked: that would synchronise
    a GPU; see docs/design.md §3c for what values outside the range do)."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got a tensor of "
                            f"dtype {value.dtype}")
        if value.device != current.device:
            raise ValueError(f"{name} is on {value.device} but current is on {current.device}; "
                             f"put them on one device")
        try:
            shape = tuple(torch.broadcast_shapes(tuple(value.shape), features))
        except RuntimeError:
            shape = None
        if shape != features:
            raise ValueError(f"{name} of shape {list(value.shape)} does not broadcast to one time "
                             f"step's per-sample shape {list(features)} (current.shape[2:]); use "
                             f"e.g. [] for one value, {list(features)} per neuron, or "
                             f"[C, 1, 1] per channel of a [T, B, C, H, W] current")
        return value
    return _check_scalar(name, value, low, high, low_open)


def _neuron_row(value, features, n, dtype, device):
    """The parameter as the kernels take it: one value per neuron, [n] (differentiable)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype).expand(features).reshape(n)
    return torch.full((n,), value, dtype=dtype, device=device)


def lif_with_stats(
    current: torch.Tensor,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state=None,
    return_mem: bool = False,
    alpha_syn=None,
):
    """lif returning (spikes, mem or None, LIFState, LIFStats, (act_cnt, act_idx))."""
    if not isinstance(current, torch.Tensor):
        raise TypeError(f"current must be a torch.Tensor, got {type(current).__name__}")
    if current.dim() < 3:
        raise ValueError(f"current must be [T, B, ...] with at least one feature dimension, got "
                         f"shape {tuple(current.shape)}")
    if current.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"current must be float32 or float64, got {current.dtype}")
    if current.shape[0] == 0:
        raise ValueError(f"current must have at least one time step, got shape "
                         f"{tuple(current.shape)}")
    T, B = current.shape[:2]
    features = tuple(current.shape[2:])
    n = math.prod(features)
    alpha = _neuron_param("alpha", alpha, features, current, 0.0, 1.0, False)
    threshold = _neuron_param("threshold", threshold, features, current, 0.0, math.inf, True)
    alpha_syn = _neuron_param("alpha_syn", alpha_syn, features, current, 0.0, 1.0, False,
                              allow_none=True)
    _, _, b_th, slope = check_lif_args(
        0.5 if isinstance(alpha, torch.Tensor) else alpha,
        1.0 if isinstance(threshold, torch.Tensor) else threshold, b_th, slope, backward,
        surrogate, reset)
    syn_model = alpha_syn is not None
    v_init = s_init = syn_init = None
    if state is not None:
        pair = f"a (v, s{', syn' if syn_model else ''}) tuple"
        if not isinstance(state, (tuple, list)) or len(state) not in (2, 3):
            raise TypeError(f"state must be {pair} of [B, ...] tensors of shape {(B,) + features} "
                            f"or None")
        v_init, s_init = state[0], state[1]
        syn_init = state[2] if len(state) == 3 else None
        if syn_init is not None and not syn_model:
            raise ValueError("state.syn is given but alpha_syn is None (no synaptic current)")
        named = [("state.v", v_init), ("state.s", s_init)]
        if syn_init is not None:
            named.append(("state.syn", syn_init))
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (B,) + features:
                raise ValueError(f"{name} must have shape {[B, *features]}, got {tuple(t.shape)}")
            _check_tensor(name, t, t.dim(), current.dtype, current.device)
        if reset == "zero" and not bool(((s_init == 0) | (s_init == 1)).all()):
            raise ValueError("state.s must hold only spikes (0 or 1) with reset='zero'")
        v_init, s_init = v_init.reshape(B, n), s_init.reshape(B, n)
        if syn_init is not None:
            syn_init = syn_init.reshape(B, n)
    sparse = backward == "sparse"
    syn_final = None
    if not syn_model and not any(isinstance(p, torch.Tensor) for p in (alpha, threshold)):
        # float parameters: the scalar kernels, exactly as before tensor parameters existed
        spikes, v_final, act_cnt, act_idx, _sg, _rg, _rst, mem, stats = ops.lif_neuron_forward(
            current.reshape(T, B, n), v_init, s_init, alpha, threshold, b_th, slope, sparse,
            surrogate, reset, return_mem)
    else:
        # per-neuron / learnable parameters, synaptic current: one value per neuron, in the
        # kernel's dtype (float32 for half types, so that alpha is not rounded to 8 bits)
        kd = torch.float32 if current.dtype in (torch.float16, torch.bfloat16) else current.dtype

        def k(t):
            return None if t is None else t.to(kd)

        rows = [_neuron_row(p, features, n, kd, current.device) if p is not None else None
                for p in (alpha, threshold, alpha_syn)]
        grad_on = torch.is_grad_enabled()
        need = [bool(grad_on and r is not None and r.requires_grad) for r in rows]
        (spikes, v_final, syn_final, act_cnt, act_idx, _sg, _p, _q, _u, _tl, _rst, mem,
         stats) = ops.lif_neuron_param_forward(
            k(current.reshape(T, B, n)), k(v_init), k(s_init), k(syn_init), rows[0], rows[1],
            rows[2], b_th, slope, sparse, surrogate, reset, return_mem, need[0], need[1], need[2])
        if kd != current.dtype:
            spikes, v_final, mem = (t.to(current.dtype) for t in (spikes, v_final, mem))
            if syn_model:
                syn_final = syn_final.to(current.dtype)
        if not syn_model:
            syn_final = None
    if sparse and current.dim() == 3:
        # a fused LIF right after this neuron then computes dx only at these entries
        attach_active_set(spikes, act_cnt, act_idx)
    spikes = spikes.view(current.shape) if current.dim() != 3 else spikes
    v_final = v_final.view((B,) + features)
    if syn_final is not None:
        syn_final = syn_final.view((B,) + features)
    state_out = LIFState(v_final, spikes[-1], syn_final)
    stats_out = LIFStats(stats[0], stats[1], stats[2], T * B * n)
    return (spikes, mem.view(current.shape) if return_mem else None, state_out, stats_out,
            (act_cnt, act_idx))


def lif(
    current: torch.Tensor,
    *,
    alpha,
    threshold=1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    return_state: bool = False,
    return_mem: bool = False,
    alpha_syn=None,
):
    """Leaky integrate-and-fire neurons driven by a given input current, over a whole sequence.

    current [T, B, *] (time-major, any trailing shape: [T, B, N], [T, B, C, H, W], ...), e.g. the
    output of a convolution applied to every time step -> spikes of the same shape:

        V[t] = alpha*V[t-1] + current[t] - threshold*S[t-1]    reset="subtract" (default)
        V[t] = alpha*(1 - S[t-1])*V[t-1] + current[t]          reset="zero"
        V[t] = alpha*V[t-1] + current[t]                       reset="none"
        S[t] = H(V[t] - threshold)                              (S[t-1] detached in every reset)

    The surrogate dS/dV (surrogate= "fast_sigmoid", "atan", "sigmoid", "triangle" with ``slope``;
    docs/surrogates.md) is used only where |V - threshold| < b_th with backward="sparse" (the
    backward then keeps only those entries), everywhere with backward="dense". The backward
    returns dL/dcurrent from the reverse-time trace of the surrogate gradient.

    state=(V, S), each [B, *], continues a sequence (default: V = S = 0). return_mem=True also
    returns the membrane V [T, B, *] (it carries gradient). Returns spikes, then mem if
    return_mem, then the LIFState(V[T-1], S[T-1]) if return_state.

    alpha and threshold are floats, or tensors that broadcast to current.shape[2:] (e.g. [] for
    one value, [C, 1, 1] for one per channel of a [T, B, C, H, W] current, the full per-sample
    shape for one per neuron); a tensor that requires grad gets its gradient in both backward
    modes (the sparse one from the traces P = dV/dalpha and Q = -dV/dthreshold kept at the
    active entries only; docs/design.md §3c). Tensor values are used as given, without a range
    check (it would synchronise a GPU): alpha outside [0, 1] makes the membrane grow or
    oscillate, a threshold <= 0 fires at rest; nn.LIFNeuron clamps its alpha to [0, 1].
    alpha_syn (float or tensor like alpha; default None: no synaptic current) adds the
    synaptic current of snnTorch's Synaptic / NIR's CubaLIF: syn[t] = alpha_syn*syn[t-1] +
    current[t], and V integrates syn[t] in place of current[t]; state and the returned
    LIFState then carry syn too (state=(V, S, syn)).
    """
    spikes, mem, state_out, _, _ = lif_with_stats(
        current, alpha=alpha, threshold=threshold, b_th=b_th, surrogate=surrogate, slope=slope,
        reset=reset, backward=backward, state=state, return_mem=return_mem, alpha_syn=alpha_syn)
    out = (spikes,)
    if return_mem:
        out += (mem,)
    if return_state:
        out += (state_out,)
    return out[0] if len(out) == 1 else out
