"""``mimscale demo``: the whole path on a CPU in minutes, on the embedded digits data.

Writes the digits shards (scikit-learn's 1,797 real 8x8 digit images, upscaled to 32 px),
pre-trains the method's ``cpu_tiny`` recipe as one process with the evaluation hook on (kNN +
linear probe on the held-out split), then compares the encoder with the same encoder at random
initialisation (:mod:`mimscale.demo.report`: a table, ``demo_results.json`` and
``demo_curves.png`` in the run directory).

Every method runs with the same student (the ``cpu_tiny`` ViT: 32 px, patch 4, width 96, depth 4),
the same steps and batch, and the same readouts; what a method's own recipe sets differently
(mask, learning rate, views, teacher) is printed before it trains. Methods with a teacher
(CAE v2, MR-MAE) get a real one by default: a small supervised ViT trained on the digits train
split first (:mod:`mimscale.demo.teacher`, cached in ``OUT/teacher``); ``--teacher random`` keeps
the tiny random teacher as a labelled control. ``--compare`` runs several methods like for like
(:mod:`mimscale.demo.compare`).

The demos are the shipped tiny recipes (:func:`demo_recipes`): ``recipes/<method>/cpu_tiny.yaml``
is ``--method <method>``, and a plug-in's ``recipes/<plugin>/<host>_cpu_tiny.yaml`` is
``--method <host>_<plugin>`` (e.g. ``mto/mae_cpu_tiny.yaml``: ``mae_mto``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from mimscale.demo import DEFAULT_METHOD
from mimscale.registry import METHODS, load_recipe

__all__ = [
    "DEMO_EVAL",
    "DEMO_STEPS",
    "demo_help",
    "demo_recipes",
    "describe",
    "eval_every",
    "prepare",
    "run_demo",
]

TINY = "cpu_tiny.yaml"
Teacher = Literal["trained", "random"]

# The same for every method: the evaluation hook on (kNN + fast linear probe on the held-out
# split, five times during pre-training and at the end), read out on mean-pooled patch tokens
# (the [CLS] token gets no direct training signal in MAE-style methods; the final tables report
# both readouts).
DEMO_EVAL = ["eval.at_end=true", "eval.knn=true", "eval.linear=true", "eval.batch_size=512", "eval.pool=mean"]
# The same for every method: 10 epochs in batches of 32 (440 optimizer steps) keep the default demo
# (MAE + MTO) within about 2 minutes on 2 idle cores; the tiny recipes' own 30 epochs of 128 are for
# `mimscale train`. Batches of 32 (4x the updates for the same images) were chosen on the validation
# split: kNN 77.4 -> 87.1 for MAE + MTO (with blr 5e-3) at 14 epochs of its 1,151 images, seed 0
# (README "The demo").
DEMO_STEPS = ["train.epochs=10", "train.global_batch=32", "train.micro_batch=32"]


def _recipe_root() -> Path:
    """The shipped recipes folder (where the CLI resolves recipe names)."""
    from mimscale.config.paths import recipes_root

    return recipes_root()


def _resolve(name: str) -> Path:
    """A recipe name resolved exactly as ``mimscale train NAME`` resolves it."""
    from mimscale.config.paths import recipe_path

    return recipe_path(name)


def demo_recipes(root: Path | None = None) -> dict[str, str]:
    """Demo name -> recipe (relative to the recipes folder), found by scanning for tiny recipes.

    Args:
        root: the recipes folder (default: the shipped one).

    Returns:
        ``{"<method>": "<method>/cpu_tiny.yaml", ..., "<host>_<plugin>": "<plugin>/<host>_cpu_tiny.yaml"}``,
        methods first, each group sorted.
    """
    root = _recipe_root() if root is None else root
    methods, plugins = {}, {}
    for path in sorted(root.glob(f"*/*{TINY}")):
        folder = path.parent.name
        if folder.startswith("_"):  # _base/cpu_tiny.yaml is a base, not a runnable recipe
            continue
        if folder in METHODS and METHODS[folder].can_predict:
            continue  # pre-training only: fine-tuning / probing (a classifier) needs a checkpoint
        if path.name == TINY:
            methods[folder] = f"{folder}/{path.name}"
        elif path.name.endswith(f"_{TINY}"):
            plugins[f"{path.name[: -len(TINY) - 1]}_{folder}"] = f"{folder}/{path.name}"
    return {**methods, **plugins}


def demo_help(root: Path | None = None) -> str:
    """``mimscale demo --help``'s list of methods: each name, its recipe and the recipe's first line."""
    root = _recipe_root() if root is None else root
    lines = ["methods (--method NAME; the recipes are deltas of recipes/_base/cpu_tiny.yaml):"]
    for name, rel in demo_recipes(root).items():
        first = (root / rel).read_text().splitlines()[:1] or [""]
        about = first[0].removeprefix("# ").split(" on the embedded")[0][:60]
        default = "  (default)" if name == DEFAULT_METHOD else ""
        lines.append(f"  {name:<9} {rel:<26} {about}{default}")
    return "\n".join(lines)


def eval_every(recipe: Any, num_train: int, times: int = 5) -> int:
    """Optimizer steps between the demo's evaluations: ``times`` evaluations over the run."""
    steps = recipe.train.epochs * max(1, num_train // recipe.train.global_batch)
    if recipe.train.max_steps:
        steps = min(steps, recipe.train.max_steps)
    return max(1, int(steps) // times)


def describe(recipe: Any) -> str:
    """The settings a method's own recipe chooses (the student, steps and batch are shared)."""
    m, o = recipe.mask, recipe.optim
    mask = f"{m.kind} " + (f"{m.num_masked} of 64" if m.num_masked else f"{m.ratio:.0%}")
    lr = f"lr {o.lr:g}" if o.lr is not None else f"blr {o.blr:g} ({o.lr_scaling})"
    views = "+".join(
        f"{v.crop}" + (f"/jitter {v.color_jitter:g}" if v.color_jitter else "") for v in recipe.data.views
    )
    parts = [f"mask {mask}", lr, f"views {views}", f"arch {recipe.model.arch}"]
    if getattr(recipe.method_cfg, "norm_pix", True) is False:
        parts.append("pixel targets not normalised per patch")
    if recipe.mto.enabled:
        parts.append("MTO losses on")
    if METHODS[recipe.method].needs_teacher:
        t = recipe.teacher
        src = "RANDOM (control)" if t.allow_random else Path(t.pretrained).name
        parts.append(f"teacher {t.kind}:{t.model} {src}")
    return "; ".join(parts)


def prepare(
    method: str,
    out: Path,
    overrides: list[str] | None = None,
    teacher: Teacher = "trained",
    log: Any = print,
    targets: str = "online",
) -> tuple[Any, dict[str, Any]]:
    """The demo recipe of ``method`` (data written, teacher trained or reused when it needs one).

    Args:
        method: a :func:`demo_recipes` name.
        out: the demo directory (``data/``, ``teacher/``, one run directory per method).
        overrides: ``key=value`` applied last (to every method alike in a comparison).
        teacher: ``trained`` (the supervised digits teacher) or ``random`` (the control).
        log: a ``print``-like function.
        targets: ``online`` (the teacher runs every step) or ``precomputed`` (a bank of its
            targets is written first, ``mimscale.targets.demo.demo_bank``, and read instead).

    Returns:
        ``(recipe, {"teacher": label or None, "num_train": n})``.
    """
    from mimscale.demo.data import write_digits_shards

    rel = demo_recipes()[method]
    paths = write_digits_shards(out / "data")
    base = [f"data.train={paths['train']}", f"data.val={paths['val']}", f"run.out_dir={out}", *DEMO_EVAL]
    base += DEMO_STEPS
    needs = METHODS[load_recipe(_resolve(rel), base).method].needs_teacher
    label = None
    if needs and teacher == "trained":
        from mimscale.demo.teacher import teacher_overrides, train_digits_teacher

        info = train_digits_teacher(out / "teacher", log=lambda s: log(f"[mimscale demo] {s}"))
        base += teacher_overrides(info)
        label = f"supervised digits ViT ({info['val_top1']:.1f}% held-out)"
    elif needs:
        label = "RANDOM (control: a random teacher's targets carry no knowledge)"
    name = method if not needs or teacher == "trained" else f"{method}_random_teacher"
    if needs and targets == "precomputed":  # write a small bank of the digits first, train from it
        from mimscale.targets.demo import demo_bank

        base += demo_bank(
            _resolve(rel), [*base, f"run.name={name}", *(overrides or [])], out / f"{name}_bank"
        )
        name += "_precomputed"
    recipe = load_recipe(_resolve(rel), [*base, f"run.name={name}", *(overrides or [])])
    if recipe.eval.every == 0:
        recipe.eval.every = eval_every(recipe, paths["num_train"])
    if not any(o.startswith("train.recon_every=") for o in overrides or []):
        recipe.train.recon_every = recipe.eval.every  # a reconstruction picture at every evaluation
    return recipe, {"teacher": label, "num_train": paths["num_train"]}


def _earlier_run(run_dir: Path) -> int | None:
    """The last logged step of an earlier run that ``train`` will resume, or None when none."""
    from mimscale.engine.checkpoint import read_pointer

    metrics = run_dir / "metrics.jsonl"
    if read_pointer(run_dir / "checkpoints") is None or not metrics.is_file():
        return None
    steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
    return max(steps, default=0)


def run_demo(
    method: str = DEFAULT_METHOD, out: Path = Path("runs/demo"), overrides: list[str] | None = None,
    teacher: Teacher = "trained", targets: str = "online", seeds_hint: bool = True,
) -> int:  # fmt: skip
    """Run one method's demo; returns a process exit code (``seeds_hint``: say how to measure the spread)."""
    recipes = demo_recipes()
    if method not in recipes:
        print(f"demo: no CPU demo for method {method!r} (have: {', '.join(recipes)})")
        return 2
    t0 = time.perf_counter()
    recipe, info = prepare(method, out, overrides, teacher, targets=targets)
    from mimscale.demo.report import method_name, report

    name = method_name(recipe)
    print(f"[mimscale demo] {name}: {describe(recipe)}")
    run_dir = Path(recipe.run.out_dir) / recipe.run.name
    before = _earlier_run(run_dir)
    if before is not None:  # `train` resumes it: say so, or a finished run looks like a fast one
        print(f"[mimscale demo] reusing the earlier run in {run_dir} (logged up to step {before}); "
              f"to start afresh, delete that directory or pass --out ANOTHER_DIR")  # fmt: skip
    from mimscale.engine.loop import train

    run_dir = train(recipe)
    seconds = time.perf_counter() - t0
    done = _earlier_run(run_dir) or 0
    if before is not None and done <= before:
        print(f"[mimscale demo] {name}: nothing left to train (the run had finished at step {done}); "
              f"the results below are re-read from it")  # fmt: skip
    else:
        trained = f" ({done - before} steps after the earlier {before})" if before is not None else ""
        print(f"[mimscale demo] {name} finished in {seconds:.0f} s{trained}")
    print(f"[mimscale demo] run directory: {run_dir}  (recipe.yaml, metrics.jsonl, checkpoints/)")
    report(recipe, run_dir, seconds, teacher=info["teacher"])  # vs the same encoder at random init
    if seeds_hint:
        print(f"[mimscale demo] one seed (run.seed={recipe.run.seed}): the random init's readouts move "
              f"with the seed; mimscale demo --method {method} --seeds 0,1,2 measures the spread "
              f"of the gains")  # fmt: skip
    return 0
