"""CPU workers: one-thread sessions a batch is split across, side by side, and where a single image runs.

On the CPU a batch of at least two images is split into contiguous shards, one per worker, each purified
on a one-thread session of its own (a core each: on a 2-core CPU 1.4-1.5x the throughput of one session
on two intra-op threads, whose small kernels wait on each other). Every image comes out with the bytes a
one-thread session gives the unsplit batch (ONNX Runtime computes each image alone; tested), a randomised
config's draws included: drawn for the whole batch, then split.

A single image runs on one session: the purifier's own ``threads``-thread one or the first worker's
one-thread one (``single_image``). Splitting one small image's kernels across threads can cost more than
it saves: ResNet-20's ~230 kernels per gradient call last ~9 us each at batch 1, about what waking a
sleeping thread takes (spinning is off). So by default ("auto") the first single-image call times one
gradient call on each session and keeps the faster, if both gave the same bytes (the one-thread session
otherwise); ``probe`` holds what it measured.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from zeropur_rt.batch_loops import BatchLoops, Iterates, Purification
from zeropur_rt.errors import ConfigError
from zeropur_rt.manifest import graph_io
from zeropur_rt.runners.base import call_graph
from zeropur_rt.schedule import Draw, StageTimes

SINGLE_IMAGE = ("auto", "own", "worker")


def resolve_workers(workers: int | None, threads: int | None, device: str) -> int:
    """The number of worker sessions: ``workers``, or by default one per thread on the CPU (1 elsewhere)."""
    if workers is None:
        return threads if device == "cpu" and threads and threads > 1 else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number >= 1, got {workers!r}")
    if workers > 1 and device != "cpu":
        raise ConfigError(f"workers={workers} splits a batch across CPU sessions; on {device} use workers=1")
    return workers


def check_single_image(single_image: str, n_workers: int) -> None:
    if single_image not in SINGLE_IMAGE:
        raise ConfigError(f"single_image must be one of {', '.join(SINGLE_IMAGE)}, got {single_image!r}")
    if single_image == "worker" and n_workers < 2:
        raise ConfigError("single_image='worker' runs a single image on a one-thread worker: it needs workers >= 2")


class Workers:
    """The workers' loops (each on a one-thread runner of its own), run side by side on a thread pool.
    ``single_image``: "auto" until the first single-image call measures it, then "own" or "worker"."""

    def __init__(self, loops: list[BatchLoops], single_image: str = "auto"):
        self.loops = loops
        self.single_image = single_image
        self.probe: dict[str, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.loops)

    def run(self, own: BatchLoops, x_in: np.ndarray, drawn: Draw | None, **asked: bool) -> Purification:
        """``x_in`` split across the workers (a single image on the session ``single_image`` says, next to
        ``own``, the purifier's own loops); ``asked``: ``BatchLoops.run``'s classify / timings / iterates."""
        k = min(len(self.loops), len(x_in))
        if k < 2:
            return self._single_image_loops(own, x_in).run(x_in, drawn, **asked)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.loops), thread_name_prefix="zeropur-worker")
        cuts = np.linspace(0, len(x_in), k + 1).round().astype(int)
        parts = [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        done = [self._pool.submit(w.run, x_in[p], drawn and drawn.rows(p), **asked) for w, p in zip(self.loops, parts)]
        wait(done)  # every worker idle again before this call returns or raises
        return merge([f.result() for f in done])

    def _single_image_loops(self, own: BatchLoops, x_in: np.ndarray) -> BatchLoops:
        if len(x_in) != 1:
            return own
        if self.single_image == "auto":
            self.probe = probe_single_image(own, self.loops[0], x_in)
            self.single_image = self.probe["chosen"]
        return self.loops[0] if self.single_image == "worker" else own

    def close(self) -> None:
        """Stop the pool, then close every worker's loops (and runner)."""
        if self._pool is not None:
            self._pool.shutdown()
        for w in self.loops:
            w.close()


def probe_single_image(own: BatchLoops, worker: BatchLoops, x: np.ndarray, rounds: int = 3) -> dict[str, Any]:
    """Time the Guided Shift gradient on one image on both sessions (a warm-up call each, then the best of
    ``rounds`` interleaved calls) and choose the faster one, if both computed the same bytes; the one-thread
    worker otherwise (its bytes are the ones the workers' contract promises)."""
    feeds = {name: x for name in graph_io("gs_grad", 0)[0]}
    best = {"own": float("inf"), "worker": float("inf")}
    outs: dict[str, dict[str, np.ndarray]] = {}
    for i in range(rounds + 1):
        for key, loops in (("own", own), ("worker", worker)):
            t = time.perf_counter()
            outs[key] = call_graph(loops.runner, "gs_grad", feeds)
            if i:
                best[key] = min(best[key], time.perf_counter() - t)
    same = all(outs["own"][k].tobytes() == outs["worker"][k].tobytes() for k in outs["own"])
    chosen = "own" if same and best["own"] < best["worker"] else "worker"
    return dict(chosen=chosen, same_bytes=same, own_ms=1e3 * best["own"], worker_ms=1e3 * best["worker"])


def merge(parts: list[Purification]) -> Purification:
    """The workers' results as one batch's; a stage's time is the workers' mean (they ran side by side)."""
    out = np.concatenate([p.images for p in parts])
    logits = None if parts[0].logits is None else np.concatenate([p.logits for p in parts])
    clock = None
    if parts[0].times is not None:
        clock = StageTimes()
        for p in parts:
            for stage, sec in p.times.seconds.items():
                clock.seconds[stage] += sec / len(parts)
    trace = None
    if parts[0].iterates is not None:
        ts = [p.iterates for p in parts]
        trace = Iterates([np.concatenate(s) for s in zip(*(t.gs_x for t in ts))],
                         None if ts[0].coarse is None else np.concatenate([t.coarse for t in ts]),
                         [np.concatenate(s) for s in zip(*(t.ap_x for t in ts))])
    return Purification(out, logits, clock, trace)
