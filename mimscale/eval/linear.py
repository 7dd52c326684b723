"""Linear probing: MAE's head (BatchNorm without affine + Linear) and a fast cached-feature fit.

The head is MAE ``main_linprobe.py``'s (docs/methods.md §1.3): ``BatchNorm1d(affine=False, eps=1e-6)``
then a Linear initialised with std 0.01. The full protocol (LARS, 90 epochs, augmentation) runs
as a recipe (``recipes/finetune/linprobe_*.yaml``) on the training engine; for periodic use
during pre-training, :func:`fit_linear_probe` trains the same head on *cached* features (no
augmentation, one feature pass, full-batch L-BFGS), which takes seconds.
"""

from __future__ import annotations

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
    max_iter: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbeHead:
    """Fit a :class:`LinearProbeHead` on cached features, full batch (the fast periodic probe).

    The BatchNorm's statistics are the training set's (what its running statistics converge
    to under MAE's protocol); the Linear is then fitted to convergence by full-batch L-BFGS on
    cross-entropy + ``weight_decay / 2 * |W|^2``, with no learning rate to tune. Deterministic
    for a given ``seed`` (the initialisation).

    Args:
        feats: ``[N, D]`` training features (any float dtype; fitted in fp32).
        labels: long ``[N]`` in ``0 .. num_classes - 1``.
        num_classes: C.
        max_iter: L-BFGS iterations.
        weight_decay: L2 penalty on the Linear weight.
        seed: init seed.

    Returns:
        The fitted head, in eval mode, on ``feats``' device.
    """
    feats, labels = feats.float(), labels.long()
    if feats.shape[0] < 2:
        raise ValueError(f"a linear probe needs at least 2 labeled samples, got {feats.shape[0]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearProbeHead(feats.shape[1], num_classes).to(feats.device)
    assert head.bn.running_mean is not None and head.bn.running_var is not None  # track_running_stats
    head.bn.running_mean.copy_(feats.mean(dim=0))
    head.bn.running_var.copy_(feats.var(dim=0, unbiased=False))
    head.eval()
    z = head.bn(feats).detach()
    opt = torch.optim.LBFGS(
        head.fc.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head.fc(z), labels) + 0.5 * weight_decay * head.fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


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
        **fit_kwargs: forwarded to :func:`fit_linear_probe` (max_iter, weight_decay, seed).

    Returns:
        Top-1 accuracy in percent.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.enable_grad():
        head = fit_linear_probe(train_feats, train_labels, num_classes, **fit_kwargs)
    return _accuracy(head, test_feats, test_labels)
