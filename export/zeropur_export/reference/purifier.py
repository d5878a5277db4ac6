"""ReferencePurifier: ZeroPur in PyTorch, the one trusted definition every backend is checked against."""
from __future__ import annotations

import numpy as np
import torch

from zeropur_export.reference.losses import APConstants, APMode, ap_constants, ap_loss, gs_loss
from zeropur_export.reference.steps import TorchKernels, input_grad
from zeropur_export.reference.torch_runner import TorchRunner
from zeropur_export.victims.taps import Victim
from zeropur_rt.batch_loops import Iterates
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.pipeline import Purifier


class ReferencePurifier:
    """ZeroPur in PyTorch: the runtime's one loop (``zeropur_rt.schedule``) over the reference's losses
    (``TorchRunner``) and its torch update twins, in the victim's precision (float64 for the truth).
    ``ap_mode='recompute'`` reproduces the released code's cost."""

    def __init__(self, victim: Victim, cfg: ZeroPurConfig, ap_mode: APMode = "lean", seed: int | None = None):
        if cfg.ap_steps > 0 and not victim.spec.supports_ap:
            raise ValueError(f"{victim.name} declares no ILA/LPIPS taps (Guided Shift only): set ap_steps=0")
        self.victim, self.cfg, self.ap_mode = victim, cfg, ap_mode
        device = "cpu" if victim.mean.device.type == "cpu" else f"cuda:{victim.mean.device.index or 0}"
        self.runner = TorchRunner(victim, cfg, device, ap_mode=ap_mode)
        self.pipeline = Purifier(self.runner, TorchKernels(self.runner.tensor), cfg, input_shape=victim.spec.input_shape,
                                 batch={"min": 1, "max": 1 << 30}, has_ap=victim.spec.supports_ap, cuda_graph=False,
                                 seed=seed)

    def gs_grad(self, x: torch.Tensor, x_blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return input_grad(lambda v: gs_loss(self.victim, v, x_blur), x)

    def ap_setup(self, x_in: torch.Tensor, coarse: torch.Tensor) -> APConstants:
        with torch.no_grad():
            return ap_constants(self.victim, x_in, coarse, self.cfg)

    def ap_grad(self, fine: torch.Tensor, c: APConstants) -> torch.Tensor:
        return input_grad(lambda v: ap_loss(self.victim, v, c, self.cfg), fine)[0]

    def _out(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.victim.mean.device)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """Purified images (the AP output; the GS output when ``ap_steps == 0``), as a tensor on the
        victim's device."""
        return self._out(self.pipeline.run(self._host(x)).images)

    def purify_with_iterates(self, x: torch.Tensor) -> tuple[torch.Tensor, Iterates]:
        """``purify`` and the run's iterates (every GS and AP step's input, host copies)."""
        res = self.pipeline.run(self._host(x), iterates=True)
        return self._out(res.images), res.iterates

    def project(self, x_in: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Adaptive Projection alone, along a given Guided Shift result."""
        return self._out(self.pipeline.project(self._host(x_in), self._host(coarse)))

    @staticmethod
    def _host(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(x.to(self.victim.mean.device, self.victim.mean.dtype)).argmax(1)
