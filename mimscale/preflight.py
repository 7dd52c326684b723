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


def check_paths(recipe: Recipe, world_size: int = 1, digests: bool = False, nodes: int = 1) -> None:
    """Raise one :class:`RecipeError` listing every missing data / teacher path of ``recipe``, and
    what ``world_size`` ranks over ``nodes`` nodes make impossible; ``digests`` also hashes a
    precomputed teacher's target shards (one process of a launch)."""
    check_resume(recipe)
    problems = data_problems(recipe) + manifest_problems(recipe) + teacher_problems(recipe)
    problems += bank_problems(recipe, digests)
    if nodes > 1:
        problems += shape_problems(recipe, nodes, world_size // nodes)
    else:
        problems += world_problems(recipe, world_size)
    if problems:
        raise RecipeError(f"{recipe.source}: " + "\n  ".join(problems))


def shape_problems(recipe: Recipe, nodes: int, ranks_per_node: int) -> list[str]:
    """:func:`world_problems` for ``nodes x ranks_per_node`` ranks, worded with the nodes, so that a
    shape that does not divide is refused in one line before anything is submitted or spawned."""
    if nodes < 1 or ranks_per_node < 1:
        return [f"--nodes {nodes} --gpus-per-node {ranks_per_node}: both must be at least 1"]
    world = nodes * ranks_per_node
    shape = f"{nodes} nodes x {ranks_per_node} ranks"
    return [
        p.replace(f"world_size={world}", f"world_size={world} ({shape})").replace(
            f"{world} ranks x", f"{shape} x"
        )
        for p in world_problems(recipe, world)
    ]


def describe_shape(
    recipe: Recipe, recipe_arg: str, overrides: list[str], nodes: int, ranks_per_node: int
) -> str:
    """What a job of this shape will run: the global batch split, accumulation, shards per rank and
    the launch lines (``mimscale check --nodes N --gpus-per-node G``). Call after the checks passed."""
    import shlex

    t, data = recipe.train, recipe.data
    world = nodes * ranks_per_node
    workers = max(1, data.num_workers)
    lines = [
        f"shape: {nodes} node(s) x {ranks_per_node} rank(s) per node = world size {world}",
        f"global batch {t.global_batch} = micro_batch {t.micro_batch} x {world} ranks x "
        f"accumulation {t.global_batch // (t.micro_batch * world)}",
    ]
    if data.train and not data_problems(recipe):
        from mimscale.data.manifest import resolve_source

        src = resolve_source(data.train)
        n = len(src.urls)
        how = "each sample once per epoch" if data.epoch_mode == "exact" else "drawn with replacement"
        lines.append(
            f"data.train: {n} shards, {n / world:.2f} per rank, {n / (world * workers):.2f} per reader "
            f"({workers} worker(s) per rank); epoch_mode={data.epoch_mode} ({how})"
        )
    args = " ".join(shlex.quote(a) for a in [recipe_arg, *overrides])
    gpus = f" --gpus-per-node {ranks_per_node}"
    lines += [
        f"launch: sbatch --nodes {nodes}{gpus} slurm/pretrain.sbatch {args}",
        f"  (CPU nodes: sbatch --nodes {nodes} --export=ALL,NPROC_PER_NODE={ranks_per_node} "
        f"slurm/pretrain.sbatch {args})",
        f"each node runs: python -m torch.distributed.run --nnodes={nodes} --nproc_per_node={ranks_per_node} "
        f"--rdzv_backend=c10d --rdzv_endpoint=FIRST_NODE:$((20000 + SLURM_JOB_ID % 20000)) "
        f"--module mimscale.train {args}",
    ]
    return "\n".join(lines)
