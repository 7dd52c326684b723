"""The analyses the papers argue with, each writing JSON + PNG.

- **Mean attention distance per layer** (LC-MAE, MR-MAE; Dosovitskiy et al. Fig. 7): for every
  patch query, the attention-weighted pixel distance to the patch keys, averaged over queries
  and images, per head and layer. The class token's row and column are dropped and each row is
  renormalised over the patch keys, so uniform attention gives the mean pairwise distance of
  the grid.
- **MTO heterogeneity per layer** (docs/methods.md §5.2, Eq. 2): H^l of the encoder's hidden states
  for a fixed random mask (masked rows = X_M, visible rows = X_V); encoders with a mask token
  (SimMIM family) see the mask token at masked positions, as in pre-training. Uses
  :func:`mimscale.methods.mto.heterogeneity`.
- **Singular-value spectrum of layer features** (LC-MAE Fig. 3): per image and layer, the
  singular values of the centred ``[N, D]`` patch-token matrix normalised by the largest,
  averaged over images; plus the effective rank ``exp(entropy(s / sum s))``.
- **RAUC** between two runs' evaluation curves (MTO Eq. 6): :mod:`mimscale.eval.rauc`.

``mimscale diagnose WHAT CKPT --data VAL --out DIR`` (WHAT: attention_distance, heterogeneity,
spectrum or all) and ``mimscale diagnose rauc RUN_A RUN_B --key eval/linear_top1 --out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "attention_distance",
    "effective_rank",
    "grid_distances",
    "heterogeneity_per_layer",
    "main",
    "run_diagnostics",
    "singular_spectrum",
]

ALL = ("attention_distance", "heterogeneity", "spectrum")


def grid_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``[N, N]`` Euclidean pixel distances between the centres of the patches of a grid."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float() * patch_size
    return torch.cdist(pos, pos)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Mean attention distance per head of one layer.

    Args:
        attn: ``[B, H, 1 + N, 1 + N]`` attention probabilities (class token first) or
            ``[B, H, N, N]`` (patches only).
        grid: patch grid (h, w), N = h * w.
        patch_size: pixels per patch.

    Returns:
        ``[H]`` mean over images and patch queries of ``sum_j a_ij d_ij`` (pixels), with the
        rows renormalised over patch keys.
    """
    n = grid[0] * grid[1]
    a = attn[..., -n:, -n:].float()
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    d = grid_distances(grid, patch_size).to(a.device)
    return (a * d).sum(dim=-1).mean(dim=(0, 2))


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of the normalised singular values ``s / sum(s)`` (last dim)."""
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(dim=-1))


def singular_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of centred per-image token features.

    Args:
        x: ``[B, N, D]`` tokens of one layer.

    Returns:
        ``(spectrum [min(N, D)] normalised by the largest and averaged over images,
        effective rank averaged over images (scalar))``.
    """
    x = x.float() - x.float().mean(dim=1, keepdim=True)
    s = torch.linalg.svdvals(x)  # [B, min(N, D)], descending
    return (s / s[:, :1].clamp_min(1e-12)).mean(dim=0), effective_rank(s).mean()


def heterogeneity_per_layer(hidden: list[torch.Tensor], mask: torch.Tensor, logit_scale: float | str = 1.0):
    """H^l (Eq. 2) of each layer's patch rows, averaged over images: a list of floats."""
    from mimscale.methods.mto import heterogeneity

    return [heterogeneity(h[:, -mask.shape[1] :], mask, logit_scale).mean().item() for h in hidden]


