"""Plain-PyTorch model of every sparsegrad op: the ground truth for tests and benchmarks.

Everything here is written step by step with ordinary autograd, exactly as DESIGN.md §2 states the
model, so that it can be read against the paper. It is slow on purpose: no fusion, one Python
iteration per time step (the "dense BPTT" baseline of the benchmarks).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["surrogate_grad", "spike", "lif_layer", "rlif_layer", "li_readout", "lif_neuron",
           "spikingjelly_neuron"]


def surrogate_grad(u: torch.Tensor, slope: float, surrogate: str = "fast_sigmoid") -> torch.Tensor:
    """dS/dV at u = V - threshold for each surrogate of csrc/lif_math.h (a = slope):

    fast_sigmoid 1/(a|u| + 1)^2, atan (a/2)/(1 + (pi/2*a*u)^2), sigmoid a*sig(a*u)*(1 - sig(a*u))
    (written with exp(-a|u|), which never overflows), triangle a*max(0, 1 - a|u|).
    """
    a = u.abs()
    if surrogate == "fast_sigmoid":
        return 1.0 / (slope * a + 1.0) ** 2
    if surrogate == "atan":
        z = (math.pi / 2) * slope * a
        return (slope / 2) / (1.0 + z * z)
    if surrogate == "sigmoid":
        e = torch.exp(-slope * a)
        return slope * e / (1.0 + e) ** 2
    if surrogate == "triangle":
        return slope * torch.clamp(1.0 - slope * a, min=0.0)
    raise ValueError(f"surrogate must be one of 'fast_sigmoid', 'atan', 'sigmoid', 'triangle', "
                     f"got {surrogate!r}")


class _Spike(torch.autograd.Function):
    """Heaviside forward; surrogate backward masked to |u| < b_th (b_th = inf: unmasked)."""

    @staticmethod
    def forward(ctx, u, slope, b_th, surrogate):
        ctx.save_for_backward(u)
        ctx.slope = slope
        ctx.b_th = b_th
        ctx.surrogate = surrogate
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        sg = surrogate_grad(u, ctx.slope, ctx.surrogate)
        if not math.isinf(ctx.b_th):
            sg = sg * (u.abs() < ctx.b_th).to(u.dtype)
        return grad_out * sg, None, None, None


def spike(u: torch.Tensor, slope: float = 100.0, b_th: float = math.inf,
          surrogate: str = "fast_sigmoid") -> torch.Tensor:
    """S = H(u) with the (optionally masked) surrogate gradient."""
    return _Spike.apply(u, slope, b_th, surrogate)


def lif_step(v, current_t, s, alpha: float, threshold: float, reset: str):
    """One membrane update (S of the previous step detached in every reset, as snnTorch)."""
    s = s.detach()
    if reset == "subtract":
        return alpha * v + current_t - threshold * s
    if reset == "zero":
        return alpha * ((1 - s) * v) + current_t
    if reset == "none":
        return alpha * v + current_t
    raise ValueError(f"reset must be one of 'subtract', 'zero', 'none', got {reset!r}")


def lif_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha: float,
    threshold: float = 1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    return_state: bool = False,
    alpha_syn=None,
):
    """Reference LIF layer, time-major x [T, B, N_in] -> spikes [T, B, N_out].

    V[t] = alpha*V[t-1] + x[t] @ W.T + b - threshold*S[t-1] (reset="subtract"; "zero":
    alpha*(1 - S[t-1])*V[t-1] + I[t]; "none": alpha*V[t-1] + I[t]; S[t-1] detached),
    S[t] = H(V[t] - threshold). backward="dense" uses the unmasked surrogate, "sparse" masks it to
    |V - threshold| < b_th. state = (V, S) of shape [B, N_out] each; the returned state is
    (V[T-1], S[T-1]). alpha / threshold / alpha_syn may be tensors of shape [] or [N_out];
    with alpha_syn the membrane integrates syn[t] = alpha_syn*syn[t-1] + I[t] and the state is
    (V, S, syn).
    """
    if backward not in ("sparse", "dense"):
        raise ValueError(f"backward must be 'sparse' or 'dense', got {backward!r}")
    current = F.linear(x, weight, bias)
    return lif_neuron(current, alpha=alpha, threshold=threshold, b_th=b_th, surrogate=surrogate,
                      slope=slope, reset=reset, backward=backward, state=state,
                      return_state=return_state, alpha_syn=alpha_syn)


def rlif_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    rec_weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha: float,
    threshold: float = 1.0,
    b_th: float = 0.2,
    surrogate: str = "fast_sigmoid",
    slope: float = 100.0,
    reset: str = "subtract",
    backward: str = "sparse",
    state: Optional[Tuple[torch.Tensor, ...]] = None,
    return_state: bool = False,
    alpha_syn=None,
):
    """Reference recurrent LIF layer, time-major x [T, B, N_in] -> spikes [T, B, N_out].

    I[t] = x[t] @ W.T + b + S[t-1] @ R.T with the previous step's spikes S[t-1] (S[-1] = state's
    S or 0), and without alpha_syn
        subtract: V[t] = alpha*V[t-1]            + I[t] - threshold*S[t-1]
        zero:     V[t] = alpha*(1-S[t-1])*V[t-1] + I[t]
        none:     V[t] = alpha*V[t-1]            + I[t]
    S[t] = H(V[t] - threshold). The reset terms use S detached; the recurrent input S[t-1] @ R.T
    does not (as snnTorch's RLeaky). rec_weight R is [N_out, N_out]. backward="dense" uses the
    unmasked surrogate, "sparse" masks it to |V - threshold| < b_th. alpha / threshold /
    alpha_syn may be floats or tensors of shape [] or [N_out] (ordinary autograd gives their
    gradients). With alpha_syn the membrane integrates syn[t] = alpha_syn*syn[t-1] + I[t] in
    place of I[t] (syn[-1] = state's syn or 0). Returns (spikes, (V, S)) of the last step with
    return_state=True ((V, S, syn) with alpha_syn).
    """
    if backward not in ("sparse", "dense"):
        raise ValueError(f"backward must be 'sparse' or 'dense', got {backward!r}")
    mask_width = b_th if backward == "sparse" else math.inf
    current = F.linear(x, weight, bias)
    _, B, N = current.shape
    syn = None
    if state is None:
        v = current.new_zeros(B, N)
        s = current.new_zeros(B, N)
    else:
        v, s = state[0], state[1]
        syn = state[2] if len(state) > 2 else None
    if alpha_syn is not None and syn is None:
        syn = current.new_zeros(B, N)
    spikes = []
    # unbind, not current[t]: indexing inside the loop would make autograd's backward O(T^2)
    for current_t in current.unbind(0):
        # the recurrent input keeps S's gradient; lif_step detaches S in the reset only
        current_t = current_t + F.linear(s, rec_weight)
        if alpha_syn is not None:
            syn = alpha_syn * syn + current_t
            current_t = syn
        v = lif_step(v, current_t, s, alpha, threshold, reset)
        s = spike(v - threshold, slope, mask_width, surrogate)
        spikes.append(s)
    out = torch.stack(spikes)
    if return_state:
        return out, ((v, s) if alpha_syn is None else (v, s, syn))
    return out


def li_readout(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha: float,
    reduce: str = "max",
):
    """Reference leaky-integrator readout: U[t] = alpha*U[t-1] + (1-alpha)*(x[t] @ W.T + b).

    reduce: "max" | "sum" | "mean" over time -> [B, N_out]; "none" -> [T, B, N_out].
    """
    current = F.linear(x, weight, bias)
    u = torch.zeros_like(current[0])
    trace = []
    for current_t in current.unbind(0):
        u = alpha * u + (1.0 - alpha) * current_t
        trace.append(u)
    potentials = torch.stack(trace)
    if reduce == "max":
        return potentials.max(dim=0).values
    if reduce == "sum":
        return potentials.sum(dim=0)
    if reduce == "mean":
        return potentials.mean(dim=0)
    if reduce == "none":
        return potentials
    raise ValueError(f"reduce must be one of 'max', 'sum', 'mean', 'none', got {reduce!r}")


# --------------------------------------------------------------------------------------------
# The LIF neuron alone (sparsegrad.lif), every surrogate and reset; SpikingJelly's neurons.
# --------------------------------------------------------------------------------------------
class _SpikeKind(torch.autograd.Function):
    """spike(), optionally firing at u >= 0 (SpikingJelly's convention)."""

    @staticmethod
    def forward(ctx, u, slope, b_th, surrogate, at_zero=False):
        ctx.save_for_backward(u)
        ctx.slope, ctx.b_th, ctx.surrogate = slope, b_th, surrogate
        return ((u >= 0) if at_zero else (u > 0)).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        sg = surrogate_grad(u, ctx.slope, ctx.surrogate)
        if not math.isinf(ctx.b_th):
            sg = sg * (u.abs() < ctx.b_th).to(u.dtype)
        return grad_out * sg, None, None, None, None


def lif_neuron(
    current: torch.Tensor,
    *,
    alpha: float,
    threshold: float = 1.0,
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
    """Reference of sparsegrad.lif: current [T, B, *] -> spikes [T, B, *], step by step.

    subtract: V[t] = alpha*V[t-1] + I[t] - threshold*S[t-1]
    zero:     V[t] = alpha*((1 - S[t-1])*V[t-1]) + I[t]      (as snnTorch's reset_mechanism="zero")
    none:     V[t] = alpha*V[t-1] + I[t]
    S[t] = H(V[t] - threshold); S[t-1] is detached in every reset.

    alpha, threshold and alpha_syn may be floats or tensors broadcasting to current.shape[2:]
    (ordinary autograd gives their gradients). With alpha_syn (a synaptic current),
    I[t] above is syn[t] = alpha_syn*syn[t-1] + current[t], syn[-1] = state's syn or 0, and the
    returned state is (V, S, syn).
    """
    if backward not in ("sparse", "dense"):
        raise ValueError(f"backward must be 'sparse' or 'dense', got {backward!r}")
    if reset not in ("subtract", "zero", "none"):
        raise ValueError(f"reset must be 'subtract', 'zero' or 'none', got {reset!r}")
    mask_width = b_th if backward == "sparse" else math.inf
    syn = None
    if state is None:
        v = current.new_zeros(current.shape[1:])
        s = current.new_zeros(current.shape[1:])
    else:
        v, s = state[0], state[1]
        syn = state[2] if len(state) > 2 else None
    if alpha_syn is not None and syn is None:
        syn = current.new_zeros(current.shape[1:])
    spikes, mems = [], []
    for current_t in current.unbind(0):
        if alpha_syn is not None:
            syn = alpha_syn * syn + current_t
            current_t = syn
        v = lif_step(v, current_t, s, alpha, threshold, reset)
        s = spike(v - threshold, slope, mask_width, surrogate)
        spikes.append(s)
        mems.append(v)
    out = (torch.stack(spikes),)
    if return_mem:
        out += (torch.stack(mems),)
    if return_state:
        out += ((v, s) if alpha_syn is None else (v, s, syn),)
    return out[0] if len(out) == 1 else out


def spikingjelly_neuron(
    x: torch.Tensor,
    *,
    tau: Optional[float] = 2.0,
    decay_input: bool = True,
    threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    surrogate: str = "sigmoid",
    slope: float = 4.0,
    detach_reset: bool = False,
    b_th: float = math.inf,
    backward: str = "dense",
):
    """SpikingJelly's LIFNode (tau given) or IFNode (tau=None), multi-step, step by step.

    H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau         (LIFNode, decay_input=True)
    H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]           (LIFNode, decay_input=False)
    H[t] = V[t-1] + X[t]                                      (IFNode)
    S[t] = 1[H[t] - threshold >= 0]
    V[t] = H[t] - threshold*S[t] (v_reset None)  or  S[t]*V_reset + (1 - S[t])*H[t]
    V[-1] = V_reset (0 when None); S is detached in the reset iff detach_reset. The reference of
    sparsegrad.conversion.SpikingJellyNeuron, written as spikingjelly.activation_based does.
    """
    mask_width = b_th if backward == "sparse" else math.inf
    reset_value = 0.0 if v_reset is None else v_reset
    v = x.new_full(x.shape[1:], reset_value)
    spikes = []
    for x_t in x.unbind(0):
        if tau is None:
            h = v + x_t
        elif decay_input:
            h = v + (x_t - (v - reset_value)) / tau
        else:
            h = v - (v - reset_value) / tau + x_t
        s = _SpikeKind.apply(h - threshold, slope, mask_width, surrogate, True)
        r = s.detach() if detach_reset else s
        v = h - r * threshold if v_reset is None else r * v_reset + (1.0 - r) * h
        spikes.append(s)
    return torch.stack(spikes), v


def conv_lif(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    pool: Optional[str] = None,
    pool_kernel: int = 2,
    pool_position: str = "before",
    **neuron,
) -> torch.Tensor:
    """Reference of sparsegrad.nn.ConvLIF: F.conv2d on every step of x [T, B, C, H, W], then
    max / avg pooling (kernel = stride = pool_kernel) before or after the neuron, the neuron being
    lif_neuron (its keyword arguments: alpha, threshold, b_th, surrogate, slope, reset, backward)
    stepped in plain PyTorch."""
    def pooled(h):
        if pool is None:
            return h
        fn = F.max_pool2d if pool == "max" else F.avg_pool2d
        return torch.stack([fn(h_t, pool_kernel) for h_t in h.unbind(0)])

    cur = torch.stack([F.conv2d(x_t, weight, bias, stride, padding, dilation, groups)
                       for x_t in x.unbind(0)])
    if pool_position == "before":
        cur = pooled(cur)
    spikes = lif_neuron(cur, **neuron)
    return pooled(spikes) if pool_position == "after" else spikes
