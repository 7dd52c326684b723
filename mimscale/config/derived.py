"""Values derived from a recipe and the world size, and the resolved recipe written to disk."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from mimscale.config.loader import check_world_size
from mimscale.config.schema import Recipe


@dataclass
class Derived:
    """Every value computed from a recipe and the world size, in one place."""

    world_size: int
    lr: float
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_epoch: int


def derive(r: Recipe, world_size: int, samples_per_epoch: int) -> Derived:
    """Absolute lr, accumulation and step counts for this world size.

    Raises:
        RecipeError: when the global batch cannot be honoured with this world size.
    """
    t, o = r.train, r.optim
    check_world_size(r, world_size)
    per_step = t.micro_batch * world_size
    scale = {
        "none": 1.0,
        "linear256": t.global_batch / 256,
        "linear512": t.global_batch / 512,
        "sqrt": math.sqrt(t.global_batch) / 4,  # LC-MAE / LUT: blr * sqrt(B) / 4
    }[o.lr_scaling]
    lr = o.lr if o.lr is not None else o.blr * scale  # type: ignore[operator]
    steps_per_epoch = max(1, samples_per_epoch // t.global_batch)
    total = max(1, round(t.epochs * steps_per_epoch))
    return Derived(
        world_size=world_size,
        lr=lr,
        grad_accum=t.global_batch // per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(o.warmup_epochs * steps_per_epoch),
        samples_per_epoch=samples_per_epoch,
    )


def save_recipe(r: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"# resolved recipe (from {r.source})\n" + yaml.safe_dump(r.to_dict(), sort_keys=False))
    tmp.replace(path)
