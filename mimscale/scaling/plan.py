"""``mimscale plan RECIPE [key=value ...] --gpus N``: what a recipe costs, and which setting fits.

For every ZeRO stage the recipe accepts x activation checkpointing off/on x micro-batch (powers of
two up to the per-GPU batch), the memory per GPU (:mod:`mimscale.scaling.memory`), whether it
fits, the accumulation the global batch then needs, the step time and the GPU-hours of the whole
run. Time comes from the method's ``train_flops_per_image`` (the Method contract; counted from the
block shapes for a method that does not give it) and an MFU that is stated per GPU (printed as an
assumption) or measured here with ``--calibrate``. The fastest setting that fits is recommended,
with its overrides and its ``sbatch`` line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mimscale.bench.common import peak_bf16_flops
from mimscale.config import RecipeError
from mimscale.scaling.memory import Counts, count_params, estimate, shaped_method, train_flops

if TYPE_CHECKING:
    from mimscale.config import Recipe

# name -> (memory GiB, assumed MFU); the dense bf16 peak is the benchmarks' (bench.common.PEAK_BF16,
# matched by name). The MFUs are assumptions for a ViT pre-training step (MAE-style, bf16, compiled
# blocks), printed with every plan; --calibrate measures.
GPUS: dict[str, tuple[float, float]] = {
    "H200": (141.0, 0.35),
    "H100": (80.0, 0.35),
    "A100-80GB": (80.0, 0.45),
    "A100-40GB": (40.0, 0.45),
    "L40S": (48.0, 0.35),
    "A10": (24.0, 0.40),
}


def peak_tflops(name: str) -> float:
    """Dense bf16 TFLOP/s of a GPU in :data:`GPUS` (from the benchmarks' peak table)."""
    peak, why = peak_bf16_flops(name)
    if peak is None:
        raise RecipeError(f"--gpu {name}: {why}")
    return peak / 1e12


# Memory kept free of the plan: the CUDA context and the caching allocator's fragmentation.
RESERVE_GIB = 1.5
USABLE = 0.92
# Extra time assumed for settings that move more data or compute: activation checkpointing runs
# each block's forward twice (+1/3 of a 3x-forward step); ZeRO-3 gathers parameters every micro-step.
CKPT_FACTOR = 4 / 3
ZERO3_FACTOR = 1.10
# Below this many images per GPU and micro-step the kernels are assumed to run less efficiently:
# MFU scaled by sqrt(micro / SMALL_MICRO).
SMALL_MICRO = 32
IMAGENET = 1_281_167  # images per epoch when the recipe's data cannot say


@dataclass
class Gpu:
    name: str
    mem_gib: float
    tflops: float
    mfu: float
    mfu_source: str


@dataclass
class Setting:
    zero_stage: int
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    memory_gib: dict[str, float]
    fits: bool
    step_s: float
    gpu_hours: float


def gpu_from_args(a: argparse.Namespace) -> Gpu:
    """The target GPU from ``--gpu NAME`` or ``--gpu-mem`` / ``--gpu-tflops`` (``--mfu`` overrides)."""
    if a.gpu_mem is not None or a.gpu_tflops is not None:
        if a.gpu_mem is None or a.gpu_tflops is None:
            raise RecipeError("--gpu-mem and --gpu-tflops: give both (or --gpu NAME)")
        mfu = a.mfu if a.mfu is not None else 0.35
        return Gpu("custom", a.gpu_mem, a.gpu_tflops, mfu, "--mfu" if a.mfu is not None else "assumed")
    if a.gpu not in GPUS:
        raise RecipeError(
            f"--gpu: unknown GPU {a.gpu!r} (have: {', '.join(GPUS)}; or --gpu-mem/--gpu-tflops)"
        )
    mem, mfu = GPUS[a.gpu]
    tf = peak_tflops(a.gpu)
    if a.mfu is not None:
        return Gpu(a.gpu, mem, tf, a.mfu, "--mfu")
    return Gpu(a.gpu, mem, tf, mfu, "assumed")


def images_per_epoch(recipe: Recipe) -> tuple[int, str]:
    """The recipe's epoch size (``data.samples_per_epoch``, else its manifest, else ImageNet-1k)."""
    if recipe.data.samples_per_epoch:
        return recipe.data.samples_per_epoch, "data.samples_per_epoch"
    from pathlib import Path

    manifest = Path(recipe.data.train)
    if manifest.name == "manifest.json" and manifest.is_file():
        total = json.loads(manifest.read_text()).get("total")
        if isinstance(total, int):
            return total, str(manifest)
    return IMAGENET, "assumed ImageNet-1k (data.train has no readable manifest)"


def stages_allowed(path: str, overrides: list[str]) -> list[int]:
    """ZeRO stages the recipe's checks accept (momentum copies refuse ZeRO-3)."""
    from mimscale.registry import load_recipe

    out = []
    for stage in range(4):
        try:
            load_recipe(path, [*overrides, f"train.zero_stage={stage}"])
        except RecipeError:
            continue
        out.append(stage)
    return out


def settings(
    recipe: Recipe, counts: Counts, stages: list[int], world: int, gpu: Gpu, flops: float, images: float
) -> list[Setting]:
    """Every candidate setting with its memory, fit, step time and GPU-hours."""
    gb = recipe.train.global_batch
    per_gpu = gb // world
    micros = [m for m in (2**i for i in range(12)) if m <= per_gpu and per_gpu % m == 0]
    usable = gpu.mem_gib * USABLE - RESERVE_GIB
    # One optimizer step of the global batch at the stated MFU, spread over the world.
    base_step = gb * flops / (world * gpu.tflops * 1e12 * gpu.mfu)
    out = []
    for stage in stages:
        for ckpt in (False, True):
            for micro in micros:
                mem = estimate(recipe, counts, stage, world, micro, ckpt, bf16=True).gib()
                factor = (CKPT_FACTOR if ckpt else 1.0) * (ZERO3_FACTOR if stage == 3 else 1.0)
                factor *= max(1.0, (SMALL_MICRO / micro) ** 0.5)
                step = base_step * factor
                hours = step * images / gb * world / 3600
                out.append(
                    Setting(stage, ckpt, micro, per_gpu // micro, mem, mem["total"] <= usable, step, hours)
                )
    return out


def best(rows: list[Setting]) -> Setting | None:
    """The fastest fitting setting; ties go to the larger micro-batch, then the least memory."""
    fits = [r for r in rows if r.fits]
    return min(fits, key=lambda r: (r.step_s, -r.micro_batch, r.memory_gib["total"])) if fits else None


def sbatch_line(recipe_name: str, overrides: list[str], s: Setting, gpus: int, nodes: int) -> str:
    per_node = max(1, gpus // nodes)
    keys = [
        f"train.zero_stage={s.zero_stage}",
        f"train.micro_batch={s.micro_batch}",
        f"train.activation_checkpointing={str(s.activation_checkpointing).lower()}",
    ]
    args = " ".join([recipe_name, *overrides, *keys])
    return f"sbatch --nodes {nodes} --gpus-per-node {per_node} slurm/pretrain.sbatch {args}"


def make_plan(recipe_name: str, overrides: list[str], gpus: int, nodes: int, gpu: Gpu) -> dict[str, Any]:
    """The whole plan as JSON-able data (what ``--json`` prints)."""
    from mimscale.config.paths import recipe_path
    from mimscale.registry import load_recipe

    path = str(recipe_path(recipe_name))
    recipe = load_recipe(path, overrides)
    world = gpus * nodes
    if recipe.train.global_batch % world:
        raise RecipeError(f"train.global_batch: {recipe.train.global_batch} does not split over {world} GPUs")
    method = shaped_method(recipe)
    counts = count_params(recipe, method)
    flops, flops_src = train_flops(recipe, method)
    per_epoch, epoch_src = images_per_epoch(recipe)
    images = recipe.train.epochs * per_epoch
    stages = stages_allowed(path, overrides)
    rows = settings(recipe, counts, stages, world, gpu, flops, images)
    pick = best(rows)
    return {
        "recipe": recipe_name,
        "overrides": overrides,
        "method": recipe.method,
        "gpus": world,
        "nodes": nodes,
        "gpu": asdict(gpu),
        "params": asdict(counts),
        "train_flops_per_image": flops,
        "train_flops_source": flops_src,
        "images": images,
        "images_source": epoch_src,
        "training_flops": flops * images,
        "assumptions": assumptions(gpu),
        "settings": [asdict(r) for r in rows],
        "recommended": asdict(pick) if pick else None,
        "launch": None if pick is None else sbatch_line(recipe_name, overrides, pick, gpus, nodes),
    }


def assumptions(gpu: Gpu) -> list[str]:
    return [
        f"MFU {gpu.mfu:.2f} ({gpu.mfu_source}) of {gpu.tflops:g} TFLOP/s bf16 on {gpu.name}",
        f"usable memory {USABLE:.0%} of {gpu.mem_gib:g} GiB minus {RESERVE_GIB} GiB "
        "(CUDA context, allocator fragmentation)",
        f"activation checkpointing x{CKPT_FACTOR:.2f} step time; ZeRO-3 x{ZERO3_FACTOR:.2f}; "
        f"micro-batch m < {SMALL_MICRO}: x sqrt({SMALL_MICRO}/m)",
        "bf16 weights with fp32 master weights and AdamW states (DeepSpeed's bf16 path)",
    ]


def shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ZeRO stage and checkpointing: the largest micro-batch that fits and the next one up
    (``--json`` has every row)."""
    out = []
    for stage in sorted({r["zero_stage"] for r in rows}):
        for ckpt in (False, True):
            group = [r for r in rows if r["zero_stage"] == stage and r["activation_checkpointing"] == ckpt]
            fit = [r for r in group if r["fits"]]
            over = [r for r in group if not r["fits"]]
            out += fit[-1:] + over[:1]
    return out


def render(plan: dict[str, Any]) -> str:
    """The plan as text: the assumptions, one row per setting shown, the recommendation."""
    g, c, m = plan["gpu"], plan["params"], 1e6
    lines = [
        f"plan: {plan['recipe']} ({plan['method']}) on {plan['gpus']} x {g['name']} ({g['mem_gib']:g} GiB)",
        f"  parameters: {c['trainable'] / m:.1f} M trained, {c['frozen'] / m:.1f} M frozen, "
        f"momentum copy {c['momentum'] / m:.1f} M, teacher {c['teacher'] / m:.1f} M",
        f"  training: {plan['images']:.3g} images x {plan['train_flops_per_image'] / 1e9:.1f} GFLOP "
        f"({plan['train_flops_source']}) = {plan['training_flops']:.3g} FLOP",
        f"  epoch size: {plan['images_source']}",
        *(f"  assumption: {a}" for a in plan["assumptions"]),
        f"  {'zero':>4} {'ckpt':>4} {'micro':>5} {'accum':>5} {'params':>7} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'extras':>7} {'buffers':>7} {'total':>7}  fits {'step s':>7} {'GPU-h':>8}",
    ]
    parts = ("params", "grads", "optimizer", "activations", "extras", "buffers", "total")
    for r in shown(plan["settings"]):
        cells = " ".join(f"{r['memory_gib'][k]:>7.2f}" for k in parts)
        ckpt, fits = "on" if r["activation_checkpointing"] else "off", "yes" if r["fits"] else "no"
        lines.append(
            f"  {r['zero_stage']:>4} {ckpt:>4} {r['micro_batch']:>5} {r['grad_accum']:>5} {cells}  "
            f"{fits:>4} {r['step_s']:>7.3f} {r['gpu_hours']:>8.1f}"
        )
    rec = plan["recommended"]
    if rec is None:
        lines.append("  nothing fits: more GPUs, a smaller train.global_batch or a larger GPU")
        return "\n".join(lines)
    ckpt = "on" if rec["activation_checkpointing"] else "off"
    lines += [
        f"  recommended: ZeRO-{rec['zero_stage']}, micro-batch {rec['micro_batch']} x "
        f"{rec['grad_accum']} accumulation, checkpointing {ckpt}: {rec['memory_gib']['total']:.1f} GiB, "
        f"{rec['step_s']:.2f} s/step, {rec['gpu_hours']:.0f} GPU-hours",
        f"  launch: {plan['launch']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimscale plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (with --gpu-tflops)")
    p.add_argument("--gpu-tflops", type=float, default=None, help="dense bf16 TFLOP/s per GPU")
    p.add_argument("--mfu", type=float, default=None, help="MFU to assume instead of the GPU's default")
    p.add_argument(
        "--calibrate", action="store_true", help="measure MFU and peak memory here (a few real steps)"
    )
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``mimscale plan``: print the plan (text or ``--json``); exit 2 on bad input."""
    a = build_parser().parse_args(argv)
    if a.gpus < 1 or a.nodes < 1:
        raise RecipeError("--gpus / --nodes: at least 1")
    gpu = gpu_from_args(a)
    if a.calibrate:
        from mimscale.scaling.calibrate import calibrate

        cal = calibrate(a.recipe, a.overrides, gpu)
        gpu = Gpu(gpu.name, gpu.mem_gib, gpu.tflops, cal["mfu"], f"measured here: {cal['summary']}")
    plan = make_plan(a.recipe, a.overrides, a.gpus, a.nodes, gpu)
    if a.calibrate:
        plan["calibration"] = cal
    print(json.dumps(plan, indent=1) if a.json else render(plan))
    return 0
