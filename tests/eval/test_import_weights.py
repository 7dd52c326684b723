"""``mimscale import-weights``: official-format checkpoints become mimscale runs with equal outputs.

The official-format state dicts are built here from a randomly initialised mimscale model by the
official key names (the inverse of the importer's map, written out independently), saved the way
the official scripts save them, imported, reloaded through :func:`mimscale.eval.ckpt.load_method`
(what ``mimscale eval`` / ``export`` use) and compared tensor by tensor and output by output.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from mimscale.cli import main as cli_main
from mimscale.eval.import_weights import import_weights, read_official
from mimscale.eval.runs import load_method
from tests.methods.tiny_methods import REPO, tiny_method

CAE_BLOCK = {
    "norm_q": "norm1_q", "norm_k": "norm1_k", "norm_v": "norm1_v", "norm2": "norm2_cross",
    "attn": "cross_attn", "mlp": "mlp_cross", "gamma_1": "gamma_1_cross", "gamma_2": "gamma_2_cross",
}  # fmt: skip


def official_key(source: str, key: str) -> str:
    """mimscale key -> the key the official code uses for the same tensor."""
    if key.startswith("encoder.vit."):
        inner = key[len("encoder.vit.") :]
        return inner if source in ("mae", "lut") else f"encoder.{inner}"
    if source in ("mae", "lut"):
        if key == "decoder.mask_token":
            return "mask_token"
        if key.startswith("decoder."):
            return "decoder_" + key[len("decoder.") :]
        if key.startswith("projector."):
            return "head." + key[len("projector.") :]
        return key  # predictor.*
    if source == "simmim":
        return key  # encoder.mask_token, decoder.0.*
    m = re.match(r"regressor\.blocks\.(\d+)\.([a-z_0-9]+)(.*)", key)
    if m:
        return f"regresser.regressor_blocks.{m[1]}.{CAE_BLOCK[m[2]]}{m[3]}"
    fixed = {"regressor.mask_token": "mask_token"}
    pairs = [("enc_to_reg.0.", "encoder_to_regresser."), ("enc_to_reg.1.", "encoder_to_regresser_norm."),
             ("head.0.", "decoder.norm."), ("head.1.", "decoder.head.")]  # fmt: skip
    for ours, theirs in pairs:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return fixed[key]


def official_state_dict(source: str, method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The method's weights under the official names, plus the keys the importer must drop."""
    sd = {
        official_key(source, k): v.clone() for k, v in method.state_dict().items() if "_extra_state" not in k
    }
    if source == "simmim":  # the saved buffer that timm recomputes
        sd["encoder.rel_pos_bias.relative_position_index"] = torch.zeros(3, 3, dtype=torch.long)
    if source == "cae_v2":  # unused by CAE v2 / recomputed
        sd["regresser.norm.weight"], sd["regresser.norm.bias"] = torch.ones(64), torch.zeros(64)
        sd["rd_pos_embed"] = torch.zeros(1, 65, 64)
    return sd


def reload(run: Path, method_name: str) -> torch.nn.Module:
    """The imported run's method, as ``mimscale eval`` / ``export`` load it."""
    return load_method(run)[0]


CASES = [("mae", "mae"), ("simmim", "simmim"), ("cae_v2", "cae_v2"), ("lut", "lc_mae")]


