"""``mimscale demo``: the whole path on a CPU in minutes, on the embedded digits data.

Writes the digits shards (scikit-learn's 1,797 real 8x8 digit images, upscaled to 32 px),
pre-trains the method's ``cpu_tiny`` recipe as one process with the evaluation hook on (kNN +
linear probe on the held-out split), then compares the encoder with the same encoder at random
initialisation (:mod:`mimscale.demo.report`: a table, ``demo_results.json`` and
``demo_curves.png`` in the run directory).
"""

from __future__ import annotations

import time
from pathlib import Path

from mimscale.config import load_recipe

DEMO_RECIPES = {
    "mae": "mae/cpu_tiny.yaml",
    "simmim": "simmim/cpu_tiny.yaml",
    "cae_v2": "cae_v2/cpu_tiny.yaml",  # tiny RANDOM CLIP teacher (the run says so, loudly)
    "mr_mae": "mr_mae/cpu_tiny.yaml",  # tiny RANDOM CLIP teacher (the run says so, loudly)
    "lc_mae": "lc_mae/cpu_tiny.yaml",
    "mae_mto": "mto/mae_cpu_tiny.yaml",
}


def run_demo(method: str = "mae", out: Path = Path("runs/demo"), overrides: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    from mimscale.cli import recipe_path
    from mimscale.demo.data import write_digits_shards

    if method not in DEMO_RECIPES:
        print(f"demo: no CPU demo for method {method!r} (have: {', '.join(DEMO_RECIPES)})")
        return 2
    t0 = time.perf_counter()
    paths = write_digits_shards(out / "data")
    from mimscale.demo.report import DEMO_EVAL, DEMO_OVERRIDES, eval_every

    base = [
        f"data.train={paths['train']}",
        f"data.val={paths['val']}",
        f"run.out_dir={out}",
        f"run.name={method}",
    ]
    base += DEMO_EVAL  # kNN + linear probe on the held-out digits during and after pre-training
    base += DEMO_OVERRIDES.get(method, [])
    recipe = load_recipe(recipe_path(DEMO_RECIPES[method]), [*base, *(overrides or [])])
    if recipe.extras["eval"].every == 0:
        recipe.extras["eval"].every = eval_every(recipe, paths["num_train"])
    from mimscale.engine.loop import train

    run_dir = train(recipe)
    seconds = time.perf_counter() - t0
    print(f"[mimscale demo] {method} finished in {seconds:.0f} s")
    print(f"[mimscale demo] run directory: {run_dir}  (recipe.yaml, metrics.jsonl, checkpoints/)")
    from mimscale.demo.report import report

    report(recipe, run_dir, seconds)  # the same encoder at random init vs pre-trained; table + PNG
    return 0
