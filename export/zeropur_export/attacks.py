"""PGD-Linf against a bare classifier (the demo's and calibration's attack; eval uses ART)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, step: float = 2 / 255,
             steps: int = 20, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Madry et al. PGD on cross-entropy: sign steps, projection to the eps ball and to [0, 1]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.detach()
    adv = x.clone()
    if random_start:
        adv = (adv + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()
