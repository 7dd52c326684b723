"""``python -m mimscale.train RECIPE [key.sub=value ...]`` — what `deepspeed` and `torchrun` run.

A plain single process (world size 1) runs the same recipe. The recipe is loaded and validated
before DeepSpeed or any data worker starts.
"""

from __future__ import annotations

import sys

from mimscale.config import RecipeError
from mimscale.registry import load_recipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the env carries the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2
    from mimscale.engine.checkpoint import CheckpointSpaceError
    from mimscale.engine.loop import train
    from mimscale.engine.safe_load import UnsafeCheckpointError

    try:
        run_dir = train(recipe)
    except UnsafeCheckpointError as e:  # resume refused a checkpoint that would run code
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointSpaceError as e:  # disk full: the last complete checkpoint stays the resume point
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    print(f"[mimscale] done; run directory: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
