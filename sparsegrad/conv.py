"""Convolutional spiking layers over whole sequences (issue 20): conv -> (pool) -> LIF and
conv -> LIF -> pool with a sparse backward and compact saved state.

``conv_pool(x, weight, bias, ...)`` is a Conv2d applied to every step of x [T, B, C, H, W]
followed by an optional max / avg pooling (kernel = stride, as ``nn.MaxPool2d(k)``), as one
autograd node that keeps for the backward only

* the input as bits (one bit per entry) when it is binary (spikes), else the input itself
  (data: a reference to the caller's tensor; one frame when the frame repeats at every step);
* max pooling's winner offsets as uint8 (``pool_k**2 <= 256``);
* the producer's active set when x came from a sparsegrad neuron (``ConvLIF``, ``LIFNeuron`` on
  [T, B, N]): dx is then computed only there.

Forward: by events (csrc/cpu/conv_cpu.cpp; on CUDA tensors csrc/cuda/conv.cuh, the same bits)
when x is binary and sparse enough for the cost model (``EVENT_COST``, measured on the CPU), else
ATen's convolution (oneDNN / cuDNN) and sparsegrad's pooling. Input frames that are
the same at every step (direct coding, snnTorch's tutorials) are convolved once (checked exactly,
``torch.equal``): the output of every step is then that frame's, and the weight gradient is taken
once from the gradient summed over time.

Backward: dW and db by the input's events from the unpooled gradient (max pooling: one position
per window; positions whose neuron is never active again carry zero and add nothing), dx at the
producer's active set; without a producer set, or for non-binary inputs, dense dx / dW by ATen.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as F_sg
from . import _C  # noqa: F401  (registers the ops)

__all__ = ["conv_pool", "ConvLIF", "SpikePool2d", "fuse_conv_layers", "EVENT_COST", "ROUTES"]

_ops = torch.ops.sparsegrad
ROUTES = ("auto", "events", "dense")
POOLS = (None, "max", "avg")
#: The events route costs about EVENT_COST dense multiply-adds per (event, tap, output channel)
#: add (measured on the tutorial CSNN's second convolution, 2 threads: benchmarks/bench_conv.py;
#: CUDA tensors use the same rule until a GPU measures its own);
#: "auto" takes events when nnz * taps * C_out/groups * EVENT_COST < the dense MACs.
EVENT_COST = 4.0
_SAVED_SET_ATTR = "_sparsegrad_conv_saved_set"


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return tuple(v)
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _narrow_index(t: torch.Tensor, bound: int) -> torch.Tensor:
    # Indices in [0, bound] kept in the narrowest integer type between forward and backward.
    if bound <= 255:
        return t.to(torch.uint8)
    if bound <= 32767:
        return t.to(torch.int16)
    return t


def _constant_over_time(x: torch.Tensor) -> bool:
    """True when every step of x [T, B, ...] equals the first (exactly), e.g. direct coding."""
    if x.shape[0] < 2:
        return False
    first = x[0]
    # A cheap rejection on one step before the full comparison.
    if not torch.equal(x[-1], first):
        return False
    return bool(torch.equal(x, first.unsqueeze(0).expand_as(x)))


class _ConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, pool, pool_k, route,
                prev_cnt, prev_idx):
        T, B = x.shape[:2]
        in_shape = list(x.shape[2:])
        pool_s = pool or "none"
        n_in = in_shape[0] * in_shape[1] * in_shape[2]
        const = not ctx.needs_input_grad[0] and _constant_over_time(x)
        frames = x[0] if const else x.reshape(T * B, *in_shape)
        n = frames.shape[0]
        bits = None
        binary = False
        if route != "dense":
            bits, info = _ops.spike_pack.default(frames.reshape(n, n_in))
            nnz, odd = (int(v) for v in info.tolist())
            binary = odd == 0
            if route == "events" and not binary:
                raise ValueError("route='events' needs a binary input (0/1 spikes); got "
                                 f"{odd} other values")
        cout, cin_g, kh, kw = weight.shape
        use_events = False
        if binary:
            if route == "events":
                use_events = True
            else:
                ho = (in_shape[1] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
                wo = (in_shape[2] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
                dense_macs = n * cout * ho * wo * cin_g * kh * kw
                use_events = nnz * kh * kw * (cout // groups) * EVENT_COST < dense_macs
        if use_events:
            out, idx = _ops.spike_conv2d_forward.default(
                bits, weight, bias, in_shape, list(stride), list(padding), list(dilation), groups,
                pool_s, pool_k)
        else:
            y = F.conv2d(frames, weight, bias, stride, padding, dilation, groups)
            if pool is None:
                out, idx = y, y.new_empty(0, dtype=torch.uint8)
            else:
                out, idx = _ops.conv_pool2d.default(y, pool_s, pool_k)
        ctx.geom = (in_shape, list(stride), list(padding), list(dilation), groups, pool_s, pool_k)
        ctx.T, ctx.B, ctx.const, ctx.binary = T, B, const, binary
        ctx.has_bias = bias is not None
        ctx.has_prev = prev_cnt is not None
        saved = [weight, idx, bits if binary else frames]
        if ctx.has_prev:
            saved += [_narrow_index(prev_cnt, n_in), _narrow_index(prev_idx, n_in)]
        ctx.save_for_backward(*saved)
        out = out.unflatten(0, (1, B)).expand(T, *out.shape) if const else out.unflatten(0, (T, B))
        return out.contiguous() if const else out

    @staticmethod
    def backward(ctx, grad):
        weight, idx, data, *prev = ctx.saved_tensors
        in_shape, stride, padding, dilation, groups, pool_s, pool_k = ctx.geom
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        T, B = ctx.T, ctx.B
        g = grad.sum(0) if ctx.const else grad.reshape(T * B, *grad.shape[2:])
        restricted = need_dx and ctx.binary and ctx.has_prev
        dense_dx = need_dx and not restricted
        dense_dw = need_dw and not ctx.binary
        dx, dw, db, gc = _ops.spike_conv2d_backward.default(
            g, idx, data if ctx.binary else None, weight, in_shape, stride, padding, dilation,
            groups, pool_s, pool_k, prev[0].to(torch.int32) if restricted else None,
            prev[1].to(torch.int32) if restricted else None, T, restricted,
            need_dw and ctx.binary, need_db, dense_dx or dense_dw)
        if dense_dw:
            dw = torch.nn.grad.conv2d_weight(data, weight.shape, gc, stride, padding, dilation,
                                             groups)
        if dense_dx:
            dx = torch.nn.grad.conv2d_input((T * B, *in_shape), weight, gc, stride, padding,
                                            dilation, groups)
        if need_dx:
            dx = dx.unflatten(0, (T, B))
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None, None, None)


def conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
              stride=1, padding=0, dilation=1, groups: int = 1, pool: Optional[str] = None,
              pool_kernel: int = 2, route: str = "auto") -> torch.Tensor:
    """Conv2d on every step of x [T, B, C_in, H, W], then optional pooling: [T, B, C_out, H', W'].

    pool: None, "max" or "avg" with kernel = stride = pool_kernel (``nn.MaxPool2d(k)``,
    ``nn.AvgPool2d(k)``). route: "auto" (cost model), "events" (x must be binary) or "dense".
    Gradients as ``F.conv2d`` + pooling; dx only at the producer's active set when x carries one
    (the spikes of a sparsegrad neuron), where the producer reads it.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x must be a [T, B, C, H, W] tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    F_sg._check_tensor("weight", weight, 4, x.dtype, x.device)
    if bias is not None:
        F_sg._check_tensor("bias", bias, 1, x.dtype, x.device)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be None, 'max' or 'avg', got {pool!r}")
    if not isinstance(pool_kernel, int) or not 1 <= pool_kernel <= 16:
        raise ValueError(f"pool_kernel must be an int in [1, 16], got {pool_kernel!r}")
    if x.shape[2] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[2]} channels but weight expects "
                         f"{weight.shape[1] * groups} (C_in/groups = {weight.shape[1]}, groups = "
                         f"{groups})")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have at least one step and one sample, got {tuple(x.shape)}")
    x = x.contiguous() if not x.is_contiguous() else x
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    prev_cnt, prev_idx = F_sg.producer_active_set(x)
    return _ConvPool.apply(x, weight, bias, stride, padding, dilation, int(groups), pool,
                           pool_kernel, route, prev_cnt, prev_idx)


