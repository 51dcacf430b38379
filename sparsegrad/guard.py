"""Dead-network guard for the sparse backward.

With the sparse backward a layer whose membrane never comes within b_th of the threshold has no
active entries, so its weights get exactly zero gradient, nothing changes, and it stays that way
for ever (Perez-Nieves & Goodman lost runs at 100 hidden units like this). A layer that never
spikes is as bad: the layers above it see no input, so their weights get no gradient either, and
its own surrogate is too small to move it. The guard reads each sparse layer's kernel statistics
after every forward (``layer.last_stats.active_count`` and ``spike_count``: no extra work), calls
a layer *dead* when either is zero, warns once per layer, and applies a recovery policy:

- ``"widen"`` (default): a dead layer's b_th is multiplied by ``growth`` (up to ``max_b_th``;
  ``inf`` is the dense surrogate) for the next step, and keeps widening while the layer is dead or
  its active fraction stays below ``target_fraction``. Once it is alive again, b_th shrinks back
  by the same factor whenever the active fraction exceeds ``4 * target_fraction``, down to its
  original value.
- ``"dense"``: a dead layer is switched to the dense surrogate and ``update()`` returns True, asking
  the caller to run this step's forward again; ``end_step()`` switches it back to sparse.
- ``"warn"``: only warn.

Under torch.distributed the counts are summed over the processes first, so every replica takes the
same decision and the replicas' hyper-parameters stay identical.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List

import torch

__all__ = ["DeadNetworkGuard", "DeadNetworkWarning", "POLICIES", "sparse_layers"]

POLICIES = ("widen", "dense", "warn")


class DeadNetworkWarning(RuntimeWarning):
    """A sparse layer had no active entries: its weights receive no gradient."""


def sparse_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The sparsegrad LIF / LIFNeuron / RLIF layers of ``model`` (unwrapping DistributedDataParallel)."""
    from .nn import LIF, LIFNeuron, RLIF

    inner = getattr(model, "module", model)
    return [m for m in inner.modules() if isinstance(m, (LIF, LIFNeuron, RLIF))]


class DeadNetworkGuard:
    """Watch sparse LIF layers for an empty active set and recover from it.

    Usage per training step::

        out = model(x)
        if guard.update():          # policy "dense" only: dead layers switched to dense
            out = model(x)          # re-run this step's forward with them
        loss.backward(); optimizer.step()
        guard.end_step()
    """

    def __init__(self, model_or_layers, policy: str = "widen", *, target_fraction: float = 0.01,
                 growth: float = 2.0, max_b_th: float = math.inf, warn: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not (isinstance(target_fraction, (int, float)) and 0 < target_fraction < 1):
            raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction!r}")
        if not (isinstance(growth, (int, float)) and growth > 1 and math.isfinite(growth)):
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        if not (isinstance(max_b_th, (int, float)) and max_b_th > 0):
            raise ValueError(f"max_b_th must be > 0 (inf allowed), got {max_b_th!r}")
        if isinstance(model_or_layers, torch.nn.Module):
            layers = sparse_layers(model_or_layers)
        else:
            layers = list(model_or_layers)
        if not layers:
            raise ValueError("model_or_layers holds no sparsegrad.nn.LIF layer to guard")
        self.layers = layers
        self.policy = policy
        self.target_fraction = float(target_fraction)
        self.growth = float(growth)
        self.max_b_th = float(max_b_th)
        self.warn = warn
        self.base_b_th = [float(layer.b_th) for layer in layers]
        self.dead_steps = [0] * len(layers)     # steps on which each layer had no active entry
        self.interventions = 0                  # steps on which the policy changed something
        self._warned = [False] * len(layers)
        self._switched: List[int] = []
        self.last_fractions: List[float] = [float("nan")] * len(layers)

    def _counts(self):
        """(active_count, spike_count, numel) per guarded sparse layer from its last forward, summed over ranks."""
        idx, active, spikes, numel = [], [], [], []
        for i, layer in enumerate(self.layers):
            stats = getattr(layer, "last_stats", None)
            if stats is None or layer.backward != "sparse":
                continue
            idx.append(i)
            active.append(stats.active_count.reshape(()).to("cpu", torch.float64))
            spikes.append(stats.spike_count.reshape(()).to("cpu", torch.float64))
            numel.append(float(stats.numel))
        if not idx:
            return idx, [], [], []
        packed = torch.stack([torch.stack(active), torch.stack(spikes),
                              torch.tensor(numel, dtype=torch.float64)])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            packed = packed.to(device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        return idx, packed[0].tolist(), packed[1].tolist(), packed[2].tolist()

    def update(self) -> bool:
        """Inspect the last forward of each layer; apply the policy. True: re-run the forward."""
        idx, active, spikes, numel = self._counts()
        rerun = False
        changed = False
        for i, a, n_spk, n in zip(idx, active, spikes, numel):
            layer = self.layers[i]
            frac = a / max(n, 1.0)
            self.last_fractions[i] = frac
            # Dead: no active entry (zero gradient), or no spike (the layers above see no input,
            # so their weights get zero gradient and this layer's surrogate is far from threshold).
            dead = a == 0 or n_spk == 0
            if dead:
                self.dead_steps[i] += 1
                if self.warn and not self._warned[i]:
                    self._warned[i] = True
                    what = "no active entries" if a == 0 else "no spikes"
                    warnings.warn(
                        f"sparse layer {i} ({layer.in_features}->{layer.out_features}) has {what} "
                        f"(b_th={layer.b_th:g}): the sparse backward gives it and the layers above "
                        f"zero or vanishing gradient. Guard policy: {self.policy!r}.",
                        DeadNetworkWarning, stacklevel=2)
            if self.policy == "widen":
                widened = layer.b_th > self.base_b_th[i]
                if dead or (widened and frac < self.target_fraction):
                    new = min(layer.b_th * self.growth, self.max_b_th)
                elif widened and frac > 4 * self.target_fraction:
                    new = layer.b_th / self.growth
                    if math.isinf(new):
                        new = self.base_b_th[i] * self.growth ** 8
                    new = max(new, self.base_b_th[i])
                else:
                    new = layer.b_th
                if new != layer.b_th:
                    layer.b_th = float(new)
                    changed = True
            elif self.policy == "dense" and dead:
                layer.backward = "dense"
                self._switched.append(i)
                rerun = changed = True
        if changed:
            self.interventions += 1
        return rerun

    def end_step(self) -> None:
        """Undo per-step changes (policy "dense": back to the sparse backward)."""
        for i in self._switched:
            self.layers[i].backward = "sparse"
        self._switched = []

    def state(self) -> Dict[str, list]:
        """For logs: current b_th, dead-step counts and last active fractions per layer."""
        return {"b_th": [float(layer.b_th) for layer in self.layers],
                "dead_steps": list(self.dead_steps),
                "active_fraction": list(self.last_fractions)}
