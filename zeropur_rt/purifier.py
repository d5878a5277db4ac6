"""Purifier: the ZeroPur loop over exported graphs, with our kernels for the blur and the update steps.

    pur = Purifier.load("artifacts/resnet20", backend="onnxruntime")
    x_pure = pur.purify(x)              # NCHW float32 in [0, 1]
    x_pure, pred = pur.purify_and_classify(x)

The loop is the reference's, stage for stage: blur -> gs_grad -> gs_update (x gs_steps),
ap_setup once, ap_grad -> ap_update (x ap_steps). Graph outputs are raw gradients; the L1
normalisation, momentum, sign steps and clips are the kernels' (host library via ctypes,
numpy twin as fallback).
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zeropur_rt.backends import Runner, make_runner
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.manifest import Manifest, load_manifest
from zeropur_rt.validate import check_images

# Fields baked into the exported ap_grad graph: changing them needs a re-export.
BAKED_FIELDS = ("ila_weight", "lpips_weight", "ila_normalized", "ila_norm_eps")
STAGES = ("blur", "gs_engine", "gs_update", "ap_setup", "ap_engine", "ap_update", "classify")


@dataclass
class StageTimes:
    """Seconds spent per stage over one call (wall clock, host side)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.seconds[stage] += t - t0
        return t

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _load_kernels(kind: str) -> Any:
    if kind == "numpy":
        from zeropur_rt.kernels import numpy_twin
        return numpy_twin
    if kind in ("auto", "host"):
        from zeropur_rt.kernels.host import HostKernels, load_host_kernels
        k = load_host_kernels()
        if kind == "host" and not isinstance(k, HostKernels):
            raise ValueError("kernels='host' asked for the native host library, which was not found or not loadable "
                             "(see the warning above); build it with `pip install -e .` or use kernels='auto'")
        return k
    raise ValueError(f"unknown kernels {kind!r}; choose auto, host or numpy")


class Purifier:
    def __init__(self, manifest: Manifest, runner: Runner, kernels: Any, cfg: ZeroPurConfig):
        self.manifest, self.runner, self.kernels, self.cfg = manifest, runner, kernels, cfg
        self.chw = tuple(manifest.input_shape)
        self.max_batch = int(manifest.batch["max"])
        if cfg.ap_steps > 0 and "ap_grad" not in manifest.graphs:
            raise ValueError(f"artifact for {manifest.model} has no AP graphs (Guided Shift only): use ap_steps=0")
        from zeropur_rt.blur import box_blur_weights
        self.blur_weights = box_blur_weights(cfg.blur_sigma)

    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
             kernels: str = "auto", threads: int | None = None, overrides: dict[str, Any] | None = None,
             **backend_kwargs: Any) -> "Purifier":
        """Verify the artifact directory (manifest + every file hash), then build the backend.

        ``overrides`` changes loop parameters (steps, eps, step sizes, sigma) without re-export;
        the loss weights baked into the graphs cannot be overridden.
        """
        d = Path(artifact_dir)
        manifest = load_manifest(d)
        cfg = manifest.zeropur_config
        if overrides:
            baked = sorted(set(overrides) & set(BAKED_FIELDS))
            if baked and any(overrides[k] != getattr(cfg, k) for k in baked):
                raise ValueError(f"{baked} are baked into the exported graphs; re-export with the new values")
            if "eps" in overrides and "ap_step" not in overrides:  # AP's step stays the recipe's fraction of eps
                overrides = {**overrides, "ap_step": cfg.ap_step * overrides["eps"] / cfg.eps}
            cfg = cfg.replace(**overrides)
        runner = make_runner(backend, d, manifest, device, threads, **backend_kwargs)
        return cls(manifest, runner, _load_kernels(kernels), cfg)

    # ------------------------------------------------------------------ input handling
    def prepare(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """A validated, contiguous float32 NCHW copy of the input."""
        if uint8_nhwc:
            arr = np.asarray(x)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != self.chw[0]:
                raise ValueError(f"uint8_nhwc=True needs uint8 (N, H, W, {self.chw[0]}) images, got {arr.dtype} {arr.shape}")
            x = arr.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        elif not isinstance(x, np.ndarray):
            x = _to_numpy(x)
        check_images(x, self.chw, self.max_batch)
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------------ the loop
    def purify(self, x: Any, uint8_nhwc: bool = False, timings: bool = False) -> np.ndarray | tuple[np.ndarray, StageTimes]:
        x_in = self.prepare(x, uint8_nhwc)
        st = StageTimes()
        out = self._purify(x_in, st)
        return (out, st) if timings else out

    def _purify(self, x_in: np.ndarray, st: StageTimes) -> np.ndarray:
        cfg, k, run = self.cfg, self.kernels, self.runner.run
        x = x_in.copy()
        m = np.zeros_like(x_in)
        t = time.perf_counter()
        for _ in range(cfg.gs_steps):
            xb = k.blur(x, self.blur_weights)
            t = st.add("blur", t)
            grad = run("gs_grad", {"x": x, "x_blur": xb})[0]
            t = st.add("gs_engine", t)
            k.gs_update(x, grad, m, x_in, eps=cfg.eps, step=cfg.gs_step, decay=cfg.momentum, l1_scope=cfg.l1_scope)
            t = st.add("gs_update", t)
        if cfg.ap_steps == 0:
            return x
        consts = run("ap_setup", {"x_in": x_in, "coarse": x})
        feeds = {name: c for name, c in zip(self.manifest.graphs["ap_setup"]["outputs"], consts)}
        t = st.add("ap_setup", t)
        fine = x_in.copy()
        for _ in range(cfg.ap_steps):
            feeds["fine"] = fine
            grad = run("ap_grad", feeds)[0]
            t = st.add("ap_engine", t)
            k.ap_update(fine, grad, x_in, eps=cfg.eps, step=cfg.ap_step)
            t = st.add("ap_update", t)
        return fine

    def classify(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """Predicted classes of the (unpurified) images."""
        return self.logits(self.prepare(x, uint8_nhwc)).argmax(1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.runner.run("classifier", {"x": x})[0]

    def purify_and_classify(self, x: Any, uint8_nhwc: bool = False, timings: bool = False):
        """(purified images, predicted classes[, StageTimes])."""
        x_in = self.prepare(x, uint8_nhwc)
        st = StageTimes()
        out = self._purify(x_in, st)
        t = time.perf_counter()
        pred = self.logits(out).argmax(1)
        st.add("classify", t)
        return (out, pred, st) if timings else (out, pred)


def _to_numpy(x: Any) -> np.ndarray:
    """Torch tensors and DLPack producers on the CPU, without a copy where possible."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.device.type != "cpu":
            raise ValueError(f"this purifier runs on the host; got a tensor on {x.device}: "
                             "load it with a GPU backend or call .cpu() first")
        return x.detach().numpy()
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    return np.asarray(x)