def _images(method: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    enc = method.encoder
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, enc.grid[0] * enc.patch_size, enc.grid[1] * enc.patch_size, generator=g)
    mask = torch.zeros(2, enc.num_patches, dtype=torch.bool)
    mask[:, : enc.num_patches // 2] = True
    return x, mask[:, torch.randperm(enc.num_patches, generator=g)]


@pytest.mark.parametrize(("source", "method_name"), CASES)
def test_official_format_imports_to_identical_model(tmp_path: Path, source: str, method_name: str) -> None:
    _, ref = tiny_method(method_name)
    ref.eval()
    file = tmp_path / "official.pth"
    # As the official scripts save: weights under "model", their argparse Namespace beside them.
    torch.save({"model": official_state_dict(source, ref), "args": argparse.Namespace(lr=1.0)}, file)
    recipe = REPO / "recipes" / method_name / "cpu_tiny.yaml"
    report = import_weights(file, source, recipe, tmp_path / "run")
    assert report["left_at_init"] == [] and report["ignored"] == []
    got = reload(tmp_path / "run", method_name)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    for k, v in ref_sd.items():
        if "_extra_state" not in k:
            assert torch.equal(v, got_sd[k]), k
    x, mask = _images(ref)
    with torch.no_grad():
        a = ref.encoder(x, mask, mode="visible" if method_name != "simmim" else "mask_token").x
        b = got.encoder(x, mask, mode="visible" if method_name != "simmim" else "mask_token").x
        assert torch.equal(a, b)
        if method_name in ("mae", "simmim"):
            assert torch.equal(ref({"images": [x]}, mask).loss, got({"images": [x]}, mask).loss)
        if method_name == "lc_mae":  # momentum copy = the imported online weights (no EMA in the file)
            assert torch.equal(got.momentum_targets(x), ref.projector.eval()(ref.encoder(x).x[:, 1:].mean(1)))


def test_lut_ema_fills_the_momentum_copy(tmp_path: Path) -> None:
    _, ref = tiny_method("lc_mae")
    online = official_state_dict("lut", ref)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in online.items()}
    file = tmp_path / "lut.pth"
    torch.save({"model": online, "model_ema": {f"module.{k}": v for k, v in ema.items()}}, file)
    import_weights(file, "lut", REPO / "recipes/lc_mae/cpu_tiny.yaml", tmp_path / "run")
    got = reload(tmp_path / "run", "lc_mae")
    shadow = got.momentum_model["encoder"].state_dict()
    assert torch.equal(shadow["vit.cls_token"], ref.encoder.vit.cls_token + 1.0)
    assert torch.equal(got.encoder.vit.cls_token, ref.encoder.vit.cls_token)


def test_encoder_only_checkpoint_leaves_the_rest_at_init(tmp_path: Path) -> None:
    _, ref = tiny_method("simmim")
    enc = {k: v for k, v in official_state_dict("simmim", ref).items() if k.startswith("encoder.")}
    enc = {k[len("encoder.") :]: v for k, v in enc.items()}  # as SimMIM's fine-tuned encoders: no prefix
    file = tmp_path / "enc.pth"
    torch.save(enc, file)
    rep = import_weights(file, "simmim", REPO / "recipes/simmim/cpu_tiny.yaml", tmp_path / "run")
    assert rep["left_at_init"] == ["decoder.0.weight", "decoder.0.bias"]
    got, _ = load_method(tmp_path / "run")
    assert torch.equal(got.encoder.vit.blocks[0].attn.qkv.weight, ref.encoder.vit.blocks[0].attn.qkv.weight)


def test_problems_are_listed_in_one_error(tmp_path: Path) -> None:
    _, ref = tiny_method("mae")
    sd = official_state_dict("mae", ref)
    sd["head.weight"] = torch.zeros(10, 64)  # a fine-tune classifier: unknown to MAE
    del sd["decoder_pred.bias"]  # missing (a non-encoder key in a full checkpoint)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # wrong shape
    file = tmp_path / "bad.pth"
    torch.save({"model": sd}, file)
    recipe = REPO / "recipes/mae/cpu_tiny.yaml"
    with pytest.raises(ValueError) as e:
        import_weights(file, "mae", recipe, tmp_path / "run")
    msg = str(e.value)
    assert (
        "head.weight" in msg and "decoder.pred.bias" in msg and "encoder.vit.blocks.0.attn.qkv.weight" in msg
    )
    assert not (tmp_path / "run").exists()
    sd["blocks.0.attn.qkv.weight"] = ref.state_dict()["encoder.vit.blocks.0.attn.qkv.weight"]
    torch.save({"model": sd}, file)
    rep = import_weights(file, "mae", recipe, tmp_path / "run", allow={"unknown", "missing"})
    assert rep["ignored"] == ["head.weight"] and rep["left_at_init"] == ["decoder.pred.bias"]


def test_unsafe_pickle_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    file = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": Path("x")}, file)  # a non-allowlisted global
    with pytest.raises(ValueError, match="weights_only=True"):
        read_official(file)


def test_cli_writes_a_run_that_export_reads(tmp_path: Path, capsys) -> None:
    _, ref = tiny_method("mae")
    file = tmp_path / "mae.pth"
    torch.save({"model": official_state_dict("mae", ref)}, file)
    run = tmp_path / "run"
    rc = cli_main(
        ["import-weights", str(file), "--from", "mae", "--recipe", "mae/cpu_tiny.yaml", "--out", str(run)]
    )
    assert rc == 0 and "imported" in capsys.readouterr().out
    assert cli_main(["export", str(run), str(tmp_path / "enc.safetensors")]) == 0
    rc = cli_main(
        ["import-weights", str(file), "--from", "mae", "--recipe", "mae/cpu_tiny.yaml", "--out", str(run)]
    )
    assert rc == 2 and "already holds" in capsys.readouterr().out
