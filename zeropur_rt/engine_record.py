"""The engine-record schema: how TensorRT engines are named, recorded in the manifest and selected.

Build time (``zeropur_export.engines.builder``) writes records, deploy time (``zeropur_rt.runners.tensorrt``)
selects one; both read this module, which needs neither TensorRT nor CUDA. One record per
(compute capability, TensorRT version, precision) in the manifest's ``engines`` section::

    "engines": {"sm90.trt10.8.fp32": {"compute_capability": "9.0", "tensorrt": "10.8.0.43",
                                       "precision": "fp32", "batch": {"min": 1, "opt": 32, "max": 256},
                                       "graphs": {"gs_grad": {"file": "gs_grad.sm90.trt10.8.fp32.engine",
                                                              "device_memory_bytes": 123, ...}, ...}}}
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from zeropur_rt.manifest import ArtifactError

PRECISIONS = ("fp32", "fp16")
MIN_TRT_MAJOR = 10
ENGINE_SUFFIX = ".engine"
BUILD_CMD = "zeropur-export build-engines {dir}"


class EngineMismatchError(ArtifactError):
    """The artifact has no engine usable on this GPU / TensorRT (or no engines at all)."""



def parse_trt_version(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0, 43)``; at least major.minor."""
    parts = re.findall(r"\d+", str(version).split("+")[0])
    if len(parts) < 2:
        raise ValueError(f"cannot parse TensorRT version {version!r}")
    return tuple(int(p) for p in parts[:4])


def trt_major_minor(version: str) -> str:
    v = parse_trt_version(version)
    return f"{v[0]}.{v[1]}"


def cc_str(cc: Sequence[int] | str) -> str:
    """(9, 0) / "9.0" / "sm90" -> "9.0"."""
    if isinstance(cc, str):
        m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", cc.strip()) or re.fullmatch(r"sm_?(\d)(\d+)", cc.strip())
        if not m:
            raise ValueError(f"cannot parse compute capability {cc!r}")
        return f"{int(m.group(1))}.{int(m.group(2))}"
    major, minor = (int(v) for v in cc)
    return f"{major}.{minor}"


def sm_tag(cc: Sequence[int] | str) -> str:
    major, minor = cc_str(cc).split(".")
    return f"sm{major}{minor}"


def engine_key(cc: Sequence[int] | str, trt_version: str, precision: str) -> str:
    """Manifest key of an engine set: ``sm90.trt10.8.fp32``."""
    check_precision(precision)
    return f"{sm_tag(cc)}.trt{trt_major_minor(trt_version)}.{precision}"


