"""The training loop: build everything from a recipe, then step (the bookkeeping: engine/bookkeeping.py).

The loop knows nothing about methods: it reads ``MethodOutput.loss`` and logs ``metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mimscale.config import Derived, Recipe, derive, save_recipe
from mimscale.engine.bookkeeping import Bookkeeping, NonFiniteLossError, TrainState  # noqa: F401
from mimscale.engine.distributed import DistInfo, StopRequest, init_distributed
from mimscale.engine.logger import MetricLogger
from mimscale.engine.optim import use_bf16
from mimscale.engine.rundir import hold_run_dir, naming
from mimscale.engine.setup import (  # noqa: F401  (re-exported for tests and the bench)
    build_engine,
    build_target_provider,
    cast_buffers_bf16,
    prepare_batch,
    seed_everything,
)
from mimscale.methods.base import Method


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


class Trainer(Bookkeeping):
    """Owns the engine, the data stream, the state and the logger of one run."""

    def __init__(self, recipe: Recipe):
        from mimscale.data.pipeline import build_train_loader
        from mimscale.methods import build_method

        self.recipe = recipe
        self.dist: DistInfo = init_distributed()
        # One writer per run directory (refused in one line otherwise), before anything is written.
        self.lock = hold_run_dir(Path(recipe.run.out_dir) / recipe.run.name, self.dist)
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
        self.recon_batch: dict[str, Any] | None = None  # the fixed picture set (engine/pictures.py)
        self.stopped_by: str | None = None  # what stopped fit() early (a signal or the stop file)
        # Seconds spent in eval hooks / checkpoint saves since the last log line: excluded from
        # img/s and ETA (an eval would otherwise inflate or deflate the throughput) and logged apart.
        self.paused = {"eval_s": 0.0, "ckpt_s": 0.0}
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with naming(self.run_dir / "recipe.yaml"):  # a full disk: one line naming the file
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

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train until the recipe's total steps (or ``train.max_steps``), or until a stop request
        (SIGTERM / SIGUSR1 / stop file: the current step ends and a checkpoint is written, see
        ``stopped_by``); return the run dir."""
        try:
            return self._fit()
        finally:
            self.stop.uninstall()  # a process stuck in teardown can be terminated again
            self.lock.release()

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

                write_reconstruction(self)
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


def train(recipe: Recipe) -> Path:
    """Run (or resume) the recipe on this process' share of the world; return the run dir."""
    return Trainer(recipe).fit()