def _pooled_set(cnt: torch.Tensor, idx: torch.Tensor, win: torch.Tensor, shape,
                k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The active set of max-pooled spikes: the pooled entries whose window's winner is active.

    cnt / idx: the neuron's active set over the unpooled map (rows b*T + t, entries
    c*H*W + y*W + x); win: max pooling's winner offsets [T*B, C, Hp, Wp] (sample t*B + b). The
    pooling's backward sends a pooled entry's gradient to its winner only, and the neuron reads
    it only at its active entries: so dL/d(pooled) is needed only at the entries returned
    (rows b*T + t, entries c*Hp*Wp + py*Wp + px, in the neuron's order within a row)."""
    T, B, C, H, W = shape
    Hp, Wp = win.shape[2], win.shape[3]
    dev = idx.device
    # Per position of an H x W plane: its pooled position (-1 outside every window), its slot.
    y = torch.arange(H, dtype=torch.int32, device=dev).unsqueeze(1)
    x = torch.arange(W, dtype=torch.int32, device=dev).unsqueeze(0)
    inside = (y // k < Hp) & (x // k < Wp)
    pos_of = torch.where(inside, (y // k) * Wp + x // k, -1).reshape(-1)
    slot_of = ((y % k) * k + x % k).to(torch.uint8).reshape(-1)
    # Where row r = b*T + t's sample t*B + b starts in win.
    r = torch.arange(B * T, dtype=torch.int32, device=dev)
    base = ((r % T) * B + r // T) * (C * Hp * Wp)
    j = idx.to(torch.int32)
    c = j // (H * W)
    rem = j - c * (H * W)
    pos = pos_of.index_select(0, rem)  # index_select: far faster than tensor[index] on the CPU
    pj = c * (Hp * Wp) + pos.clamp_min(0)
    rows = torch.repeat_interleave(r, cnt.to(torch.int64), output_size=idx.numel())
    winner = win.reshape(-1).index_select(0, base.index_select(0, rows) + pj)
    keep = (winner == slot_of.index_select(0, rem)) & (pos >= 0)
    sel = keep.nonzero().squeeze(1)
    new_cnt = torch.bincount(rows.index_select(0, sel), minlength=B * T).to(torch.int32)
    return new_cnt, pj.index_select(0, sel)


class _SpikePool(torch.autograd.Function):
    """Max / avg pooling of spikes [T, B, C, H, W] with the winner offsets saved as uint8."""

    @staticmethod
    def forward(ctx, s, pool, k):
        T, B, C, H, W = s.shape
        out, idx = _ops.conv_pool2d.default(s.reshape(T * B, C, H, W), pool, k)
        ctx.pool, ctx.k, ctx.shape = pool, k, s.shape
        ctx.save_for_backward(idx)
        # max pooling's winners also tell which pooled entries the neuron reads (_pooled_set)
        ctx.mark_non_differentiable(idx)
        return out.unflatten(0, (T, B)), idx

    @staticmethod
    def backward(ctx, grad, _grad_idx=None):
        (idx,) = ctx.saved_tensors
        T, B, C, H, W = ctx.shape
        g = grad.reshape(T * B, C, grad.shape[3], grad.shape[4])
        out = _ops.conv_unpool2d.default(g, idx, ctx.pool, ctx.k, H, W)
        return out.view(T, B, C, H, W), None, None


class SpikePool2d(nn.Module):
    """Max ("max") or average ("avg") pooling of a spike sequence [T, B, C, H, W] over every step,
    kernel = stride = ``kernel_size``; keeps only uint8 winner offsets for the backward."""

    def __init__(self, kernel_size: int = 2, pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        if not isinstance(kernel_size, int) or not 1 <= kernel_size <= 16:
            raise ValueError(f"kernel_size must be an int in [1, 16], got {kernel_size!r}")
        self.kernel_size, self.pool = kernel_size, pool

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if not isinstance(s, torch.Tensor) or s.dim() != 5:
            raise ValueError(f"input must be [T, B, C, H, W], got {getattr(s, 'shape', s)}")
        return _SpikePool.apply(s.contiguous(), self.pool, self.kernel_size)[0]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, pool={self.pool!r}"


class ConvLIF(nn.Module):
    """Conv2d -> [pool] -> LIF neurons (or Conv2d -> LIF -> pool) over a whole sequence.

    Input [T, B, C_in, H, W] (time-major) -> spikes [T, B, C_out, H', W']. The convolution's
    parameters are an nn.Conv2d's (``weight`` [C_out, C_in/groups, KH, KW], ``bias``; state_dict
    keys ``weight``, ``bias``); stride / padding / dilation / groups as nn.Conv2d's (zero padding).
    pool: None, "max" or "avg" with kernel = stride = pool_kernel; pool_position "before" the
    neuron (snnTorch's tutorial CSNN: conv -> MaxPool2d -> Leaky) or "after" it (SpikingJelly's
    conv -> LIF -> MaxPool2d). The neuron: ``neuron`` (a time-major sparsegrad.nn.LIFNeuron or
    conversion.SpikingJellyNeuron taking [T, B, N]) or, by default, LIFNeuron(alpha, threshold,
    b_th, surrogate, slope, reset, backward) (sparsegrad.lif's arguments). route: the
    convolution's forward route ("auto", "events", "dense"; see sparsegrad.conv).
    ``last_stats``: the neuron's statistics of the last call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, pool: Optional[str] = None,
                 pool_kernel: int = 2, pool_position: str = "before", alpha: float = 0.9,
                 threshold: float = 1.0, b_th: float = 0.2, surrogate: str = "fast_sigmoid",
                 slope: float = 100.0, reset: str = "subtract", backward: str = "sparse",
                 route: str = "auto", neuron: Optional[nn.Module] = None, device=None,
                 dtype=None):
        super().__init__()
        from .nn import LIFNeuron

        if isinstance(padding, str):
            raise ValueError("padding must be ints (string padding is not supported)")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, device=device, dtype=dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = groups
        if pool not in POOLS:
            raise ValueError(f"pool must be None, 'max' or 'avg', got {pool!r}")
        if pool_position not in ("before", "after"):
            raise ValueError(f"pool_position must be 'before' or 'after', got {pool_position!r}")
        if not isinstance(pool_kernel, int) or not 1 <= pool_kernel <= 16:
            raise ValueError(f"pool_kernel must be an int in [1, 16], got {pool_kernel!r}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.pool, self.pool_kernel, self.pool_position = pool, int(pool_kernel), pool_position
        self.route = route
        if neuron is None:
            neuron = LIFNeuron(alpha=alpha, threshold=threshold, b_th=b_th, surrogate=surrogate,
                               slope=slope, reset=reset, backward=backward)
        elif getattr(neuron, "batch_first", False) or getattr(neuron, "return_mem", False):
            raise ValueError("neuron must be time-major and return spikes only")
        self.neuron = neuron

    @property
    def last_stats(self):
        return getattr(self.neuron, "last_stats", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> "ConvLIF":
        """A ConvLIF sharing ``conv``'s weight and bias Parameters."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero padding given as ints is supported, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                dtype=conv.weight.dtype, **kwargs)
        m.weight = conv.weight
        m.bias = conv.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.pool if self.pool_position == "before" else None
        cur = conv_pool(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups, pool=before,
                        pool_kernel=self.pool_kernel, route=self.route)
        T, B = cur.shape[:2]
        spikes3 = self.neuron(cur.reshape(T, B, -1))
        spikes = spikes3.view(cur.shape)
        cnt, idx = F_sg.producer_active_set(spikes3)
        if self.pool is not None and self.pool_position == "after":
            pooled, win = _SpikePool.apply(spikes, self.pool, self.pool_kernel)
            if cnt is not None and self.pool == "max" and win.numel():
                # the next ConvLIF computes dx only where a pooled entry's winner is active
                F_sg.attach_active_set(pooled, *_pooled_set(cnt, idx, win, spikes.shape,
                                                            self.pool_kernel))
            return pooled
        if cnt is not None:  # the next ConvLIF computes dx only at these entries
            F_sg.attach_active_set(spikes, cnt, idx)
        return spikes

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.pool is not None:
            s += f", pool={self.pool!r}, pool_kernel={self.pool_kernel}, " \
                 f"pool_position={self.pool_position!r}"
        return s + (f", route={self.route!r}" if self.route != "auto" else "")


# ------------------------------------------------------------------------------ conversion

def _fusable_neuron(n) -> bool:
    """A time-major neuron module that takes [T, B, N] and returns spikes only: a plain
    LIFNeuron or a SpikingJellyNeuron (conversion's exact SpikingJelly neuron)."""
    from .nn import LIFNeuron

    if type(n) is LIFNeuron:
        return not n.batch_first and not n.return_mem
    return type(n).__name__ == "SpikingJellyNeuron" and type(n).__module__ == "sparsegrad.conversion"


def _conv_of(layer) -> Optional[nn.Conv2d]:
    from .nn import TimeDistributed

    if isinstance(layer, TimeDistributed) and not layer.batch_first and \
            _plain(layer.module, nn.Conv2d) and layer.module.padding_mode == "zeros" and \
            not isinstance(layer.module.padding, str):
        return layer.module
    return None


def _plain(m, cls) -> bool:
    """m is a cls itself or SpikingJelly's single-step subclass of it (layer.Conv2d, ...)."""
    return type(m) is cls or (isinstance(m, cls) and
                              (type(m).__module__ or "").startswith("spikingjelly"))


def _pool_of(layer) -> Optional[Tuple[str, int]]:
    """("max" | "avg", k) for TimeDistributed(MaxPool2d(k) / AvgPool2d(k)) with stride k, no
    padding, dilation 1, floor mode (and for avg: no divisor override); else None."""
    from .nn import TimeDistributed

    if not isinstance(layer, TimeDistributed) or layer.batch_first:
        return None
    return pool_spec(layer.module)


def pool_spec(p) -> Optional[Tuple[str, int]]:
    """("max" | "avg", k) for an nn.MaxPool2d(k) / nn.AvgPool2d(k) that ConvLIF can compute
    (stride k, no padding, dilation 1, floor mode, no divisor override), else None."""
    if not (_plain(p, nn.MaxPool2d) or _plain(p, nn.AvgPool2d)):
        return None
    return _pool_args("max" if isinstance(p, nn.MaxPool2d) else "avg", p.kernel_size, p.stride,
                      p.padding, getattr(p, "dilation", 1), p.ceil_mode,
                      getattr(p, "return_indices", False), getattr(p, "divisor_override", None))


def pool_call_spec(fn, args, kwargs) -> Optional[Tuple[str, int]]:
    """The same for a call F.max_pool2d(x, ...) / F.avg_pool2d(x, ...) with its arguments
    after x (as a model's forward writes it), else None."""
    import torch.nn.functional as F

    names = {F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                            "return_indices"),
             F.avg_pool2d: ("kernel_size", "stride", "padding", "ceil_mode",
                            "count_include_pad", "divisor_override")}.get(fn)
    if names is None or len(args) > len(names):
        return None
    a = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in a:
            return None
        a[k] = v
    if "kernel_size" not in a:
        return None
    return _pool_args("max" if fn is F.max_pool2d else "avg", a["kernel_size"], a.get("stride"),
                      a.get("padding", 0), a.get("dilation", 1), a.get("ceil_mode", False),
                      a.get("return_indices", False), a.get("divisor_override"))


def _pool_args(kind, k, stride, padding, dilation, ceil_mode, return_indices,
               divisor_override) -> Optional[Tuple[str, int]]:
    def one(v):  # an int, or a pair of equal ints
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v and len(set(v)) == 1 and isinstance(v[0], int):
            return v[0]
        return None

    k = one(k)
    stride = k if stride is None or (isinstance(stride, (tuple, list)) and not stride) else one(stride)
    if k is None or stride != k or one(padding) != 0 or ceil_mode or not 1 <= k <= 16:
        return None
    if kind == "max":
        return ("max", k) if one(dilation) == 1 and not return_indices else None
    return ("avg", k) if divisor_override is None else None


def fuse_conv_layers(model: nn.Module) -> int:
    """Replace, in place, every TimeDistributed(Conv2d) -> [TimeDistributed(Max/AvgPool2d)] ->
    LIFNeuron and TimeDistributed(Conv2d) -> LIFNeuron -> TimeDistributed(Max/AvgPool2d) run of
    an nn.Sequential (e.g. what sparsegrad.convert returns) by one ConvLIF sharing the conv's
    Parameters; the replaced positions become nn.Identity, so indices and state_dict keys stay.
    Nested nn.Sequential children are fused too. Returns the number of ConvLIF made."""
    from .nn import LIFNeuron  # noqa: F401

    made = 0
    if not isinstance(model, nn.Sequential):
        return 0
    layers = list(model)
    i = 0
    while i < len(layers):
        if isinstance(layers[i], nn.Sequential):
            made += fuse_conv_layers(layers[i])
            i += 1
            continue
        conv = _conv_of(layers[i])
        if conv is None:
            i += 1
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        nxt2 = layers[i + 2] if i + 2 < len(layers) else None
        span, kwargs = 0, None
        pool = _pool_of(nxt) if nxt is not None else None
        if pool is not None and nxt2 is not None and _fusable_neuron(nxt2):
            span, kwargs = 3, dict(neuron=nxt2, pool=pool[0], pool_kernel=pool[1])
        elif nxt is not None and _fusable_neuron(nxt):
            pool = _pool_of(nxt2) if nxt2 is not None else None
            if pool is not None:
                span, kwargs = 3, dict(neuron=nxt, pool=pool[0], pool_kernel=pool[1],
                                       pool_position="after")
            else:
                span, kwargs = 2, dict(neuron=nxt)
        if not span:
            i += 1
            continue
        model[i] = ConvLIF.from_conv(conv, **kwargs)
        for k in range(i + 1, i + span):
            model[k] = nn.Identity()
        made += 1
        layers = list(model)
        i += span
    return made
