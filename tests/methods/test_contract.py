"""The method contract, parametrised over the METHODS registry (STYLE.md point 14).

Every registered method ships ``recipes/<name>/cpu_tiny.yaml``; built from it on CPU, one
forward/backward gives a finite loss, every trainable parameter (and only those) gets a
gradient, the teacher gets none, and each trainable parameter lands in exactly one optimizer
group (with and without layer-wise lr decay) while frozen ones land in none.
"""

from __future__ import annotations

import pytest
import torch
from tiny_methods import tiny_method

from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import build_target_provider, prepare_batch
from mimscale.engine.optim import param_groups
from mimscale.methods import METHODS


def build(name: str, *overrides: str):
    recipe, method = tiny_method(name, *overrides)
    provider = build_target_provider(recipe, torch.device("cpu"))
    return recipe, method, provider


# Every method as registered, plus the plug-in variants (built through the same build_method).
PLUGINS = {"mto": ["mae", "simmim"]}
VARIANTS = [(n, None) for n in sorted(METHODS)] + [(n, p) for p, hosts in PLUGINS.items() for n in hosts]


@pytest.mark.parametrize("name, plugin", VARIANTS, ids=lambda v: v or "plain")
def test_method_contract(name: str, plugin: str | None) -> None:
    recipe, method, provider = build(name, *([f"{plugin}.enabled=true"] if plugin else []))
    batch = prepare_batch(synthetic_batch(recipe), torch.device("cpu"), torch.float32)
    targets = provider(batch) if provider is not None else None
    out = method(batch, batch.get("mask"), targets)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss), out.loss
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    out.loss.backward()
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: trainable {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    teacher = getattr(provider, "model", None)
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert not any(p is q for p in teacher.parameters() for q in method.parameters())


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_every_trainable_parameter_in_exactly_one_group(name: str, layer_decay) -> None:
    recipe, method, _ = build(name)
    recipe.optim.layer_decay = layer_decay
    groups = param_groups(method, recipe)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert set(seen) == trainable
    if layer_decay is not None:
        assert len({g["lr_scale"] for g in groups}) > 2  # the decay actually spreads the lr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padding_rows_get_no_gradient(name: str) -> None:
    """Rows flagged ``valid = False`` (exact-epoch padding, replacements for undecodable samples)
    leave the loss exactly as if the batch held only the valid rows, for every method."""
    recipe, method, provider = build(name)
    method.eval()  # no dropout / drop-path: the two forwards must see the same function
    full = synthetic_batch(recipe)
    b = full["views"][0].shape[0]
    full["valid"] = torch.tensor([i % 2 == 0 for i in range(b)])
    keep = [i for i in range(b) if i % 2 == 0]
    repeats = full["mask"].shape[0] // b if "mask" in full else 1
    alone = dict(full)
    alone["views"] = [v[keep] for v in full["views"]]
    alone["labels"] = full["labels"][keep]
    alone["keys"] = [full["keys"][i] for i in keep] if "keys" in full else None
    alone["valid"] = torch.ones(len(keep), dtype=torch.bool)
    if "mask" in full:
        rows = [i * repeats + r for i in keep for r in range(repeats)]
        alone["mask"], alone["mask_noise"] = full["mask"][rows], full["mask_noise"][rows]
    losses = []
    for batch in (full, alone):
        prepared = prepare_batch(batch, torch.device("cpu"), torch.float32)
        assert prepared["views"][0].shape[0] == len(keep)
        torch.manual_seed(0)  # methods that draw inside forward draw the same
        targets = provider(prepared) if provider is not None else None
        losses.append(method(prepared, prepared.get("mask"), targets).loss)
    assert torch.equal(losses[0], losses[1]), f"{name}: {losses}"
