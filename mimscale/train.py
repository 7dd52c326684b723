"""``python -m mimscale.train RECIPE [key.sub=value ...]`` — what `deepspeed` and `torchrun` run.

A plain single process (world size 1) runs the same recipe. The recipe is loaded and validated
before DeepSpeed or any data worker starts.
"""

from __future__ import annotations

import os
import sys

from mimscale.config import RecipeError
from mimscale.config.paths import recipe_path
from mimscale.preflight import check_paths
from mimscale.registry import load_recipe

# Exit status of a run stopped early by a signal or the stop file, its checkpoint written:
# EX_TEMPFAIL ("try again later"), so `mimscale train ... && next` does not run `next`.
EXIT_STOPPED = 75
# Exit status of a run stopped by bad input data with data.on_error: fail (a corrupt shard or an
# undecodable sample, named on one line): an input error, as a bad recipe (2).
EXIT_DATA = 2
# Exit status of a run that kept producing non-finite losses after reloading its last good
# checkpoint (train.nan_patience): retrying the same command would fail the same way.
EXIT_NONFINITE = 3


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; return the exit status.

    Under a command that reads the status itself (``MIMSCALE_STATUS_FILE``: `mimscale train
    --nproc`, pretrain.sbatch), rank 0 records it there, and an outcome every rank reached
    together (a stop, 75; non-finite losses, 3; an input error, 2) exits 0 to the launcher:
    torchrun would print a ChildFailedError traceback and report 1, and the deepspeed launcher
    would kill the ranks still closing their files.
    """
    from mimscale.engine.rundir import STATUS_ENV, write_status

    code = _main(list(sys.argv[1:] if argv is None else argv))
    if not os.environ.get(STATUS_ENV):
        return code
    if os.environ.get("RANK", "0") == "0":
        write_status(code)
    return 0 if code in (EXIT_STOPPED, EXIT_NONFINITE, 2) else code


def _main(argv: list[str]) -> int:
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the env carries the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from mimscale.engine.rundir import RunDirBusy, die_with_owner, disk_full_line

    die_with_owner()  # under `mimscale train --nproc`: no rank outlives that command
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        recipe = load_recipe(recipe_path(argv[0]), argv[1:])
        check_paths(recipe, int(os.environ.get("WORLD_SIZE", "1")), digests=rank0)  # one hashes the bank
    except RecipeError as e:
        if rank0:  # one line, not one per rank
            print(f"recipe error: {e}", file=sys.stderr)
        return 2
    from mimscale.data.reader import ShardReadError
    from mimscale.engine.bookkeeping import ResumeRefusedError
    from mimscale.engine.checkpoint import CheckpointSpaceError
    from mimscale.engine.loop import NonFiniteLossError, Trainer
    from mimscale.engine.safe_load import UnsafeCheckpointError

    try:
        trainer = Trainer(recipe)
        run_dir = trainer.fit()
    except UnsafeCheckpointError as e:  # resume refused a checkpoint that would run code
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ResumeRefusedError as e:  # e.g. a checkpoint from older mask random streams
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardReadError as e:  # data.on_error: fail; a worker's error arrives with its traceback
        print(f"data error: {e.line()}", file=sys.stderr, flush=True)
        return EXIT_DATA
    except RunDirBusy as e:  # another run writes this run directory: nothing was written
        if not e.quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointSpaceError as e:  # disk full: the last complete checkpoint stays the resume point
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk before or between checkpoints: the file, in one line
        line = disk_full_line(e, recipe.run.out_dir)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:  # every rank stops at the same step; one line says why
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    if trainer.stopped_by is not None:
        if trainer.dist.rank == 0:
            print(
                f"[mimscale] stopped by {trainer.stopped_by} after step {trainer.state.step}; checkpoint "
                f"written; the same command resumes. Run directory: {run_dir}",
                flush=True,
            )
        return EXIT_STOPPED
    if trainer.dist.rank == 0:
        print(f"[mimscale] done; run directory: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
