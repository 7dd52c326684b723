"""pretrain.sbatch treats SIGTERM as it treats SIGUSR1 (torchrun would pass only SIGTERM on to
the ranks): the ranks finish their step, save together, and the job requeues and resumes."""

from __future__ import annotations

import subprocess

import pytest
from slurm_helpers import wait_done, wait_for
from test_slurm import STEPS, records, submit_pretrain, train_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]


def test_sigterm_to_the_batch_script_saves_requeues_and_logs_every_step_once(digits, tmp_path) -> None:
    jid, log = submit_pretrain(tmp_path, train_args(digits, tmp_path, "term"), ["--gpus-per-node=2"])
    run = tmp_path / "term"
    wait_for(lambda: len(records(run)) >= 3, what="step 3 logged")
    subprocess.run(["scancel", "--signal=TERM", "--batch", jid], check=True)
    info = wait_done(jid)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "SIGTERM: asking every rank to save and stop" in text and "requeueing job" in text
    assert "resumed from" in text
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1)), "a step was lost or logged twice"
