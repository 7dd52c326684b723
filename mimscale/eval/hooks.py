"""Evaluation hooks run by the training loop every ``eval.every`` optimizer steps.

``eval:`` recipe section (:class:`EvalConfig`)::

    eval: {every: 500, knn: true, linear: true, pool: cls}   # kNN + fast linear probe
    eval: {every: 0, at_end: true, top1: true}                # fine-tuning: the method's own head

One evaluation = one pass over the labeled bank (``eval.train``, default ``data.train``) and
the held-out split (``eval.val``, default ``data.val``), split across ranks and all-gathered
(:mod:`mimscale.eval.features`); rank 0 then fits the kNN / linear probe on the cached features
and logs ``eval/knn_top1``, ``eval/linear_top1``, ``eval/top1`` with step and samples seen.
Under ZeRO-3 the parameters are gathered once into a plain copy of the method (built on the
first evaluation), so the evaluation never runs through the engine's partitioned module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mimscale.config import EvalConfig
from mimscale.methods.base import Method

__all__ = ["EvalHook", "build_eval_hooks", "evaluate"]


def _loader(recipe: Any, source: str, cfg: EvalConfig, rank: int, world: int):
    from mimscale.data.pipeline import build_eval_loader

    return build_eval_loader(
        recipe.data, img_size=recipe.model.img_size, batch_size=cfg.batch_size, rank=rank,
        world_size=world, source=source,
    )  # fmt: skip


@torch.no_grad()
def _predict_top1(method: Method, loader: Any, device: torch.device, dtype: torch.dtype) -> float:
    from mimscale.eval.features import all_gather_rows, normalize_uint8

    hits, counts = torch.zeros(1, device=device), torch.zeros(1, device=device)
    for batch in loader:
        keep = batch["valid"].to(device) & (batch["labels"].to(device) >= 0)
        logits = method.predict(normalize_uint8(batch["views"][0].to(device), dtype))
        hits += (logits.argmax(-1) == batch["labels"].to(device))[keep].sum()
        counts += keep.sum()
    total = all_gather_rows(torch.stack([hits, counts]).view(1, 2)).sum(0)
    return 100.0 * (total[0] / total[1].clamp_min(1)).item()


def evaluate(
    method: Method,
    recipe: Any,
    cfg: EvalConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    diag_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Run the configured evaluations of ``method`` (in eval mode, plain module).

    Collective across ranks (every rank calls it). Results are complete on rank 0; other
    ranks return the values that need no rank-0-only work (``top1``).

    Args:
        method: the method (``method.encoder`` is evaluated; ``method.predict`` for top-1).
        recipe: the run's recipe (data section, model size).
        cfg: what to evaluate.
        device: compute device.
        rank: this rank.
        world: world size.
        diag_dir: where diagnostics write JSON + PNG (rank 0; skipped when None).
        progress: show progress bars on rank 0 (standalone tools; the training loop logs instead).

    Returns:
        ``{"knn_top1", "linear_top1", "top1", "num_train", "num_val"}`` (the enabled ones).
    """
    from mimscale.eval.features import extract_features

    dtype = next(method.parameters()).dtype
    val_src = cfg.val or recipe.data.val
    out: dict[str, float] = {}
    if cfg.knn or cfg.linear:
        bank_loader = _loader(recipe, cfg.train or recipe.data.train, cfg, rank, world)
        bar = progress and rank == 0
        bank = extract_features(
            method.encoder, bank_loader, device, cfg.pool, dtype, "features: bank" if bar else ""
        )
        val_loader = _loader(recipe, val_src, cfg, rank, world)
        val = extract_features(
            method.encoder, val_loader, device, cfg.pool, dtype, "features: val" if bar else ""
        )
        if rank == 0:
            out.update(_probe(bank, val, cfg))
    if cfg.top1:
        out["top1"] = _predict_top1(method, _loader(recipe, val_src, cfg, rank, world), device, dtype)
    if cfg.diagnostics and rank == 0 and diag_dir is not None:
        from mimscale.eval.diagnostics import run_diagnostics

        out.update(
            run_diagnostics(method.encoder, recipe, val_src, cfg.diagnostics, cfg.diag_images, diag_dir)
        )
    return out


