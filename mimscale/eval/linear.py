"""Linear probing: MAE's head (BatchNorm without affine + Linear) and a fast cached-feature fit.

The head is MAE ``main_linprobe.py``'s (METHODS.md §1.3): ``BatchNorm1d(affine=False, eps=1e-6)``
then a Linear initialised with std 0.01. The full protocol (LARS, 90 epochs, augmentation) runs
as a recipe (``recipes/finetune/linprobe_*.yaml``) on the training engine; for periodic use
during pre-training, :func:`fit_linear_probe` trains the same head on *cached* features (no
augmentation, one feature pass), which takes seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearProbeHead", "fit_linear_probe", "linear_probe_accuracy"]


class LinearProbeHead(nn.Module):
    """``BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear(dim, num_classes)`` (MAE protocol).

    Args:
        dim: feature width D.
        num_classes: C.
        init_std: std of the Linear weight's trunc-normal init (MAE: 0.01); bias 0.
    """

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` features -> ``[B, C]`` logits."""
        return self.fc(self.bn(feats))


def fit_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearProbeHead:
    """Train a :class:`LinearProbeHead` on cached features (the fast periodic probe).

    AdamW with a per-step cosine schedule over ``epochs`` passes of shuffled mini-batches;
    deterministic for a given ``seed``. BatchNorm uses batch statistics while fitting and its
    running statistics afterwards (the head is returned in eval mode).

    Args:
        feats: ``[N, D]`` training features (any float dtype; fitted in fp32).
        labels: long ``[N]`` in ``0 .. num_classes - 1``.
        num_classes: C.
        epochs: passes over the cached features.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: mini-batch (capped at N; a last batch of one sample is dropped for BN).
        seed: shuffling and init seed.

    Returns:
        The fitted head, in eval mode, on ``feats``' device.
    """
    feats, labels = feats.float(), labels.long()
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 labeled samples, got {n}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearProbeHead(feats.shape[1], num_classes).to(feats.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(feats.device)
        for idx in order.split(bs):
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def _accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    pred = head(feats.float()).argmax(1)
    return 100.0 * (pred == labels).float().mean().item()


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    **fit_kwargs,
) -> float:
    """Fit :func:`fit_linear_probe` on the training features; top-1 (%) on the test features.

    Args:
        train_feats: ``[N_train, D]``.
        train_labels: long ``[N_train]``.
        test_feats: ``[N_test, D]``.
        test_labels: long ``[N_test]``.
        num_classes: C (default: the largest label seen + 1).
        **fit_kwargs: forwarded to :func:`fit_linear_probe` (epochs, lr, ...).

    Returns:
        Top-1 accuracy in percent.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.enable_grad():
        head = fit_linear_probe(train_feats, train_labels, num_classes, **fit_kwargs)
    return _accuracy(head, test_feats, test_labels)
