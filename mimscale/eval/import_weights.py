"""``mimscale import-weights FILE --from mae|simmim|cae_v2|lut --recipe R --out RUN_DIR``.

Turns a checkpoint released with the official code of MAE, SimMIM, CAE v2 or LC-MAE (LUT) into a
mimscale run directory (``RUN_DIR/checkpoints/LATEST`` -> ``step00000000/`` holding
``recipe.yaml`` and DeepSpeed's stage-0 module file) that ``mimscale eval``, ``export`` and
``finetune.pretrained=RUN_DIR`` read like any trained run.

Key maps (established by a forward/loss/gradient comparison with the official code):

- MAE: encoder keys ``X`` -> ``encoder.vit.X``; ``decoder_{embed,pos_embed,blocks,norm,pred}`` ->
  ``decoder.{embed,pos_embed,blocks,norm,pred}``; ``mask_token`` -> ``decoder.mask_token``.
- LUT (LC-MAE): MAE's map plus ``head.*`` -> ``projector.*`` and ``predictor.*`` unchanged; an
  EMA state (``model_ema`` / ``ema``) fills the momentum copy (encoder + projector), else the copy
  starts from the imported online weights.
- SimMIM: ``encoder.X`` -> ``encoder.vit.X`` (``encoder.mask_token`` stays), ``decoder.*`` kept;
  the saved ``relative_position_index`` buffers are dropped (timm recomputes them).
- CAE v2: ``encoder.X`` -> ``encoder.vit.X``; ``encoder_to_regresser[_norm]`` -> ``enc_to_reg.0/.1``;
  ``regresser.regressor_blocks.i.{norm1_q,norm1_k,norm1_v,norm2_cross,cross_attn,mlp_cross,
  gamma_{1,2}_cross}`` -> ``regressor.blocks.i.{norm_q,norm_k,norm_v,norm2,attn,mlp,gamma_{1,2}}``;
  ``mask_token`` -> ``regressor.mask_token``; ``decoder.norm/head`` -> ``head.0/.1``; the unused
  ``regresser.norm.*`` and the recomputed ``rd_pos_embed`` are dropped.

Encoder-only checkpoints (released pre-trained or fine-tuned encoders, with or without the
``encoder.`` prefix) load into the encoder; every other part stays at its initialisation and the
command lists what was left there. Any unknown, missing or shape-mismatched key is an error that
lists them all, unless ``--allow unknown`` / ``--allow missing`` says otherwise (shapes never).
Files are read with ``torch.load(weights_only=True)`` (or safetensors).

To continue pre-training from the imported weights, start a new run with
``model.init_from=RUN_DIR`` (fresh optimizer, schedule and data order from step 0; the imported
run has no optimizer state to resume).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["ImportReport", "convert_state_dict", "import_weights", "init_from_run", "main", "read_official"]

SOURCES = ("mae", "simmim", "cae_v2", "lut")
DROP = object()  # a rule target: the key is known and deliberately not loaded

_MAE_DECODER = [
    (r"^decoder_embed\.", "decoder.embed."),
    (r"^decoder_pos_embed$", "decoder.pos_embed"),
    (r"^decoder_blocks\.", "decoder.blocks."),
    (r"^decoder_norm\.", "decoder.norm."),
    (r"^decoder_pred\.", "decoder.pred."),
    (r"^mask_token$", "decoder.mask_token"),
]
_MAE_ENCODER = [(r"^(cls_token|pos_embed|patch_embed\.|blocks\.|norm\.)", r"encoder.vit.\1")]
_CAE_BLOCK = {"norm1_q": "norm_q", "norm1_k": "norm_k", "norm1_v": "norm_v", "norm2_cross": "norm2",
              "cross_attn": "attn", "mlp_cross": "mlp", "gamma_1_cross": "gamma_1",
              "gamma_2_cross": "gamma_2"}  # fmt: skip

# source -> ordered (pattern, replacement or DROP); the first matching pattern wins.
RULES: dict[str, list[tuple[str, Any]]] = {
    "mae": _MAE_DECODER + _MAE_ENCODER,
    "lut": _MAE_DECODER + _MAE_ENCODER + [(r"^head\.", "projector."), (r"^predictor\.", "predictor.")],
    "simmim": [
        (r"relative_position_index$", DROP),
        (r"^encoder\.mask_token$", "encoder.mask_token"),
        (r"^encoder\.", "encoder.vit."),
        (r"^decoder\.", "decoder."),
    ],
    "cae_v2": [
        (r"^rd_pos_embed$", DROP),
        (r"^regresser\.norm\.", DROP),
        (r"relative_position_index$", DROP),
        (r"^encoder\.", "encoder.vit."),
        (r"^encoder_to_regresser_norm\.", "enc_to_reg.1."),
        (r"^encoder_to_regresser\.", "enc_to_reg.0."),
        (r"^mask_token$", "regressor.mask_token"),
        (r"^decoder\.norm\.", "head.0."),
        (r"^decoder\.head\.", "head.1."),
        (
            rf"^regresser\.regressor_blocks\.(\d+)\.({'|'.join(_CAE_BLOCK)})(\.|$)",
            lambda m: f"regressor.blocks.{m[1]}.{_CAE_BLOCK[m[2]]}{m[3]}",
        ),  # fmt: skip
    ],
}
EMA_KEYS = ("model_ema", "ema", "state_dict_ema")
# Official files nest the weights under one of these; the first present wins.
WEIGHT_KEYS = ("model", "state_dict", "module")


class ImportReport(dict):
    """What an import did: ``loaded`` / ``left_at_init`` / ``dropped`` / ``ignored`` key lists."""


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(weights, ema or None)`` of an official checkpoint, on CPU, read safely.

    Accepts a ``.safetensors`` file or a ``torch.save`` file holding a state dict directly or
    under ``model`` / ``state_dict`` / ``module`` (the EMA under ``model_ema`` / ``ema``).
    A leading ``module.`` (DDP / timm EMA wrappers) is stripped.

    Raises:
        ValueError: the file cannot be read safely or holds no tensors; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip(load_file(str(path))), None
    try:
        # Official training scripts also pickle their argparse Namespace beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure gets the same clear message
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
            "re-save just its state dict (torch.save(ckpt['model'], 'weights.pth')) and import that"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    weights = next((obj[k] for k in WEIGHT_KEYS if isinstance(obj.get(k), dict)), obj)
    ema = next((obj[k] for k in EMA_KEYS if isinstance(obj.get(k), dict)), None)
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise ValueError(f"{path}: no tensors found (looked at the top level and {WEIGHT_KEYS})")
    return _strip(weights), _strip(ema) if ema else None


def _strip(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def convert_state_dict(
    source: str, sd: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename an official state dict to mimscale's keys.

    An encoder-only SimMIM / CAE v2 file (keys without the ``encoder.`` prefix, as their
    fine-tuned models) is first given the prefix.

    Returns:
        ``(renamed, dropped, unmapped)``: the renamed tensors, the official keys dropped on
        purpose, and the official keys no rule knows.
    """
    if source not in RULES:
        raise ValueError(f"--from: expected one of {SOURCES}, got {source!r}")
    rules = [(re.compile(p), r) for p, r in RULES[source]]
    if source in ("simmim", "cae_v2") and not any(k.startswith("encoder.") for k in sd):
        sd = {f"encoder.{k}": v for k, v in sd.items()}
    out, dropped, unmapped = {}, [], []
    for key, value in sd.items():
        for pat, repl in rules:
            m = pat.search(key)
            if m is None:
                continue
            if repl is DROP:
                dropped.append(key)
            else:
                out[pat.sub(repl, key, count=1)] = value
            break
        else:
            unmapped.append(key)
    return out, dropped, unmapped


