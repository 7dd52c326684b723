"""How teacher tokens are stored in a bank: ``fp32``, ``fp16``, ``int8`` (per-token scale) and
``pca:D`` / ``pca:D:int8`` (codes on a basis fitted at precompute time).

Encoding runs once, in numpy, when the bank is written; decoding runs on the training device
(:func:`decode`): ``codes * scale`` for int8, ``codes @ basis + mean`` for PCA. ``fp32`` is the
exact teacher output (the bitwise reference); the others trade fidelity for bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Encoding", "Pca", "decode", "encode", "fit_pca", "parse_encoding"]

INT8_MAX = 127.0


@dataclass(frozen=True)
class Encoding:
    """A parsed encoding name.

    Attributes:
        name: as given (``fp16``, ``int8``, ``pca:64``, ``pca:64:int8``, ``fp32``).
        pca_dim: D for PCA encodings, else None.
        int8: codes are int8 with a per-token float32 scale.
    """

    name: str
    pca_dim: int | None = None
    int8: bool = False

    @property
    def code_dtype(self) -> str:
        """numpy dtype string of the stored codes."""
        if self.int8:
            return "i1"
        return "<f4" if self.name == "fp32" else "<f2"

    def code_width(self, channels: int) -> int:
        """Stored values per token."""
        return self.pca_dim if self.pca_dim is not None else channels


def parse_encoding(name: str) -> Encoding:
    """``fp32 | fp16 | int8 | pca:D | pca:D:int8`` -> :class:`Encoding`.

    Raises:
        ValueError: an unknown name or a non-positive D (the message lists the valid names).
    """
    if name in ("fp32", "fp16"):
        return Encoding(name)
    if name == "int8":
        return Encoding(name, int8=True)
    parts = name.split(":")
    if parts[0] == "pca" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) > 0:
        if len(parts) == 2 or parts[2] == "int8":
            return Encoding(name, pca_dim=int(parts[1]), int8=len(parts) == 3)
    raise ValueError(f"unknown target encoding {name!r}: use fp32, fp16, int8, pca:D or pca:D:int8")


@dataclass(frozen=True)
class Pca:
    """A PCA basis: ``x ~ codes @ basis + mean`` with orthonormal rows in ``basis`` ``[D, C]``."""

    basis: np.ndarray  # float32 [D, C]
    mean: np.ndarray  # float32 [C]
    explained_variance: float  # fraction of the sample's variance the D components keep

    def to_json(self) -> dict:
        """For the manifest: arrays as base64 little-endian float32."""
        return {
            "dim": int(self.basis.shape[0]),
            "channels": int(self.basis.shape[1]),
            "explained_variance": self.explained_variance,
            "basis_f32": base64.b64encode(self.basis.astype("<f4").tobytes()).decode(),
            "mean_f32": base64.b64encode(self.mean.astype("<f4").tobytes()).decode(),
        }

    @staticmethod
    def from_json(d: dict) -> Pca:
        """The inverse of :meth:`to_json`."""
        basis = np.frombuffer(base64.b64decode(d["basis_f32"]), "<f4").reshape(d["dim"], d["channels"])
        mean = np.frombuffer(base64.b64decode(d["mean_f32"]), "<f4")
        return Pca(basis.copy(), mean.copy(), float(d["explained_variance"]))


def fit_pca(tokens: np.ndarray, dim: int) -> Pca:
    """Fit a D-component PCA on a sample of tokens ``[M, C]`` (float64 on the CPU: deterministic).

    The sign of each component is fixed (its largest-magnitude entry positive), so the same
    sample always gives the same basis.

    Raises:
        ValueError: D larger than the channel count.
    """
    x = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    if dim > x.shape[1]:
        raise ValueError(f"pca:{dim}: the teacher has only {x.shape[1]} channels")
    mean = x.mean(0)
    xc = x - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc / max(1, len(x)))
    order = np.argsort(evals)[::-1][:dim]
    basis = evecs[:, order].T  # [D, C]
    signs = np.sign(basis[np.arange(dim), np.abs(basis).argmax(1)])
    basis = basis * signs[:, None]
    total = float(np.clip(evals, 0, None).sum())
    kept = float(np.clip(evals[order], 0, None).sum())
    return Pca(basis.astype(np.float32), mean.astype(np.float32), kept / total if total > 0 else 1.0)


def encode(tokens: np.ndarray, enc: Encoding, pca: Pca | None = None) -> dict[str, np.ndarray]:
    """Encode float32 tokens ``[n, T, C]``.

    Returns:
        ``{"codes": [n, T, C or D]}`` in :attr:`Encoding.code_dtype`, plus ``"scale"`` float32
        ``[n, T]`` for int8 codes (per token: max |value| / 127).
    """
    x = tokens.astype(np.float32, copy=False)
    if enc.pca_dim is not None:
        assert pca is not None, "pca encodings need a fitted basis"
        x = ((x - pca.mean) @ pca.basis.T).astype(np.float32)  # [n, T, D]
    if not enc.int8:
        return {"codes": x.astype(enc.code_dtype)}
    amax = np.abs(x).max(-1)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return {"codes": q, "scale": scale}


def decode(
    codes: torch.Tensor,
    scale: torch.Tensor | None,
    pca: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Decode on the device: float32 ``[B, T, C]`` from stored codes.

    Args:
        codes: ``[B, T, C or D]`` as stored (float32, float16 or int8).
        scale: float32 ``[B, T]`` for int8 codes, else None.
        pca: ``(basis [D, C], mean [C])`` float32 on the device for PCA codes, else None.
    """
    x = codes.float()
    if scale is not None:
        x = x * scale.unsqueeze(-1)
    if pca is not None:
        basis, mean = pca
        x = x @ basis + mean
    return x
