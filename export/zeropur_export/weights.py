"""Pretrained weights: lookup by file name, sha256 verification, optional download, strict loading."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zeropur_rt.data import shared_dir
from zeropur_rt.files import download_verified, sha256_file

WEIGHTS_ENV = "ZEROPUR_WEIGHTS"
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/d5489e8995e81e91ce6b1d69dcc98ad579b0b153/pretrained_models/"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    sha256: str
    url: str


KNOWN_WEIGHTS: dict[str, WeightFile] = {
    "resnet20": WeightFile("resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", _AKAMASTER + "resnet20-12fca82f.th"),
    "resnet32": WeightFile("resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", _AKAMASTER + "resnet32-d509ac18.th"),
    "resnet56": WeightFile("resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", _AKAMASTER + "resnet56-4bfd9763.th"),
}


def weight_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    """Where weights are looked up, in order: ``extra``, ``$ZEROPUR_WEIGHTS``, ``<shared>/models``."""
    dirs = [Path(extra)] if extra else []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]))
    dirs.append(shared_dir() / "models")
    return dirs


def find_weights(model: str, weights_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Path of the verified weight file of a zoo model; downloads into the first directory if allowed."""
    if model not in KNOWN_WEIGHTS:
        raise ValueError(f"no known pretrained weights for {model!r}; known: {', '.join(sorted(KNOWN_WEIGHTS))}. "
                         "Pass a weights file explicitly instead.")
    wf = KNOWN_WEIGHTS[model]
    dirs = weight_dirs(weights_dir)
    for d in dirs:
        p = d / wf.filename
        if p.is_file():
            verify_sha256(p, wf.sha256)
            return p
    if download:
        return download_verified(wf.url, dirs[0] / wf.filename, wf.sha256)
    raise FileNotFoundError(f"weights {wf.filename} for {model} not found in {[str(d) for d in dirs]}; "
                            f"set {WEIGHTS_ENV}, pass --weights-dir, or allow download (--download) from {wf.url}")


def verify_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {got}; refusing to load it")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: accepts a bare state_dict or ``{'state_dict': ...}``; strips ``module.``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(net: nn.Module, path: str | os.PathLike) -> None:
    try:
        net.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights {path} do not fit this architecture: {e}") from e
