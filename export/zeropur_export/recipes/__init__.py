"""Recipes: a ZeroPurConfig with a name. ``paper`` (the model's preset, the released code's recipe), ``calibrated``
(the JSON shipped in this folder for the model's pretrained weights) or a JSON file of your own; and the one rule
that builds a config from a preset, a config file and ``--set`` pairs."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from zeropur_rt.config import ZeroPurConfig, apply_overrides, parse_sets, preset, preset_for_shape
from zeropur_rt.errors import ConfigError
from zeropur_rt.files import read_json_object, sha256_file

RECIPES_DIR = Path(__file__).resolve().parent  # the shipped JSONs lie beside this file


def build_config(preset_name: str, config_file: str | Path | None = None, sets: Sequence[str] = (),
                 input_shape: Sequence[int] | None = None) -> tuple[ZeroPurConfig, dict[str, Any] | None]:
    """Preset (at ``input_shape``'s resolution, by ``preset_for_shape``), then a config file (a ZeroPurConfig
    JSON, as calibration writes it), then ``--set`` pairs.

    Returns the config and the provenance the manifest records (None without a file).
    """
    cfg = preset_for_shape(input_shape, preset_name) if input_shape is not None else preset(preset_name)
    calibration = None
    if config_file:
        raw = read_json_object(config_file, ConfigError, "config file")
        calibration = {"config_file": Path(config_file).name, "sha256": sha256_file(config_file)}  # provenance
        if "_budget" in raw:  # a calibration that found nothing wrote its closest miss, marked
            calibration["budget"] = str(raw["_budget"])
            print(f"warning: {config_file} {raw['_budget']} (its calibration found no config within budget)",
                  file=sys.stderr)
        cfg = ZeroPurConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in raw.items() if not k.startswith("_")}})
    return apply_overrides(cfg, parse_sets(sets)), calibration


def shipped_recipe(model: str) -> Path | None:
    """The calibrated recipe shipped for ``model``'s pretrained weights, if there is one."""
    path = RECIPES_DIR / f"{model}_calibrated.json"
    return path if path.is_file() else None


def default_recipe(model: str) -> str:
    """The best recipe we ship for ``model``: its calibrated one where it exists, else the paper's."""
    return "calibrated" if shipped_recipe(model) else "paper"


def recipe_config(model: str, recipe: str) -> tuple[str, ZeroPurConfig, dict[str, Any] | None]:
    """(name, config, provenance) of ``recipe``: "paper", "calibrated" or a JSON file."""
    from zeropur_export.victims.zoo import ZOO
    if model not in ZOO:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(ZOO))}")
    if recipe == "paper":
        return recipe, preset(ZOO[model][2]), None
    if recipe == "calibrated":
        path = shipped_recipe(model)
        if path is None:
            shipped = sorted(p.stem.removesuffix("_calibrated") for p in RECIPES_DIR.glob("*_calibrated.json"))
            raise ValueError(f"no calibrated recipe ships for {model} (only for {', '.join(shipped)}): use --recipe "
                             f"paper, or calibrate one (zeropur-export calibrate --model {model}) and pass its JSON")
        return recipe, *build_config(ZOO[model][2], path)
    if not Path(recipe).is_file():
        raise ValueError(f"--recipe takes paper, calibrated or a config JSON file; {recipe!r} is none of these")
    return Path(recipe).stem, *build_config(ZOO[model][2], recipe)


def describe(cfg: ZeroPurConfig) -> str:
    """The recipe in one line, in the units the README's tables use."""
    ila = f"ILA {cfg.ila_weight:g}" + (" (normalised)" if cfg.ila_normalized else "")
    sigma = f"sigma {cfg.blur_sigma:g}" + (f" x U(1 -/+ {cfg.blur_sigma_jitter:g})" if cfg.blur_sigma_jitter else "")
    return (f"{sigma}, eps {cfg.eps * 255:.3g}/255, GS {cfg.gs_steps} x {cfg.gs_step * 255:.3g}/255, "
            f"AP {cfg.ap_steps} x {cfg.ap_step * 255:.3g}/255, {ila}" + (", random start" if cfg.random_start else ""))
