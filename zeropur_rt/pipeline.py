"""Purifier: the pipeline that joins a runner, a kernel set and the schedule.

    pur = Purifier.load("artifacts/resnet20")                          # ONNX Runtime on the CPU, host kernels
    pur = Purifier.load("artifacts/resnet20", backend="tensorrt")      # TensorRT engines, CUDA kernels, CUDA graph
    x_pure, pred = pur.purify_and_classify(x)                          # NCHW float32 in [0, 1]
    res = pur.run(x, classify=True, timings=True)                      # a Purification: images, logits, times, ...

Every backend runs the same loop (``zeropur_rt.schedule``), on the buffers of each batch size
(``zeropur_rt.batch_loops``: host runners eagerly on numpy buffers; device runners with every tensor on the
GPU, each batch size's loop captured into a CUDA graph and replayed). On the CPU a batch is split across
``workers`` one-thread sessions run side by side (``zeropur_rt.workers``).
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import zeropur_rt.schedule as schedule
from zeropur_rt.batch_loops import BatchLoops, Purification
from zeropur_rt.config import ZeroPurConfig, apply_overrides
from zeropur_rt.errors import ConfigError, InputError, ZeroPurError
from zeropur_rt.kernels.sets import CudaKernelSet, host_kernels
from zeropur_rt.manifest import Manifest, load_manifest
from zeropur_rt.runners.base import Runner, call_graph
from zeropur_rt.schedule import KernelSet
from zeropur_rt.validate import check_batch, check_images
from zeropur_rt.workers import Workers, check_single_image, resolve_workers


def make_kernels(kind: str, runner: Runner) -> KernelSet:
    """The kernel set for a runner's buffers: host kernels for host runners; on a device, the CUDA kernels
    loaded in the runner's CUDA context and launched on its stream."""
    if not runner.on_device:
        return host_kernels(kind)
    if kind not in ("auto", "cuda"):
        raise ValueError(f"kernels={kind!r} run on the host; a device runner uses kernels='cuda' (or 'auto')")
    from zeropur_rt.kernels.cuda import CudaKernels
    with runner.device_context():
        return CudaKernelSet(CudaKernels(runner.ordinal), runner.stream_handle)


