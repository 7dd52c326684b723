"""Console + JSONL + (optional) wandb metrics and pictures. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mimscale.config import Recipe, WandbConfig
from mimscale.engine.rundir import naming


class MetricLogger:
    """Writes one JSON object per log step to ``run_dir/metrics.jsonl`` and a console line."""

    def __init__(self, recipe: Recipe, run_dir: Path, rank: int, extra_meta: dict[str, Any] | None = None):
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self._wandb: Any = None
        self._wandb_args: tuple[WandbConfig, Path, str, dict[str, Any]] | None = None
        if self.enabled:  # run metadata (derived values, teacher provenance) beside the metrics
            with naming(run_dir / "meta.json"):
                (run_dir / "meta.json").write_text(json.dumps(extra_meta or {}, indent=2, default=str) + "\n")
        if self.enabled and wandb_on(recipe.wandb):  # opened by rewind() or the first use
            config = {**recipe.to_dict(), "meta": extra_meta or {}}
            self._wandb_args = (recipe.wandb, run_dir, recipe.run.name, config)

    @property
    def wandb(self) -> Any:
        """The wandb run (None without wandb); a run not rewound continues where it ended."""
        if self._wandb is None and self._wandb_args is not None:
            self._wandb = open_wandb(*self._wandb_args)
        return self._wandb

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:  # wall-clock "time" stays in the JSONL: wandb keeps its own clock
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"},
                step=record["step"],
            )

    def log_image(self, key: str, png: Path, step: int, caption: str = "") -> None:
        """Send a picture (already written under the run directory) to wandb at ``step``."""
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(png), caption=caption)}, step=step)

    def rewind(self, step: int) -> None:
        """Drop records after ``step`` (written by a run killed after its last checkpoint).

        A torn last line (killed mid-write) is dropped too. wandb's history is rewound to the
        same step (its ``resume_from``), so replayed steps are not doubled there either.
        """
        if self._wandb is None and self._wandb_args is not None:
            self._wandb = open_wandb(*self._wandb_args, rewind_to=step)
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if line.endswith("\n") and rec.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with naming(self.path):
            tmp.write_text("".join(keep))
            tmp.replace(self.path)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def publish_pngs(run_dir: Path, pngs: dict[str, Path], caption: str = "") -> bool:
    """Add pictures made after training (demo curves, diagnostics) to the run's wandb run.

    The run's saved recipe decides: nothing happens unless its ``wandb`` section is on; then the
    same wandb run is resumed (its id is in ``run_dir/wandb_id``) and each PNG is logged under its
    key, at wandb's current step. Returns whether anything was sent.
    """
    import yaml

    from mimscale.config.typed import build_section

    saved = run_dir / "recipe.yaml"
    recipe = (yaml.safe_load(saved.read_text()) if saved.is_file() else None) or {}
    w = build_section(WandbConfig, recipe.get("wandb"), f"{saved}: wandb")
    if not wandb_on(w) or not pngs:
        return False
    import wandb

    run = open_wandb(w, run_dir, run_dir.name)
    run.log({key: wandb.Image(str(png), caption=caption) for key, png in pngs.items()})
    run.finish()
    return True


def wandb_on(w: WandbConfig) -> bool:
    """Whether a run with this ``wandb`` section logs to wandb."""
    return w.enabled and w.mode != "disabled"


def open_wandb(
    w: WandbConfig,
    run_dir: Path,
    name: str,
    config: dict[str, Any] | None = None,
    rewind_to: int | None = None,
) -> Any:
    """The wandb run of ``run_dir``: every restart of the run dir (and every picture sent after
    training) continues the one run whose id is kept in ``run_dir/wandb_id``.

    ``rewind_to``: the step a restarted run resumes from. What a killed run logged after it is
    dropped from that run's history by wandb itself (``resume_from="ID?_step=N"``; offline, the
    rewind is recorded and applied by ``wandb sync``). Where wandb refuses to rewind, the run
    continues as a new wandb run, named ``NAME (from step N)``, whose id replaces the old one.
    """
    import wandb  # lazy: wandb is heavy and never needed by tests

    had = (run_dir / "wandb_id").is_file()
    args: dict[str, Any] = dict(
        project=w.project, entity=w.entity, tags=w.tags, mode=w.mode, dir=str(run_dir), config=config
    )
    if rewind_to is None or not had:  # nothing logged yet that a rewind could drop
        return wandb.init(**args, name=w.name or name, id=wandb_run_id(run_dir), resume="allow")
    try:
        return wandb.init(
            **args, name=w.name or name, resume_from=f"{wandb_run_id(run_dir)}?_step={rewind_to}"
        )
    except wandb.Error as e:  # e.g. a server without rewind
        (run_dir / "wandb_id").unlink()
        named = f"{w.name or name} (from step {rewind_to})"
        print(f"[mimscale] wandb cannot rewind its run ({e}); continuing as new run {named!r}", flush=True)
        return wandb.init(**args, name=named, id=wandb_run_id(run_dir))


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of ``run_dir``: made once, kept in ``run_dir/wandb_id``."""
    import uuid

    path = run_dir / "wandb_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12] + "\n")
    return path.read_text().strip()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
