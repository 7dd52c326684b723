"""A recipe that differs from its bank fails before anything starts, naming the key and both
values; a missing key, a corrupt record or a missing target shard is skipped and counted, or
(``data.on_error: fail``) an error naming the target shard. Nothing is paired with another image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bank_helpers import tiny_recipe

from mimscale.config import RecipeError
from mimscale.data.pipeline import build_train_loader
from mimscale.data.reader import ShardReadError
from mimscale.targets.bank import read_header


@pytest.mark.parametrize(
    ("override", "key", "bank_value", "recipe_value"),
    [
        ("teacher.depth=3", "teacher.depth", "2", "3"),
        ("teacher.layer=1", "teacher.layer", "-1", "1"),
        ("teacher.mean=[0.5,0.5,0.5] teacher.std=[0.5,0.5,0.5]", "teacher.mean", "None", "[0.5, 0.5, 0.5]"),
        ("model.patch_size=8 mask.num_masked=8", "model.patch_size", "4", "8"),
        ("data.draft=false", "data.draft", "True", "False"),
    ],
)
def test_recipe_bank_mismatch_names_key_and_both_values(
    small_digits, bank_factory, override, key, bank_value, recipe_value
) -> None:
    bank = bank_factory("cae_v2", "fp16")
    with pytest.raises(RecipeError) as e:
        tiny_recipe(
            "cae_v2", small_digits, "teacher.source=precomputed", f"teacher.bank={bank}", *override.split()
        )
    msg = str(e.value)
    assert f"{key}={bank_value}" in msg and f"has {recipe_value}" in msg and "\n" not in msg


def test_view_config_mismatch_and_missing_bank(small_digits, bank_factory, tmp_path) -> None:
    bank = bank_factory("cae_v2", "fp16")
    with pytest.raises(
        RecipeError,
        match=r"data\.views\[0\]\.color_jitter: the bank .* with data\.views\[0\]\.color_jitter=0\.4, "
        r"the recipe has 0\.2",
    ):
        views = (
            "data.views=[{size: 32, crop: rrc, scale: [0.5, 1.0], color_jitter: 0.2, color_jitter_p: 1.0}]"
        )
        tiny_recipe("cae_v2", small_digits, "teacher.source=precomputed", f"teacher.bank={bank}", views)
    with pytest.raises(RecipeError, match=r"teacher\.bank: .*nowhere.*no target bank manifest"):
        tiny_recipe(
            "cae_v2", small_digits, "teacher.source=precomputed", f"teacher.bank={tmp_path / 'nowhere'}"
        )
    with pytest.raises(RecipeError, match=r"teacher\.bank: teacher.source is precomputed"):
        tiny_recipe("cae_v2", small_digits, "teacher.source=precomputed")


def damaged(bank: str, tmp_path: Path, how: str) -> tuple[Path, str, int]:
    """A copy of ``bank`` with target shard 1 damaged; returns (dir, shard file, samples hit)."""
    out = tmp_path / how
    shutil.copytree(bank, out)
    name = json.loads((out / "manifest.json").read_text())["shards"][1]["file"]
    path = out / name
    header, start = read_header(path)
    data = bytearray(path.read_bytes())
    if how == "missing_shard":
        path.unlink()
        return out, name, header["count"]
    if how == "missing_key":  # the first key renamed in place: that image has no targets
        old = json.dumps(header["keys"][0]).encode()
        i = data.index(old)
        data[i + len(old) - 2] = ord("#")
    elif how == "corrupt_record":  # one byte flipped in every record of the first image
        rec = (len(data) - start) // (header["count"] * header["views_per_image"])
        for k in range(header["views_per_image"]):
            data[start + k * rec + rec // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return out, name, 1


@pytest.mark.parametrize("how", ["missing_key", "corrupt_record", "missing_shard"])
def test_bad_bank_entries_skip_and_count_or_fail_naming_the_shard(
    small_digits, bank_factory, tmp_path, how
) -> None:
    bank, name, hit = damaged(bank_factory("cae_v2", "fp16"), tmp_path, how)
    for policy in ("skip", "fail"):
        r = tiny_recipe("cae_v2", small_digits, "data.epoch_mode=exact", "data.num_workers=0",
                        f"data.on_error={policy}")  # fmt: skip
        loader = build_train_loader(
            r.data,
            r.mask,
            img_size=32,
            patch_size=4,
            batch_size=16,
            seed=0,
            rank=0,
            world_size=1,
            bank=str(bank),
        )
        if policy == "fail":
            with pytest.raises(ShardReadError, match=name):
                list(loader)
            continue
        with pytest.warns(RuntimeWarning, match=name):
            batches = list(loader)
        invalid = sum(int((~b["valid"]).sum()) for b in batches)
        assert invalid == hit and loader.shard_errors == hit
        seen = {k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v}
        assert len(seen) == 128 - hit


def test_other_image_shards_are_refused_before_training(small_digits, bank_factory, tmp_path) -> None:
    """Rewritten image shards under the same names (another sha256), or shards the bank lacks."""
    bank = bank_factory("cae_v2", "fp16")
    m = json.loads(Path(small_digits).read_text())
    m["shards"][1]["sha256"] = "0" * 64
    changed = Path(small_digits).with_name("changed.json")
    changed.write_text(json.dumps(m))
    with pytest.raises(
        RecipeError, match=r"teacher\.bank: .*image shard digits-train-000001\.tar has sha256 000000"
    ):
        tiny_recipe("cae_v2", str(changed), "teacher.source=precomputed", f"teacher.bank={bank}")
    r = tiny_recipe("cae_v2", str(changed))
    with pytest.raises(ValueError, match=r"teacher\.bank: .*digits-train-000001\.tar has sha256"):
        build_train_loader(r.data, r.mask, img_size=32, patch_size=4, batch_size=16, seed=0, rank=0,
                           world_size=1, bank=bank)  # fmt: skip
    full = Path(small_digits).with_name("manifest.json")  # every digits shard: more than the bank has
    with pytest.raises(RecipeError, match=r"no target shard for image shard digits-train-000004\.tar"):
        tiny_recipe("cae_v2", str(full), "teacher.source=precomputed", f"teacher.bank={bank}")


def test_teacher_file_overwritten_after_the_bank_is_refused(small_digits, tmp_path) -> None:
    """Same teacher.pretrained path, other bytes: the bank's targets are stale, so the run is
    refused before it starts; a copy of the same bytes (new modification time) is accepted."""
    import os

    from bank_helpers import tiny_clip_file

    from mimscale.targets.precompute import precompute

    weights = tiny_clip_file(tmp_path / "teacher.pt", seed=0)
    teacher = (f"teacher.pretrained={weights}", "teacher.allow_random=false")
    bank = tmp_path / "bank"
    precompute(tiny_recipe("cae_v2", small_digits, *teacher), bank, views=1, encoding="fp16", batch=32)
    train = ("teacher.source=precomputed", f"teacher.bank={bank}", *teacher)
    tiny_recipe("cae_v2", small_digits, *train)  # the very file: accepted
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # copied: same bytes, new time
    tiny_recipe("cae_v2", small_digits, *train)
    tiny_clip_file(weights, seed=1)  # overwritten in place with other weights
    with pytest.raises(
        RecipeError,  # the key came from an override: the message names it (issue 25, item 12)
        match=r"^override 'teacher\.pretrained=.*' \(on .*cpu_tiny\.yaml\): teacher\.pretrained: "
        r".*teacher\.pt is not the file the bank",
    ):
        tiny_recipe("cae_v2", small_digits, *train)
