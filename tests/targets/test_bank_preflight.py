"""A target shard that differs from what its bank records (replaced, changed, truncated, missing,
an absurd header) is one line naming the shard in ``mimscale check`` and the preflight, before
training, instead of one warning per sample; a header length is bounded before it is read."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from bank_helpers import tiny_recipe

from mimscale.config import RecipeError
from mimscale.preflight import check_paths
from mimscale.targets.bank import MAGIC, BankError, read_header


def _flip_a_record_byte(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _absurd_header_length(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 8] = struct.pack("<Q", 1 << 62)
    path.write_bytes(bytes(data))


def _header_not_json(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 8] = ord("!")
    path.write_bytes(bytes(data))


# case -> (damage(shard, another shard of the bank), what its line says, seen without digests)
CASES: dict[str, tuple[Callable[[Path, Path], None], str, bool]] = {
    "replaced by another shard of the bank": (lambda p, o: shutil.copy(o, p), "sha256 differs", False),
    "one record byte changed": (_flip_a_record_byte, "sha256 differs", False),
    "truncated": (lambda p, o: p.write_bytes(p.read_bytes()[:-64]), "the bank's manifest says", True),
    "missing": (lambda p, o: p.unlink(), "cannot read target shard", True),
    "absurd header length": (_absurd_header_length, "corrupt target shard header", True),
    "header not JSON": (_header_not_json, "corrupt target shard header", True),
}


def _damaged(bank: str, tmp_path: Path, case: str) -> tuple[Path, str]:
    out = tmp_path / "bank"
    shutil.copytree(bank, out)
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    CASES[case][0](out / shards[1]["file"], out / shards[0]["file"])
    return out, shards[1]["file"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_target_shard_is_one_line_before_training(small_digits, bank_factory, tmp_path, case) -> None:
    bank, name = _damaged(bank_factory("cae_v2", "fp16"), tmp_path, case)
    r = tiny_recipe("cae_v2", small_digits, "teacher.source=precomputed", f"teacher.bank={bank}")
    damage, said, cheap = CASES[case]
    with pytest.raises(RecipeError) as info:
        check_paths(r, digests=True)
    lines = [x for x in str(info.value).splitlines() if "teacher.bank:" in x]
    assert len(lines) == 1 and name in lines[0] and said in lines[0], str(info.value)
    if cheap:  # size and header are checked by every rank; digests by one process per launch
        with pytest.raises(RecipeError, match=said):
            check_paths(r, digests=False)
    else:
        check_paths(r, digests=False)


def test_a_sound_bank_passes_with_digests(small_digits, bank_factory) -> None:
    bank = bank_factory("cae_v2", "fp16")
    r = tiny_recipe("cae_v2", small_digits, "teacher.source=precomputed", f"teacher.bank={bank}")
    check_paths(r, digests=True)


@pytest.mark.parametrize("length", [1 << 62, 1 << 40, 10_000_000])
def test_a_header_length_beyond_the_file_is_refused_without_allocating(tmp_path, length) -> None:
    path = tmp_path / "x.tgt"
    path.write_bytes(MAGIC + struct.pack("<Q", length) + b"{}" + b"\0" * 54)
    with pytest.raises(BankError, match=f"its length field says {length} bytes"):
        read_header(path)
