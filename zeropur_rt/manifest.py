"""The artifact directory contract: manifest.json written at build time, verified at deploy time.

An artifact directory holds the exported graphs (``classifier.onnx``, ``gs_grad.onnx``,
``ap_setup.onnx``, ``ap_grad.onnx``), optional TensorRT engines, and ``manifest.json`` with
the sha256 of every file. Graph input/output names are part of the format version.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.files import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REBUILD_HINT = "rebuild it with `zeropur-export export MODEL --out DIR --force`"

# Graph I/O names (format version 1). ap_setup/ap_grad carry one ila_dir_<l> per ILA layer.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classifier": (("x",), ("logits", "embedding")),
    "gs_grad": (("x", "x_blur"), ("grad", "loss")),
    "ap_setup": (("x_in", "coarse"), ("ila_dir_*", "lpips_ref")),
    "ap_grad": (("fine", "ila_dir_*", "lpips_ref"), ("grad",)),
}


class ArtifactError(ValueError):
    """An artifact directory that is missing, tampered with, or built for something else."""


@dataclass
class Manifest:
    format_version: int
    model: str
    weights_sha256: str | None
    taps: dict[str, Any]
    config: dict[str, Any]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    batch: dict[str, int]  # min / opt / max of the dynamic batch dimension
    opset: int
    tools: dict[str, str]
    graphs: dict[str, dict[str, Any]]  # name -> {"file", "inputs", "outputs"}
    files: dict[str, str]  # relative path -> sha256
    engines: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def zeropur_config(self) -> ZeroPurConfig:
        return ZeroPurConfig.from_dict(self.config)

    @property
    def n_ila(self) -> int:
        return len(self.taps.get("ila", ()))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["input_shape"], d["mean"], d["std"] = list(self.input_shape), list(self.mean), list(self.std)
        return d


def graph_io(name: str, n_ila: int) -> tuple[list[str], list[str]]:
    """Concrete input/output names of one graph for a victim with ``n_ila`` projection layers."""
    def expand(names: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        for n in names:
            out += [f"ila_dir_{i}" for i in range(n_ila)] if n == "ila_dir_*" else [n]
        return out
    ins, outs = GRAPH_IO[name]
    return expand(ins), expand(outs)


def load_manifest(artifact_dir: str | os.PathLike, verify_files: bool = True) -> Manifest:
    """Read and check a manifest: format version, required fields, and (by default) every file's sha256."""
    d = Path(artifact_dir)
    p = d / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{d} is not an artifact directory (no {MANIFEST}); {REBUILD_HINT}")
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p} is not valid JSON ({e}); {REBUILD_HINT}") from e
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d} has artifact format version {raw.get('format_version')!r}, this runtime reads "
                            f"version {FORMAT_VERSION}; {REBUILD_HINT}")
    try:
        m = Manifest(**{**raw, "input_shape": tuple(raw["input_shape"]), "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
        m.zeropur_config  # noqa: B018 - validates the config
    except (TypeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{p} is malformed ({e}); {REBUILD_HINT}") from e
    for g, spec in m.graphs.items():
        if spec.get("file") not in m.files:
            raise ArtifactError(f"graph {g!r} names file {spec.get('file')!r} that the manifest does not hash; {REBUILD_HINT}")
    if verify_files:
        verify_hashes(d, m.files)
    return m


def verify_hashes(artifact_dir: Path, files: dict[str, str]) -> None:
    for rel, expected in files.items():
        f = artifact_dir / rel
        if not f.is_file():
            raise ArtifactError(f"{f} is listed in the manifest but missing; {REBUILD_HINT}")
        got = sha256_file(f)
        if got != expected:
            raise ArtifactError(f"{f} does not match its manifest hash (expected {expected[:12]}…, got {got[:12]}…): "
                                f"the file was modified or corrupted; {REBUILD_HINT}")
