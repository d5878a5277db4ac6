"""PGD-Linf against a bare classifier (the demo's and calibration's attack, and eval's ``pgd`` / ``pgd-first``),
and the numerically stable cross-entropy the CE attacks may take instead of ``F.cross_entropy``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stable_cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy written as softplus(logsumexp_{j != y} z_j - z_y): the same value, but in float32 it stays
    positive (with a non-zero gradient) up to margins of about 100, where ``F.cross_entropy`` rounds to exactly 0
    from a margin of about 17 on, and ART's APGD stops a batch whose every loss is 0."""
    if y.dim() == 2:  # ART hands one-hot labels to a loss it does not know
        y = y.argmax(1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    loss = F.softplus(torch.logsumexp(others, 1) - z_y)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


class StableCrossEntropy(nn.Module):
    """``stable_cross_entropy`` as a loss module with a settable ``reduction`` (ART sets it per call)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return stable_cross_entropy(logits, y, self.reduction)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, step: float = 2 / 255,
             steps: int = 20, random_start: bool = True, seed: int = 0, stop_at_success: bool = False,
             loss: str = "ce") -> torch.Tensor:
    """Madry et al. PGD on cross-entropy (``loss`` "ce" or "stable-ce"): sign steps, projection to the eps ball
    and to [0, 1].

    ``stop_at_success`` freezes each image at the first iterate the model misclassifies: the minimal-
    perturbation, first-success variant (``pgd-first``). It is *not* AutoAttack's protocol, whose APGD keeps
    the last misclassified iterate (``zeropur_export.attacks.autoattack``), a deeper perturbation.
    """
    lossf = F.cross_entropy if loss == "ce" else stable_cross_entropy
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.detach()
    adv = x.clone()
    if random_start:
        adv = (adv + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device) * eps).clamp(0, 1)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            logits = model(adv)
            value = lossf(logits, y)
            (grad,) = torch.autograd.grad(value, adv)
        if stop_at_success:
            active &= logits.detach().argmax(1) == y
            if not active.any():
                break
            grad = grad * active.view(-1, *([1] * (x.dim() - 1)))
        adv = adv.detach() + step * grad.sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()
