"""The training loop: build everything from a recipe, then step, log and checkpoint.

The loop knows nothing about methods: it reads ``MethodOutput.loss`` and logs ``metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimscale.config import Derived, Recipe, derive, save_recipe
from mimscale.engine import checkpoint
from mimscale.engine.distributed import DistInfo, StopRequest, init_distributed
from mimscale.engine.logger import MetricLogger, format_eta
from mimscale.engine.optim import apply_recipe_lr, use_bf16
from mimscale.engine.setup import (  # noqa: F401  (re-exported for tests and the bench)
    build_engine,
    build_target_provider,
    cast_buffers_bf16,
    prepare_batch,
    seed_everything,
)
from mimscale.methods.base import Method


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses persist after reloading the last good checkpoint."""


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


def _stream(loader) -> Iterator[dict[str, Any]]:
    """Batches across epoch boundaries; the loader's position stays exact for checkpoints."""
    while True:
        yield from loader
        loader.set_epoch(loader.state_dict()["epoch"] + 1)


def base_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer DeepSpeed wraps (None for a bare module, as in the bench)."""
    return getattr(engine, "basic_optimizer", None) or getattr(engine, "client_optimizer", None)


def train_step(
    engine,
    micro_batches: list[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
    targets_fn: Any = None,
) -> tuple[list[Any], torch.Tensor]:
    """Forward/backward every micro-batch, then one optimizer step; returns the outputs and
    the step's non-finite flag (a 0-d float tensor on ``device``, 1.0 = the step was skipped).

    No host sync: the flag (any micro-batch's loss non-finite, on any rank) is max-reduced
    across ranks on the device and handed to the fused AdamW as ``found_inf``, which leaves
    weights and moments untouched on a bad step (as ``torch.amp.GradScaler`` does). Every rank
    therefore runs the same backward passes and collectives (ZeRO's gradient reduction never
    hangs); the NaN gradients of a bad step are discarded with it. With accumulation one bad
    micro-batch skips the whole step. The caller reads the flag only when it syncs anyway
    (:meth:`Trainer._read_bad`). An optimizer without ``found_inf`` support (LARS) falls
    back to one host read per step. ``targets_fn(batch)`` is the frozen target provider.
    """
    opt = base_optimizer(engine)
    bad = torch.zeros((), device=device)
    outs = []
    for i, batch in enumerate(micro_batches):
        b = prepare_batch(batch, device, dtype)
        targets = targets_fn(b) if targets_fn is not None else None
        out = engine(b, b.get("mask"), targets)
        loss = out.loss
        bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).to(bad.dtype))
        if "valid" in b:  # only padding rows (keep_valid_rows kept them): no gradient from them
            loss = loss * b["valid"].any().to(loss.dtype)
        engine.backward(loss)
        if i == len(micro_batches) - 1:
            bad = _agree(bad)
            _skip_if(opt, bad)
        engine.step()
        outs.append(out)
    return outs, bad


def _agree(bad: torch.Tensor) -> torch.Tensor:
    """Max over ranks, on the device (no host read): every rank skips the same steps."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad


def _skip_if(opt: torch.optim.Optimizer | None, bad: torch.Tensor) -> None:
    """Make the coming optimizer step a no-op when ``bad`` is set."""
    if opt is None:
        return
    if opt.defaults.get("fused") or getattr(opt, "takes_found_inf", False):  # LARS: optim.py
        opt.found_inf = bad  # type: ignore[attr-defined]  # read by the fused kernel on the device
    elif bool(bad):  # host read, once per step (LARS has no found_inf): lr 0, no gradient
        for g in opt.param_groups:  # the schedule sets every group's lr again after the step
            g["lr"] = 0.0
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.zero_()


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


class Trainer:
    """Owns the engine, the data stream, the state and the logger of one run."""

    def __init__(self, recipe: Recipe):
        from mimscale.data.pipeline import build_train_loader
        from mimscale.methods import build_method

        self.recipe = recipe
        self.dist: DistInfo = init_distributed()
        # Before the data workers fork, so they inherit the handlers (a signal to the whole
        # process tree must not kill them mid-step).
        self.stop = StopRequest(watch_file=self.dist.rank == 0)
        self.stop.install()
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(recipe.run.seed)  # identical initial weights on every rank
        method = build_method(recipe)
        if recipe.model.init_from:  # e.g. an imported official checkpoint; a resume overrides it
            from mimscale.eval.import_weights import init_from_run

            init_from_run(method, recipe.model.init_from)
        seed_everything(recipe.run.seed + 1000 * (self.dist.rank + 1))  # per-rank dropout/drop-path
        t = recipe.train
        self.loader = build_train_loader(
            recipe.data,
            recipe.mask,
            img_size=recipe.model.img_size,
            patch_size=recipe.model.patch_size,
            batch_size=t.micro_batch,
            seed=recipe.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            bank=recipe.teacher.bank if recipe.teacher.source == "precomputed" else None,
        )
        samples = self.loader.batches_per_epoch * t.micro_batch * self.dist.world_size
        self.derived: Derived = derive(recipe, self.dist.world_size, samples)
        method.set_total_steps(
            self.derived.total_steps
        )  # per-step schedules inside methods (LC-MAE momentum)
        self.engine = self._build_engine(method)
        # The frozen teacher is built here, outside deepspeed.initialize (DeepSpeed #3175).
        self.targets_fn = build_target_provider(recipe, self.dist.device)
        from mimscale.eval.hooks import build_eval_hooks

        self.hooks = build_eval_hooks(recipe)
        self.dtype = torch.bfloat16 if use_bf16(recipe, self.dist.device) else torch.float32
        self.run_dir = Path(recipe.run.out_dir) / recipe.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.stopped_by: str | None = None  # what stopped fit() early (a signal or the stop file)
        # Seconds spent in eval hooks / checkpoint saves since the last log line: excluded from
        # img/s and ETA (an eval would otherwise inflate or deflate the throughput) and logged apart.
        self.paused = {"eval_s": 0.0, "ckpt_s": 0.0}
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, self.run_dir / "recipe.yaml")
        meta = {"derived": vars(self.derived), "teacher": getattr(self.targets_fn, "metadata", None)}
        self.logger = MetricLogger(recipe, self.run_dir, self.dist.rank, extra_meta=meta)
        if recipe.run.resume == "auto":
            self._maybe_resume()
        self._keys = self._open_keys_log()

    @property
    def method(self) -> Method:
        return self.engine.module

    def _build_engine(self, method: Method) -> Any:
        if self.recipe.train.activation_checkpointing:
            method.set_grad_checkpointing(True)
        return build_engine(method, self.recipe, self.derived, self.dist.device)

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
        import yaml

        if not saved.is_file():
            return
        old = yaml.safe_load(saved.read_text()).get("train", {})
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
        }
        tag = checkpoint.save(
            self.engine, self.ckpt_dir, self.state.step, client, self.recipe, self.dist.rank
        )
        self.paused["ckpt_s"] += time.perf_counter() - t0
        return tag

    # ------------------------------------------------------------------ one step

    def train_step(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step, no host sync; returns its non-finite flag (device, 0-d)."""
        outs, bad = train_step(self.engine, micro_batches, self.dist.device, self.dtype, self.targets_fn)
        s = self.state
        good = 1.0 - bad
        for out in outs:
            self._accumulate(out, len(micro_batches), good)
        s.good = good if s.good is None else s.good + good
        if s.bad is None:
            s.bad = torch.zeros(3, device=self.dist.device)
        s.bad = torch.stack([s.bad[0] + bad, (s.bad[1] + 1.0) * bad, bad])
        return bad

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

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train until the recipe's total steps (or ``train.max_steps``), or until a stop request
        (SIGTERM / SIGUSR1 / stop file: the current step ends and a checkpoint is written, see
        ``stopped_by``); return the run dir."""
        try:
            return self._fit()
        finally:
            self.stop.uninstall()  # a process stuck in teardown can be terminated again

    def _fit(self) -> Path:
        t, d = self.recipe.train, self.derived
        stop = min(d.total_steps, t.max_steps) if t.max_steps else d.total_steps
        stream = _stream(self.loader)
        if self.dist.rank == 0:
            print(
                f"[mimscale] {self.recipe.method}: {stop - self.state.step} steps to go; lr {d.lr:.3g}, "
                f"accum {d.grad_accum}, world {d.world_size}, run dir {self.run_dir}",
                flush=True,
            )
        t0, wait, steps_since = time.perf_counter(), 0.0, 0
        saved = -1
        while self.state.step < stop:
            w0 = time.perf_counter()
            micro = [next(stream) for _ in range(d.grad_accum)]
            wait += time.perf_counter() - w0
            self.state.samples += t.global_batch
            if self._keys is not None:
                self._keys.write(" ".join(k for b in micro for k in b["keys"]) + "\n")
            self.train_step(micro)
            nxt = self.state.step + 1
            sync = nxt % t.log_every == 0 or nxt % t.ckpt_every == 0 or nxt == stop
            if sync and self._read_bad():  # host reads only where the step syncs anyway
                self._on_bad_step()
                continue
            self.state.step += 1
            self.method.after_step(self.state.step)  # e.g. EMA updates
            e0 = time.perf_counter()
            for hook in self.hooks:
                hook.maybe_run(self)
            if self._picture_due(stop):
                from mimscale.engine.pictures import write_reconstruction

                write_reconstruction(self, micro[-1])
            self.paused["eval_s"] += time.perf_counter() - e0
            steps_since += 1
            if self.state.step % t.log_every == 0 or self.state.step == stop:
                self._log(time.perf_counter() - t0, wait, steps_since, stop, micro)
                t0, wait, steps_since = time.perf_counter(), 0.0, 0
            if self.state.step % t.ckpt_every == 0 and self.state.step != stop:
                self.save()
                saved = self.state.step
            # Polled every step, read one step late (no sync; the step after the request ends the
            # run and is saved, so no work is lost); the same answer on every rank.
            if self.state.step < stop and self.stop.poll():
                self.stopped_by = self.stop.signal or "another rank's stop request"
                break
        self.stop.drain()
        if saved != self.state.step:
            self.save()
        self.loader.close()  # stop the workers before the interpreter tears down
        self.logger.close()
        if self._keys is not None:
            self._keys.close()
        return self.run_dir

    def _picture_due(self, stop: int) -> bool:
        every = self.recipe.train.recon_every
        step = self.state.step
        return bool(every) and self.method.reconstructs_pixels and (step % every == 0 or step == stop)

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
        lr = self.engine.get_lr()[0]
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


def train(recipe: Recipe) -> Path:
    """Run (or resume) the recipe on this process' share of the world; return the run dir."""
    return Trainer(recipe).fit()