def _probe(bank: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], cfg: EvalConfig):
    from mimscale.eval.knn import knn_accuracy
    from mimscale.eval.linear import linear_probe_accuracy

    (xb, yb), (xv, yv) = bank, val
    lb, lv = yb >= 0, yv >= 0  # unlabeled samples cannot vote or be scored
    xb, yb, xv, yv = xb[lb], yb[lb], xv[lv], yv[lv]
    if yb.numel() == 0 or yv.numel() == 0:
        raise ValueError("evaluation: the bank or the val split has no labeled samples (cls entries)")
    classes = int(max(yb.max(), yv.max())) + 1
    out: dict[str, float] = {"num_train": float(yb.numel()), "num_val": float(yv.numel())}
    if cfg.knn:
        out["knn_top1"] = knn_accuracy(xb, yb, xv, yv, cfg.k, cfg.temperature, classes)
    if cfg.linear:
        out["linear_top1"] = linear_probe_accuracy(
            xb, yb, xv, yv, classes, max_iter=cfg.linear_iters, weight_decay=cfg.linear_wd
        )
    return out


class EvalHook:
    """Calls :func:`evaluate` every ``cfg.every`` steps (and at the end) and logs the results."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self._plain: torch.nn.Module | None = None  # ZeRO-3: gathered copy, built once

    def maybe_run(self, trainer: Any) -> dict[str, float] | None:
        """Evaluate when the step is due; collective (every rank calls it after each step)."""
        step, cfg = trainer.state.step, self.cfg
        t = trainer.recipe.train
        stop = min(trainer.derived.total_steps, t.max_steps) if t.max_steps else trainer.derived.total_steps
        if not ((cfg.every > 0 and step % cfg.every == 0) or (cfg.at_end and step == stop)):
            return None
        return self.run(trainer)

    def run(self, trainer: Any) -> dict[str, float]:
        """Evaluate now and log ``eval/*`` with step and samples seen."""
        t0 = time.perf_counter()
        dist = trainer.dist
        diag_dir = trainer.run_dir / "diagnostics" / f"step{trainer.state.step:08d}"
        # Evaluation must not move the training RNG streams (exact resume): fork them.
        devices = [dist.device] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._eval_view(trainer) as method:
            res = evaluate(
                method, trainer.recipe, self.cfg, dist.device, dist.rank, dist.world_size, diag_dir
            )
        seconds = time.perf_counter() - t0
        rec = {"step": trainer.state.step, "samples": trainer.state.samples, "eval_seconds": seconds}
        rec.update({f"eval/{k}": v for k, v in res.items()})
        shown = " ".join(f"{k} {v:.2f}" for k, v in res.items() if k.endswith("top1"))
        trainer.logger.log(rec, f"eval step {trainer.state.step}: {shown} ({seconds:.1f} s)")
        for png in sorted(diag_dir.glob("*.png")):  # the plots, to wandb too (rank 0's logger sends)
            trainer.logger.log_image(f"diagnostics/{png.stem}", png, trainer.state.step, diag_dir.name)
        return res

    @contextmanager
    def _eval_view(self, trainer: Any) -> Iterator[Method]:
        """The method in eval mode; under ZeRO-3 a plain copy holding the gathered weights."""
        module = trainer.method
        if trainer.recipe.train.zero_stage == 3:
            import deepspeed

            from mimscale.methods import build_method

            if self._plain is None:
                self._plain = build_method(trainer.recipe).to(trainer.dist.device, trainer.dtype)
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                self._plain.load_state_dict(module.state_dict())
            module = self._plain
        was_training = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)


def build_eval_hooks(recipe: Any) -> list[EvalHook]:
    """Hooks with ``maybe_run(trainer)`` called after every optimizer step."""
    cfg = recipe.eval
    if cfg is None or not cfg.enabled:
        return []
    return [EvalHook(cfg)]
