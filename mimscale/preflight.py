"""Check every path a recipe reads before any process is spawned.

A missing manifest or teacher file otherwise fails ~20 s later, once per rank, as a traceback.
Here it is one line naming the key, the path and the command that makes it.
"""

from __future__ import annotations

from pathlib import Path

from mimscale.config import Recipe, RecipeError, check_world_size

_MAKE_SHARDS = "make it with `mimscale prep-shards --src IMAGES --out DIR` (or `mimscale demo-data DIR`)"


def _local_path(spec: str) -> Path | None:
    """The local file or directory a data spec needs, or None for remote/pipe specs (not checked)."""
    if spec.startswith("pipe:") or "://" in spec:
        return None
    if "{" in spec or "::" in spec:  # a brace / list pattern: its folder must exist
        return Path(spec.split("::")[0].split("{")[0]).parent
    return Path(spec)


def data_problems(recipe: Recipe) -> list[str]:
    """One line per data key the run will read whose path does not exist."""
    keys = [("data.train", recipe.data.train, True)]
    ev = recipe.eval
    if ev is not None and ev.enabled:  # only evaluation reads the labeled splits
        keys += [("eval.train", ev.train, False)]
        keys += [("eval.val", ev.val, False) if ev.val else ("data.val", recipe.data.val, False)]
    out = []
    for key, spec, required in keys:
        if not spec:
            if required:
                out.append(f"{key}: empty; point it at the shards' manifest.json; {_MAKE_SHARDS}")
            continue
        p = _local_path(spec)
        if p is not None and not p.exists():
            out.append(f"{key}: {spec} does not exist; {_MAKE_SHARDS}")
    return out


def _sources(recipe: Recipe) -> list[tuple[str, str]]:
    """``(key, spec)`` of every shard source the run reads (evaluation's only when enabled)."""
    keys = [("data.train", recipe.data.train)]
    ev = recipe.eval
    if ev is not None and ev.enabled:
        keys += [("eval.train", ev.train), ("eval.val", ev.val) if ev.val else ("data.val", recipe.data.val)]
    return [(k, s) for k, s in keys if s]


def manifest_problems(recipe: Recipe) -> list[str]:
    """One line per manifest problem of the sources the run reads, in every epoch mode: a
    malformed or inconsistent manifest (counts, total), a listed shard that is missing or has
    another size. Remote and pattern sources are left to the reader."""
    from mimscale.data.manifest import read_manifest, shard_file_problems

    out: list[str] = []
    for key, spec in _sources(recipe):
        p = Path(spec)
        if p.is_dir():
            p = p / "manifest.json"
        elif not spec.endswith(".json"):
            continue  # a shard pattern, file or url: its sibling manifest is optional
        if not p.is_file():
            continue  # remote, or no manifest at all (the loader says so, naming the key)
        try:
            read_manifest(p)
            out += [f"{key}: {line}" for line in shard_file_problems(p)]
        except (ValueError, FileNotFoundError) as e:
            out.append(f"{key}: {e}")
    return out


def teacher_problems(recipe: Recipe) -> list[str]:
    """A line when the method needs a teacher whose weights cannot be found on local disk."""
    from mimscale.methods import METHODS

    cfg = recipe.teacher
    if cfg.allow_random or not METHODS[recipe.method].needs_teacher:
        return []
    from mimscale.teachers import resolve_weights

    found, looked = resolve_weights(cfg)
    if found is not None:
        return []
    return [
        f"teacher.pretrained: no weights for {cfg.kind}:{cfg.model} ({cfg.pretrained!r}); looked in: "
        + "; ".join(looked)
        + ". Give teacher.pretrained a weights file (tests / CPU demo: teacher.allow_random=true)"
    ]


def bank_problems(recipe: Recipe, digests: bool = False) -> list[str]:
    """One line per target shard of a precomputed teacher's bank that differs from what the bank
    records (size, header; sha256 with ``digests``), for the image shards ``data.train`` reads.
    The bank's own manifest and its match with the recipe are checked when the recipe is loaded."""
    from mimscale.methods import METHODS

    cfg = recipe.teacher
    if cfg.source != "precomputed" or not cfg.bank or not METHODS[recipe.method].needs_teacher:
        return []
    from mimscale.data.manifest import resolve_source
    from mimscale.targets.bank import BankError, image_shard_name, target_shard_problems

    try:
        images = {image_shard_name(u) for u in resolve_source(recipe.data.train).urls}
        return [f"teacher.bank: {line}" for line in target_shard_problems(cfg.bank, images, digests)]
    except (BankError, ValueError, FileNotFoundError):
        return []  # reported by the recipe's own checks (targets.check) or manifest_problems


def world_problems(recipe: Recipe, world_size: int) -> list[str]:
    """Lines for what the world size alone makes impossible: the global batch split, and in
    ``exact`` epochs a shard for every reader (ranks x workers)."""
    try:
        check_world_size(recipe, world_size)
    except RecipeError as e:
        return [str(e).removeprefix(f"{recipe.source}: ")]
    data = recipe.data
    if data.epoch_mode != "exact" or not data.train or data_problems(recipe) or manifest_problems(recipe):
        return []
    from mimscale.data.manifest import resolve_source
    from mimscale.data.pipeline import _check_exact

    try:
        _check_exact(data, resolve_source(data.train), world_size, max(1, data.num_workers))
    except (ValueError, FileNotFoundError) as e:
        return [str(e)]
    return []


def check_resume(recipe: Recipe) -> None:
    """The recipe saved with the checkpoint a ``run.resume: auto`` run continues from must read as
    a recipe (the same loader and message as ``eval`` / ``export``), before any rank starts."""
    ckpt_dir = Path(recipe.run.out_dir) / recipe.run.name / "checkpoints"
    if recipe.run.resume != "auto" or not ckpt_dir.is_dir():
        return
    from mimscale.config.loader import parse_file
    from mimscale.engine.checkpoint import read_pointer

    tag = read_pointer(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / "recipe.yaml").exists():
        return
    try:
        parse_file(ckpt_dir / tag / "recipe.yaml")
    except RecipeError as e:
        raise RecipeError(
            f"{e} (the checkpoint this run resumes from; a new run.name or run.resume=never starts afresh)"
        ) from None


def check_paths(recipe: Recipe, world_size: int = 1, digests: bool = False) -> None:
    """Raise one :class:`RecipeError` listing every missing data / teacher path of ``recipe``;
    ``digests`` also hashes a precomputed teacher's target shards (one process of a launch)."""
    check_resume(recipe)
    problems = data_problems(recipe) + manifest_problems(recipe) + teacher_problems(recipe)
    problems += bank_problems(recipe, digests)
    problems += world_problems(recipe, world_size)
    if problems:
        raise RecipeError(f"{recipe.source}: " + "\n  ".join(problems))
