"""Purifier: the pipeline that joins a runner, a kernel set and the schedule.

    pur = Purifier.load("artifacts/resnet20")                          # ONNX Runtime on the CPU, host kernels
    pur = Purifier.load("artifacts/resnet20", backend="tensorrt")      # TensorRT engines, CUDA kernels, CUDA graph
    x_pure, pred = pur.purify_and_classify(x)                          # NCHW float32 in [0, 1]

Every backend runs the same loop (``zeropur_rt.schedule``). Host runners run it eagerly on numpy
buffers; on the CPU a batch is split across ``workers`` one-thread sessions run side by side (a core
each: on a 2-core CPU 1.4-1.5x the throughput of one session on two intra-op threads, whose small
kernels wait on each other), and a single image runs on whichever session was measured faster. Device
runners keep every tensor on the GPU: the input is uploaded once, the result and the logits downloaded
once, and the loop of each batch size is captured into a CUDA graph after its first (eager) run and
replayed from then on. Timings and iterates need the eager loop, so they never replay.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import zeropur_rt.schedule as schedule
from zeropur_rt.config import ZeroPurConfig, apply_overrides
from zeropur_rt.engine_record import check_batch
from zeropur_rt.errors import ConfigError, InputError, ZeroPurError
from zeropur_rt.manifest import Manifest, graph_io, load_manifest
from zeropur_rt.schedule import LoopBuffers, StageTimes
from zeropur_rt.validate import check_images

SINGLE_IMAGE = ("auto", "own", "worker")


@dataclass
class Iterates:
    """One purification's iterates (host copies): ``gs_x[t]`` / ``ap_x[t]`` is the input of GS / AP step t."""

    gs_x: list[np.ndarray] = field(default_factory=list)
    coarse: np.ndarray | None = None
    ap_x: list[np.ndarray] = field(default_factory=list)


@dataclass
class _BatchState:
    bufs: LoopBuffers
    replay: Any = None  # the captured loop, once there is one
    result: Any = None  # the buffer the captured loop leaves its result in
    capture_failed: bool = False


