"""Shard writing: sources, manifest formats, bad files, resume after interruption, array tasks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from photo_folder import make_photo_folder
from PIL import Image

from mimscale.data import shard_writer
from mimscale.data.manifest import read_manifest, resolve_source
from mimscale.data.shards import make_shards, merge_task_manifests
from mimscale.data.shards_cli import main


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_imagefolder_to_shards_with_manifest(tmp_path: Path) -> None:
    good = make_photo_folder(tmp_path / "src")
    # listing order (no shuffle) so the empty-last-shard case below is deterministic by layout
    summary = make_shards(tmp_path / "src", tmp_path / "out", shard_size=4, progress=False, shuffle_seed=None)
    m = read_manifest(tmp_path / "out")
    assert summary["images"] == m["total"] == len(good) == 15
    # 17 files in 5 planned shards; the last holds only notes.txt, so it is empty and not listed
    assert [s["name"] for s in m["shards"]] == [f"out-{i:06d}.tar" for i in range(4)]
    assert m["classes"] == {"cat": 0, "cup": 1, "rocket": 2}
    # bad input is skipped, counted and listed, never fatal
    assert summary["skipped"] == 2
    assert sorted(s["path"] for s in m["skipped"]) == ["cup/broken.jpg", "rocket/notes.txt"]
    # the two formats other tools read
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {s["name"]: s["count"] for s in m["shards"]}
    info = json.loads((tmp_path / "out" / "_info.json").read_text())["splits"]["train"]
    assert info["num_samples"] == 15 and info["shard_lengths"] == [s["count"] for s in m["shards"]]
    # per sample: original bytes (no re-encode), cls, json with source path and size
    seen = {}
    for s in m["shards"]:
        members = _tar_members(tmp_path / "out" / s["name"])
        assert hashlib.sha256((tmp_path / "out" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                ext = "jpg" if meta["path"].endswith(".jpg") else "png"
                assert members[f"{key}.{ext}"] == (tmp_path / "src" / meta["path"]).read_bytes()
                assert int(members[f"{key}.cls"]) == m["classes"][good[meta["path"]]]
                assert Image.open(io.BytesIO(members[f"{key}.{ext}"])).size == (meta["width"], meta["height"])
                seen[meta["path"]] = key
    assert set(seen) == set(good) and len(set(seen.values())) == 15


def test_pre_resize_is_recorded(tmp_path: Path) -> None:
    make_photo_folder(tmp_path / "src", per_class=2, bad=False)
    make_shards(tmp_path / "src", tmp_path / "out", short_side=24, quality=80, progress=False)
    m = read_manifest(tmp_path / "out")
    assert m["settings"]["short_side"] == 24 and m["settings"]["quality"] == 80
    members = _tar_members(tmp_path / "out" / m["shards"][0]["name"])
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert all(min(x["width"], x["height"]) == 24 for x in metas)
    assert all("orig_width" in x for x in metas)
    assert all(k.endswith((".jpg", ".json", ".cls")) for k in members)  # re-encoded as JPEG


def test_flat_folder_and_csv_list(tmp_path: Path) -> None:
    make_photo_folder(tmp_path / "tree", per_class=2, bad=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "tree").rglob("*.*"):
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    make_shards(flat, tmp_path / "out_flat", progress=False)
    m = read_manifest(tmp_path / "out_flat")
    assert m["total"] == 6 and m["classes"] is None and m["source"]["kind"] == "folder"
    rows = ["path\tlabel"] + [
        f"tree/{p.parent.name}/{p.name}\t{p.parent.name}" for p in (tmp_path / "tree").rglob("*.*")
    ]
    rows.append("tree/missing.jpg\tcat")
    (tmp_path / "list.tsv").write_text("\n".join(rows) + "\n")
    make_shards(tmp_path / "list.tsv", tmp_path / "out_list", progress=False)
    m = read_manifest(tmp_path / "out_list")
    assert m["total"] == 6 and m["source"]["kind"] == "list" and len(m["classes"]) == 3
    assert [s["path"] for s in m["skipped"]] == ["tree/missing.jpg"]


def test_empty_source_is_an_error_naming_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        make_shards(tmp_path / "empty", tmp_path / "out", progress=False)
    assert main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2


def test_shard_size_by_bytes(tmp_path: Path) -> None:
    make_photo_folder(tmp_path / "src", bad=False)
    sizes = [p.stat().st_size for p in (tmp_path / "src").rglob("*.*")]
    make_shards(
        tmp_path / "src", tmp_path / "out", shard_size=None, shard_bytes=3 * max(sizes), progress=False
    )
    m = read_manifest(tmp_path / "out")
    assert m["total"] == 15 and 1 < len(m["shards"]) < 15
    assert all(s["count"] >= 3 for s in m["shards"][:-1])


def test_interrupted_prep_resumes_and_gives_identical_shards(tmp_path: Path, monkeypatch) -> None:
    make_photo_folder(tmp_path / "src")
    make_shards(tmp_path / "src", tmp_path / "ref", prefix="x", shard_size=3, progress=False)
    reference = _digests(tmp_path / "ref")
    # Kill the job while it writes the third shard: an exception out of the encoder.
    real_encode, calls = shard_writer._encode, {"n": 0}

    def dying_encode(item, settings):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_encode(item, settings)

    monkeypatch.setattr(shard_writer, "_encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path / "src", tmp_path / "run", prefix="x", shard_size=3, progress=False)
    monkeypatch.setattr(shard_writer, "_encode", real_encode)
    run = tmp_path / "run"
    assert not (run / "manifest.json").exists()
    assert list(run.glob(".x-000002.tar.tmp-*"))  # the partial shard never got its final name
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("*.tar")}
    summary = make_shards(tmp_path / "src", run, prefix="x", shard_size=3, progress=False)
    assert summary["shards_reused"] == len(before) == 2
    assert summary["shards_written"] == len(reference) - 2
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("x-00000[01].tar")} == before
    assert not list(run.glob(".*.tmp-*"))
    assert _digests(run) == reference
    ref_manifest, run_manifest = read_manifest(tmp_path / "ref"), read_manifest(run)
    assert (
        ref_manifest["shards"] == run_manifest["shards"]
        and run_manifest["skipped"] == ref_manifest["skipped"]
    )


def test_changed_settings_in_the_same_dir_are_refused(tmp_path: Path) -> None:
    make_photo_folder(tmp_path / "src", per_class=2, bad=False)
    make_shards(tmp_path / "src", tmp_path / "out", shard_size=2, progress=False)
    with pytest.raises(ValueError, match="different source listing or settings"):
        make_shards(tmp_path / "src", tmp_path / "out", shard_size=2, short_side=16, progress=False)


def test_array_tasks_then_merge_equal_a_single_run(tmp_path: Path) -> None:
    make_photo_folder(tmp_path / "src")
    make_shards(tmp_path / "src", tmp_path / "one", prefix="p", shard_size=2, progress=False)
    args = [
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "arr"),
        "--prefix",
        "p",
        "--shard-size",
        "2",
    ]
    assert main([*args, "--task-index", "0", "--num-tasks", "3", "--no-progress", "--workers", "2"]) == 0
    with pytest.raises(ValueError, match="have not finished"):
        merge_task_manifests(tmp_path / "arr")
    for i in (1, 2):
        assert (
            main([*args, "--task-index", str(i), "--num-tasks", "3", "--no-progress", "--workers", "1"]) == 0
        )
    assert main(["merge", "--out", str(tmp_path / "arr")]) == 0
    one, arr = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "arr")
    assert one["shards"] == arr["shards"] and one["total"] == arr["total"] == 15
    assert sorted(map(str, one["skipped"])) == sorted(map(str, arr["skipped"]))
    assert _digests(tmp_path / "one") == _digests(tmp_path / "arr")


def test_resolve_source_forms(tmp_path: Path, digits: dict) -> None:
    train = Path(digits["train"]).parent
    by_manifest = resolve_source(digits["train"])
    by_dir = resolve_source(str(train))
    pattern = resolve_source(str(train / "digits-train-{000000..000005}.tar"))
    assert by_manifest.urls == by_dir.urls == pattern.urls
    assert by_manifest.total == pattern.total == 1438  # a sibling manifest gives the counts
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "a-000000.tar").write_bytes((train / "digits-train-000000.tar").read_bytes())
    assert resolve_source(str(bare / "a-{000000..000000}.tar")).counts is None
    piped = resolve_source(f"pipe:cat {train}/digits-train-{{000000..000001}}.tar")
    assert piped.urls[1] == f"pipe:cat {train}/digits-train-000001.tar" and piped.counts is None


def _cls_order(out: Path) -> list[int]:
    order = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            order += [int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")]
    return order


def test_items_are_shuffled_across_classes_unless_asked_not_to(tmp_path: Path) -> None:
    """An ImageFolder lists class by class; shards must mix classes (seeded, reproducible)."""
    make_photo_folder(tmp_path / "src", per_class=6, bad=False)
    make_shards(tmp_path / "src", tmp_path / "a", shard_size=4, progress=False)
    make_shards(tmp_path / "src", tmp_path / "b", shard_size=4, progress=False)
    make_shards(tmp_path / "src", tmp_path / "keep", shard_size=4, progress=False, shuffle_seed=None)
    kept, shuffled = _cls_order(tmp_path / "keep"), _cls_order(tmp_path / "a")
    assert kept == sorted(kept) and shuffled != kept and sorted(shuffled) == kept
    assert shuffled == _cls_order(tmp_path / "b")  # the same seed gives the same shards
    assert read_manifest(tmp_path / "a")["settings"]["shuffle_seed"] == 0


def _sample_metas(out: Path) -> dict[str, tuple[dict, bytes]]:
    """source path -> (json meta, stored image bytes) over every shard of ``out``."""
    found = {}
    for s in read_manifest(out)["shards"]:
        members = _tar_members(out / s["name"])
        for k, v in members.items():
            if k.endswith(".json"):
                key = k.split(".")[0]
                img = next(
                    b for n, b in members.items() if n.startswith(key + ".") and n.endswith(("jpg", "png"))
                )
                found[json.loads(v)["path"]] = (json.loads(v), img)
    return found


@pytest.mark.parametrize("short_side", [None, 16])
def test_exif_rotated_and_sixteen_bit_images_are_prepared_upright_and_unclipped(
    tmp_path: Path, short_side: int | None
) -> None:
    from test_transforms import _exif_rotated_jpeg, _png16_gradient

    src = tmp_path / "src"
    src.mkdir()
    rotated, _ = _exif_rotated_jpeg()
    (src / "phone.jpg").write_bytes(rotated)  # stored 48 wide x 24 high, displayed 24 x 48
    (src / "scan16.png").write_bytes(_png16_gradient())  # 64 x 48, 16-bit
    make_shards(src, tmp_path / "out", short_side=short_side, progress=False)
    metas = _sample_metas(tmp_path / "out")
    phone, phone_bytes = metas["phone.jpg"]
    scan, scan_bytes = metas["scan16.png"]
    if short_side is None:  # original bytes kept; sizes as displayed
        assert (phone["width"], phone["height"]) == (24, 48) and phone_bytes == rotated
    else:  # re-encoded upright: the stored pixels are 16 x 32, top red
        assert (phone["width"], phone["height"], phone["orig_width"], phone["orig_height"]) == (
            16,
            32,
            24,
            48,
        )
        up = np.asarray(Image.open(io.BytesIO(phone_bytes)).convert("RGB")).astype(int)
        assert up.shape == (32, 16, 3) and up[:8, :, 0].mean() > 200 and up[-8:, :, 2].mean() > 200
        gray = np.asarray(Image.open(io.BytesIO(scan_bytes)).convert("L")).astype(int)
        assert gray[:, 0].mean() < 10 and gray[:, -1].mean() > 245 and (gray == 255).mean() < 0.1
    assert (scan["width"], scan["height"]) == (64, 48) or scan["orig_width"] == 64
