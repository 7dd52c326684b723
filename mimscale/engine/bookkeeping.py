"""The Trainer's bookkeeping around the step: checkpoints and resume, metric sums and log lines,
log rewinding, the key log, and non-finite (bad) step handling.

:class:`Bookkeeping` is mixed into :class:`mimscale.engine.loop.Trainer`, which sets the
attributes declared below; the loop itself (building, stepping) stays in ``engine/loop.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimscale.config import Derived, Recipe
from mimscale.engine import checkpoint
from mimscale.engine.distributed import DistInfo
from mimscale.engine.logger import MetricLogger, format_eta
from mimscale.engine.optim import apply_recipe_lr, use_bf16
from mimscale.masking import MASK_STREAMS


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses persist after reloading the last good checkpoint."""


class ResumeRefusedError(RuntimeError):
    """A checkpoint this run must not continue from (``mimscale train`` prints one line, exit 2)."""


def check_mask_streams(client: dict[str, Any], where: Path, method: Any) -> None:
    """Refuse a checkpoint drawn from other mask random streams, for a method that draws from them.

    Checkpoints before ``mask_streams`` was recorded are version 1 (masking.MASK_STREAMS).
    Continuing them on the new stream would silently change the masks mid-run, so the run stops.
    """
    then = client.get("mask_streams", 1)
    if then != MASK_STREAMS and getattr(method, "uses_mask_noise", False):
        raise ResumeRefusedError(
            f"cannot resume {where}: it was saved with mask random streams v{then}, this mimscale draws "
            f"v{MASK_STREAMS} (MR-MAE focused sampling and LC-MAE's second view now come from the data "
            f"side; README 'Changes'); start a new run.name, or run.resume=never"
        )


@dataclass
class TrainState:
    step: int = 0  # optimizer steps applied
    samples: int = 0  # samples consumed (all ranks)
    bad_steps: int = 0  # steps skipped for a non-finite loss (total)
    consecutive_bad: int = 0
    reloaded: bool = False
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over good steps (device)
    good: torch.Tensor | None = None  # good steps since the last log line (device)
    # [bad steps not yet read by the host, consecutive bad steps, this step bad] (device)
    bad: torch.Tensor | None = None


def unstep_schedule(engine) -> None:
    """Undo the lr-schedule step DeepSpeed took for a step skipped on the device (the schedule
    follows applied steps only, as before the device-side skip)."""
    if not getattr(engine, "_step_applied", True):  # DeepSpeed skipped it itself (overflow)
        return
    sched = engine.lr_scheduler
    sched.last_epoch -= 1
    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for g, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    sched._last_lr = lrs
    engine.global_steps -= 1
    engine.global_samples -= engine.train_batch_size()