def make_kernels(kind: str, runner: Any) -> Any:
    """The kernel set for a runner's buffers: host kernels for host runners, CUDA kernels on a device."""
    if not getattr(runner, "on_device", False):
        from zeropur_rt.kernels.sets import host_kernels
        return host_kernels(kind)
    if kind not in ("auto", "cuda"):
        raise ValueError(f"kernels={kind!r} run on the host; a device runner uses kernels='cuda' (or 'auto')")
    return runner.cuda_kernels()


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
    split into contiguous shards, one per worker, each purified by a purifier of its own on a one-thread
    session, side by side. Every image comes out with the bytes a one-thread session gives the unsplit
    batch (ONNX Runtime computes each image alone; tested), a randomised config's draws included: drawn
    for the whole batch, then split.

    A single image runs on one session: this purifier's ``threads``-thread one or the first worker's
    one-thread one (``single_image``). Splitting one small image's kernels across threads can cost more
    than it saves: ResNet-20's ~230 kernels per gradient call last ~9 us each at batch 1, about what
    waking a sleeping thread takes (spinning is off). So by default ("auto") the first single-image
    call times one gradient call on each session and keeps the faster, if both gave the same bytes (the
    one-thread session otherwise); ``single_image_probe`` holds what it measured.
    """

    def __init__(self, runner: Any, kernels: Any, cfg: ZeroPurConfig, *, input_shape: tuple[int, int, int],
                 batch: Mapping[str, int], has_ap: bool, manifest: Manifest | None = None, cuda_graph: bool = True,
                 max_cached_batches: int = 4, seed: int | None = None):
        if cfg.ap_steps > 0 and not has_ap:
            raise ConfigError("this victim has no Adaptive Projection graphs (Guided Shift only): use ap_steps=0")
        self.runner, self.kernels, self.cfg, self.manifest = runner, kernels, cfg, manifest
        self.chw = tuple(int(v) for v in input_shape)
        self.batch = {k: int(v) for k, v in batch.items()}
        self.max_batch = self.batch["max"]
        self.has_ap = has_ap
        self.cuda_graph = bool(cuda_graph) and getattr(runner, "on_device", False)
        self.max_cached_batches = max(1, int(max_cached_batches))
        self.reseed(seed)  # a randomised config's draws, fresh per call (see schedule.draw)
        self._states: OrderedDict[int, _BatchState] = OrderedDict()
        self._lock = threading.Lock()
        self._shards: list[Purifier] = []
        self._pool: ThreadPoolExecutor | None = None
        self._single_image = "own"  # "auto" until measured, then "own" or "worker"; set by load
        self.single_image_probe: dict[str, Any] | None = None

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
        n_workers = _resolve_workers(workers, threads, device)
        if single_image not in SINGLE_IMAGE:
            raise ConfigError(f"single_image must be one of {', '.join(SINGLE_IMAGE)}, got {single_image!r}")
        if single_image == "worker" and n_workers < 2:
            raise ConfigError("single_image='worker' runs a single image on a one-thread worker: it needs workers >= 2")
        per_worker = max(1, (threads or n_workers) // n_workers)
        plan = [(threads, seed)] + ([(per_worker, None)] * n_workers if n_workers > 1 else [])
        built: list[Purifier] = []
        try:
            for threads_i, seed_i in plan:  # the first is this purifier, the rest its workers (which draw nothing)
                runner = load_runner(backend, d, manifest, device, threads_i, **runner_kwargs)
                try:
                    built.append(cls.from_manifest(manifest, runner, kernels, overrides, cuda_graph, seed_i))
                except BaseException:
                    runner.close()
                    raise
        except BaseException:
            for p in built:
                p.close()
            raise
        built[0]._shards = built[1:]
        built[0]._single_image = single_image if n_workers > 1 else "own"
        return built[0]

    @classmethod
    def from_manifest(cls, manifest: Manifest, runner: Any, kernels: str = "auto",
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

    def _state(self, n: int) -> _BatchState:
        st = self._states.get(n)
        if st is not None:
            self._states.move_to_end(n)
            return st
        while len(self._states) >= self.max_cached_batches:
            self._release(self._states.popitem(last=False)[1])
        st = self._states[n] = _BatchState(schedule.allocate(self.runner, n, self.chw, self.has_ap))
        return st

    def _release(self, st: _BatchState) -> None:
        if st.replay is not None:
            st.replay.close()
        self.runner.release([b for _, b in st.bufs.items()], st.bufs.n)

    # ------------------------------------------------------------------ the loop
    def draw(self, shape: tuple[int, ...]) -> schedule.Draw | None:
        """The next purification's draws for images of ``shape`` (None for a deterministic config)."""
        return schedule.draw(self.cfg, shape, self.rng)

    def reseed(self, seed: int | None) -> None:
        """Restart the draws from ``seed``: a run that reseeds per chunk draws the same after a resume."""
        self.rng = np.random.default_rng(seed)

    @property
    def workers(self) -> int:
        return max(1, len(self._shards))

    @_serialised
    def _loop(self, x_in: np.ndarray, classify: bool, timings: bool, iterates: bool
              ) -> tuple[np.ndarray, np.ndarray | None, StageTimes | None, Iterates | None]:
        drawn = self.draw(x_in.shape)
        k = min(len(self._shards), len(x_in))
        if k < 2:
            return self._single_image_session(x_in)._run(x_in, classify, timings, iterates, drawn)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self._shards), thread_name_prefix="zeropur-worker")
        cuts = np.linspace(0, len(x_in), k + 1).round().astype(int)
        parts = [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        done = [self._pool.submit(w._run, x_in[p], classify, timings, iterates, drawn and drawn.rows(p))
                for w, p in zip(self._shards, parts)]
        wait(done)  # every worker idle again before this call returns or raises
        return _merge([f.result() for f in done])

    @property
    def single_image(self) -> str:
        """Where a single image runs: "own", "worker", or "auto" until the first single-image call measures it."""
        return self._single_image

    def _single_image_session(self, x_in: np.ndarray) -> "Purifier":
        """The purifier whose session purifies a batch that is not split (under this purifier's lock)."""
        if len(x_in) != 1 or not self._shards:
            return self
        if self._single_image == "auto":
            self.single_image_probe = _probe_single_image(self, self._shards[0], x_in)
            self._single_image = self.single_image_probe["chosen"]
        return self._shards[0] if self._single_image == "worker" else self

    def _run(self, x_in: np.ndarray, classify: bool, timings: bool, iterates: bool, drawn: schedule.Draw | None
             ) -> tuple[np.ndarray, np.ndarray | None, StageTimes | None, Iterates | None]:
        """The loop on this purifier's own runner (under its owner's lock: ``_loop``)."""
        r, k, cfg = self.runner, self.kernels, self.cfg
        st = self._state(len(x_in))
        b = st.bufs
        r.upload(b.x_in, x_in)
        clock = StageTimes(r.sync if r.on_device else None) if timings else schedule.NO_CLOCK
        trace = Iterates() if iterates else None

        def observe(stage: str, t: int, buf: Any) -> None:
            a = r.download(buf)
            if stage == "coarse":
                trace.coarse = a
            else:
                (trace.gs_x if stage == "gs" else trace.ap_x).append(a)
        eager = timings or iterates or not self.cuda_graph or st.capture_failed or drawn is not None
        if st.replay is not None and not eager:
            st.replay.launch()
            out = st.result
        else:
            out = schedule.purify(r, k, b, cfg, clock, observe if trace is not None else None, drawn)
        logits = None
        if classify:
            schedule.classify(r, b, out)
            clock.lap("classify")
            logits = r.download(b.logits)
        result = r.download(out)
        if st.replay is None and not eager:
            # the eager run was the warm-up TensorRT and cuDNN need before a capture
            st.replay, st.result = r.capture(lambda: schedule.purify(r, k, b, cfg)), out
            st.capture_failed = st.replay is None
        return result, logits, (clock if timings else None), trace

    def purify(self, x: Any, uint8_nhwc: bool = False, timings: bool = False, iterates: bool = False) -> Any:
        """Purified images (float32 NCHW, host), then the StageTimes and/or Iterates when asked for."""
        out, _, st, tr = self._loop(self.prepare(x, uint8_nhwc), False, timings, iterates)
        return _pack(out, timings and st, iterates and tr)

    def purify_and_classify(self, x: Any, uint8_nhwc: bool = False, timings: bool = False,
                            iterates: bool = False) -> Any:
        """(purified images, predicted classes[, StageTimes][, Iterates])."""
        out, logits, st, tr = self._loop(self.prepare(x, uint8_nhwc), True, timings, iterates)
        return _pack((out, logits.argmax(1)), timings and st, iterates and tr)

    @_serialised
    def project(self, x: Any, coarse: Any) -> np.ndarray:
        """Adaptive Projection alone, from ``x`` along a given Guided Shift result ``coarse`` (eager)."""
        x_in, c = self.prepare(x), self.prepare(coarse)
        if x_in.shape != c.shape:
            raise ValueError(f"coarse images {c.shape} do not match the inputs {x_in.shape}")
        if self.cfg.ap_steps == 0:
            return c
        b = self._state(len(x_in)).bufs
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
        b = self._state(len(x_in)).bufs
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
        return self._call_graph(graph, feeds)

    def _call_graph(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.runner
        n = len(next(iter(feeds.values())))
        ins = {k: r.alloc(np.shape(v), k) for k, v in feeds.items()}
        outs = {k: r.alloc(s, k) for k, s in r.output_shapes(graph, n).items()}
        try:
            for k, v in feeds.items():
                r.upload(ins[k], v)
            r.run(graph, ins, outs)
            return {k: r.download(b) for k, b in outs.items()}
        finally:
            r.release([*ins.values(), *outs.values()])

    def graph_captured(self, n: int) -> bool:
        st = self._states.get(n)
        return st is not None and st.replay is not None

    @_serialised
    def close(self) -> None:
        """Free every buffer, captured graph, kernel module and the runner (idempotent)."""
        if self.runner is None:
            return
        try:
            if self._pool is not None:
                self._pool.shutdown()
            for w in self._shards:
                w.close()
            self.runner.sync()
        finally:
            for st in self._states.values():
                self._release(st)
            self._states.clear()
            self.kernels.close()
            self.runner.close()
            self.runner = None

    def __enter__(self) -> "Purifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _probe_single_image(own: Purifier, worker: Purifier, x: np.ndarray, rounds: int = 3) -> dict[str, Any]:
    """Time the Guided Shift gradient on one image on both sessions (a warm-up call each, then the best of
    ``rounds`` interleaved calls) and choose the faster one, if both computed the same bytes; the one-thread
    worker otherwise (its bytes are the ones the workers' contract promises)."""
    feeds = {name: x for name in graph_io("gs_grad", 0)[0]}
    best = {"own": float("inf"), "worker": float("inf")}
    outs: dict[str, dict[str, np.ndarray]] = {}
    for i in range(rounds + 1):
        for key, p in (("own", own), ("worker", worker)):
            t = time.perf_counter()
            outs[key] = p._call_graph("gs_grad", feeds)
            if i:
                best[key] = min(best[key], time.perf_counter() - t)
    same = all(outs["own"][k].tobytes() == outs["worker"][k].tobytes() for k in outs["own"])
    chosen = "own" if same and best["own"] < best["worker"] else "worker"
    return dict(chosen=chosen, same_bytes=same, own_ms=1e3 * best["own"], worker_ms=1e3 * best["worker"])


def _resolve_workers(workers: int | None, threads: int | None, device: str) -> int:
    if workers is None:
        return threads if device == "cpu" and threads and threads > 1 else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number >= 1, got {workers!r}")
    if workers > 1 and device != "cpu":
        raise ConfigError(f"workers={workers} splits a batch across CPU sessions; on {device} use workers=1")
    return workers


def _merge(parts: list[tuple[np.ndarray, np.ndarray | None, StageTimes | None, Iterates | None]]
           ) -> tuple[np.ndarray, np.ndarray | None, StageTimes | None, Iterates | None]:
    """The workers' results as one batch's; a stage's time is the workers' mean (they ran side by side)."""
    out = np.concatenate([p[0] for p in parts])
    logits = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    clock = None
    if parts[0][2] is not None:
        clock = StageTimes()
        for p in parts:
            for stage, sec in p[2].seconds.items():
                clock.seconds[stage] += sec / len(parts)
    trace = None
    if parts[0][3] is not None:
        ts = [p[3] for p in parts]
        trace = Iterates([np.concatenate(s) for s in zip(*(t.gs_x for t in ts))],
                         None if ts[0].coarse is None else np.concatenate([t.coarse for t in ts]),
                         [np.concatenate(s) for s in zip(*(t.ap_x for t in ts))])
    return out, logits, clock, trace


def _pack(main: Any, times: Any, trace: Any) -> Any:
    extra = tuple(v for v in (times, trace) if v)
    if not extra:
        return main
    return (*main, *extra) if isinstance(main, tuple) else (main, *extra)


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
