"""Fresh initialisation matches the official code's, per tensor family (docs/methods.md §1.2).

The official numbers are computed analytically here, never measured from official code:

- BEiT-style ``trunc_normal_(std=0.02)`` cuts at +-1 sigma (``a=-std, b=std``), so its standard
  deviation is ``0.02 * sqrt(1 - 2 phi(1) / (Phi(1) - Phi(-1)))`` ~ 0.0108; BEiT then divides the
  attention ``proj`` and MLP ``fc2`` of block l (1-based) by ``sqrt(2 l)``.
- xavier-uniform on a ``[out, in]`` weight: ``sqrt(2 / (in + out))``.
- PyTorch's default conv / Linear init (kaiming-uniform, a = sqrt(5)): ``1 / sqrt(3 fan_in)``.
- MAE tokens: ``normal(0, 0.02)``.

Each family's pooled RMS (all init means are 0) must be within 5% of the expected pooled value.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.methods.tiny_methods import tiny_method

_PHI1 = math.exp(-0.5) / math.sqrt(2.0 * math.pi)  # standard normal density at 1
_MASS = math.erf(1.0 / math.sqrt(2.0))  # Phi(1) - Phi(-1)
TRUNC1 = 0.02 * math.sqrt(1.0 - 2.0 * _PHI1 / _MASS)  # BEiT trunc_normal_(std=0.02), +-1 sigma


def xavier(w: torch.Tensor) -> float:
    """xavier-uniform std of a weight whose dim 0 is fan_out and the rest fan_in."""
    fan_out, fan_in = w.shape[0], w[0].numel()
    return math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_default(w: torch.Tensor) -> float:
    """std of PyTorch's default Linear / Conv init (uniform in +-1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(3.0 * w[0].numel())


def beit_linear(name: str) -> float:
    """BEiT encoder Linear: trunc +-1 sigma, attn.proj / mlp.fc2 of block l divided by sqrt(2 l)."""
    parts = name.split(".")
    if parts[-2] in ("proj", "fc2") and parts[-3] in ("attn", "mlp") and "blocks" in parts:
        layer = int(parts[parts.index("blocks") + 1]) + 1
        return TRUNC1 / math.sqrt(2.0 * layer)
    return TRUNC1


def family_check(model: nn.Module, rules: dict[str, list]) -> dict[str, tuple[float, float]]:
    """Pooled measured vs expected std per family.

    Args:
        model: the freshly built method.
        rules: family -> list of (predicate(name, tensor), expected(name, tensor)) pairs; the
            first matching predicate of a family claims the tensor.

    Returns:
        family -> (measured RMS, expected RMS), each pooled over the family's elements.
    """
    out = {}
    for fam, preds in rules.items():
        sq = exp_sq = n = 0.0
        for name, p in model.named_parameters():
            for pred, expected in preds:
                if pred(name, p):
                    sq += float((p.detach().double() ** 2).sum())
                    exp_sq += expected(name, p) ** 2 * p.numel()
                    n += p.numel()
                    break
        assert n > 0, f"family {fam}: no tensor matched"
        out[fam] = (math.sqrt(sq / n), math.sqrt(exp_sq / n))
    return out


def _is_linear_w(model: nn.Module, prefix: str = ""):
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return lambda name, p: name in linears and name.startswith(prefix)


def _ends(*suffixes: str):
    return lambda name, p: name.endswith(suffixes)


def rules_for(method: str, model: nn.Module) -> dict[str, list]:
    """The official init of each method, as family -> [(predicate, expected std)]."""
    const = lambda v: lambda name, p: v  # noqa: E731
    if method == "simmim":  # microsoft/SimMIM models/vision_transformer.py + simmim.py
        return {
            "patch_embed": [(_ends("patch_embed.proj.weight"), const(TRUNC1))],
            "linear": [(_is_linear_w(model, "encoder."), lambda n, p: beit_linear(n))],
            "tokens": [(_ends("cls_token", "mask_token"), const(TRUNC1))],
            "head": [(_ends("decoder.0.weight"), lambda n, p: kaiming_default(p))],
        }
    if method == "cae_v2":  # Atten4Vis/CAE models/modeling_cae.py (+ _helper): xavier overrides
        return {
            "patch_embed": [(_ends("patch_embed.proj.weight"), const(TRUNC1))],
            "linear": [(_is_linear_w(model), lambda n, p: xavier(p))],
            "tokens": [(_ends("cls_token", "mask_token"), const(TRUNC1))],
        }
    mae = {  # facebookresearch/mae models_mae.py initialize_weights
        "patch_embed": [(_ends("patch_embed.proj.weight"), lambda n, p: xavier(p))],
        "linear": [
            (_is_linear_w(model, "encoder."), lambda n, p: xavier(p)),
            (_is_linear_w(model, "decoder."), lambda n, p: xavier(p)),
        ],  # fmt: skip
        "tokens": [(_ends("cls_token", "mask_token"), const(0.02))],
    }
    if method == "lc_mae":  # naver-ai/lut: heads built before initialize_weights -> xavier
        mae["heads"] = [(lambda n, p: n.startswith(("projector.", "predictor.")) and p.ndim == 2,
                         lambda n, p: xavier(p))]  # fmt: skip
    return mae


@pytest.mark.parametrize("method", ["simmim", "cae_v2", "lc_mae", "mae"])
def test_fresh_init_matches_official_std(method: str) -> None:
    # A wider encoder than cpu_tiny's so the token families hold enough elements for a 5% check.
    _, model = tiny_method(method, "model.embed_dim=256", "model.num_heads=4")
    got = family_check(model, rules_for(method, model))
    bad = {f: v for f, v in got.items() if abs(v[0] / v[1] - 1.0) > 0.05}
    assert not bad, f"{method}: measured vs official std off by > 5%: {bad}"


def test_simmim_trunc_is_cut_at_one_sigma() -> None:
    _, model = tiny_method("simmim", "model.embed_dim=256", "model.num_heads=4")
    for name in ("encoder.vit.cls_token", "encoder.mask_token", "encoder.vit.patch_embed.proj.weight"):
        t = dict(model.named_parameters())[name]
        assert t.abs().max() <= 0.02 + 1e-7, f"{name}: values beyond +-1 sigma"


def test_analytic_trunc_std() -> None:
    # Cross-check the closed form against a large draw of the same truncated normal.
    g = torch.Generator().manual_seed(0)
    x = torch.empty(2_000_000)
    nn.init.trunc_normal_(x, std=0.02, a=-0.02, b=0.02, generator=g)
    assert abs(float(x.std()) / TRUNC1 - 1.0) < 0.005
    assert abs(TRUNC1 - 0.01079) < 1e-4
