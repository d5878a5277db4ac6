"""The loop of each batch size on one runner: its buffers and, on a device, its CUDA graph.

A purification of n images runs on the buffers of batch size n (``schedule.LoopBuffers``), allocated at
the first call of that size and kept for the ``max_cached`` sizes used last (the oldest is freed first).
On a device runner the loop of each size is captured into a CUDA graph after its first, eager, run (the
warm-up TensorRT and cuDNN need before a capture) and replayed from then on: the input is uploaded once,
the result and the logits downloaded once. Timings, iterates and a randomised config's draws need the
eager loop, so they never replay; a size whose capture failed stays eager.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import zeropur_rt.schedule as schedule
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.runners.base import Buffer, Runner
from zeropur_rt.schedule import KernelSet, LoopBuffers, StageTimes


@dataclass
class Iterates:
    """One purification's iterates (host copies): ``gs_x[t]`` / ``ap_x[t]`` is the input of GS / AP step t."""

    gs_x: list[np.ndarray] = field(default_factory=list)
    coarse: np.ndarray | None = None
    ap_x: list[np.ndarray] = field(default_factory=list)


@dataclass
class Purification:
    """One purification's results (host arrays): the purified images (float32 NCHW), and what was asked for
    beside them: the victim's ``logits`` of those images (classify), the ``times`` of each stage (timings),
    every GS / AP ``iterates`` (iterates); None where not asked for."""

    images: np.ndarray
    logits: np.ndarray | None = None
    times: StageTimes | None = None
    iterates: Iterates | None = None

    @property
    def labels(self) -> np.ndarray:
        """The predicted classes of the purified images."""
        if self.logits is None:
            raise ValueError("this purification was not classified: ask for classify=True")
        return self.logits.argmax(1)


@dataclass
class _BatchState:
    bufs: LoopBuffers
    replay: Any = None  # the captured loop, once there is one
    result: Buffer = None  # the buffer the captured loop leaves its result in
    capture_failed: bool = False


class BatchLoops:
    """One runner and its kernel set, running the loop at any batch size (see the module). It owns both:
    ``close`` frees every buffer and captured graph, then closes the kernels and the runner."""

    def __init__(self, runner: Runner, kernels: KernelSet, cfg: ZeroPurConfig, chw: tuple[int, int, int],
                 has_ap: bool, *, cuda_graph: bool = True, max_cached: int = 4):
        self.runner, self.kernels, self.cfg, self.chw, self.has_ap = runner, kernels, cfg, chw, has_ap
        self.cuda_graph = bool(cuda_graph) and runner.on_device
        self.max_cached = max(1, int(max_cached))
        self._states: OrderedDict[int, _BatchState] = OrderedDict()

    def buffers(self, n: int) -> LoopBuffers:
        """The loop's buffers of batch size ``n`` (allocated at first use)."""
        return self._state(n).bufs

    @property
    def cached_sizes(self) -> list[int]:
        """The batch sizes whose buffers are kept, the one used last at the end."""
        return list(self._states)

    def captured(self, n: int) -> bool:
        """Whether the loop of batch size ``n`` replays a captured CUDA graph."""
        st = self._states.get(n)
        return st is not None and st.replay is not None

    def _state(self, n: int) -> _BatchState:
        st = self._states.get(n)
        if st is not None:
            self._states.move_to_end(n)
            return st
        while len(self._states) >= self.max_cached:
            self._release(self._states.popitem(last=False)[1])
        st = self._states[n] = _BatchState(schedule.allocate(self.runner, n, self.chw, self.has_ap))
        return st

    def _release(self, st: _BatchState) -> None:
        if st.replay is not None:
            st.replay.close()
        self.runner.release([b for _, b in st.bufs.items()], st.bufs.n)

    def run(self, x_in: np.ndarray, drawn: schedule.Draw | None, *, classify: bool = False, timings: bool = False,
            iterates: bool = False) -> Purification:
        """The loop on ``x_in`` (validated float32 NCHW, host) with a randomised config's ``drawn``: replayed
        where a captured graph can, eager (and then captured, on a device) otherwise."""
        r, k, cfg = self.runner, self.kernels, self.cfg
        st = self._state(len(x_in))
        b = st.bufs
        r.upload(b.x_in, x_in)
        clock = StageTimes(r.sync if r.on_device else None) if timings else schedule.NO_CLOCK
        trace = Iterates() if iterates else None

        def observe(stage: str, t: int, buf: Buffer) -> None:
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
        result = Purification(r.download(out), logits, clock if timings else None, trace)
        if st.replay is None and not eager:
            # the eager run was the warm-up TensorRT and cuDNN need before a capture
            st.replay, st.result = r.capture(lambda: schedule.purify(r, k, b, cfg)), out
            st.capture_failed = st.replay is None
        return result

    def close(self) -> None:
        """Wait for the runner, then free every buffer and captured graph, the kernels and the runner
        (idempotent: ``runner`` is None once closed)."""
        if self.runner is None:
            return
        try:
            self.runner.sync()
        finally:
            for st in self._states.values():
                self._release(st)
            self._states.clear()
            self.kernels.close()
            self.runner.close()
            self.runner = None
