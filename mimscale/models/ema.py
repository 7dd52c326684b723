"""A momentum (EMA) copy of some modules, kept in fp32 and out of the engine's reach.

Used by LC-MAE's momentum encoder (docs/methods.md §3.5, §6.2). Design:

- The shadow copy is **not** a registered submodule. A bf16 DeepSpeed engine casts every registered
  parameter of the trained module to bf16 and ZeRO-3 partitions them; an EMA with tau -> 1 in bf16
  rounds its updates away (8 mantissa bits vs (1 - tau) ~ 4e-3), so it must be invisible to both.
  It is never in the optimizer either. Under bf16 it is fed the engine's bf16 weights (the fp32
  masters are partitioned under ZeRO-1/2); their rounding noise averages out in the EMA.
- It travels with the run as this module's *extra state* (``nn.Module.get_extra_state``), which
  ``state_dict`` / ``load_state_dict`` -- and therefore DeepSpeed's ``save_checkpoint`` /
  ``load_checkpoint`` -- carry. No change to the checkpoint code is needed.
- Under ZeRO 0/1/2 every rank holds the whole parameters, so each rank updates the same fp32
  copy from the same values; DeepSpeed saves the module state of rank 0 and every rank loads it,
  which is exact as long as the copies agree across ranks (BatchNorm buffers must therefore agree
  too: see :func:`average_buffers`). ZeRO-3 is refused by the methods using this class.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def cosine_momentum(i: int, total: int | None, base: float) -> float:
    """tau(i) = 1 - (1 - base) * (1 + cos(pi * i / total)) / 2 (LUT ``cosine_scheduler``, §3.5).

    Args:
        i: optimizer steps applied before this update (0 for the first update).
        total: optimizer steps of the whole schedule; None keeps tau at ``base``.
        base: tau_0 (0.996).

    Returns:
        tau in [base, 1]; 1 from ``i >= total`` on.
    """
    if total is None:
        return base
    progress = min(1.0, i / max(1, total))
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """All-reduce-average the floating-point buffers of ``module`` (e.g. BN running stats).

    Per-rank BatchNorm (the CPU fallback for SyncBatchNorm) leaves each rank with its own
    running statistics; averaging them after each optimizer step keeps every rank's copy equal,
    which the rank-0 checkpoint (and so exact resume) relies on. As timm's ``distribute_bn``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


class MomentumCopy(nn.Module):
    """An fp32, eval-mode, gradient-free EMA of the modules in ``sources``.

    Args:
        sources: name -> module to copy (e.g. ``{"encoder": enc, "projector": proj}``). The
            copies are reachable as ``self[name]``; the sources themselves are not stored.

    The EMA covers parameters and buffers (§3.5): floating-point tensors are averaged, integer
    buffers (``num_batches_tracked``) copied.
    """

    shadow: nn.ModuleDict  # set with object.__setattr__: not a registered submodule

    def __init__(self, sources: dict[str, nn.Module]) -> None:
        super().__init__()
        shadow = nn.ModuleDict({k: copy.deepcopy(m) for k, m in sources.items()})
        shadow.float().eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module registration on purpose (see the module docstring).
        object.__setattr__(self, "shadow", shadow)
        self.num_updates = 0

    def __getitem__(self, name: str) -> nn.Module:
        return self.shadow[name]

    def train(self, mode: bool = True) -> MomentumCopy:
        """The copy stays in eval mode: its BatchNorm uses running statistics (§3.9 #4)."""
        super().train(mode)
        self.shadow.eval()
        return self

    def to_device(self, device: torch.device) -> None:
        """Move the copy (kept fp32) to ``device``; ``Module.to`` never reaches it."""
        first = next(iter(self.shadow.state_dict().values()), None)
        if first is not None and first.device != device:
            self.shadow.to(device)

    def _pairs(self, sources: dict[str, nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if sources.keys() != self.shadow.keys():
            raise KeyError(f"MomentumCopy: sources {sorted(sources)} != copies {sorted(self.shadow)}")
        pairs = []
        for name, src in sources.items():
            dst = self.shadow[name]
            s_sd, d_sd = src.state_dict(keep_vars=True), dst.state_dict(keep_vars=True)
            if s_sd.keys() != d_sd.keys():
                raise KeyError(f"MomentumCopy[{name}]: source and copy differ in state keys")
            pairs += [(d_sd[k], s_sd[k]) for k in d_sd]
        return pairs

    @torch.no_grad()
    def update(self, sources: dict[str, nn.Module], tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta for every parameter and float buffer (fp32).

        Args:
            sources: the same names as at construction, pointing at the trained modules.
            tau: momentum in [0, 1].
        """
        pairs = self._pairs(sources)
        self.to_device(pairs[0][1].device)
        floats = [(d, s) for d, s in pairs if d.is_floating_point()]
        ema = [d for d, _ in floats]
        torch._foreach_mul_(ema, tau)
        torch._foreach_add_(ema, [s.detach().float() for _, s in floats], alpha=1.0 - tau)
        for d, s in pairs:
            if not d.is_floating_point():
                d.copy_(s)
        self.num_updates += 1

    def get_extra_state(self) -> dict[str, Any]:
        """What the checkpoint stores: the fp32 copy and the update count."""
        return {"state": self.shadow.state_dict(), "num_updates": self.num_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`get_extra_state` (strict: every key, every shape)."""
        self.shadow.load_state_dict(state["state"], strict=True)
        self.num_updates = int(state["num_updates"])
