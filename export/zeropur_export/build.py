"""Export-once helper for jobs that need an artifact directory of a zoo model (demo, bench, eval)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from zeropur_export.onnx_export import export_artifacts
from zeropur_export.weights import find_weights
from zeropur_export.zoo import ZOO, load_victim
from zeropur_rt.config import ZeroPurConfig, preset
from zeropur_rt.files import sha256_file
from zeropur_rt.manifest import MANIFEST, load_manifest


def ensure_artifacts(model: str, out_dir: str | Path, cfg: ZeroPurConfig | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """``out_dir`` if it already holds a valid artifact directory, else export ``model`` (real weights) into it.

    An existing but invalid directory is an error (never silently overwritten).
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).is_file():
        m = load_manifest(out_dir)
        if cfg is not None and m.config != cfg.to_dict():
            raise ValueError(f"{out_dir} was exported with another config; remove it or pick another --artifacts dir")
        return out_dir
    if model not in ZOO:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(ZOO))}")
    weights = find_weights(model)
    cfg = cfg or preset(ZOO[model][2])
    log(f"exporting {model} to {out_dir} (once) ...")
    return export_artifacts(load_victim(model, weights=str(weights)), cfg, out_dir, model=model,
                            weights_sha256=sha256_file(weights), log=log)
