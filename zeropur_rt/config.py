"""ZeroPurConfig: every knob of the algorithm, plus the presets from the paper's released code.

Lives in the runtime package (no torch) because the artifact manifest carries it from
build time to deploy time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Literal

from zeropur_rt.blur import box_blur_weights, check_weights
from zeropur_rt.errors import ConfigError

L1Scope = Literal["sample", "batch"]
# How the GS step relates to eps. "fixed": gs_step is a constant of the recipe (1/255 in the presets: the older
# released code). "eps_over_steps": gs_step = eps / gs_steps, so that GS may travel eps (the newest released code).
# The two coincide only at eps 10/255 with 10 steps, the CIFAR preset.
GS_STEP_RULES = ("fixed", "eps_over_steps")

# Fields baked into the exported ap_grad graph: changing them needs a re-export.
BAKED_FIELDS = ("ila_weight", "lpips_weight", "ila_normalized", "ila_norm_eps")


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
    gs_step_rule: str = "fixed"  # see GS_STEP_RULES
    # Randomised purification (off in every preset): GS and AP each start from a uniform draw inside the
    # eps ball around the input, and each GS step blurs with sigma drawn from blur_sigma * U(1 - j, 1 + j).
    # The draws come from the Purifier's seeded generator, fresh per call; evaluate them under EOT.
    random_start: bool = False
    blur_sigma_jitter: float = 0.0
    preset: str = "cifar10"

    def __post_init__(self) -> None:
        for name in ("eps", "gs_step", "ap_step", "blur_sigma", "ila_weight", "lpips_weight", "momentum", "ila_norm_eps",
                     "blur_sigma_jitter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                raise ConfigError(f"config.{name} must be a finite number (float32 range), got {v!r}")
        for name in ("eps", "gs_step", "ap_step"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"config.{name} must be > 0, got {v}")
            if v > 1:  # images live in [0, 1]: a budget above 1 is a budget written in pixel levels
                raise ConfigError(f"config.{name}={v:g} is outside [0, 1] (images are in [0, 1]); did you mean "
                                  f"{name}={v:g}/255?")
        for name in ("blur_sigma", "ila_weight", "lpips_weight", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.blur_sigma_jitter < 1:
            raise ConfigError("config.blur_sigma_jitter is a fraction of blur_sigma in [0, 1), "
                              f"got {self.blur_sigma_jitter}")
        try:  # the kernels' own rule: a sigma whose box filter overflows their integer weights is no blur
            check_weights(box_blur_weights(float(self.blur_sigma) * (1 + self.blur_sigma_jitter)))
        except ValueError:
            raise ConfigError(f"config.blur_sigma {self.blur_sigma!r} (jitter {self.blur_sigma_jitter!r}) is beyond "
                              "what the blur kernels take (its box filter overflows their integer weights)") from None
        for name in ("gs_steps", "ap_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"config.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.l1_scope, str) or self.l1_scope not in ("sample", "batch"):
            raise ConfigError(f"config.l1_scope must be 'sample' or 'batch', got {self.l1_scope!r}")
        for name in ("ila_normalized", "random_start"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.gs_step_rule, str) or self.gs_step_rule not in GS_STEP_RULES:
            raise ConfigError(f"config.gs_step_rule must be one of {', '.join(GS_STEP_RULES)}, got {self.gs_step_rule!r}")
        if self.gs_step_rule == "eps_over_steps" and self.gs_steps > 0 and \
                not math.isclose(self.gs_step, self.eps / self.gs_steps, rel_tol=1e-9):
            raise ConfigError(f"config.gs_step {self.gs_step!r} is not eps / gs_steps ({self.eps / self.gs_steps!r}), "
                              "which gs_step_rule 'eps_over_steps' sets: leave gs_step out, or use gs_step_rule 'fixed'")
        if not isinstance(self.preset, str):
            raise ConfigError(f"config.preset must be a name, got {self.preset!r}")

    @property
    def randomised(self) -> bool:
        """Whether each purification draws (a random start or a jittered blur sigma)."""
        return self.random_start or self.blur_sigma_jitter > 0

    def replace(self, **overrides: Any) -> "ZeroPurConfig":
        """A copy with ``overrides``; AP's step follows eps and the AP step count (see ``ap_step_for``)
        unless ``ap_step`` is among the overrides."""
        if "ap_step" not in overrides and ("eps" in overrides or "ap_steps" in overrides):
            overrides = {**overrides, "ap_step": ap_step_for(self, overrides.get("eps", self.eps),
                                                              overrides.get("ap_steps", self.ap_steps))}
        rule = overrides.get("gs_step_rule", self.gs_step_rule)
        if "gs_step" not in overrides and (rule != self.gs_step_rule or (
                rule == "eps_over_steps" and ("eps" in overrides or "gs_steps" in overrides))):
            overrides = {**overrides, "gs_step": gs_step_for(rule, overrides.get("eps", self.eps),
                                                              overrides.get("gs_steps", self.gs_steps))}
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZeroPurConfig":
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise ConfigError(f"a ZeroPurConfig is a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ZeroPurConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


FLOAT32_MAX = 3.4028234663852886e38  # the kernels and graphs take every number as float32


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v) and abs(v) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def ap_step_for(cfg: ZeroPurConfig, eps: float, ap_steps: int) -> float:
    """The one eps -> ap_step rule: AP's total travel (ap_steps * ap_step) stays the recipe's multiple
    of eps. The presets travel exactly eps (ap_step = eps / ap_steps, the released code's rule), so a
    new eps scales the step and more AP steps make each one shorter."""
    if ap_steps <= 0:  # no AP: the step is unused, keep it in scale with eps
        return cfg.ap_step * eps / cfg.eps
    travel = cfg.ap_steps * cfg.ap_step / cfg.eps if cfg.ap_steps > 0 else 1.0
    return travel * eps / ap_steps


def gs_step_for(rule: str, eps: float, gs_steps: int) -> float:
    """The GS step under ``rule`` (GS_STEP_RULES): 1/255, or eps / gs_steps."""
    if rule == "eps_over_steps" and gs_steps > 0:
        return eps / gs_steps
    return 1 / 255


def parse_value(field_name: str, raw: str) -> Any:
    """One ``--set`` value, typed by the config field: booleans (true/false/1/0/yes/no/on/off), integers,
    and floats written as decimals or fractions (``8/255``)."""
    fields = {f.name: f for f in dataclasses.fields(ZeroPurConfig)}
    if field_name not in fields:
        raise ConfigError(f"unknown config field {field_name!r}; valid fields: {', '.join(sorted(fields))}")
    default = getattr(ZeroPurConfig(), field_name)
    text = raw.strip()
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected a boolean (true/false)")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"--set {field_name}={raw}: {e}") from None
    return text


def parse_sets(pairs: Iterable[str]) -> dict[str, Any]:
    """``["eps=8/255", "ap_steps=100", "ila_normalized=true"]`` -> typed overrides (the one --set parser)."""
    out: dict[str, Any] = {}
    for kv in pairs:
        key, sep, raw = kv.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        out[key.strip()] = parse_value(key.strip(), raw)
    return out


def apply_overrides(cfg: ZeroPurConfig, overrides: dict[str, Any] | None, *, baked: bool = False) -> ZeroPurConfig:
    """``cfg`` with ``overrides``. ``baked=True`` (a run over exported graphs) refuses a change to a field
    baked into the ap_grad graph, instead of applying it where it cannot take effect."""
    if not overrides:
        return cfg
    if baked:
        changed = sorted(k for k in set(overrides) & set(BAKED_FIELDS) if overrides[k] != getattr(cfg, k))
        if changed:
            raise ConfigError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} baked into the exported "
                             "ap_grad graph and cannot change at run time: re-export with `zeropur-export export "
                             f"MODEL --set {changed[0]}=...`")
    return cfg.replace(**overrides)


# The image side (pixels) each preset's blur sigma was set for by the released code.
PRESET_SIDE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def resolution_scale(input_shape: Iterable[int], preset_name: str) -> float:
    """The one resolution rule: a victim whose shorter image side is ``s`` gets the preset's blur sigma times
    ``s / PRESET_SIDE[preset]``, so the blur (and its kernel support, about 3 sigma of box passes) covers the
    same fraction of the image. Step sizes and eps are L-inf budgets in intensity units, which do not depend
    on the pixel count: they stay, and the AP step follows eps by ``ap_step_for``."""
    if preset_name not in PRESET_SIDE:
        raise ValueError(f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESET_SIDE)}")
    side = min(int(v) for v in list(input_shape)[1:])
    return side / PRESET_SIDE[preset_name]


def preset_for_shape(input_shape: Iterable[int], name: str | None = None, **overrides: Any) -> ZeroPurConfig:
    """The preset for a victim of ``input_shape`` (C, H, W): ``name``, else the preset whose side is nearest in
    scale (the shorter side against 32 and 224, log scale: up to 84 px is CIFAR-like), with its blur sigma
    scaled by ``resolution_scale``. At a preset's own side this is the preset itself."""
    shape = list(input_shape)
    if name is None:
        side = min(int(v) for v in shape[1:])
        name = min(("cifar10", "imagenet"), key=lambda n: abs(math.log(side / PRESET_SIDE[n])))
    base = preset(name)
    sigma = overrides.pop("blur_sigma", base.blur_sigma * resolution_scale(shape, name))
    return preset(name, blur_sigma=sigma, **overrides)


def preset(name: str, **overrides: Any) -> ZeroPurConfig:
    """The released code's presets; every field can be overridden.

    ``ap_step`` is eps / ap_steps unless given explicitly. Every preset keeps the older released code's GS step,
    1/255 (``gs_step_rule="fixed"``); ``gs_step_rule="eps_over_steps"`` gives the newest code's, eps / gs_steps.
    """
    if name in ("cifar10", "cifar100"):
        base: dict[str, Any] = dict(eps=10 / 255, gs_steps=10, ap_steps=50, gs_step_rule="fixed")
    elif name == "imagenet":
        base = dict(eps=6 / 255, gs_steps=10, ap_steps=50, gs_step_rule="fixed")
    else:
        raise ValueError(f"unknown preset {name!r}; valid presets: cifar10, cifar100, imagenet")
    base.update(overrides)
    base.setdefault("ap_step", base["eps"] / (base["ap_steps"] or 50))
    base.setdefault("gs_step", gs_step_for(base["gs_step_rule"], base["eps"], base["gs_steps"]))
    return ZeroPurConfig(preset=name, **base)
