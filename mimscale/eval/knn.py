"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Wu et al. (2018) / Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, ICCV'21), ``eval_knn.py``: L2-normalised features, cosine similarity to every training
feature, the ``k`` most similar vote for their label with weight ``exp(sim / T)``; k = 20 and
T = 0.07 are DINO's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of each test feature from its ``k`` nearest training features.

    Args:
        train_feats: ``[N_train, D]`` features of the labeled bank (normalised here).
        train_labels: long ``[N_train]`` in ``0 .. num_classes - 1``.
        test_feats: ``[N_test, D]`` query features (normalised here).
        num_classes: number of classes C.
        k: neighbours (capped at ``N_train``).
        temperature: T of the vote weight ``exp(cos / T)``.
        chunk: queries per similarity block (bounds memory at ``chunk x N_train``).

    Returns:
        float ``[N_test, C]`` vote scores; ``argmax(-1)`` is the prediction.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} labels")
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must be in 0..{num_classes - 1} (unlabeled samples: drop them first)")
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in torch.split(F.normalize(test_feats.float(), dim=1), chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [n, k]
        weights = (sim / temperature).exp()
        votes = F.one_hot(train_labels[idx], num_classes).float()  # [n, k, C]
        out.append((votes * weights.unsqueeze(-1)).sum(dim=1))
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy (in %) of :func:`knn_predict` on labeled test features.

    Args:
        train_feats: ``[N_train, D]``.
        train_labels: long ``[N_train]``.
        test_feats: ``[N_test, D]``.
        test_labels: long ``[N_test]``.
        k: neighbours.
        temperature: vote temperature.
        num_classes: C (default: the largest label seen + 1).

    Returns:
        Top-1 accuracy in percent.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()