class Bookkeeping:
    """Checkpoints, logs and bad steps of one run (the attributes are set by ``Trainer``)."""

    recipe: Recipe
    dist: DistInfo
    derived: Derived
    state: TrainState
    logger: MetricLogger
    engine: Any
    loader: Any
    run_dir: Path
    ckpt_dir: Path
    paused: dict[str, float]
    _keys: Any

    # ------------------------------------------------------------------ checkpoints

    def _maybe_resume(self) -> None:
        tag = checkpoint.read_pointer(self.ckpt_dir)
        if tag is None:  # killed before its first checkpoint: start over, logs included
            self._rewind_logs()
            return
        self._check_compatible(self.ckpt_dir / tag / "recipe.yaml")
        self._load(tag)
        before, now = apply_recipe_lr(
            self.engine.lr_scheduler, self.recipe, self.derived
        )  # a changed lr applies
        self._rewind_logs()
        if self.dist.rank == 0:
            print(f"[mimscale] resumed from {self.ckpt_dir / tag} at step {self.state.step}", flush=True)
            if abs(before - now) > 1e-9 * max(abs(before), abs(now)):
                print(
                    f"[mimscale] optim lr changed since the checkpoint: peak {before:.4g} -> {now:.4g}, "
                    f"applied from step {self.state.step}",
                    flush=True,
                )

    def _rewind_logs(self) -> None:
        """Drop what a killed run logged after the checkpoint this run starts from: those steps
        are replayed, and every step must appear once however many kills and resumes."""
        self.logger.rewind(self.state.step)
        if self.recipe.train.log_keys:  # one line per step attempted (bad steps included)
            keys = self.run_dir / f"keys_rank{self.dist.rank}.txt"
            _truncate_lines(keys, self.state.step + self.state.bad_steps)

    def _check_compatible(self, saved: Path) -> None:
        """DeepSpeed's state layout depends on the ZeRO stage and the precision: say so plainly
        instead of failing on a missing shard file."""
        from mimscale.config.loader import parse_file

        if not saved.is_file():
            return
        old = parse_file(saved).get("train")  # the preflight already read it (check_resume)
        old = old if isinstance(old, dict) else {}
        dev = self.dist.device
        for key, now, then in [
            ("train.zero_stage", self.recipe.train.zero_stage, old.get("zero_stage")),
            (
                "train.precision (resolved bf16)",
                use_bf16(self.recipe, dev),
                old.get("precision") == "bf16" or (old.get("precision") == "auto" and dev.type == "cuda"),
            ),
        ]:
            if then is not None and now != then:
                raise RuntimeError(
                    f"cannot resume {saved.parent}: it was saved with {key}={then}, this run has {now}; "
                    f"use the same setting, or a new run.name / run.resume=never"
                )

    def _load(self, tag: str, restore_data: bool = True) -> None:
        client = checkpoint.load(self.engine, self.ckpt_dir, tag, self.dist.rank)
        check_mask_streams(client, self.ckpt_dir / tag, self.engine.module)
        self.state.step = client["step"]
        if restore_data:  # a NaN reload keeps the stream where it is, so the count stays too
            self.state.samples = client["samples"]
            data, note = checkpoint.data_position(client["data"], self.loader.state_dict())
            if note and self.dist.rank == 0:
                print(f"[mimscale] {note}", flush=True)
            self.loader.load_state_dict(data)
            self.state.bad_steps = client.get("bad_steps", 0)

    def save(self) -> str:
        t0 = time.perf_counter()
        if self._keys is not None:  # the key log is complete up to every checkpoint
            self._keys.flush()
        client = {
            "step": self.state.step,
            "samples": self.state.samples,
            "data": self.loader.state_dict(),
            "bad_steps": self.state.bad_steps,
            "recipe": self.recipe.to_dict(),
            "mask_streams": MASK_STREAMS,
        }
        tag = checkpoint.save(
            self.engine, self.ckpt_dir, self.state.step, client, self.recipe, self.dist.rank
        )
        self.paused["ckpt_s"] += time.perf_counter() - t0
        return tag

    def _accumulate(self, out, n: int, good: torch.Tensor) -> None:
        m = self.state.metrics
        for k, v in {"loss": out.loss, **out.metrics}.items():
            v = torch.where(good > 0, v.detach().float() / n, 0.0)  # a skipped step's NaN stays out
            m[k] = m[k] + v if k in m else v

    def _read_bad(self) -> bool:
        """The one host read of the non-finite flags (log and checkpoint steps only): counts the
        steps skipped on the device since the last read; True when this step was skipped, which
        is then undone on the host too (not counted, the lr schedule not advanced)."""
        s = self.state
        if s.bad is None:
            return False
        unread, consecutive, now = s.bad.tolist()
        s.bad = torch.stack([torch.zeros_like(s.bad[0]), s.bad[1], s.bad[2]])
        s.bad_steps += int(unread)
        s.consecutive_bad = int(consecutive)
        earlier = int(unread) - int(now)
        if earlier and self.dist.rank == 0:
            print(
                f"[mimscale] step {s.step}: {earlier} earlier step(s) with a non-finite loss were "
                f"skipped on the device ({s.bad_steps} so far)",
                flush=True,
            )
        if now:
            unstep_schedule(self.engine)
        return bool(now)

    # ------------------------------------------------------------------ logs and bad steps

    def _open_keys_log(self):
        if not self.recipe.train.log_keys:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return open(self.run_dir / f"keys_rank{self.dist.rank}.txt", "a")

    def _on_bad_step(self) -> None:
        s = self.state  # bad_steps / consecutive_bad were just read from the device
        if self.dist.rank == 0:
            print(
                f"[mimscale] step {s.step}: non-finite loss, step skipped ({s.bad_steps} so far)", flush=True
            )
        if s.consecutive_bad < self.recipe.train.nan_patience:
            return
        tag = checkpoint.read_pointer(self.ckpt_dir)
        if s.reloaded or tag is None:
            where = (
                f"after reloading {self.ckpt_dir / str(tag)}" if s.reloaded else "and no checkpoint to reload"
            )
            raise NonFiniteLossError(
                f"{s.consecutive_bad} consecutive non-finite losses at step {s.step} {where}; stopping"
            )
        if self.dist.rank == 0:
            print(f"[mimscale] reloading last good checkpoint {self.ckpt_dir / tag}", flush=True)
        self._load(tag, restore_data=False)  # new data from here on: the same batches would fail again
        s.reloaded, s.consecutive_bad = True, 0
        s.bad = None

    def _log(self, elapsed: float, wait: float, steps: int, stop: int, micro: list[dict[str, Any]]) -> None:
        s = self.state
        keys = list(s.metrics)
        good = s.good if s.good is not None else torch.zeros((), device=self.dist.device)
        vals = torch.stack([good.float(), *(s.metrics[k].float() for k in keys)]).tolist()  # one sync
        m = {k: v / max(vals[0], 1.0) for k, v in zip(keys, vals[1:], strict=True)}  # mean of good steps
        s.metrics, s.good = {}, None
        # Under layer decay each group runs at lr x lr_scale: log the unscaled lr (scale 1: the head),
        # the schedule optim.lr / blr set, not group 0's (the embeddings', layer_decay**(depth + 1) of it).
        lr = max(self.engine.get_lr())
        paused, self.paused = self.paused, {k: 0.0 for k in self.paused}
        elapsed = max(elapsed - sum(paused.values()), 1e-9)  # training time only
        ips = steps * self.recipe.train.global_batch / elapsed
        eta = (stop - self.state.step) * elapsed / max(steps, 1)
        skipped = torch.tensor([float(self.loader.shard_errors)], device=self.dist.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(skipped)  # the exact total: every worker, epoch and rank
        rec = {
            "step": self.state.step,
            "samples": self.state.samples,
            "lr": lr,
            "img_per_s": ips,
            "data_wait": wait / max(elapsed, 1e-9),
            "bad_steps": self.state.bad_steps,
            "shard_errors": int(skipped.item()),
            **paused,
            **m,
        }
        terms = " ".join(f"{k} {v:.4f}" for k, v in m.items())
        line = (
            f"step {self.state.step}/{stop} {terms} lr {lr:.3e} {ips:.1f} img/s "
            f"data {100 * rec['data_wait']:.0f}% eta {format_eta(eta)}"
        )
        self.logger.log(rec, line)


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` complete lines of ``path`` (a missing or shorter file is left alone)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    complete = [ln for ln in lines if ln.endswith("\n")]
    if len(lines) > n or len(complete) != len(lines):
        path.write_text("".join(complete[:n]))
