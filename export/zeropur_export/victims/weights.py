"""Pretrained weights: lookup by file name, sha256 verification, optional download, strict loading."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zeropur_rt import sources
from zeropur_rt.files import sha256_file

WEIGHTS_ENV = sources.WEIGHTS_ENV


@dataclass(frozen=True)
class WeightFile:
    filename: str
    sha256: str
    url: str


# The zoo models with published weights, read from the one sources table (zeropur_rt/sources.json).
KNOWN_WEIGHTS: dict[str, WeightFile] = {s.name: WeightFile(s.file, s.sha256, s.url)
                                        for s in sources.table().values() if s.kind == "weights"}


def find_weights(model: str, weights_dir: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """Path of the verified weight file of a zoo model: ``weights_dir``, ``$ZEROPUR_WEIGHTS``, shared/models,
    the user cache; downloaded into the cache where ``download`` (default: ``--download`` / ``$ZEROPUR_DOWNLOAD``)
    allows it."""
    if model not in KNOWN_WEIGHTS:
        raise ValueError(f"no known pretrained weights for {model!r}; known: {', '.join(sorted(KNOWN_WEIGHTS))}. "
                         "Pass a weights file explicitly instead.")
    return sources.weights_file(model, weights_dir, download)


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
