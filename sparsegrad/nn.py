"""Modules: LIF (nn.Linear + leaky integrate-and-fire, fused), RLIF (its recurrent version),
LIFNeuron (the neuron alone, after any layer), LIReadout, and TimeDistributed (a per-step layer
applied to a whole sequence)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import functional as F_sg
from . import ops

__all__ = ["LIF", "RLIF", "LIReadout", "LIFNeuron", "TimeDistributed", "TimeSequential"]


class _LinearParams(nn.Module):
    """weight [out, in] and bias [out], initialised and named exactly as nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _time_major(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"input must be [T, B, {self.in_features}] (or [B, T, {self.in_features}] with "
                f"batch_first=True), got shape {tuple(x.shape)}")
        return x.transpose(0, 1) if self.batch_first else x

    def _producer(self, x: torch.Tensor):
        # A batch-first output of a sparse LIF carries its set under time_major=False.
        return F_sg.producer_active_set(x, time_major=not self.batch_first)


class LIF(_LinearParams):
    """Linear layer followed by leaky integrate-and-fire neurons, as one fused kernel.

    state_dict-compatible with nn.Linear (``weight`` [out, in], ``bias`` [out]). Input [T, B, in]
    (or [B, T, in] with batch_first=True) -> spikes of the same layout with ``out`` features.
    After each forward, ``last_stats`` holds that call's spike count and active fraction.

    ``alpha``, ``threshold`` and ``alpha_syn`` (default None: no synaptic current) are floats or
    tensors of shape [] or [out] (per neuron); ``learn_alpha`` / ``learn_threshold`` /
    ``learn_alpha_syn`` make them nn.Parameters (state_dict keys ``alpha``, ``threshold``,
    ``alpha_syn``), as LIFNeuron's; a tensor alpha / alpha_syn is clamped to [0, 1] in the
    forward. forward(x, state=(V, S[, syn]), return_state=True) continues a sequence.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 alpha=0.9, threshold=1.0, b_th: float = 0.2,
                 surrogate: str = "fast_sigmoid", slope: float = 100.0, reset: str = "subtract",
                 backward: str = "sparse", batch_first: bool = False, device=None, dtype=None,
                 alpha_syn=None, learn_alpha: bool = False, learn_threshold: bool = False,
                 learn_alpha_syn: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        F_sg.check_lif_args(0.5, 1.0, b_th, slope, backward, surrogate, reset)
        _layer_neuron_parameters(self, out_features, alpha, threshold, alpha_syn, learn_alpha,
                                 learn_threshold, learn_alpha_syn, device)
        self.b_th = float(b_th)
        self.surrogate = surrogate
        self.slope = float(slope)
        self.reset = reset
        self.backward = backward
        self.batch_first = bool(batch_first)
        self.last_stats: Optional[F_sg.LIFStats] = None

    def _input_bias(self) -> Optional[torch.Tensor]:
        """The bias added to the input current (subclasses may add a constant current)."""
        return self.bias

    def _initial_state(self, x_tm: torch.Tensor):
        """State used when forward() gets none (None: V = S = 0)."""
        return None

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False):
        x_tm = self._time_major(x)
        if state is None:
            state = self._initial_state(x_tm)
        spikes, state_out, stats, (cnt, idx) = F_sg.lif_layer_with_stats(
            x_tm, self.weight, self._input_bias(), alpha=LIFNeuron._clamped(self.alpha),
            threshold=self.threshold, b_th=self.b_th, surrogate=self.surrogate, slope=self.slope,
            reset=self.reset, backward=self.backward, state=state, producer=self._producer(x),
            alpha_syn=LIFNeuron._clamped(getattr(self, "alpha_syn", None)))
        self.last_stats = stats
        if self.batch_first:
            spikes = spikes.transpose(0, 1)
            if self.backward == "sparse":
                F_sg.attach_active_set(spikes, cnt, idx, time_major=False)
        return (spikes, state_out) if return_state else spikes

    def __setstate__(self, state):
        # Models pickled before surrogates and resets were options used the defaults.
        state.setdefault("surrogate", "fast_sigmoid")
        state.setdefault("reset", "subtract")
        state.setdefault("alpha_syn", None)
        super().__setstate__(state)

    def __getstate__(self):
        # Per-call statistics are not part of the model: keep pickles and deep copies clean.
        state = super().__getstate__().copy()
        state["last_stats"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, alpha={_param_repr(self.alpha)}, "
                f"threshold={_param_repr(self.threshold)}"
                + ("" if getattr(self, "alpha_syn", None) is None
                   else f", alpha_syn={_param_repr(self.alpha_syn)}")
                + f", b_th={self.b_th}, surrogate={self.surrogate!r}, slope={self.slope}, "
                f"reset={self.reset!r}, backward={self.backward!r}, "
                f"batch_first={self.batch_first}")


class RLIF(_LinearParams):
    """Linear layer followed by recurrent leaky integrate-and-fire neurons, as one fused kernel.

        V[t] = alpha*V[t-1] + W x[t] + b + R S[t-1] - threshold*S[t-1],   S[t] = H(V[t] - threshold)

    ``weight`` [out, in] and ``bias`` [out] as nn.Linear's; ``rec_weight`` [out, out] is R (an
    nn.Linear(out, out, bias=False)'s weight, initialised as one). rec_bias=True adds a second
    bias ``rec_bias`` [out] (zero-initialised) to the current, as the recurrent nn.Linear of
    snnTorch's RLeaky has (``sparsegrad.convert`` uses it). Input [T, B, in] (or [B, T, in]
    with batch_first=True) -> spikes of the same layout with ``out`` features. ``surrogate`` and
    ``reset`` as sparsegrad.lif_layer's. forward(x, state=(V, S), return_state=True) continues a
    sequence chunk by chunk (gradients flow across chunks through V and S unless detached).
    After each forward, ``last_stats`` holds that call's spike count and active fraction.

    ``alpha``, ``threshold`` and ``alpha_syn`` (default None: no synaptic current) are floats or
    tensors of shape [] or [out] (per neuron), as nn.LIF's: ``learn_alpha`` /
    ``learn_threshold`` / ``learn_alpha_syn`` make them nn.Parameters (state_dict keys
    ``alpha``, ``threshold``, ``alpha_syn``); a tensor alpha / alpha_syn is clamped to [0, 1] in
    the forward. With alpha_syn the state is (V, S, syn). Tensor parameters and alpha_syn run
    the tensor-parameter kernels (CPU and CUDA).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 alpha=0.9, threshold=1.0, b_th: float = 0.2,
                 surrogate: str = "fast_sigmoid", slope: float = 100.0, reset: str = "subtract",
                 backward: str = "sparse", batch_first: bool = False, rec_bias: bool = False,
                 device=None, dtype=None, alpha_syn=None, learn_alpha: bool = False,
                 learn_threshold: bool = False, learn_alpha_syn: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        F_sg.check_lif_args(0.5, 1.0, b_th, slope, backward, surrogate, reset)
        _layer_neuron_parameters(self, out_features, alpha, threshold, alpha_syn, learn_alpha,
                                 learn_threshold, learn_alpha_syn, device)
        self.rec_weight = nn.Parameter(torch.empty(out_features, out_features, device=device,
                                                   dtype=dtype))
        nn.init.kaiming_uniform_(self.rec_weight, a=math.sqrt(5))
        if rec_bias:
            self.rec_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("rec_bias", None)
        self.b_th = float(b_th)
        self.surrogate = surrogate
        self.slope = float(slope)
        self.reset = reset
        self.backward = backward
        self.batch_first = bool(batch_first)
        self.last_stats: Optional[F_sg.LIFStats] = None

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False):
        x_tm = self._time_major(x)
        bias = self.bias
        if self.rec_bias is not None:
            bias = self.rec_bias if bias is None else bias + self.rec_bias
        spikes, state_out, stats, (ptr, idx) = F_sg.rlif_layer_with_stats(
            x_tm, self.weight, self.rec_weight, bias, alpha=LIFNeuron._clamped(self.alpha),
            threshold=self.threshold, b_th=self.b_th, surrogate=self.surrogate, slope=self.slope,
            reset=self.reset, backward=self.backward, state=state, producer=self._producer(x),
            alpha_syn=LIFNeuron._clamped(getattr(self, "alpha_syn", None)))
        self.last_stats = stats
        if self.batch_first:
            spikes = spikes.transpose(0, 1)
            if self.backward == "sparse":
                F_sg.attach_active_set(spikes, ptr, idx, time_major=False)
        return (spikes, state_out) if return_state else spikes

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["last_stats"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("alpha_syn", None)  # models pickled before RLIF had a synaptic current
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rec_bias={self.rec_bias is not None}, "
                f"alpha={_param_repr(self.alpha)}, threshold={_param_repr(self.threshold)}"
                + ("" if getattr(self, "alpha_syn", None) is None
                   else f", alpha_syn={_param_repr(self.alpha_syn)}")
                + f", b_th={self.b_th}, surrogate={self.surrogate!r}, slope={self.slope}, "
                f"reset={self.reset!r}, backward={self.backward!r}, "
                f"batch_first={self.batch_first}")


