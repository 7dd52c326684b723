"""wandb history without ghosts: a run killed after its last checkpoint, then resumed, has every
step once in wandb as in metrics.jsonl. Offline wandb records the rewind (``resume_from``) in the
resumed run; ``wandb sync`` applies it. The test reads the offline files and applies it the same
way (keep the first run's steps up to the branch point, then the resumed run's)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mimscale.engine.logger import MetricLogger
from mimscale.registry import recipe_from_dict


def _records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte headers
    ``crc32c, length, type`` with type 1 full, 2 first, 3 middle, 4 last; a 7-byte file header)."""
    data, pos, block, out, part = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            out.append(part)
    return out


def _offline_runs(run_dir: Path) -> list[tuple[str, tuple[str, float] | None, dict[int, float]]]:
    """Each offline run, oldest first: (id, branch point (run id, step) or None, {step: loss})."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime):
        run_id, branch, hist = "", None, {}
        for raw in _records(next(d.glob("*.wandb"))):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
                if rec.run.branch_point.run:
                    branch = (rec.run.branch_point.run, rec.run.branch_point.value)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                if "loss" in items:
                    hist[int(items["_step"])] = float(items["loss"])
        runs.append((run_id, branch, hist))
    return runs


def _recipe():
    return recipe_from_dict({"optim": {"blr": 1e-4}, "wandb": {"enabled": True, "mode": "offline"}})


def test_a_resumed_run_rewinds_wandb_to_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = MetricLogger(_recipe(), tmp_path, rank=0)
    first.rewind(0)  # a fresh run: nothing to rewind
    for s in range(1, 6):  # killed after step 5; its last checkpoint was step 3
        first.log({"step": s, "loss": float(s)})
    first.close()
    again = MetricLogger(_recipe(), tmp_path, rank=0)
    again.rewind(3)
    for s in range(4, 8):
        again.log({"step": s, "loss": 10.0 + s})
    again.close()

    (a, a_branch, a_hist), (b, b_branch, b_hist) = _offline_runs(tmp_path)
    assert a == b == (tmp_path / "wandb_id").read_text().strip() and a_branch is None
    assert b_branch == (a, 3.0)  # wandb drops steps 4 and 5 of the killed run
    synced = {**{s: v for s, v in a_hist.items() if s <= b_branch[1]}, **b_hist}
    assert sorted(synced) == list(range(1, 8))
    assert [synced[s] for s in range(1, 8)] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0, 17.0]


def test_where_wandb_cannot_rewind_a_clearly_named_new_run_continues(tmp_path: Path, monkeypatch) -> None:
    import wandb

    (tmp_path / "wandb_id").write_text("oldrun123\n")
    calls: list[dict] = []

    def init(**kw):
        calls.append(kw)
        if "resume_from" in kw:
            raise wandb.errors.CommError("rewind is not enabled for this entity")
        return type("Run", (), {"id": kw["id"], "finish": lambda self: None})()

    monkeypatch.setattr(wandb, "init", init)
    log = MetricLogger(_recipe(), tmp_path, rank=0)
    log.rewind(3)
    assert calls[0]["resume_from"] == "oldrun123?_step=3"
    new_id = (tmp_path / "wandb_id").read_text().strip()
    assert new_id != "oldrun123" and log.wandb.id == new_id
    assert calls[1]["name"].endswith("(from step 3)") and calls[1]["id"] == new_id


@pytest.mark.parametrize("step", [0, 4])
def test_a_run_without_wandb_history_is_not_rewound(tmp_path: Path, monkeypatch, step: int) -> None:
    import wandb

    calls: list[dict] = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or object())
    MetricLogger(_recipe(), tmp_path, rank=0).rewind(step)
    assert "resume_from" not in calls[0] and calls[0]["resume"] == "allow"