def _serialised(method: Any) -> Any:
    """Run ``method`` under the purifier's lock: one call at a time uses its buffers (see ``Purifier``)."""
    @functools.wraps(method)
    def locked(self: "Purifier", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.runner is None and method.__name__ != "close":
                raise ZeroPurError("this Purifier is closed: load a new one (Purifier.load)")
            return method(self, *args, **kwargs)
    return locked


class Purifier:
    """A runner, a kernel set and a config over one artifact's graphs.

    Thread safety: a Purifier may be shared between threads. Its calls are serialised by one lock per
    Purifier (the loop reuses one set of buffers per batch size, and a device runner has one stream), so
    every caller gets exactly the result a serial call would give; concurrent callers wait for each other.
    Input validation runs outside the lock. For parallel throughput load one Purifier per thread (each
    with ``threads=`` set so that they do not oversubscribe the cores).

    Workers (host runners on the CPU, ``Purifier.load(..., workers=)``): a batch of at least two images is
    split across one-thread sessions run side by side, and a single image runs on the session
    ``single_image`` says; ``single_image_probe`` holds what choosing it measured (``zeropur_rt.workers``).
    """

    def __init__(self, runner: Runner, kernels: KernelSet, cfg: ZeroPurConfig, *, input_shape: tuple[int, int, int],
                 batch: Mapping[str, int], has_ap: bool, manifest: Manifest | None = None, cuda_graph: bool = True,
                 max_cached_batches: int = 4, seed: int | None = None):
        if cfg.ap_steps > 0 and not has_ap:
            raise ConfigError("this victim has no Adaptive Projection graphs (Guided Shift only): use ap_steps=0")
        self.runner, self.kernels, self.cfg, self.manifest = runner, kernels, cfg, manifest
        self.chw = tuple(int(v) for v in input_shape)
        self.batch = {k: int(v) for k, v in batch.items()}
        self.max_batch = self.batch["max"]
        self.has_ap = has_ap
        self.loops = BatchLoops(runner, kernels, cfg, self.chw, has_ap, cuda_graph=cuda_graph,
                                max_cached=max_cached_batches)
        self.reseed(seed)  # a randomised config's draws, fresh per call (see schedule.draw)
        self._lock = threading.Lock()
        self._workers: Workers | None = None  # set by load

    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, backend: str = "onnxruntime", device: str | None = None,
             kernels: str = "auto", threads: int | None = None, overrides: dict[str, Any] | None = None,
             cuda_graph: bool = True, seed: int | None = None, workers: int | None = None,
             single_image: str = "auto", **runner_kwargs: Any) -> "Purifier":
        """Verify the artifact directory (manifest + every file hash), then build the runner and kernels.

        ``device``: "cpu" (default for onnxruntime) or "cuda[:N]" (default for tensorrt). ``overrides``
        changes loop parameters (steps, eps, step sizes, sigma) without re-export; the loss weights baked
        into the graphs are refused. ``seed`` seeds a randomised config's draws (``random_start``,
        ``blur_sigma_jitter``); a deterministic config draws nothing. ``workers`` (CPU only; default
        ``threads``): one-thread sessions a batch is split across (see the class); 1 runs every batch on
        one ``threads``-thread session. ``single_image`` (with workers): "auto" (measured once), "own" (the
        ``threads``-thread session) or "worker" (a one-thread worker's).
        """
        from zeropur_rt.runners import load_runner
        d = Path(artifact_dir)
        manifest = load_manifest(d)
        device = device or ("cuda" if backend == "tensorrt" else "cpu")
        n_workers = resolve_workers(workers, threads, device)
        check_single_image(single_image, n_workers)
        runner = load_runner(backend, d, manifest, device, threads, **runner_kwargs)
        try:
            pur = cls.from_manifest(manifest, runner, kernels, overrides, cuda_graph, seed)
        except BaseException:
            runner.close()
            raise
        if n_workers < 2:
            return pur
        per_worker = max(1, (threads or n_workers) // n_workers)
        built: list[BatchLoops] = []
        try:
            for _ in range(n_workers):  # the workers draw nothing: their draws are the purifier's, split
                runner = load_runner(backend, d, manifest, device, per_worker, **runner_kwargs)
                try:
                    built.append(BatchLoops(runner, make_kernels(kernels, runner), pur.cfg, pur.chw, pur.has_ap))
                except BaseException:
                    runner.close()
                    raise
        except BaseException:
            for w in built:
                w.close()
            pur.close()
            raise
        pur._workers = Workers(built, single_image)
        return pur

    @classmethod
    def from_manifest(cls, manifest: Manifest, runner: Runner, kernels: str = "auto",
                      overrides: dict[str, Any] | None = None, cuda_graph: bool = True,
                      seed: int | None = None) -> "Purifier":
        """A purifier over an artifact's graphs on any runner (the build-time torch runner included)."""
        cfg = apply_overrides(manifest.zeropur_config, overrides, baked=True)
        return cls(runner, make_kernels(kernels, runner), cfg, input_shape=manifest.input_shape, batch=manifest.batch,
                   has_ap="ap_grad" in manifest.graphs, manifest=manifest, cuda_graph=cuda_graph, seed=seed)

    # ------------------------------------------------------------------ input handling
    def prepare(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """A validated, contiguous float32 NCHW copy of the input."""
        if uint8_nhwc:
            arr = _to_numpy(x)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != self.chw[0]:
                raise InputError(f"uint8_nhwc=True needs uint8 (N, H, W, {self.chw[0]}) images, got {arr.dtype} {arr.shape}")
            x = arr.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        else:  # a plain ndarray: a masked array's hidden values must not pass unchecked
            x = np.asarray(x) if isinstance(x, np.ndarray) else _to_numpy(x)
        check_images(x, self.chw, self.max_batch)
        check_batch(len(x), self.batch, "this artifact")
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------------ the loop
    def draw(self, shape: tuple[int, ...]) -> schedule.Draw | None:
        """The next purification's draws for images of ``shape`` (None for a deterministic config)."""
        return schedule.draw(self.cfg, shape, self.rng)

    def reseed(self, seed: int | None) -> None:
        """Restart the draws from ``seed``: a run that reseeds per chunk draws the same after a resume."""
        self.rng = np.random.default_rng(seed)

    @property
    def workers(self) -> int:
        """The sessions a batch is split across (1: no workers, every batch on this purifier's own)."""
        return len(self._workers) if self._workers else 1

    @property
    def single_image(self) -> str:
        """Where a single image runs: "own", "worker", or "auto" until the first single-image call measures it."""
        return self._workers.single_image if self._workers else "own"

    @property
    def single_image_probe(self) -> dict[str, Any] | None:
        """What the "auto" choice of ``single_image`` measured (None until it ran)."""
        return self._workers.probe if self._workers else None

    def run(self, x: Any, *, uint8_nhwc: bool = False, classify: bool = False, timings: bool = False,
            iterates: bool = False) -> Purification:
        """Purify ``x`` and return the images with what was asked for: their logits (``classify``), the
        StageTimes (``timings``) and every GS / AP iterate (``iterates``); the others stay None."""
        return self._run(self.prepare(x, uint8_nhwc), classify=classify, timings=timings, iterates=iterates)

    @_serialised
    def _run(self, x_in: np.ndarray, **asked: bool) -> Purification:
        drawn = self.draw(x_in.shape)
        if self._workers:
            return self._workers.run(self.loops, x_in, drawn, **asked)
        return self.loops.run(x_in, drawn, **asked)

    def purify(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """The purified images (float32 NCHW, host)."""
        return self.run(x, uint8_nhwc=uint8_nhwc).images

    def purify_and_classify(self, x: Any, uint8_nhwc: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(purified images, their predicted classes)."""
        res = self.run(x, uint8_nhwc=uint8_nhwc, classify=True)
        return res.images, res.labels

    @_serialised
    def project(self, x: Any, coarse: Any) -> np.ndarray:
        """Adaptive Projection alone, from ``x`` along a given Guided Shift result ``coarse`` (eager)."""
        x_in, c = self.prepare(x), self.prepare(coarse)
        if x_in.shape != c.shape:
            raise ValueError(f"coarse images {c.shape} do not match the inputs {x_in.shape}")
        if self.cfg.ap_steps == 0:
            return c
        b = self.loops.buffers(len(x_in))
        self.runner.upload(b.x_in, x_in)
        self.runner.upload(b.x, c)
        schedule.adaptive_projection(self.runner, self.kernels, b, self.cfg,
                                     drawn=self.draw(x_in.shape))
        return self.runner.download(b.fine)

    def logits(self, x: Any) -> np.ndarray:
        """The victim's logits of the (unpurified) images."""
        return self._logits(self.prepare(x))

    @_serialised
    def _logits(self, x_in: np.ndarray) -> np.ndarray:
        b = self.loops.buffers(len(x_in))
        self.runner.upload(b.x_in, x_in)
        schedule.classify(self.runner, b, b.x_in)
        return self.runner.download(b.logits)

    def classify(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """Predicted classes of the (unpurified) images."""
        return self._logits(self.prepare(x, uint8_nhwc)).argmax(1)

    @_serialised
    def run_graph(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of one exported graph on host arrays, outside the loop (parity checks feed it the
        reference's iterates)."""
        return call_graph(self.runner, graph, feeds)

    def graph_captured(self, n: int) -> bool:
        """Whether the loop of batch size ``n`` replays a captured CUDA graph."""
        return self.loops.captured(n)

    @_serialised
    def close(self) -> None:
        """Free every buffer, captured graph, kernel module and the runner (idempotent)."""
        if self.runner is None:
            return
        try:
            if self._workers is not None:
                self._workers.close()
        finally:
            self.loops.close()
            self.runner = None

    def __enter__(self) -> "Purifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _to_numpy(x: Any) -> np.ndarray:
    """Torch tensors and DLPack producers on the CPU, without a copy where possible."""
    if type(x).__module__.startswith("torch"):
        if x.device.type != "cpu":
            raise ValueError(f"images on {x.device}: pass host images (x.cpu()); the purifier uploads them itself")
        return x.detach().numpy()
    try:
        return np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(x)
    except (ValueError, TypeError, RuntimeError, BufferError) as e:  # ragged lists, foreign objects
        raise InputError(f"images must be an array (NCHW float32 in [0, 1]); {type(x).__name__} is not one: {e}") from None
