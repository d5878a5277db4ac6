"""ZeroPurConfig: every knob of the algorithm, plus the presets from the paper's released code.

Lives in the runtime package (no torch) because the artifact manifest carries it from
build time to deploy time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

L1Scope = Literal["sample", "batch"]


@dataclass(frozen=True)
class ZeroPurConfig:
    """ZeroPur hyper-parameters. Defaults are the authors' CIFAR recipe.

    Guided Shift (GS): ``gs_steps`` sign steps of ``gs_step`` on the momentum of the
    L1-normalised gradient of ``-cos(E(x), E(blur(x)))``, inside the ``eps`` ball.
    Adaptive Projection (AP): restart from the input, ``ap_steps`` sign steps of
    ``ap_step`` on ``ila_weight * ILA + lpips_weight * LPIPS_self``.
    """

    eps: float = 10 / 255
    gs_steps: int = 10
    gs_step: float = 1 / 255
    momentum: float = 1.0
    l1_scope: L1Scope = "sample"
    blur_sigma: float = 1.8
    ap_steps: int = 50
    ap_step: float = (10 / 255) / 50
    ila_weight: float = 1e-4
    lpips_weight: float = 1.0
    # The authors' code also carries a normalised ILA: the dot product divided by
    # ||h(coarse) - h(x_in)|| + ila_norm_eps, which makes ila_weight portable across victims.
    ila_normalized: bool = False
    ila_norm_eps: float = 1e-8
    preset: str = "cifar10"

    def __post_init__(self) -> None:
        for name in ("eps", "gs_step", "ap_step", "blur_sigma", "ila_weight", "lpips_weight", "momentum", "ila_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"config.{name} must be a finite number, got {v!r}")
        if self.eps <= 0:
            raise ValueError(f"config.eps must be > 0, got {self.eps}")
        for name in ("gs_step", "ap_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.{name} must be > 0, got {getattr(self, name)}")
        for name in ("blur_sigma", "ila_weight", "lpips_weight", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"config.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gs_steps", "ap_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"config.{name} must be an integer >= 0, got {v!r}")
        if self.l1_scope not in ("sample", "batch"):
            raise ValueError(f"config.l1_scope must be 'sample' or 'batch', got {self.l1_scope!r}")

    def replace(self, **overrides: Any) -> "ZeroPurConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZeroPurConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ZeroPurConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


def preset(name: str, **overrides: Any) -> ZeroPurConfig:
    """The released code's presets; every field can be overridden.

    ``ap_step`` follows ``eps`` (eps / 50) unless given explicitly.
    """
    if name in ("cifar10", "cifar100"):
        base: dict[str, Any] = dict(eps=10 / 255, gs_steps=10, gs_step=1 / 255, ap_steps=50)
    elif name == "imagenet":
        base = dict(eps=6 / 255, gs_steps=10, gs_step=1 / 255, ap_steps=50)
    else:
        raise ValueError(f"unknown preset {name!r}; valid presets: cifar10, cifar100, imagenet")
    base.update(overrides)
    base.setdefault("ap_step", base["eps"] / 50)
    return ZeroPurConfig(preset=name, **base)
