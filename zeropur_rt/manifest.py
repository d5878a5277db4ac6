"""The artifact directory contract: manifest.json written at build time, verified at deploy time.

An artifact directory holds the exported graphs (``classifier.onnx``, ``gs_grad.onnx``,
``ap_setup.onnx``, ``ap_grad.onnx``), optional TensorRT engines, and ``manifest.json`` with
the sha256 of every file. Graph input/output names are part of the format version.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.errors import ArtifactError
from zeropur_rt.files import inside, read_json_object, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# An export writes into ".NAME.<random>" + PARTIAL_SUFFIX beside its destination and renames it when complete.
PARTIAL_SUFFIX = ".partial"
REBUILD_HINT = "rebuild it with `zeropur-export export MODEL --out DIR --force`"

# Graph I/O names (format version 1). ap_setup/ap_grad carry one ila_dir_<l> per ILA layer.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classifier": (("x",), ("logits", "embedding")),
    "gs_grad": (("x", "x_blur"), ("grad", "loss")),
    "ap_setup": (("x_in", "coarse"), ("ila_dir_*", "lpips_ref")),
    "ap_grad": (("fine", "ila_dir_*", "lpips_ref"), ("grad",)),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SIDE = 1 << 14  # pixels; an input side larger than this is not a real export


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
    """Read and check a manifest: format version, every field's type and range, graph I/O names, files
    inside the directory, and (by default) every file's sha256. Anything else is an ArtifactError, and so
    is an export's temp directory (``.NAME.*.partial``): an export killed between writing its manifest and
    the rename that commits it leaves one complete-looking."""
    d = Path(artifact_dir)
    if d.name.startswith(".") and d.name.endswith(PARTIAL_SUFFIX):
        raise ArtifactError(f"{d} is not an artifact directory: it is the temp directory of an export that did "
                            f"not finish (an export is renamed into place only when complete); {REBUILD_HINT}")
    return check_manifest(d, verify_files)


def check_manifest(artifact_dir: str | os.PathLike, verify_files: bool = True) -> Manifest:
    """``load_manifest``'s checks wherever the directory lies (the exporter's round trip on its temp dir)."""
    d = Path(artifact_dir)
    p = d / MANIFEST
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such directory (an artifact directory is what zeropur-export export --out "
                            "writes)")
    if p.is_symlink() or not p.is_file():
        raise ArtifactError(f"{d} is not an artifact directory (no {MANIFEST} file); {REBUILD_HINT}")
    raw = read_json_object(p, ArtifactError, "manifest", REBUILD_HINT)
    if type(raw.get("format_version")) is not int or raw["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{d} has artifact format version {raw.get('format_version')!r}, this runtime reads "
                            f"version {FORMAT_VERSION}; {REBUILD_HINT}")
    try:
        m = _from_dict(d, raw)
    except (TypeError, KeyError, ValueError) as e:  # ConfigError is a ValueError
        raise ArtifactError(f"{p} is malformed ({e}); {REBUILD_HINT}") from None
    if verify_files:
        verify_hashes(d, m.files)
    return m


def _from_dict(d: Path, raw: dict[str, Any]) -> Manifest:
    """A Manifest from the parsed JSON, every field checked (the runtime trusts them from here on)."""
    names = {f.name for f in fields(Manifest)}
    unknown, missing = sorted(set(raw) - names), sorted(n for n in names - set(raw) if n not in ("engines", "calibration"))
    if unknown or missing:
        raise KeyError(f"unknown fields {unknown}, missing fields {missing}")
    for k, kind in (("model", str), ("taps", dict), ("config", dict), ("batch", dict), ("tools", dict),
                    ("graphs", dict), ("files", dict), ("engines", dict), ("input_shape", list), ("mean", list),
                    ("std", list)):
        if k in raw and not isinstance(raw[k], kind):
            raise TypeError(f"{k} must be a JSON {kind.__name__}, got {type(raw[k]).__name__}")
    if raw["weights_sha256"] is not None and not _is_sha(raw["weights_sha256"]):
        raise ValueError(f"weights_sha256 must be a sha256 hex digest or null, got {raw['weights_sha256']!r}")
    if raw.get("calibration") is not None and not isinstance(raw["calibration"], dict):
        raise TypeError("calibration must be a JSON object or null")
    shape = tuple(raw["input_shape"])
    if len(shape) != 3 or not all(_is_int(v) and 1 <= v <= MAX_SIDE for v in shape):
        raise ValueError(f"input_shape must be 3 integers in 1..{MAX_SIDE} (C, H, W), got {raw['input_shape']!r}")
    for k in ("mean", "std"):
        v = raw[k]
        if len(v) != shape[0] or not all(_is_num(a) for a in v):
            raise ValueError(f"{k} must be {shape[0]} finite numbers (one per channel), got {v!r}")
    if any(a <= 0 for a in raw["std"]):
        raise ValueError(f"std must be > 0, got {raw['std']!r}")
    if not _is_int(raw["num_classes"]) or raw["num_classes"] < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {raw['num_classes']!r}")
    if not _is_int(raw["opset"]):
        raise ValueError(f"opset must be an integer, got {raw['opset']!r}")
    b = raw["batch"]
    if set(b) != {"min", "opt", "max"} or not all(_is_int(v) for v in b.values()) or not 1 <= b["min"] <= b["opt"] <= b["max"]:
        raise ValueError(f"batch must be {{min, opt, max}} integers with 1 <= min <= opt <= max, got {b!r}")
    taps = raw["taps"]
    for k in ("ila", "lpips"):
        if not isinstance(taps.get(k, []), list) or not all(isinstance(t, str) for t in taps.get(k, [])):
            raise TypeError(f"taps.{k} must be a list of module names, got {taps.get(k)!r}")
    files = raw["files"]
    for rel, digest in files.items():
        if not _is_sha(digest):
            raise ValueError(f"files[{rel!r}] must be a sha256 hex digest, got {digest!r}")
        try:
            inside(d, rel)
        except ValueError as e:
            raise ArtifactError(f"the manifest of {d} lists a file outside the directory: {e}; {REBUILD_HINT}") from None
    _check_graphs(raw["graphs"], files)
    _check_engines(raw.get("engines", {}), files)
    m = Manifest(**{**raw, "input_shape": shape, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
    if m.zeropur_config.ap_steps > 0 and "ap_grad" not in m.graphs:  # also validates the config (ConfigError)
        raise ValueError(f"config asks for {m.zeropur_config.ap_steps} Adaptive Projection steps, but the artifact has "
                         "no ap_setup/ap_grad graphs (a Guided-Shift-only export has ap_steps 0)")
    return m


def _check_graphs(graphs: dict[str, Any], files: dict[str, str]) -> None:
    unknown = sorted(set(graphs) - set(GRAPH_IO))
    if unknown or not {"classifier", "gs_grad"} <= set(graphs) or ("ap_setup" in graphs) != ("ap_grad" in graphs):
        raise ValueError(f"graphs must be classifier + gs_grad [+ ap_setup + ap_grad], got {sorted(graphs)}")
    for g, spec in graphs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            raise TypeError(f"graph {g!r} must be an object with a 'file', got {spec!r}")
        if spec["file"] not in files:
            raise ArtifactError(f"graph {g!r} names file {spec['file']!r} that the manifest does not hash; {REBUILD_HINT}")
        for k in ("inputs", "outputs"):  # the runners match them against the graph files' own names
            if not isinstance(spec.get(k), list) or not all(isinstance(n, str) for n in spec[k]):
                raise TypeError(f"graph {g!r} {k} must be a list of names, got {spec.get(k)!r}")


def _check_engines(engines: dict[str, Any], files: dict[str, str]) -> None:
    """Engine records are matched to the GPU by ``engine_record.select_engines``; here only their shape, and
    that every engine file they name is hashed (an engine is never loaded unverified)."""
    for key, rec in engines.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("graphs", {}), dict):
            raise TypeError(f"engine record {key!r} must be an object with a 'graphs' object, got {rec!r}")
        for g, spec in rec.get("graphs", {}).items():
            if not isinstance(spec, dict) or spec.get("file") not in files:
                raise ArtifactError(f"engine record {key!r} graph {g!r} names an engine file the manifest does not "
                                    f"hash ({spec.get('file') if isinstance(spec, dict) else spec!r}); {REBUILD_HINT}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    if type(v) is float:
        return math.isfinite(v)
    return type(v) is int and abs(v) < 1 << 53  # JSON ints past float precision are no mean or std


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def verify_hashes(artifact_dir: Path, files: dict[str, str]) -> None:
    """Every listed file is a regular file inside ``artifact_dir`` (no symlink out of it) with its sha256."""
    for rel, expected in files.items():
        try:
            f = inside(artifact_dir, rel)
        except ValueError as e:
            raise ArtifactError(f"refusing {artifact_dir}: {e}; {REBUILD_HINT}") from None
        if not f.is_file():
            raise ArtifactError(f"{f} is listed in the manifest but missing; {REBUILD_HINT}")
        try:
            got = sha256_file(f)
        except OSError as e:
            raise ArtifactError(f"{f} cannot be read ({e.strerror or e}); {REBUILD_HINT}") from None
        if got != expected:
            raise ArtifactError(f"{f} does not match its manifest hash (expected {expected[:12]}…, got {got[:12]}…): "
                                f"the file was modified or corrupted; {REBUILD_HINT}")
