"""``mimscale precompute-targets``: run the frozen teacher once over K replayable views per image.

Usage::

    mimscale precompute-targets RECIPE [key.sub=value ...] --out DIR [--views K] [--encoding fp16]
        [--batch 64] [--task-index I --num-tasks N] [--merge]

Data-parallel without collectives: process ``r`` of ``n`` (``RANK`` / ``WORLD_SIZE`` from
torchrun or the deepspeed launcher, else ``SLURM_PROCID`` / ``SLURM_NTASKS``) writes the image
shards ``i`` of its range with ``i % n == r``. Each target shard is written to ``.partial`` and
renamed, then its completion record (``.tgt.json``) is written: a rerun skips complete shards
only. The manifest is written by whoever finds every shard complete (or by ``--merge``); its
content is a pure function of the shards, so any process may write it.

Exactness: view ``k`` of image ``key`` is drawn from a generator seeded by (seed, key, k) only,
and the teacher always sees the same chunks of one shard (``--batch`` views, image-major), so
1 process and N processes write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mimscale.data.manifest import file_sha256
from mimscale.targets.bank import (
    FORMAT,
    bank_identity,
    file_identity,
    image_shard_name,
    key_seed,
    record_dtype,
    record_fields,
    target_file,
    with_crc,
    write_shard,
)
from mimscale.targets.encoding import Encoding, Pca, encode, fit_pca, parse_encoding

if TYPE_CHECKING:
    import torch

    from mimscale.config import Recipe

__all__ = ["Precompute", "main", "precompute"]

PCA_FILE = "pca.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".partial{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_once(path: Path, text: str) -> None:
    """Create ``path`` atomically unless it exists: the first process to finish wins, and a file
    another process has already read is never replaced (the PCA basis every shard is encoded with)."""
    tmp = path.with_name(path.name + f".partial{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _weights_identity(model: torch.nn.Module) -> str:
    """sha256 over the teacher's parameters and buffers as built (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Precompute:
    """One process's share of writing a bank.

    Args:
        recipe: the training recipe (its ``teacher``, ``model``, ``data.train``, ``data.views``).
        out: the bank directory.
        views: K, stored views per image.
        encoding: ``fp32 | fp16 | int8 | pca:D | pca:D:int8``.
        batch: views per teacher forward (part of the bank's identity: keep it across ranks).
        device: where the teacher runs.
        seed: seeds the views (default: the recipe's ``run.seed``).
        pca_images: images (from the first shards) whose K views fit the PCA basis.
    """

    def __init__(
        self, recipe: Recipe, out: str | Path, *, views: int = 1, encoding: str = "fp16", batch: int = 64,
        device: torch.device | str = "cpu", seed: int | None = None, pca_images: int = 256,
    ) -> None:  # fmt: skip
        import torch

        from mimscale.data.manifest import resolve_source
        from mimscale.teachers import build_provider

        if views < 1:
            raise ValueError(f"--views must be >= 1, got {views}")
        self.recipe, self.out, self.k, self.batch = recipe, Path(out), views, batch
        self.enc: Encoding = parse_encoding(encoding)
        self.seed = recipe.run.seed if seed is None else seed
        self.pca_images = pca_images
        self.source = resolve_source(recipe.data.train)
        if self.source.counts is None:
            raise ValueError(f"data.train={recipe.data.train!r}: precompute needs the shards' manifest.json")
        torch.manual_seed(self.seed)  # a random (allow_random) teacher is then the same in every process
        if recipe.teacher.offload:
            _world_of_one(torch.device(device))
        self.provider = build_provider(recipe, torch.device(device))
        self.pca: Pca | None = None
        # What every shard of one bank must share (checked when a rerun finds finished shards).
        self.job = {"identity": bank_identity(recipe), "views_per_image": views, "encoding": encoding,
                    "seed": self.seed, "batch": batch, "image_manifest": self.source.manifest}  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))

    # ------------------------------------------------------------------ targets of one image list

    def _replays(self, data: bytes, key: str) -> np.ndarray:
        """float64 ``[K, V, 20]``: view k of ``key`` from a generator seeded by (seed, key, k)."""
        from PIL import Image

        from mimscale.data.transforms import draw_replay, oriented_size

        w, h = oriented_size(Image.open(io.BytesIO(data)))
        views = self.recipe.data.views
        return np.stack(
            [
                draw_replay(h, w, views, np.random.default_rng([self.seed % 2**63, key_seed(key), k]))
                for k in range(self.k)
            ]
        )

    def _teacher(self, items: list[tuple[bytes, np.ndarray]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Teacher outputs (float32 tokens ``[n, T, C]``, cls_attn ``[n, N]`` or None) of the first
        view of each ``(image bytes, replay [V, 20])``, in chunks of ``batch`` views."""
        import torch

        from mimscale.data.transforms import render_views

        view0 = self.recipe.data.views[:1]
        toks, attns = [], []
        for i in range(0, len(items), self.batch):
            chunk = items[i : i + self.batch]
            # PIL decodes and resizes without the GIL: threads keep a GPU teacher fed; map keeps order.
            render = lambda item: render_views(item[0], view0, item[1][:1], draft=self.recipe.data.draft)[0]  # noqa: E731
            px = np.stack(list(self._pool.map(render, chunk)))
            out = self.provider({"views": [torch.from_numpy(px)]})
            toks.append(out.tokens.float().cpu().numpy())
            if out.cls_attn is not None:
                attns.append(out.cls_attn.float().cpu().numpy())
        return np.concatenate(toks), (np.concatenate(attns) if attns else None)

    def _read(self, i: int) -> tuple[list[str], list[tuple[bytes, np.ndarray]], int]:
        """Keys, ``(bytes, replay)`` of every (image, view) and the undecodable count of shard ``i``."""
        from mimscale.data.batches import IMAGE_KEYS
        from mimscale.data.reader import ErrorPolicy, read_shard, shard_entry

        policy = ErrorPolicy("fail", 0, 0)  # a bad image shard stops the precompute, naming it
        keys: list[str] = []
        items: list[Any] = []
        bad = 0
        for s in read_shard(self.source.urls[i], policy, shard_entry(self.source, i)):
            data: Any = next((s[k] for k in IMAGE_KEYS if k in s), None)
            try:
                replays = self._replays(data, s["__key__"])
            except Exception as e:  # noqa: BLE001 - undecodable: training skips it too (key absent)
                print(
                    f"[precompute] {self.source.urls[i]}: sample {s['__key__']!r} skipped ({e})",
                    file=sys.stderr,
                )
                bad += 1
                continue
            keys.append(s["__key__"])
            items += [(data, r) for r in replays]
        return keys, items, bad

    # ------------------------------------------------------------------ layout, PCA, shards

    def record_fields(self, tokens: np.ndarray, attn: np.ndarray | None) -> list[list[Any]]:
        """The manifest's ``record`` list for these teacher outputs (``[n, T, C]``, ``[n, N]``)."""
        t, c = tokens.shape[1:]
        n_attn = attn.shape[1] if attn is not None else None
        e = self.enc
        return record_fields(len(self.recipe.data.views), t, c, e.code_dtype, e.code_width(c), e.int8, n_attn)

    def fit_pca(self) -> Pca | None:
        """The PCA basis (fitted on the first ``pca_images`` images' K views; shared via ``pca.json``)."""
        if self.enc.pca_dim is None:
            return None
        path = self.out / PCA_FILE
        if not path.is_file():
            items: list[tuple[bytes, np.ndarray]] = []
            for i in range(len(self.source.urls)):
                items += self._read(i)[1]
                if len(items) >= self.pca_images * self.k:
                    break
            tokens, _ = self._teacher(items[: self.pca_images * self.k])
            _write_once(path, json.dumps(fit_pca(tokens, self.enc.pca_dim).to_json()))
        return Pca.from_json(json.loads(path.read_text()))  # every process uses the same bytes

    def shard_done(self, i: int) -> bool:
        """Complete: its completion record exists and the target file has the recorded size."""
        name = target_file(image_shard_name(self.source.urls[i]))
        done, path = self.out / (name + ".json"), self.out / name
        if not done.is_file() or not path.is_file():
            return False
        try:
            record = json.loads(done.read_text())
            complete = record["nbytes"] == path.stat().st_size
        except (ValueError, KeyError):
            return False
        if complete and record.get("job") != self.job:  # never mix the shards of two configs
            old = record.get("job") or {}
            key = next(k for k in self.job if old.get(k) != self.job[k])
            raise ValueError(
                f"{done}: this bank was written with another {key} ({old.get(key)!r}, now "
                f"{self.job[key]!r}); use a new --out directory"
            )
        return complete

    def write_shard(self, i: int) -> dict[str, Any]:
        """Compute and write target shard ``i``; returns its completion record."""
        image = image_shard_name(self.source.urls[i])
        keys, items, bad = self._read(i)
        tokens, attn = self._teacher(items) if items else (np.zeros((0, 1, 1), np.float32), None)
        fields = self.record_fields(tokens, attn) if items else json.loads(self._layout_hint())
        records = np.zeros(len(items), record_dtype(fields))
        if items:
            enc = encode(tokens, self.enc, self.pca)
            records["replay"] = np.stack([r for _, r in items])
            for name, value in enc.items():
                records[name] = value
            if attn is not None:
                records["cls_attn"] = attn
        name = target_file(image)
        header = {"image_shard": image, "count": len(keys), "views_per_image": self.k,
                  "record_bytes": records.dtype.itemsize, "keys": keys}  # fmt: skip
        write_shard(self.out / name, header, with_crc(records))
        done = {
            "job": self.job,
            "file": name, "image": image, "count": len(keys), "skipped": bad, "fields": fields,
            "nbytes": (self.out / name).stat().st_size, "sha256": file_sha256(self.out / name),
            "fidelity": _fidelity(tokens, records, self.enc, self.pca) if items else None,
        }  # fmt: skip
        _atomic_write(self.out / (name + ".json"), json.dumps(done, sort_keys=True))
        return done

    def _layout_hint(self) -> str:
        """The record layout of a shard without decodable images (from a finished shard)."""
        for f in sorted(self.out.glob("*.tgt.json")):
            return json.dumps(json.loads(f.read_text())["fields"])
        raise ValueError("the first shard written has no decodable image: cannot infer the record layout")

    def run(self, rank: int = 0, world: int = 1, shards: tuple[int, int] | None = None) -> list[int]:
        """Write this process's missing shards (``i % world == rank`` within ``shards``); returns
        the indices written. Writes the manifest when every shard of the bank is complete."""
        self.out.mkdir(parents=True, exist_ok=True)
        lo, hi = shards or (0, len(self.source.urls))
        self.pca = self.fit_pca()
        written = []
        for i in range(lo, hi):
            if i % world == rank and not self.shard_done(i):
                self.write_shard(i)
                written.append(i)
        if all(self.shard_done(i) for i in range(len(self.source.urls))):
            self.write_manifest()
        return written

    def write_manifest(self) -> dict[str, Any]:
        """Merge the completion records into ``manifest.json`` (a pure function of the shards).

        Raises:
            ValueError: a shard is still missing (names it).
        """
        shards = []
        for i, url in enumerate(self.source.urls):
            name = target_file(image_shard_name(url))
            if not self.shard_done(i):
                raise ValueError(f"{self.out / name}: target shard missing or incomplete; rerun precompute")
            shards.append(json.loads((self.out / (name + ".json")).read_text()))
        shards = [
            {**s, "image_sha256": (self.source.sha256 or [None] * len(shards))[i]}
            for i, s in enumerate(shards)
        ]
        manifest = self.manifest(shards)
        _atomic_write(self.out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        return manifest

    def manifest(self, shards: list[dict[str, Any]]) -> dict[str, Any]:
        """The bank's manifest: identity, layout, encoding, counts, checksums, fidelity."""
        meta = self.provider.metadata
        fid = [(s["fidelity"], s["count"]) for s in shards if s["fidelity"]]
        cos_mean = (
            float(np.average([f["cosine_mean"] for f, _ in fid], weights=[c for _, c in fid]))
            if fid
            else None
        )
        fields = next(s["fields"] for s in shards if s["count"])
        n = sum(s["count"] for s in shards)
        pca = json.loads((self.out / PCA_FILE).read_text()) if self.enc.pca_dim else None
        return {
            "format": FORMAT,
            "identity": bank_identity(self.recipe),
            "teacher_built": {
                "weights": meta["weights"], "weights_sha256": _weights_identity(self.provider.model),
                # the file's own identity, compared (cheaply) by every run that trains from the bank
                "weights_file": None if meta["random_weights"] else file_identity(meta["weights"]),
                "img_size": meta["img_size"], "grid": meta["grid"], "out_dim": meta["out_dim"],
                "mean": self.provider._mean.flatten().div(255).tolist(),
                "std": self.provider._std.flatten().div(255).tolist(), "torch_dtype": meta["torch_dtype"],
            },
            "views_per_image": self.k, "encoding": self.enc.name, "seed": self.seed, "batch": self.batch,
            "pca": pca,
            "record": fields, "record_bytes": record_dtype(fields).itemsize,
            "join": "aligned: <image shard>.tgt holds the targets of <image shard>, joined by key; "
                    "record (j, k) = view k of the j-th key of its header",
            "images": {"manifest": self.source.manifest, "count": n},
            "fidelity": {
                "cosine_mean": cos_mean,
                "cosine_min": min(f["cosine_min"] for f, _ in fid) if fid else None,
                "explained_variance": pca["explained_variance"] if pca else None,
            },
            "shards": shards,
        }  # fmt: skip


def _fidelity(tokens: np.ndarray, records: np.ndarray, enc: Encoding, pca: Pca | None) -> dict[str, float]:
    """Per-token cosine of the decoded targets to the exact teacher output (mean and min)."""
    import torch

    from mimscale.targets.encoding import decode

    scale = torch.from_numpy(records["scale"].copy()) if enc.int8 else None
    p = (torch.from_numpy(pca.basis), torch.from_numpy(pca.mean)) if pca is not None else None
    dec = decode(torch.from_numpy(records["codes"].copy()), scale, p)
    cos = torch.nn.functional.cosine_similarity(dec.double(), torch.from_numpy(tokens).double(), dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def precompute(recipe: Recipe, out: str | Path, **kw: Any) -> dict[str, Any] | None:
    """One-process convenience: write every missing shard of ``recipe``'s bank in ``out``.

    Returns:
        The manifest (None if another process still has shards to write).
    """
    job = Precompute(recipe, out, **kw)
    job.run()
    path = Path(out) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _world_of_one(device: torch.device) -> None:
    """A process group of this process alone, for an offloaded teacher (ZeRO-Inference needs
    one). Never the launcher's world: precompute processes share no collectives and write
    different shard counts, so a ZeRO-3 gather across them would wait forever."""
    import torch

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise ValueError(
                "teacher.offload: precompute needs a process group of its own process "
                f"(found one of {torch.distributed.get_world_size()} ranks)"
            )
        return
    from mimscale.engine.distributed import skip_cpu_shm_allreduce

    skip_cpu_shm_allreduce()  # before deepspeed.initialize sets up its communication
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))  # DeepSpeed's engine reads it
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def _rank_world() -> tuple[int, int]:
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mimscale precompute-targets`` and ``data_prep/precompute_targets.py``."""
    import torch

    from mimscale.config.paths import recipe_path
    from mimscale.registry import load_recipe

    p = argparse.ArgumentParser(prog="mimscale precompute-targets", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--out", required=True, help="the bank directory")
    p.add_argument("--views", type=int, default=1, help="K: stored views per image")
    p.add_argument("--encoding", default="fp16", help="fp32 | fp16 | int8 | pca:D | pca:D:int8")
    p.add_argument("--batch", type=int, default=64, help="views per teacher forward")
    p.add_argument("--pca-images", type=int, default=256)
    p.add_argument("--task-index", type=int, default=0, help="array task: this task's contiguous shard range")
    p.add_argument("--num-tasks", type=int, default=1, help="array task count (shards split evenly)")
    p.add_argument("--merge", action="store_true", help="only write the manifest from finished shards")
    a = p.parse_intermixed_args(argv)
    try:
        parse_encoding(a.encoding)
    except ValueError as e:
        p.error(str(e))
    if a.views < 1 or a.batch < 1:
        p.error(f"--views and --batch must be >= 1 (got {a.views}, {a.batch})")
    # The bank is written for teacher.source: online semantics (the teacher itself runs here).
    recipe = load_recipe(recipe_path(a.recipe), [*a.overrides, "teacher.source=online"])
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    job = Precompute(recipe, a.out, views=a.views, encoding=a.encoding, batch=a.batch, device=device,
                     pca_images=a.pca_images)  # fmt: skip
    if a.merge:
        m = job.write_manifest()
        print(f"[precompute] manifest: {len(m['shards'])} shards, {m['images']['count']} images")
        return 0
    rank, world = _rank_world()
    n = len(job.source.urls)
    if not 0 <= a.task_index < a.num_tasks:
        raise SystemExit(f"--task-index {a.task_index} is outside 0..{a.num_tasks - 1}")
    lo, hi = a.task_index * n // a.num_tasks, (a.task_index + 1) * n // a.num_tasks
    written = job.run(rank, world, (lo, hi))
    print(f"[precompute] rank {rank}/{world}: wrote {len(written)} target shards in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
