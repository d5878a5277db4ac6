"""PGD-Linf against a bare classifier (the demo's and calibration's attack, and eval's first-success run)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, step: float = 2 / 255,
             steps: int = 20, random_start: bool = True, seed: int = 0, stop_at_success: bool = False) -> torch.Tensor:
    """Madry et al. PGD on cross-entropy: sign steps, projection to the eps ball and to [0, 1].

    ``stop_at_success`` freezes each image at the first iterate the model misclassifies, as AutoAttack
    does: the smallest-effort adversarial image, the protocol behind the paper's headline figures.
    """
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
            loss = F.cross_entropy(logits, y)
            (grad,) = torch.autograd.grad(loss, adv)
        if stop_at_success:
            active &= logits.detach().argmax(1) == y
            if not active.any():
                break
            grad = grad * active.view(-1, *([1] * (x.dim() - 1)))
        adv = adv.detach() + step * grad.sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()
