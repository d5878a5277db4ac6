"""The reference's step rules: the torch twins of the runtime's kernels (GS and AP updates, the blur) and
``TorchKernels``, the kernel set that applies them in place on a torch runner's buffers."""
from __future__ import annotations

from typing import Callable

import torch

from zeropur_export.reference.losses import blur_torch
from zeropur_rt.config import ZeroPurConfig

Sign = Callable[[torch.Tensor], torch.Tensor]


def gs_update(x: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, x_in: torch.Tensor,
              cfg: ZeroPurConfig, sign: Sign = torch.sign) -> tuple[torch.Tensor, torch.Tensor]:
    """L1-normalise (per sample, or over the batch), momentum, sign step, eps-ball clip, [0,1] clamp.
    ``sign`` is swapped only by the unrolled attack (``zeropur_export.attacks.adaptive``), for a straight-through one."""
    a = grad.abs()
    l1 = a.flatten(1).sum(1).view(-1, 1, 1, 1) if cfg.l1_scope == "sample" else a.sum().view(1, 1, 1, 1)
    g = torch.where(l1 > 0, grad / torch.where(l1 > 0, l1, torch.ones_like(l1)), torch.zeros_like(grad))
    m = g + cfg.momentum * m
    return _step_and_clip(x, m, x_in, cfg.eps, cfg.gs_step, sign), m


def ap_update(x: torch.Tensor, grad: torch.Tensor, x_in: torch.Tensor, cfg: ZeroPurConfig,
              sign: Sign = torch.sign) -> torch.Tensor:
    return _step_and_clip(x, grad, x_in, cfg.eps, cfg.ap_step, sign)


def _step_and_clip(x: torch.Tensor, direction: torch.Tensor, x_in: torch.Tensor, eps: float, step: float,
                   sign: Sign = torch.sign) -> torch.Tensor:
    x = x - step * sign(direction)
    x = torch.minimum(torch.maximum(x, x_in - eps), x_in + eps)
    return x.clamp(0.0, 1.0)


def input_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
    return g, loss.detach()


class TorchKernels:
    """The kernel set of the reference: the torch twins above, in place on a torch runner's buffers
    (any float dtype, any device)."""

    name = "torch"

    def __init__(self, tensor: Callable[[object], torch.Tensor]):
        self.t = tensor

    def blur(self, src, dst, sigma: float) -> None:
        self.t(dst).copy_(blur_torch(self.t(src), sigma))

    def gs_update(self, x, grad, m, x_in, l1, cfg: ZeroPurConfig) -> None:
        xt, mt = self.t(x), self.t(m)
        new_x, new_m = gs_update(xt, self.t(grad), mt, self.t(x_in), cfg)
        xt.copy_(new_x)
        mt.copy_(new_m)

    def ap_update(self, x, grad, x_in, cfg: ZeroPurConfig) -> None:
        xt = self.t(x)
        xt.copy_(ap_update(xt, self.t(grad), self.t(x_in), cfg))

    def close(self) -> None:
        pass
