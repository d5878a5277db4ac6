"""What every part of calibration shares: the error type, the attack, config identity and labels, the device."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from zeropur_rt.config import ZeroPurConfig, preset_for_shape
from zeropur_rt.cuda_driver import parse_device

# The evaluation slice of the CIFAR-10 test copy: a calibration that overlaps it inflates the reported accuracy.
EVAL_ROWS = (0, 5000)
DEFAULT_CALIB_ROWS = "5000:6000"
ATTACK = dict(eps=8 / 255, step=2 / 255, steps=20, random_start=True)
EXIT_BAD_INPUT, EXIT_NO_FEASIBLE = 2, 3


class CalibError(ValueError):
    """Bad input: the CLI prints it as one clear message and exits 2."""


def paper_config(input_shape: tuple[int, ...] = (3, 32, 32)) -> ZeroPurConfig:
    """The released code's recipe for a victim of ``input_shape`` (its preset at that resolution)."""
    return preset_for_shape(input_shape)


def cfg_key(cfg: ZeroPurConfig) -> str:
    """Identity of a config in the search: two configs that purify alike share one key (and one record)."""
    d = cfg.to_dict()
    d.pop("preset", None)
    if cfg.ap_steps == 0:  # AP knobs are irrelevant for a GS-only config
        for k in ("ap_step", "ila_weight", "lpips_weight", "ila_normalized", "ila_norm_eps"):
            d.pop(k)
    return json.dumps(d, sort_keys=True)


def cfg_label(cfg: ZeroPurConfig) -> str:
    s = f"sigma {cfg.blur_sigma:g}, eps {cfg.eps * 255:.3g}/255, GS {cfg.gs_steps} (step {cfg.gs_step * 255:.3g}/255)"
    if cfg.ap_steps == 0:
        return s + ", AP 0"
    ila = f"n{cfg.ila_weight:g}" if cfg.ila_normalized else f"u{cfg.ila_weight:g}"
    return s + f", AP {cfg.ap_steps} (step {cfg.ap_step * 255:.3g}/255), ILA {ila}"


def predict(victim: Any, x: torch.Tensor, batch: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([victim(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).cpu().numpy()


def resolve_device(device: str) -> torch.device:
    """``device`` checked (the one device grammar); on CUDA, TF32 off so that a search on a GPU sees float32
    as on the CPU."""
    try:
        ordinal = parse_device(device)
    except ValueError as e:
        raise CalibError(str(e)) from None
    if ordinal is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CalibError(f"device {device}: this torch sees no CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda", ordinal)


def labelled(victim: Any, x: Any, y: Any, device: str | None) -> tuple[Any, torch.Tensor, np.ndarray]:
    """(victim, images, labels) on one device, checked: NCHW float images in [0, 1] of the victim's shape,
    one integer label per image inside the victim's classes."""
    dev = resolve_device(str(device if device is not None else victim.mean.device))
    victim = victim.to(dev)
    xt = torch.as_tensor(x).to(dev, torch.float32)
    ys = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if xt.ndim != 4 or tuple(xt.shape[1:]) != tuple(victim.spec.input_shape):
        raise CalibError(f"images must be N x {' x '.join(map(str, victim.spec.input_shape))} (NCHW), got {tuple(xt.shape)}")
    if len(xt) == 0:
        raise CalibError("no images")
    if not bool(torch.isfinite(xt).all()) or float(xt.min()) < 0 or float(xt.max()) > 1:
        raise CalibError("images must be finite floats in [0, 1]")
    if ys.shape != (len(xt),) or not np.issubdtype(ys.dtype, np.integer):
        raise CalibError(f"labels must be {len(xt)} integers (one per image), got {ys.dtype} {ys.shape}")
    k = victim.spec.num_classes
    if ys.min() < 0 or ys.max() >= k:
        raise CalibError(f"labels must be in 0..{k - 1}, got range {int(ys.min())}..{int(ys.max())}")
    return victim, xt, ys.astype(np.int64)