class LIReadout(_LinearParams):
    """Non-spiking leaky-integrator readout: U[t] = alpha*U[t-1] + (1-alpha)*(W x[t] + b).

    reduce over time: "max" (default), "sum", "mean" -> [B, out]; "none" -> [T, B, out]
    (or [B, T, out] with batch_first=True).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 alpha=0.9, reduce: str = "max", batch_first: bool = False,
                 device=None, dtype=None, learn_alpha: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        if isinstance(alpha, torch.Tensor) and tuple(alpha.shape) not in ((), (out_features,)):
            raise ValueError(f"alpha must be a float or a tensor of shape [] or [out_features] = "
                             f"[{out_features}], got shape {list(alpha.shape)}")
        if reduce not in ops.REDUCTIONS:
            raise ValueError(f"reduce must be one of {ops.REDUCTIONS}, got {reduce!r}")
        # a float, a buffer, or with learn_alpha an nn.Parameter (clamped to [0, 1] in forward)
        _neuron_parameter(self, "alpha", alpha, learn_alpha, 0.0, 1.0, False)
        if device is not None and isinstance(self.alpha, torch.Tensor):
            self.alpha.data = self.alpha.data.to(device)
        self.reduce = reduce
        self.batch_first = bool(batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F_sg.li_readout(self._time_major(x), self.weight, self.bias,
                              alpha=LIFNeuron._clamped(self.alpha), reduce=self.reduce,
                              producer=self._producer(x))
        if self.reduce == "none" and self.batch_first:
            out = out.transpose(0, 1)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, alpha={_param_repr(self.alpha)}, "
                f"reduce={self.reduce!r}, "
                f"batch_first={self.batch_first}")


def _neuron_parameter(module: nn.Module, name: str, value, learn: bool, low: float, high: float,
                      low_open: bool) -> None:
    """Store a neuron parameter on `module` under `name`: a float stays a float attribute (the
    float kernels, exactly as before); a tensor becomes a buffer, or with learn=True (a float
    too) an nn.Parameter, so that the state_dict key is `name`. Tensor values are checked here,
    once, so that the forward never synchronises a GPU to check them."""
    if not isinstance(value, torch.Tensor) and not learn:
        setattr(module, name, F_sg._check_scalar(name, value, low, high, low_open))
        return
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {value.dtype}")
        t = value.detach().clone()
    else:
        t = torch.tensor(F_sg._check_scalar(name, value, -math.inf, math.inf, False))
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if math.isnan(lo) or math.isnan(hi) or (lo <= low if low_open else lo < low) or hi > high:
            bracket = "(" if low_open else "["
            raise ValueError(f"{name} must be in {bracket}{low}, {high}], got values in "
                             f"[{lo}, {hi}]")
    if learn:
        setattr(module, name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


def _layer_neuron_parameters(module, n_out, alpha, threshold, alpha_syn, learn_alpha,
                             learn_threshold, learn_alpha_syn, device=None):
    """alpha / threshold / alpha_syn of a layer with n_out neurons: floats or [] / [n_out]."""
    for name, value in (("alpha", alpha), ("threshold", threshold), ("alpha_syn", alpha_syn)):
        if isinstance(value, torch.Tensor) and tuple(value.shape) not in ((), (n_out,)):
            raise ValueError(f"{name} must be a float or a tensor of shape [] or [out_features] "
                             f"= [{n_out}], got shape {list(value.shape)}")
    _neuron_parameter(module, "alpha", alpha, learn_alpha, 0.0, 1.0, False)
    _neuron_parameter(module, "threshold", threshold, learn_threshold, 0.0, math.inf, True)
    if alpha_syn is None:
        if learn_alpha_syn:
            raise ValueError("learn_alpha_syn=True needs alpha_syn (a float or a tensor), got None")
        module.alpha_syn = None
    else:
        _neuron_parameter(module, "alpha_syn", alpha_syn, learn_alpha_syn, 0.0, 1.0, False)
    if device is not None:
        for name in ("alpha", "threshold", "alpha_syn"):
            value = getattr(module, name)
            if isinstance(value, torch.Tensor):
                value.data = value.data.to(device)


def _param_repr(value) -> str:
    if isinstance(value, torch.Tensor):
        kind = "Parameter" if isinstance(value, nn.Parameter) else "tensor"
        return f"{kind}{list(value.shape)}"
    return repr(value)


class LIFNeuron(nn.Module):
    """Leaky integrate-and-fire neurons driven by the output of any layer (sparsegrad.lif).

    Input: the current [T, B, *] (or [B, T, *] with batch_first=True), e.g. a convolution's output
    for every time step (see TimeDistributed) -> spikes of the same shape and layout. ``reset``
    ("subtract", "zero", "none") and ``surrogate`` ("fast_sigmoid", "atan", "sigmoid",
    "triangle", with ``slope``) as in sparsegrad.lif; return_mem=True makes forward return
    (spikes, membrane). After each forward, ``last_stats`` holds that call's spike count and
    active fraction.

    ``alpha``, ``threshold`` and ``alpha_syn`` (default None: no synaptic current; a float gives
    snnTorch's Synaptic with alpha = beta and alpha_syn = its alpha) are floats or tensors that
    broadcast to the per-sample shape (e.g. [C, 1, 1] per channel, [N] per neuron). A float
    stays a plain attribute; a tensor is a buffer; ``learn_alpha`` / ``learn_threshold`` /
    ``learn_alpha_syn`` make the value (a float becomes a 0-d tensor) an nn.Parameter. Either
    way the state_dict keys are ``alpha``, ``threshold``, ``alpha_syn``. In the forward a
    tensor alpha and alpha_syn are clamped to [0, 1], as snnTorch clamps a learnable beta (the
    gradient is zero outside); the threshold is used as it is (it should stay > 0).
    """

    def __init__(self, *, alpha=0.9, threshold=1.0, b_th: float = 0.2,
                 surrogate: str = "fast_sigmoid", slope: float = 100.0, reset: str = "subtract",
                 backward: str = "sparse", batch_first: bool = False, return_mem: bool = False,
                 alpha_syn=None, learn_alpha: bool = False, learn_threshold: bool = False,
                 learn_alpha_syn: bool = False):
        super().__init__()
        F_sg.check_lif_args(0.5, 1.0, b_th, slope, backward, surrogate, reset)
        _neuron_parameter(self, "alpha", alpha, learn_alpha, 0.0, 1.0, False)
        _neuron_parameter(self, "threshold", threshold, learn_threshold, 0.0, math.inf, True)
        if alpha_syn is None:
            if learn_alpha_syn:
                raise ValueError("learn_alpha_syn=True needs alpha_syn (a float or a tensor), "
                                 "got None")
            self.alpha_syn = None
        else:
            _neuron_parameter(self, "alpha_syn", alpha_syn, learn_alpha_syn, 0.0, 1.0, False)
        self.b_th = float(b_th)
        self.surrogate = surrogate
        self.slope = float(slope)
        self.reset = reset
        self.backward = backward
        self.batch_first = bool(batch_first)
        self.return_mem = bool(return_mem)
        self.last_stats: Optional[F_sg.LIFStats] = None

    @staticmethod
    def _clamped(value):
        return value.clamp(0.0, 1.0) if isinstance(value, torch.Tensor) else value

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            layout = "[B, T, ...]" if self.batch_first else "[T, B, ...]"
            raise ValueError(f"input must be a {layout} tensor with at least one feature "
                             f"dimension, got {getattr(x, 'shape', type(x).__name__)}")
        x_tm = x.transpose(0, 1) if self.batch_first else x
        spikes, mem, state_out, stats, _ = F_sg.lif_with_stats(
            x_tm, alpha=self._clamped(self.alpha), threshold=self.threshold, b_th=self.b_th,
            surrogate=self.surrogate, slope=self.slope, reset=self.reset, backward=self.backward,
            state=state, return_mem=self.return_mem, alpha_syn=self._clamped(self.alpha_syn))
        self.last_stats = stats
        if self.batch_first:
            time_major = spikes
            spikes = spikes.transpose(0, 1)
            mem = mem.transpose(0, 1) if mem is not None else None
            producer = F_sg.producer_active_set(time_major)
            if producer[0] is not None:
                F_sg.attach_active_set(spikes, *producer, time_major=False)
        out = (spikes, mem) if self.return_mem else (spikes,)
        if return_state:
            out += (state_out,)
        return out[0] if len(out) == 1 else out

    def __setstate__(self, state):
        state.setdefault("alpha_syn", None)  # pickled before the synaptic current existed
        super().__setstate__(state)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["last_stats"] = None
        return state

    def extra_repr(self) -> str:
        syn = "" if self.alpha_syn is None else f", alpha_syn={_param_repr(self.alpha_syn)}"
        return (f"alpha={_param_repr(self.alpha)}, threshold={_param_repr(self.threshold)}"
                f"{syn}, b_th={self.b_th}, "
                f"surrogate={self.surrogate!r}, slope={self.slope}, reset={self.reset!r}, "
                f"backward={self.backward!r}, batch_first={self.batch_first}"
                + (", return_mem=True" if self.return_mem else ""))


class TimeDistributed(nn.Module):
    """Apply a module written for one time step to a whole sequence, by folding time into the batch.

    ``TimeDistributed(nn.Conv2d(1, 8, 3))`` maps [T, B, 1, H, W] to [T, B, 8, H', W'] (or
    [B, T, ...] to [B, T, ...] with batch_first=True) with one call of the module on T*B samples:
    one reshape each way, no loop. That equals calling the module once per step for every layer
    that treats samples independently (Conv*, pooling, Linear, Flatten, activations, Dropout in
    distribution, BatchNorm in eval mode). In training mode a BatchNorm normalises over all T*B
    samples at once (SpikingJelly's multi-step convention), not once per step.

    The state_dict keys are the wrapped module's (``TimeDistributed(conv)`` saves ``weight`` and
    ``bias``, not ``module.weight``), so a model whose layers were wrapped still loads the
    original's weights and vice versa; parameter names (named_parameters) do include ``module.``.
    """

    def __init__(self, module: nn.Module, batch_first: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.batch_first = bool(batch_first)
        self._register_load_state_dict_pre_hook(_time_distributed_load_hook, with_module=True)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if args:  # the deprecated positional form: (destination, prefix, keep_vars)
            return super().state_dict(*args)
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            layout = "[B, T, ...]" if self.batch_first else "[T, B, ...]"
            raise ValueError(f"TimeDistributed({type(self.module).__name__}) takes a {layout} "
                             f"sequence, got {getattr(x, 'shape', type(x).__name__)}")
        lead = x.shape[:2]
        y = self.module(x.flatten(0, 1))
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"TimeDistributed: {type(self.module).__name__} returned "
                            f"{type(y).__name__}; only modules returning one tensor per sample "
                            f"can be applied over time")
        if y.dim() == 0 or y.shape[0] != lead[0] * lead[1]:
            raise ValueError(f"TimeDistributed: {type(self.module).__name__} mapped "
                             f"{lead[0] * lead[1]} samples to shape {tuple(y.shape)}; it must keep "
                             f"the batch dimension first (one output per sample)")
        return y.unflatten(0, lead)

    def extra_repr(self) -> str:
        return "batch_first=True" if self.batch_first else ""


# Layers that compute each sample alone and deterministically (the one list: conversion.py folds
# these, plus Dropout, over time). A run of TimeDistributed layers made of these gives the same
# per-sample results whether it sees all time steps at once or a few at a time (Dropout is left
# out here: chunks would draw its masks differently).
_PER_SAMPLE_LAYERS = (
    nn.Linear, nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
)


def _chunkable(layer: nn.Module) -> bool:
    """A TimeDistributed layer whose every part is a plain nn.Sequential or in _PER_SAMPLE_LAYERS."""
    return isinstance(layer, TimeDistributed) and all(
        type(m) is nn.Sequential or isinstance(m, _PER_SAMPLE_LAYERS) for m in layer.module.modules())


class TimeSequential(nn.Sequential):
    """An nn.Sequential for whole sequences that runs consecutive per-step layers together.

    Children run in order as in nn.Sequential, except that a run of two or more consecutive
    ``TimeDistributed`` layers of per-sample layers (convolutions, pooling, Linear, Flatten,
    activations, ...; not Dropout) is applied to a few time steps at a time: each chunk of
    about ``chunk_samples`` samples goes through the whole run, and the chunks' outputs are
    concatenated over time. Every sample's result is what the layers give it one after another;
    the run's intermediate tensors (e.g. a convolution's output before its pooling) then exist
    per chunk only, small and cache-resident, instead of over all T·B samples at once (tens of MB
    that the allocator maps and page-faults in again at every step).

    ``sparsegrad.convert`` returns an nn.Sequential model as a TimeSequential (same children,
    indices and state_dict keys).
    """

    #: samples per call of a chunked run (time steps per chunk: ceil(chunk_samples / batch))
    chunk_samples = 256

    def forward(self, x):
        layers = list(self)
        i = 0
        while i < len(layers):
            j = i
            while j < len(layers) and _chunkable(layers[j]) and \
                    layers[j].batch_first == layers[i].batch_first:
                j += 1
            if j - i >= 2 and isinstance(x, torch.Tensor) and x.dim() >= 2:
                x = self._run_chunked(layers[i:j], x)
                i = j
            else:
                x = layers[i](x)
                i += 1
        return x

    def _run_chunked(self, run, x: torch.Tensor) -> torch.Tensor:
        tdim = 1 if run[0].batch_first else 0
        steps, batch = x.shape[tdim], x.shape[1 - tdim]
        per_chunk = max(1, -(-int(self.chunk_samples) // max(batch, 1)))
        parts = []
        # split, not narrow: its backward concatenates the chunks' gradients once instead of
        # zero-filling a whole-sequence gradient per chunk and adding them up
        for h in x.split(per_chunk, dim=tdim) if per_chunk < steps else [x]:
            for layer in run:
                h = layer(h)
            parts.append(h)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=tdim)


def _time_distributed_load_hook(module, state_dict, prefix, *args):
    # Keys saved without the "module." level (TimeDistributed.state_dict, or the original
    # unwrapped layer) are moved under it; keys that already have it are left alone.
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


# Convolutional spiking layers (issue 20) live in sparsegrad/conv.py.
from .conv import ConvLIF, SpikePool2d  # noqa: E402,F401
