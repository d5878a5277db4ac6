"""The artifact directories the build-time jobs (demo, bench, eval, calibrate) share: a recipe exported once, a
purifier on any backend, a user's victim and data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from zeropur_export.recipes import build_config, recipe_config
from zeropur_rt.config import ZeroPurConfig, preset
from zeropur_rt.files import sha256_file
from zeropur_rt.manifest import MANIFEST, load_manifest


def recipe_artifacts(model: str, recipe: str, artifacts: str | Path | None = None,
                     log: Callable[[str], None] = print) -> tuple[str, Path]:
    """(recipe name, artifact directory) of ``model`` with ``recipe``: ``artifacts`` or artifacts/<model>-<recipe>,
    exported if missing. A directory exported with another config is refused, so the name printed is what runs."""
    name, cfg, calibration = recipe_config(model, recipe)
    out = Path(artifacts or f"artifacts/{model}-{name}")
    return name, ensure_artifacts(model, out, cfg, log=log, calibration=calibration)


def ensure_artifacts(model: str, out_dir: str | Path, cfg: ZeroPurConfig | None = None,
                     log: Callable[[str], None] = print, calibration: dict[str, Any] | None = None) -> Path:
    """``out_dir`` if it already holds a valid artifact directory, else export ``model`` (real weights) into it.

    An existing but invalid directory is an error (never silently overwritten); so is one exported with
    a config other than ``cfg`` (when given). One that an exporter of another graph revision wrote is used,
    and ``log`` says so: it computes the same, but timings of it are not this exporter's graphs'.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).is_file():
        m = load_manifest(out_dir)
        if m.model != model:
            raise ValueError(f"{out_dir} holds {m.model}, not {model}; remove it or pick another --artifacts dir")
        if cfg is not None and m.zeropur_config != cfg:  # dataclasses: a field added since export takes its default
            raise ValueError(f"{out_dir} was exported with another config; remove it or pick another --artifacts dir")
        from zeropur_export.graphs.onnx_export import GRAPH_REVISION
        # before revisions were recorded, revision 2 came with BatchNorm folding (tools.bn_folded)
        rev = m.tools.get("graph_revision") or ("2" if "bn_folded" in m.tools else "1")
        if rev != str(GRAPH_REVISION):
            log(f"note: {out_dir} holds graphs of revision {rev}, this exporter writes revision {GRAPH_REVISION}: "
                "they compute the same, without the newer graph optimisations (revision 2: BatchNorm folded into "
                "the convolutions); remove the directory to export it again")
        return out_dir
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_export.victims.weights import find_weights
    from zeropur_export.victims.zoo import ZOO, load_victim
    if model not in ZOO:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(ZOO))}")
    weights = find_weights(model)
    cfg = cfg or preset(ZOO[model][2])
    log(f"exporting {model} to {out_dir} (once) ...")
    return export_artifacts(load_victim(model, weights=str(weights)), cfg, out_dir, model=model,
                            weights_sha256=sha256_file(weights), calibration=calibration, log=log)


def load_backend(artifact_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
                 threads: int | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """A ``zeropur_rt.Purifier`` over an artifact directory on a runtime backend, or on ``torch`` (the reference's
    gradients behind the same loop). Overrides of the loss weights baked into the graphs are refused."""
    if backend == "torch":
        from zeropur_export.reference.torch_runner import load_purifier
        return load_purifier(artifact_dir, device or "cpu", overrides=overrides, threads=threads)
    from zeropur_rt.pipeline import Purifier
    return Purifier.load(artifact_dir, backend, device, threads=threads, overrides=overrides)


def victim_data(path: str | Path, victim: Any, resize: str = "crop", labels: bool = True) -> tuple[Any, dict[str, Any]]:
    """A user's image set at ``victim``'s input shape (a ``zeropur_rt.datasets.ImageSet``) and how it was split.

    Labelled rows are dealt out class by class (``stratified_order``), so every slice and prefix is about
    class-balanced; the first half of that order is the evaluation slice, the second the calibration slice."""
    from zeropur_rt.datasets import read_dataset, stratified_order
    ds = read_dataset(path, victim.spec.input_shape, resize=resize, labels=labels, num_classes=victim.spec.num_classes)
    if ds.y is not None:
        ds = ds.take(stratified_order(ds.y))
    split = dict(order="class-interleaved (zeropur_rt.datasets.stratified_order)" if ds.y is not None else "file order",
                 n_data=len(ds), eval_rows=[0, len(ds) // 2], classes=ds.classes, resize=resize)
    return ds, split


def victim_artifacts(rv: Any, out_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The artifact directory of a resolved ``--victim`` (``victims.flags.ResolvedVictim``): ``out_dir`` (default
    artifacts/<name>-paper) if it holds this victim, else exported there with the paper recipe at its resolution.
    A directory that holds another model or other weights is refused, never overwritten."""
    from zeropur_export.victims.flags import preset_name
    out = Path(out_dir or f"artifacts/{rv.name}-paper")
    if (out / MANIFEST).is_file():
        m = load_manifest(out)
        if m.model != rv.name or (rv.weights_sha256 and m.weights_sha256 != rv.weights_sha256):
            raise ValueError(f"{out} holds {m.model} (weights {str(m.weights_sha256)[:12]}), not {rv.name} (weights "
                             f"{str(rv.weights_sha256)[:12]}); remove it or pick another --artifacts dir")
        return out
    from zeropur_export.graphs.onnx_export import export_artifacts
    cfg, _ = build_config(preset_name(rv), input_shape=rv.victim.spec.input_shape)
    log(f"exporting {rv.name} to {out} (once) ...")
    return export_artifacts(rv.victim, cfg, out, model=rv.name, weights_sha256=rv.weights_sha256,
                            taps_source=rv.taps_source, log=log)