@torch.no_grad()
def _attention_maps(encoder: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention probabilities through timm's ``AttentionExtract`` (hooks on a copy)."""
    from timm.utils import AttentionExtract

    vit = copy.deepcopy(encoder.vit).eval()
    for m in vit.modules():  # the fused kernel never materialises the probabilities
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    maps = AttentionExtract(vit, method="hook")(images)
    return [maps[k] for k in sorted(maps, key=lambda k: int(k.split(".")[1]))]


def _show_progress(wanted: bool) -> bool:
    """Progress bars only where asked, and only on rank 0 of a process group."""
    import torch.distributed as dist

    return wanted and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


@torch.no_grad()
def _measure(
    encoder: Any, images: torch.Tensor, what: list[str], seed: int, logit_scale, progress: bool = False
) -> dict[str, Any]:
    from tqdm import tqdm

    res: dict[str, Any] = {}
    for name in tqdm(what, desc="diagnose", unit="analysis", disable=not _show_progress(progress)):
        res.update(_measure_one(encoder, images, name, seed, logit_scale))
    return res


def _measure_one(encoder: Any, images: torch.Tensor, name: str, seed: int, logit_scale) -> dict[str, Any]:
    """One analysis (``name`` from :data:`ALL`) on one batch of images."""
    res: dict[str, Any] = {}
    layers = list(range(encoder.depth + 1))
    if name == "attention_distance":
        dist = [
            attention_distance(a, encoder.grid, encoder.patch_size) for a in _attention_maps(encoder, images)
        ]
        res["attention_distance"] = {
            "per_head": [d.tolist() for d in dist],
            "mean": [d.mean().item() for d in dist],
        }
    if name == "spectrum":
        hidden = encoder(images, return_layers=layers).hidden
        spec = [singular_spectrum(h[:, 1:]) for h in hidden]
        res["spectrum"] = {"singular_values": [s.tolist() for s, _ in spec],
                           "effective_rank": [r.item() for _, r in spec]}  # fmt: skip
    if name == "heterogeneity":
        g = torch.Generator().manual_seed(seed)
        n = encoder.num_patches
        keep = max(1, round(n * 0.25))  # MAE's 75 % masking
        order = torch.rand(images.shape[0], n, generator=g).argsort(dim=1)
        mask = torch.ones(images.shape[0], n, dtype=torch.bool).scatter(1, order[:, :keep], False)
        mask = mask.to(images.device)
        if getattr(encoder, "mask_token", None) is not None:
            hidden = encoder(images, mask, mode="mask_token", return_layers=layers).hidden
        else:
            hidden = encoder(images, return_layers=layers).hidden
        res["heterogeneity"] = {
            "H": heterogeneity_per_layer(hidden, mask, logit_scale),
            "mask_ratio": 1 - keep / n,
            "logit_scale": logit_scale,
            "log_num_visible": math.log(keep),
        }
    return res


LAYER_AXIS = "layer (0 = embeddings, l = output of block l)"  # one numbering for every plot


def _plot(res: dict[str, Any], out_dir: Path, label: str = "") -> dict[str, str]:
    """One PNG per analysis; returns ``{name: title}``.

    Every plot uses the same layer numbering (0 = the embeddings entering block 1, l = block l;
    a block's attention belongs to layer l), integer layer ticks, and a title naming the run and
    step when ``label`` gives them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {}
    for name, data in res.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        if name == "attention_distance":
            for layer, heads in enumerate(data["per_head"], start=1):
                ax.scatter([layer] * len(heads), heads, s=8, color="tab:blue", alpha=0.6,
                           label="one head" if layer == 1 else None)  # fmt: skip
            ax.plot(range(1, len(data["mean"]) + 1), data["mean"], color="black", marker="o", ms=3,
                    label="mean over heads")  # fmt: skip
            ax.set(xlabel=LAYER_AXIS, ylabel="mean attention distance (px)")
        elif name == "heterogeneity":
            ax.plot(range(len(data["H"])), data["H"], marker="o", label="H^l (mean over images)")
            ax.axhline(data["log_num_visible"], ls="--", color="gray", label="log |V| (uniform attention)")
            ax.set(xlabel=LAYER_AXIS, ylabel="heterogeneity H^l (nats)")
        elif name == "spectrum":
            curves = data["singular_values"]
            cmap = plt.get_cmap("viridis")
            shown = {0, len(curves) // 2, len(curves) - 1}  # a readable legend: first, middle, last
            for layer, s in enumerate(curves):
                ax.plot(range(1, len(s) + 1), [max(v, 1e-8) for v in s], lw=1,
                        color=cmap(layer / max(1, len(curves) - 1)),
                        label=f"layer {layer}" if layer in shown else None)  # fmt: skip
            ax.set(xlabel="singular value index", ylabel="s_i / s_1 (mean over images)", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and indices are integers
        ax.legend(fontsize=7)
        titles[name] = name.replace("_", " ") + (f" - {label}" if label else "")
        ax.set_title(titles[name], fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=120)
        plt.close(fig)
    return titles


def run_diagnostics(
    encoder: Any,
    recipe: Any,
    source: str,
    what: Sequence[str] = ALL,
    num_images: int = 64,
    out_dir: str | Path | None = None,
    seed: int = 0,
    logit_scale: float | str = 1.0,
    label: str = "",
    progress: bool = False,
) -> dict[str, float]:
    """Run the encoder diagnostics on the first ``num_images`` images of ``source``.

    Writes ``out_dir/<name>.json`` and ``out_dir/<name>.png`` for each analysis; ``label``
    (e.g. "run_x step 1000") goes into the plot titles; ``progress`` shows a tqdm bar (rank 0).

    Returns:
        Scalar summaries (``attn_dist_last``, ``heterogeneity_last``, ``eff_rank_last``) to log.
    """
    from mimscale.data.pipeline import build_eval_loader
    from mimscale.eval.features import normalize_uint8

    bad = sorted(set(what) - set(ALL))
    if bad:
        raise ValueError(f"unknown diagnostic {bad[0]!r} (known: {', '.join(ALL)})")
    device = next(encoder.parameters()).device
    loader = build_eval_loader(recipe.data, img_size=recipe.model.img_size, batch_size=num_images, rank=0,
                               world_size=1, source=source)  # fmt: skip
    batch = next(iter(loader))
    images = normalize_uint8(batch["views"][0][batch["valid"]].to(device), next(encoder.parameters()).dtype)
    res = _measure(encoder, images, list(what), seed, logit_scale, progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in res.items():
            (out / f"{name}.json").write_text(json.dumps({"num_images": images.shape[0], **data}) + "\n")
        _plot(res, out, label)
    summary = {}
    if "attention_distance" in res:
        summary["attn_dist_last"] = res["attention_distance"]["mean"][-1]
    if "heterogeneity" in res:
        summary["heterogeneity_last"] = res["heterogeneity"]["H"][-1]
    if "spectrum" in res:
        summary["eff_rank_last"] = res["spectrum"]["effective_rank"][-1]
    return summary


def run_label(ckpt: str | Path) -> str:
    """``"<run name> step <n>"`` of a run / checkpoints / tag dir (for plot titles)."""
    from mimscale.eval.ckpt import resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(ckpt)
    step = int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else tag
    return f"{ckpt_dir.parent.name} step {step}"


def main(argv: list[str] | None = None) -> int:
    """CLI: ``mimscale diagnose {attention_distance,heterogeneity,spectrum,all,rauc} ...``."""
    argv = list(argv or [])
    if argv and argv[0] == "rauc":
        from mimscale.eval.rauc import main as rauc_main

        return rauc_main(argv[1:])
    p = argparse.ArgumentParser(prog="mimscale diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("what", choices=[*ALL, "all"])
    p.add_argument("ckpt", help="run dir, checkpoints dir or tag dir")
    p.add_argument(
        "--data", default="", help="labeled or unlabeled manifest.json (default: the recipe's data.val)"
    )
    p.add_argument("--out", required=True, help="directory for <name>.json and <name>.png")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--logit-scale", default="1.0", help="heterogeneity: 1.0 (paper) or inv_sqrt_d")
    args = p.parse_args(argv)
    from mimscale.eval.runs import load_method

    method, recipe = load_method(args.ckpt)
    what = list(ALL) if args.what == "all" else [args.what]
    scale = args.logit_scale if args.logit_scale == "inv_sqrt_d" else float(args.logit_scale)
    summary = run_diagnostics(method.encoder, recipe, args.data or recipe.data.val, what, args.num_images,
                              args.out, logit_scale=scale, label=run_label(args.ckpt),
                              progress=True)  # fmt: skip
    print(json.dumps({"out": args.out, **summary}))
    _publish(args.ckpt, Path(args.out), what)
    return 0


def _publish(ckpt: str | Path, out: Path, what: list[str]) -> None:
    """The plots, to the run's wandb run when its recipe logs to wandb."""
    from mimscale.engine.logger import publish_pngs
    from mimscale.eval.ckpt import resolve_checkpoint

    ckpt_dir, _ = resolve_checkpoint(ckpt)
    pngs = {f"diagnostics/{n}": out / f"{n}.png" for n in what if (out / f"{n}.png").is_file()}
    if publish_pngs(ckpt_dir.parent, pngs, run_label(ckpt)):
        print(f"[mimscale] diagnostics: {len(pngs)} plot(s) sent to the run's wandb run")