def _check(
    target: dict[str, torch.Tensor], given: dict[str, torch.Tensor], unmapped: list[str], allow: set[str]
) -> tuple[list[str], list[str]]:
    """Raise one error listing every problem not allowed; return ``(left_at_init, ignored)``."""
    unknown = unmapped + [k for k in given if k not in target]
    missing = [k for k in target if k not in given]
    shapes = [f"{k}: file {list(v.shape)} vs model {list(target[k].shape)}"
              for k, v in given.items() if k in target and v.shape != target[k].shape]  # fmt: skip
    encoder_only = all(k.startswith("encoder.") for k in given)
    allowed_missing = [
        k for k in missing if "missing" in allow or (encoder_only and not k.startswith("encoder."))
    ]
    problems = []
    if unknown and "unknown" not in allow:
        problems.append(f"unknown keys ({len(unknown)}): {unknown}")
    if len(allowed_missing) < len(missing):
        problems.append(f"missing keys ({len(missing) - len(allowed_missing)}): "
                        f"{[k for k in missing if k not in allowed_missing]}")  # fmt: skip
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes}")
    if problems:
        raise ValueError(
            "the checkpoint does not fit the recipe's model -- " + "; ".join(problems)
            + ". Use --allow unknown / --allow missing to accept unknown or missing keys."
        )  # fmt: skip
    return missing, unknown


