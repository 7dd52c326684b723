"""``mimscale bench teacher``: what the frozen teacher costs inside a training step, as JSON.

Usage: ``mimscale bench teacher [RECIPE] [key.sub=value ...] [--steps N] [--out FILE]``. The default
recipe is CAE v2+ ViT-L/16 on a GPU and the tiny CPU recipe elsewhere; the teacher is random
(``teacher.allow_random=true``: speed does not depend on the weights). One process, the real engine
step (:func:`mimscale.engine.loop.train_step`) on one synthetic micro-batch (accumulation 1):

- ``online`` vs ``none``: the step with the teacher forward vs the same step fed cached targets;
  ``teacher_share`` = 1 - none / online (plus the teacher forward alone).
- ``amortised``: ``mask.repeats`` M = 1, 2, 4 with the student batch fixed (B / M views, M masks
  each, one teacher forward per view): step time per student image and per view.
- ``offload``: the same step with the teacher in DeepSpeed ZeRO-Inference (weights in host memory).
- ``precomputed``: the same step fed stored targets of each encoding (fp32, fp16, int8, pca:D,
  pca:D:int8; decoded on the device by the precomputed provider), alternated with ``online`` and
  ``none``; per encoding the fidelity (per-token cosine, PCA explained variance), bytes per view,
  the storage for ImageNet-1k at K = 1, 10, 100, and one data worker's target-read rate.
- FLOPs counted by ``torch.utils.flop_counter`` (student forward + backward and teacher forward);
  on GPU also images/s, peak memory and MFU counting the teacher's FLOPs (the GPU's bf16 dense peak,
  :data:`mimscale.bench.common.PEAK_BF16`; null with ``mfu_unknown`` for a GPU not in it).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

TEACHER_SEED = 1234


def teacher_batch(recipe, views: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """``views`` random uint8 views with ``repeats`` masks each (rows b*R .. b*R + R - 1)."""
    from mimscale.masking import batch_noise, build_mask_generator

    s, p = recipe.model.img_size, recipe.model.patch_size
    g = torch.Generator().manual_seed(seed)
    gen = build_mask_generator(recipe.mask, (s // p, s // p), s, p)
    assert gen is not None, "the teacher bench draws masks: mask.kind must not be none"
    rng = np.random.default_rng(seed)
    return {
        "views": [torch.randint(0, 256, (views, 3, s, s), dtype=torch.uint8, generator=g)],
        "keys": [str(i) for i in range(views)],
        "labels": torch.full((views,), -1, dtype=torch.long),
        "mask": torch.from_numpy(np.stack([gen(rng) for _ in range(views * repeats)])),
        "mask_noise": batch_noise(seed, 0, [str(i) for i in range(views)], gen.num_patches, repeats),
    }


def _timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per call and peak device memory (GiB, 0 on CPU) over the timed calls."""
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def _flops(method, provider, batch: dict[str, Any], device, dtype) -> tuple[float, float]:
    """(student forward + backward, teacher forward) FLOPs of one micro-batch, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimscale.engine.loop import prepare_batch

    b = prepare_batch(batch, device, dtype)
    # nn.MultiheadAttention's inference fast path (open_clip blocks) is one fused op the counter
    # does not know; count the same math through the regular path.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with FlopCounterMode(display=False) as teacher:
        targets = provider(b)
    torch.backends.mha.set_fastpath_enabled(fast)
    with FlopCounterMode(display=False) as student:
        method(b, b["mask"], targets).loss.backward()
    method.zero_grad(set_to_none=True)
    return float(student.get_total_flops()), float(teacher.get_total_flops())


def run_bench(recipe, steps: int, warmup: int = 2) -> dict[str, Any]:
    """All measurements of the module docstring, as one JSON-able dict."""
    from mimscale.config import derive
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, prepare_batch, seed_everything, train_step
    from mimscale.engine.optim import use_bf16
    from mimscale.methods import build_method
    from mimscale.teachers import build_provider

    dist = init_distributed()
    dev = dist.device
    seed_everything(0)
    method = build_method(recipe).to(dev)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    engine = build_engine(method, recipe, d, dev)
    dtype = torch.bfloat16 if use_bf16(recipe, dev) else torch.float32
    torch.manual_seed(TEACHER_SEED)  # the offloaded copy gets the same (random) weights
    provider = build_provider(recipe, dev)
    n = recipe.train.micro_batch
    batch = teacher_batch(recipe, n, 1)
    step = lambda b, fn: train_step(engine, [b], dev, dtype, fn)  # noqa: E731
    cached = provider(prepare_batch(batch, dev, dtype))
    online, mem_online = _timed(lambda: step(batch, provider), steps, warmup, dev)
    none, _ = _timed(lambda: step(batch, lambda _b: cached), steps, warmup, dev)
    fwd, _ = _timed(lambda: provider(prepare_batch(batch, dev, dtype)), steps, warmup, dev)
    out: dict[str, Any] = {
        "method": recipe.method, "size": recipe.model.size, "img_size": recipe.model.img_size,
        "teacher": f"{provider.cfg.kind}:{provider.cfg.model}@{provider.img_size}px", "device": str(dev),
        "micro_batch": n, "dtype": str(dtype), "online_step_s": online, "no_teacher_step_s": none,
        "teacher_forward_s": fwd, "teacher_share": 1.0 - none / online, "amortised": {},
    }  # fmt: skip
    for m in (1, 2, 4):
        if n % m == 0:
            bm = teacher_batch(recipe, n // m, m)
            t, _ = _timed(functools.partial(step, bm, provider), steps, warmup, dev)
            out["amortised"][f"M={m}"] = {"step_s": t, "s_per_image": t / n, "s_per_view": t / (n // m)}
    student_flops, teacher_flops = _flops(engine.module, provider, batch, dev, dtype)
    out.update(student_flops_per_image=student_flops / n, teacher_flops_per_image=teacher_flops / n)
    out["images_per_s"] = n / online
    if dev.type == "cuda":
        out.update(peak_mem_gib=mem_online, gpu=torch.cuda.get_device_name())
        from mimscale.bench.common import mfu

        util = mfu((student_flops + teacher_flops) / online, torch.cuda.get_device_name())
        out.update(mfu_with_teacher=util.pop("mfu"), **util)
    out["offload"] = _offload(recipe, provider, step, batch, dev, dtype, steps, warmup, online)
    out["precomputed"] = _precomputed(recipe, provider, step, batch, dev, dtype, steps, warmup)
    return out


def _offload(recipe, resident, step, batch, dev, dtype, steps: int, warmup: int, online: float) -> dict:
    """The same step with the teacher in ZeRO-Inference; its outputs must equal the resident's."""
    from mimscale.engine.loop import prepare_batch
    from mimscale.teachers import build_provider

    recipe.teacher.offload = True
    torch.manual_seed(TEACHER_SEED)
    off = build_provider(recipe, dev)
    recipe.teacher.offload = False
    b = prepare_batch(batch, dev, dtype)
    diff = (off(b).tokens.float() - resident(b).tokens.float()).abs().max().item()
    t, mem = _timed(lambda: step(batch, off), steps, warmup, dev)
    fwd, _ = _timed(lambda: off(prepare_batch(batch, dev, dtype)), steps, warmup, dev)
    res = {"step_s": t, "teacher_forward_s": fwd, "slowdown_vs_resident": t / online, "max_abs_diff": diff}
    if dev.type == "cuda":
        res["peak_mem_gib"] = mem
    return res