def engine_filename(graph: str, cc: Sequence[int] | str, trt_version: str, precision: str) -> str:
    """``gs_grad.sm90.trt10.8.fp32.engine``, stored beside the ONNX files."""
    return f"{graph}.{engine_key(cc, trt_version, precision)}{ENGINE_SUFFIX}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def versions_compatible(built: str, runtime: str) -> bool:
    """TensorRT engines load only in the TensorRT version that built them (no version-compatible
    builds here): major.minor.patch must match; the build number may differ."""
    return parse_trt_version(built)[:3] == parse_trt_version(runtime)[:3]


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build one precision with one TensorRT version.

    ``strongly_typed``: create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED
    (TensorRT 11: always on, the flag is accepted and ignored). ``set_flags`` / ``clear_flags``:
    BuilderFlag names. ``onnx_fp16``: build from an FP16 copy of the ONNX graph (float32 I/O kept).
    """

    precision: str
    trt_major: int
    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    onnx_fp16: bool

    def describe(self) -> str:
        how = "FP16 copy of the ONNX graph, " if self.onnx_fp16 else ""
        typed = "strongly typed" if self.strongly_typed else "weakly typed"
        flags = ", ".join([f"+{f}" for f in self.set_flags] + [f"-{f}" for f in self.clear_flags]) or "no flags"
        return f"{self.precision} on TensorRT {self.trt_major}: {how}{typed} network, builder flags {flags}"


def precision_plan(trt_version: str, precision: str) -> PrecisionPlan:
    """The build recipe for ``precision`` under TensorRT ``trt_version``.

    fp32 (10.x and 11.x): the float32 ONNX as is, TF32 cleared (it is on by default and rounds
    conv/matmul inputs to 10-bit mantissas, which breaks fp32 parity). 10.x builds it weakly typed
    with no reduced-precision flag, which leaves every layer in float32.

    fp16 (10.x and 11.x): an FP16 copy of the ONNX graph (convolutions/matmuls in float16, float32
    everywhere else and at the I/O) on a strongly typed network, so TensorRT runs each layer in
    the type the graph gives it. BuilderFlag.FP16 on a weakly typed 10.x network is not used: it
    lets TensorRT pick FP16 for any layer, the norms, divisions and floors included, which must
    stay float32 (their 1e-30 / 1e-10 floors underflow in fp16). TensorRT 11 removed that flag and
    builds strongly typed networks only; 10.x has NetworkDefinitionCreationFlag.STRONGLY_TYPED.
    https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#strongly-typed-networks
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
    """
    check_precision(precision)
    major = parse_trt_version(trt_version)[0]
    if major < MIN_TRT_MAJOR:
        raise ValueError(f"TensorRT {trt_version} is too old: zeropur-rt needs TensorRT >= {MIN_TRT_MAJOR} "
                         "(name-based I/O, opset 18 ONNX parsing)")
    if precision == "fp32":
        return PrecisionPlan("fp32", major, major >= 11, (), ("TF32",), False)
    return PrecisionPlan("fp16", major, True, (), ("TF32",), True)


def _describe_record(key: str, rec: Mapping[str, Any]) -> str:
    try:
        sm = cc_str(rec.get("compute_capability", "?")).replace(".", "")
    except (ValueError, TypeError):  # a malformed record is still named in the refusal
        sm = f"?{rec.get('compute_capability')!r}"
    return (f"{key} (sm{sm}, "
            f"TensorRT {rec.get('tensorrt', '?')}, {rec.get('precision', '?')})")


def select_engines(engines: Mapping[str, Any], cc: Sequence[int] | str, trt_version: str, *,
                   precision: str | None = None, graphs: Iterable[str] = (), batch: Mapping[str, int] | None = None,
                   artifact_dir: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """Pick the manifest engine record usable on this GPU and TensorRT, or refuse with how to rebuild.

    ``engines``: the manifest's ``engines`` section. ``cc``: this GPU's compute capability.
    ``precision``: the one wanted, or None = fp32 if present, else fp16. ``graphs``: graphs that
    must be in the record. ``batch``: the manifest's batch range, which the record must equal.
    Returns (key, record).
    """
    where = str(artifact_dir) if artifact_dir is not None else "DIR"
    rebuild = f"rebuild them on this machine with `{BUILD_CMD.format(dir=where)}`"
    if precision is not None:
        check_precision(precision)
        rebuild += f" --precision {precision}" if precision != "fp32" else ""
    want_cc = cc_str(cc)
    here = f"this machine has an sm{want_cc.replace('.', '')} GPU and TensorRT {trt_version}"
    if not engines:
        raise EngineMismatchError(f"{where} has no TensorRT engines; {rebuild}")
    usable, seen = [], []
    for key, rec in engines.items():
        if not isinstance(rec, Mapping):
            raise EngineMismatchError(f"engine record {key!r} in {where} is malformed; {rebuild}")
        seen.append(_describe_record(key, rec))
        try:
            same_cc = cc_str(rec["compute_capability"]) == want_cc
            same_trt = versions_compatible(str(rec["tensorrt"]), trt_version)
        except (KeyError, ValueError, TypeError):
            continue
        if same_cc and same_trt and (precision is None or rec.get("precision") == precision):
            usable.append((key, rec))
    if not usable:
        raise EngineMismatchError(f"the TensorRT engines in {where} were built for {', '.join(seen)}; {here}. "
                                  f"Engines run only on the GPU architecture and TensorRT version that built them: {rebuild}")
    usable.sort(key=lambda kr: PRECISIONS.index(kr[1].get("precision", "fp32")) if kr[1].get("precision") in PRECISIONS else 9)
    key, rec = usable[0]
    missing = sorted(set(graphs) - set(rec.get("graphs", {})))
    if missing:
        raise EngineMismatchError(f"engine set {key} in {where} lacks the graphs {missing}; {rebuild}")
    if batch is not None and {k: int(v) for k, v in rec.get("batch", {}).items()} != {k: int(v) for k, v in batch.items()}:
        raise EngineMismatchError(f"engine set {key} in {where} was built for batch range {rec.get('batch')}, the "
                                  f"artifact's is {dict(batch)} (re-exported since?); {rebuild}")
    return key, dict(rec)
