"""``mimscale demo``: the whole path on a CPU in minutes, on the embedded digits data.

Writes the digits shards (scikit-learn's 1,797 real 8x8 digit images, upscaled to 32 px),
pre-trains the method's ``cpu_tiny`` recipe as one process with the evaluation hook on (kNN +
linear probe on the held-out split), then compares the encoder with the same encoder at random
initialisation (:mod:`mimscale.demo.report`: a table, ``demo_results.json`` and
``demo_curves.png`` in the run directory).

The demos are the shipped tiny recipes (:func:`demo_recipes`): ``recipes/<method>/cpu_tiny.yaml``
is ``--method <method>``, and a plug-in's ``recipes/<plugin>/<host>_cpu_tiny.yaml`` is
``--method <host>_<plugin>`` (e.g. ``mto/mae_cpu_tiny.yaml``: ``mae_mto``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mimscale.registry import METHODS, load_recipe

__all__ = ["DEMO_EVAL", "DEMO_OVERRIDES", "demo_recipes", "eval_every", "run_demo"]

TINY = "cpu_tiny.yaml"

# Recipe overrides that turn the evaluation hook on for the demo (kNN + fast linear probe on the
# held-out split, five times during pre-training and at the end).
DEMO_EVAL = ["eval.at_end=true", "eval.knn=true", "eval.linear=true", "eval.batch_size=512"]

# Per-method demo settings, applied after DEMO_EVAL and before the user's overrides. Found on the
# digits: with 4-px patches of the bicubic-upscaled 8 x 8 scans, a masked patch is interpolated
# from its neighbours and MAE's encoder learns nothing a random one does not already give (probe
# accuracy at or below random init after 30 epochs); 8-px patches (2 x 2 original pixels, 16
# tokens, 4 visible) make the task need the digit's shape, and the encoder overtakes its random
# initialisation after ~600 steps. Mean-pooled patch tokens (MAE's global pool) are probed: the
# class token gets no direct training signal in MAE.
DEMO_OVERRIDES: dict[str, list[str]] = {
    "mae": ["model.patch_size=8", "train.epochs=40", "optim.blr=3.0e-3", "eval.pool=mean"],
}


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
        if path.name == TINY:
            # pre-training methods only: fine-tuning (a method with a classifier) needs a checkpoint
            if not (folder in METHODS and METHODS[folder].can_predict):
                methods[folder] = f"{folder}/{path.name}"
        elif path.name.endswith(f"_{TINY}"):
            plugins[f"{path.name[: -len(TINY) - 1]}_{folder}"] = f"{folder}/{path.name}"
    return {**methods, **plugins}


def eval_every(recipe: Any, num_train: int, times: int = 5) -> int:
    """Optimizer steps between the demo's evaluations: ``times`` evaluations over the run."""
    steps = recipe.train.epochs * max(1, num_train // recipe.train.global_batch)
    if recipe.train.max_steps:
        steps = min(steps, recipe.train.max_steps)
    return max(1, int(steps) // times)


def run_demo(
    method: str = "mae",
    out: Path = Path("runs/demo"),
    overrides: list[str] | None = None,
    teacher: str = "online",
) -> int:
    """Run the demo (``teacher="precomputed"``: from a bank written first); returns an exit code."""
    from mimscale.demo.data import write_digits_shards

    recipes = demo_recipes()
    if method not in recipes:
        print(f"demo: no CPU demo for method {method!r} (have: {', '.join(recipes)})")
        return 2
    t0 = time.perf_counter()
    paths = write_digits_shards(out / "data")
    base = [
        f"data.train={paths['train']}",
        f"data.val={paths['val']}",
        f"run.out_dir={out}",
        f"run.name={method}",
    ]
    base += DEMO_EVAL  # kNN + linear probe on the held-out digits during and after pre-training
    base += DEMO_OVERRIDES.get(method, [])
    if teacher == "precomputed":  # write a small bank of the digits first, then train from it
        from mimscale.targets.demo import demo_bank

        base += demo_bank(_resolve(recipes[method]), [*base, *(overrides or [])], out)
    recipe = load_recipe(_resolve(recipes[method]), [*base, *(overrides or [])])
    if recipe.eval.every == 0:
        recipe.eval.every = eval_every(recipe, paths["num_train"])
    from mimscale.engine.loop import train

    run_dir = train(recipe)
    seconds = time.perf_counter() - t0
    print(f"[mimscale demo] {method} finished in {seconds:.0f} s")
    print(f"[mimscale demo] run directory: {run_dir}  (recipe.yaml, metrics.jsonl, checkpoints/)")
    from mimscale.demo.report import report

    report(recipe, run_dir, seconds)  # the same encoder at random init vs pre-trained; table + PNG
    return 0
