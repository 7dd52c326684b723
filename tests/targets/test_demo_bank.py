"""The demo's bank: written, reported (size, step-time ratio) and trainable from as returned."""

from __future__ import annotations

from bank_helpers import REPO, tiny_recipe

from mimscale.targets.demo import bank_bytes, demo_bank


def test_demo_bank_reports_and_returns_overrides_that_train_from_it(small_digits, tmp_path, capsys) -> None:
    recipe = REPO / "recipes/cae_v2/cpu_tiny.yaml"
    overrides = demo_bank(recipe, [f"data.train={small_digits}"], tmp_path, views=2)
    out = capsys.readouterr().out
    assert overrides == ["teacher.source=precomputed", f"teacher.bank={tmp_path / 'bank'}"]
    assert f"{bank_bytes(tmp_path / 'bank') / 2**20:.1f} MiB" in out and "128 images x 2 views" in out
    assert "ratio" in out
    r = tiny_recipe("cae_v2", small_digits, *overrides)  # the bank matches its recipe
    assert r.teacher.source == "precomputed"
