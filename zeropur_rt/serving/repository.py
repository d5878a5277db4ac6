"""A Triton model repository from an artifact directory (``zeropur-rt triton-repo``).

    REPO/
      zeropur/config.pbtxt  zeropur/1/model.py  zeropur/artifact/...   purification, dynamic batching
      zeropur_classify/...                                            optional: the victim alone
      zeropur_continuous/...                                          optional: continuous batching (decoupled)

Every model is the same ``model.py`` (``zeropur_rt/serving/triton_model.py``), told what to do by its
config parameters; they share the one copy of the artifact. The repository is self-contained: mount it
into NVIDIA's tritonserver container as it is (see docs/serving.md).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from zeropur_rt.errors import ConfigError
from zeropur_rt.files import default_mode
from zeropur_rt.manifest import MANIFEST, load_manifest

TEMPLATE = Path(__file__).with_name("triton_model.py")


@dataclass
class RepoOptions:
    name: str = "zeropur"
    backend: str = "onnxruntime"  # onnxruntime (CPU instances) or tensorrt (one instance per GPU)
    device: str | None = None
    instances: int | None = None  # CPU instances (default: one per core); GPU: instances per GPU (default 1)
    threads: int | None = None  # CPU threads per instance (default: cores / instances)
    max_queue_delay_us: int = 2000
    preferred: Sequence[int] | None = None  # preferred batch sizes (default: the manifest's opt and max)
    dynamic_batching: bool = True
    classify_model: bool = False
    continuous_model: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def _gpu(o: RepoOptions) -> bool:
    return o.backend == "tensorrt" or (o.device or "cpu").startswith("cuda")


def model_config(name: str, o: RepoOptions, manifest: Any, mode: str, continuous: bool) -> str:
    """config.pbtxt of one model (protobuf text format)."""
    c, h, w = manifest.input_shape
    k, max_batch = manifest.num_classes, int(manifest.batch["max"])
    cpus = os.cpu_count() or 1
    if _gpu(o):
        count, kind, threads = o.instances or 1, "KIND_GPU", o.threads or 0
    elif continuous:  # one scheduler owns the cores: more instances would split its batch
        count, kind, threads = 1, "KIND_CPU", o.threads or cpus
    else:
        count = o.instances or cpus
        count, kind, threads = count, "KIND_CPU", o.threads or max(1, cpus // count)
    outputs = [("LOGITS", "TYPE_FP32", [k]), ("LABEL", "TYPE_INT64", [1])]
    if mode == "purify":
        outputs.insert(0, ("PURIFIED", "TYPE_FP32", [c, h, w]))
    params = {"mode": mode, "continuous": "1" if continuous else "0", "artifact": f"../{o.name}/artifact",
              "backend": o.backend, "device": o.device or "", "threads": str(threads),
              "overrides": json.dumps(o.overrides)}
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}", "input ["]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] optional: true }}'
                            for n, t, d in (("IMAGE", "TYPE_FP32", [c, h, w]), ("IMAGE_U8", "TYPE_UINT8", [h, w, c]))))
    lines += ["]", "output ["]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] }}'
                            for n, t, d in outputs))
    lines.append("]")
    if continuous:
        lines.append("model_transaction_policy { decoupled: true }")
    elif o.dynamic_batching:
        pref = sorted({int(b) for b in (o.preferred or (manifest.batch.get("opt", max_batch), max_batch))})
        if any(not 1 <= b <= max_batch for b in pref):
            raise ConfigError(f"preferred batch sizes {pref} must lie in [1, {max_batch}] (the artifact's max batch)")
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, pref))} ] "
                     f"max_queue_delay_microseconds: {int(o.max_queue_delay_us)} }}")
    lines.append(f"instance_group [ {{ count: {count} kind: {kind} }} ]")
    lines.append("parameters [")
    lines.append(",\n".join(f'  {{ key: "{key}" value: {{ string_value: {json.dumps(v)} }} }}' for key, v in params.items()))
    lines.append("]")
    return "\n".join(lines) + "\n"


def write_repository(artifact_dir: str | os.PathLike, out: str | os.PathLike, options: RepoOptions | None = None,
                     force: bool = False) -> Path:
    """Write the repository to ``out`` atomically (a temp directory beside it, renamed into place)."""
    o = options or RepoOptions()
    src, out = Path(artifact_dir), Path(out)
    manifest = load_manifest(src)  # verifies every hash before anything is copied
    if o.max_queue_delay_us < 0:
        raise ConfigError(f"--max-queue-delay-us must be >= 0, got {o.max_queue_delay_us}")
    if o.instances is not None and o.instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {o.instances}")
    if o.backend not in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"backend {o.backend!r}: choose onnxruntime or tensorrt")
    if o.continuous_model and _gpu(o) and o.backend == "tensorrt":
        raise ConfigError("the continuous model gathers slots on the host: use --backend onnxruntime with it")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    models = [(o.name, "purify", False)]
    if o.classify_model:
        models.append((f"{o.name}_classify", "classify", False))
    if o.continuous_model:
        models.append((f"{o.name}_continuous", "purify", True))
    configs = {name: model_config(name, o, manifest, mode, cont) for name, mode, cont in models}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        art = tmp / o.name / "artifact"
        for rel in [MANIFEST, *manifest.files]:
            (art / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, art / rel)
        for name, text in configs.items():
            (tmp / name / "1").mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.pbtxt").write_text(text)
            shutil.copyfile(TEMPLATE, tmp / name / "1" / "model.py")
        load_manifest(art)  # the copy verifies too
        for d, _, _ in os.walk(tmp):
            os.chmod(d, default_mode(directory=True))
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "repo")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