def import_weights(
    file: str | Path,
    source: str,
    recipe_file: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    allow: set[str] | frozenset[str] = frozenset(),
) -> ImportReport:
    """Load an official checkpoint into the recipe's method and write a mimscale run directory.

    Args:
        file: the official checkpoint (``.pth`` / ``.pt`` / ``.safetensors``).
        source: which code wrote it: ``mae``, ``simmim``, ``cae_v2`` or ``lut``.
        recipe_file: the recipe whose method receives the weights.
        out: the run directory to create (refused when it already holds a checkpoint).
        overrides: ``key=value`` recipe overrides.
        allow: ``{"unknown", "missing"}`` problems to accept instead of failing.

    Returns:
        :class:`ImportReport` (also written to ``RUN_DIR/import.json``).
    """
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    out = Path(out)
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out}: already holds checkpoints/; choose a new --out")
    recipe = load_recipe(recipe_file, overrides or [])
    method = build_method(recipe)
    weights, ema = read_official(file)
    given, dropped, unmapped = convert_state_dict(source, weights)
    target = {k: v for k, v in method.state_dict().items() if not k.endswith("_extra_state")}
    left, ignored = _check(target, given, unmapped, set(allow))
    method.load_state_dict({**target, **{k: v for k, v in given.items() if k in target}}, strict=False)
    momentum = _fill_momentum(method, source, ema)
    report = ImportReport(
        source=source, file=str(file), loaded=sorted(k for k in given if k in target),
        left_at_init=left, dropped=dropped, ignored=ignored, momentum=momentum,
    )  # fmt: skip
    _write_run(method, recipe, out, report)
    return report


def _fill_momentum(method: torch.nn.Module, source: str, ema: dict[str, torch.Tensor] | None) -> str:
    """Set a momentum copy (LC-MAE) from the file's EMA, else from the imported online weights."""
    copy = getattr(method, "momentum_model", None)
    if copy is None:
        return "none"
    if ema is not None:
        renamed, _, _ = convert_state_dict(source, ema)
        for name in copy.shadow:
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in renamed.items() if k.startswith(prefix)}
            copy.shadow[name].load_state_dict(part, strict=True)
        return "from the file's EMA"
    for name in copy.shadow:
        copy.shadow[name].load_state_dict(getattr(method, name).state_dict(), strict=True)
    return "copied from the imported online weights"


def _write_run(method: torch.nn.Module, recipe: Any, out: Path, report: ImportReport) -> None:
    """A stage-0 DeepSpeed layout: ``checkpoints/LATEST`` -> ``step00000000/`` (module + recipe)."""
    from mimscale.config import save_recipe
    from mimscale.eval.ckpt import POINTER

    tag_dir = out / "checkpoints" / "step00000000"
    tag_dir.mkdir(parents=True)
    sd = {k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v
          for k, v in method.state_dict().items()}  # fmt: skip
    torch.save({"module": sd}, tag_dir / "mp_rank_00_model_states.pt")
    save_recipe(recipe, tag_dir / "recipe.yaml")
    save_recipe(recipe, out / "recipe.yaml")
    (out / "import.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "checkpoints" / POINTER).write_text(tag_dir.name + "\n")


def init_from_run(method: torch.nn.Module, path: str | Path) -> None:
    """Load a run's weights (every key, strict) into a freshly built ``method``.

    Used by ``model.init_from``. Stage-0 files are read with ``weights_only=True``; ZeRO
    checkpoints are consolidated by :func:`mimscale.eval.ckpt.method_state_dict`.

    Raises:
        ValueError: the run's weights do not fit the recipe's model (names the run and the keys).
    """
    from mimscale.eval.ckpt import method_state_dict, resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(path)
    stage0 = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if stage0.is_file() and not any((ckpt_dir / tag).glob("*zero_pp_rank_*")):
        sd = torch.load(stage0, map_location="cpu", weights_only=True)["module"]
    else:
        sd = method_state_dict(path)
    try:
        missing, unexpected = method.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"model.init_from: {ckpt_dir / tag} does not fit the recipe's model: {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"model.init_from: {ckpt_dir / tag} does not fit the recipe's model: "
            f"missing {list(missing)}, unexpected {list(unexpected)}"
        )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``mimscale import-weights FILE --from SRC --recipe R --out RUN_DIR [key=value ...]``."""
    from mimscale.config.paths import recipe_path

    p = argparse.ArgumentParser(prog="mimscale import-weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("file", help="official checkpoint (.pth / .pt / .safetensors)")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES)
    p.add_argument("--recipe", required=True, help="recipe whose method receives the weights")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--allow", action="append", default=[], choices=["unknown", "missing"],
                   help="accept unknown (ignored) or missing (left at init) keys; repeatable")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value")
    args = p.parse_args(argv)
    try:
        rep = import_weights(args.file, args.source, recipe_path(args.recipe), args.out, args.overrides,
                             set(args.allow))  # fmt: skip
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"import-weights: {e}", flush=True)
        return 2
    print(
        f"imported {len(rep['loaded'])} tensors from {args.file} -> {args.out} (momentum: {rep['momentum']})"
    )
    if rep["left_at_init"]:
        print(f"left at initialisation ({len(rep['left_at_init'])}): {rep['left_at_init']}")
    for k in ("dropped", "ignored"):
        if rep[k]:
            print(f"{k} ({len(rep[k])}): {rep[k]}")
    return 0