# --------------------------------------------------------------------------- precomputed targets


def _encodings(channels: int) -> list[str]:
    d = max(1, channels // 8)  # pca:64 for a 512-d CLIP-B/16 target
    return ["fp32", "fp16", "int8", f"pca:{d}", f"pca:{d}:int8"]


def _encoded(provider, batch: dict[str, Any], dev, dtype) -> dict[str, tuple[dict, Any, float | None]]:
    """Per encoding: ``(batch with stored targets, precomputed provider, explained variance)``,
    encoded from the online teacher's outputs on the batch (PCA fitted on them)."""
    from mimscale.engine.loop import prepare_batch
    from mimscale.targets.encoding import encode, fit_pca, parse_encoding
    from mimscale.targets.provider import PrecomputedProvider

    exact = provider(prepare_batch(batch, dev, dtype))
    tokens = exact.tokens.float().cpu().numpy()
    out = {}
    for name in _encodings(tokens.shape[-1]):
        enc = parse_encoding(name)
        pca = fit_pca(tokens, enc.pca_dim) if enc.pca_dim else None
        stored = {k: torch.from_numpy(v) for k, v in encode(tokens, enc, pca).items()}
        if exact.cls_attn is not None:
            stored["cls_attn"] = exact.cls_attn.float().cpu()
        manifest = {"encoding": name, "pca": pca.to_json() if pca else None, "views_per_image": 1,
                    "teacher_built": None}  # fmt: skip
        prov = PrecomputedProvider(manifest, "<bench>", dev, provider.dtype)
        out[name] = ({**batch, "teacher": stored}, prov, pca.explained_variance if pca else None)
    return out


def _alternated(fns: dict[str, Callable[[], Any]], steps: int, warmup: int, dev, rounds: int = 3) -> dict:
    """Median step seconds per mode, the modes alternated round by round (drift hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up calls, untimed
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn, steps, 0, dev)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def _precomputed(recipe, provider, step, batch, dev, dtype, steps: int, warmup: int) -> dict[str, Any]:
    """Step time online / precomputed (each encoding) / no teacher, alternated; fidelity, bytes
    per view, the ImageNet-1k storage table and the target-read throughput of one data worker."""
    from mimscale.engine.loop import prepare_batch

    encoded = _encoded(provider, batch, dev, dtype)
    exact = provider(prepare_batch(batch, dev, dtype))
    fns: dict[str, Any] = {
        "online": functools.partial(step, batch, provider),
        "none": functools.partial(step, batch, lambda _b: exact),
    }
    fns |= {f"precomputed_{k}": functools.partial(step, b, p) for k, (b, p, _) in encoded.items()}
    t = _alternated(fns, steps, warmup, dev)
    out: dict[str, Any] = {"step_s": t, "encodings": {}}
    grid, channels = exact.tokens.shape[1], exact.tokens.shape[2]
    for name, (b, p, ev) in encoded.items():
        got = p(prepare_batch(b, dev, dtype)).tokens.float()
        cos = torch.nn.functional.cosine_similarity(got, exact.tokens.float(), dim=-1)
        per_view = _bytes_per_view(recipe, name, grid, channels, exact.cls_attn is not None)
        out["encodings"][name] = {
            "bytes_per_view": per_view, "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "explained_variance": ev, "step_vs_none": t[f"precomputed_{name}"] / t["none"],
            "imagenet1k_storage_gb": {f"K={k}": per_view * k * IMAGENET_1K / 1e9 for k in (1, 10, 100)},
            "read": _read_throughput(recipe, name, grid, channels, exact.cls_attn is not None),
        }  # fmt: skip
    return out


IMAGENET_1K = 1_281_167


def _bytes_per_view(recipe, name: str, tokens: int, channels: int, cls_attn: bool) -> int:
    from mimscale.targets.bank import record_dtype, record_fields
    from mimscale.targets.encoding import parse_encoding

    e = parse_encoding(name)
    fields = record_fields(len(recipe.data.views), tokens, channels, e.code_dtype, e.code_width(channels),
                           e.int8, tokens - 1 if cls_attn else None)  # fmt: skip
    return record_dtype(fields).itemsize


def _read_throughput(recipe, name: str, tokens: int, channels: int, cls_attn: bool, n: int = 256) -> dict:
    """One worker reading random (image, view) records of a synthetic bank (warm page cache: the
    reader's own cost; a cold disk adds its latency per record)."""
    import json
    import tempfile
    from pathlib import Path

    from mimscale.targets.bank import FORMAT, BankReader, record_dtype, record_fields, with_crc, write_shard
    from mimscale.targets.encoding import parse_encoding

    e, k = parse_encoding(name), 4
    fields = record_fields(len(recipe.data.views), tokens, channels, e.code_dtype, e.code_width(channels),
                           e.int8, tokens - 1 if cls_attn else None)  # fmt: skip
    dt = record_dtype(fields)
    rng = np.random.default_rng(0)
    records = np.frombuffer(rng.bytes(dt.itemsize * n * k), dt).copy()
    with tempfile.TemporaryDirectory() as tmp:
        keys = [f"{i:08d}" for i in range(n)]
        header = {
            "image_shard": "s.tar",
            "count": n,
            "views_per_image": k,
            "record_bytes": dt.itemsize,
            "keys": keys,
        }
        write_shard(Path(tmp) / "s.tgt", header, with_crc(records))
        manifest = {"format": FORMAT, "views_per_image": k, "record": fields,
                    "shards": [{"image": "s.tar", "file": "s.tgt"}]}  # fmt: skip
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest))
        reader = BankReader(tmp)
        order = rng.permutation(n * k)
        t0 = time.perf_counter()
        for i in order:
            reader.record("s.tar", keys[i // k], int(i % k))
        dt_s = time.perf_counter() - t0
    return {"views_per_s": n * k / dt_s, "mb_per_s": n * k * records.dtype.itemsize / dt_s / 1e6}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mimscale bench teacher``; prints (and optionally writes) the JSON."""
    from mimscale.bench.common import emit, recipe_args
    from mimscale.registry import load_recipe

    default = "cae_v2/vit_l16_plus.yaml" if torch.cuda.is_available() else "cae_v2/cpu_tiny.yaml"
    path, args, a = recipe_args("mimscale bench teacher", __doc__, default, 5, argv)
    recipe = load_recipe(path, ["teacher.allow_random=true", "train.micro_batch=8", "train.global_batch=8",
                                "train.zero_stage=1", *args])  # fmt: skip
    return emit(run_bench(recipe, a.steps), a.out)
