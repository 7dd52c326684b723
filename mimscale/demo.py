"""``mimscale demo``: the whole path on a CPU in minutes, on the embedded digits data.

Writes the digits shards (scikit-learn's 1,797 real 8x8 digit images, upscaled to 32 px),
pre-trains the method's ``cpu_tiny`` recipe as one process, and prints the run directory.
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
}


def run_demo(method: str = "mae", out: Path = Path("runs/demo"), overrides: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    from mimscale.cli import recipe_path
    from mimscale.data.demo import write_digits_shards

    if method not in DEMO_RECIPES:
        print(f"demo: no CPU demo for method {method!r} (have: {', '.join(DEMO_RECIPES)})")
        return 2
    t0 = time.perf_counter()
    paths = write_digits_shards(out / "data")
    recipe = load_recipe(
        recipe_path(DEMO_RECIPES[method]),
        [
            f"data.train={paths['train']}",
            f"data.val={paths['val']}",
            f"run.out_dir={out}",
            f"run.name={method}",
            *(overrides or []),
        ],
    )
    from mimscale.engine.loop import train

    run_dir = train(recipe)
    print(f"[mimscale demo] {method} finished in {time.perf_counter() - t0:.0f} s")
    print(f"[mimscale demo] run directory: {run_dir}  (recipe.yaml, metrics.jsonl, checkpoints/)")
    return 0
