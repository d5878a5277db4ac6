"""Continuous batching across loop steps: samples join and leave the running batch at every step boundary.

With whole-loop batching a request that arrives while a batch purifies waits for all of its ~60 steps.
Here every image occupies a *slot* that carries its own stage (Guided Shift, then Adaptive Projection) and
step counter. At each step boundary the scheduler

1. admits waiting images into free slots (Guided Shift starts for them),
2. runs one Guided Shift step over every slot in that stage, as one graph call over those slots,
3. starts Adaptive Projection for the slots whose Guided Shift just ended, and runs one AP step over every
   slot in AP,
4. classifies the slots that finished and hands each request its images once all of them are done.

The steps are ``zeropur_rt.schedule``'s own per-step functions, run over the occupied slots gathered
into the first rows of batch-``capacity`` loop buffers (the graphs have a dynamic batch). The ZeroPur
math is per sample (per-sample L1 norms, blur per plane; ``l1_scope="batch"`` is refused), so each
image's result equals the whole-batch loop's for it, bit for bit wherever the runner's graphs are
batch-independent (ONNX Runtime on the CPU is: tests/rt/test_continuous.py).

Host runners only (numpy buffers: ONNX Runtime on the CPU, or on a GPU through its IOBinding): slots are
gathered and scattered with numpy. Device runners (TensorRT, torch on CUDA) would need device-side
gathers and are refused.

    sched = ContinuousScheduler(Purifier.load("artifacts/resnet20")).start()     # a worker thread
    fut = sched.submit(x)               # any thread; x as Purifier.purify takes it
    purified, logits = fut.result()
    sched.close()
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import zeropur_rt.schedule as schedule
from zeropur_rt.errors import ConfigError, ZeroPurError
from zeropur_rt.schedule import LoopBuffers

GS, AP = 0, 1


class SchedulerClosed(ZeroPurError, RuntimeError):
    """The scheduler was closed before the request finished."""


@dataclass
class _Job:
    x: np.ndarray  # validated float32 NCHW
    future: Future
    purified: np.ndarray = None
    logits: np.ndarray = None
    admitted: int = 0  # images placed in slots so far
    done: int = 0


@dataclass
class _Slots:
    """Per-slot loop state, row i = slot i (the whole-batch loop keeps the same tensors per sample)."""

    x_in: np.ndarray
    x: np.ndarray
    m: np.ndarray
    fine: np.ndarray | None
    ap_consts: dict[str, np.ndarray]
    job: list[_Job | None] = field(default_factory=list)
    row: np.ndarray = None  # the image's index in its job
    stage: np.ndarray = None
    step: np.ndarray = None


def _rows(b: LoopBuffers, k: int) -> LoopBuffers:
    """The first ``k`` rows of every per-sample buffer: a batch-``k`` view (host buffers, leading-axis slices
    stay C-contiguous). Scalars (the GS loss) stay whole."""
    def head(buf: np.ndarray) -> np.ndarray:
        return buf[:k] if buf.ndim else buf
    return LoopBuffers(n=k, **{name: head(buf) for name, buf in vars(b).items() if name not in ("n", "ap_consts")
                               and buf is not None}, ap_consts={k_: head(v) for k_, v in b.ap_consts.items()})


class ContinuousScheduler:
    def __init__(self, purifier: Any, capacity: int | None = None):
        r = purifier.runner
        if getattr(r, "on_device", False):
            raise ConfigError(f"continuous batching gathers slots with numpy and needs a host runner; the "
                             f"{r.name} runner on {r.device} keeps its buffers on the device (use "
                             "backend='onnxruntime', or whole-batch Purifier.purify)")
        if purifier.cfg.l1_scope != "sample":
            raise ConfigError("continuous batching needs per-sample math: l1_scope='batch' couples the samples "
                             "of a batch (each image's result would depend on which others share its step)")
        if purifier.cfg.randomised:
            raise ConfigError("continuous batching runs deterministic configs: random_start / blur_sigma_jitter draw "
                             "per whole-batch call (use Purifier.purify)")
        self.pur, self.cfg = purifier, purifier.cfg
        self.capacity = int(capacity or purifier.max_batch)
        if not 1 <= self.capacity <= purifier.max_batch:
            raise ConfigError(f"capacity {self.capacity} must lie in [1, {purifier.max_batch}] (the artifact's max batch)")
        self.has_ap = self.cfg.ap_steps > 0
        c, chw = self.capacity, purifier.chw
        self.work = schedule.allocate(r, c, chw, self.has_ap)
        w = self.work
        self.slots = _Slots(x_in=np.zeros_like(w.x_in), x=np.zeros_like(w.x), m=np.zeros_like(w.m),
                            fine=np.zeros_like(w.fine) if self.has_ap else None,
                            ap_consts={k: np.zeros_like(v) for k, v in w.ap_consts.items()},
                            job=[None] * c, row=np.zeros(c, np.int64), stage=np.zeros(c, np.int8),
                            step=np.zeros(c, np.int64))
        self.queue: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.steps_run = 0  # step boundaries so far
        self.slot_steps = 0  # occupied slots summed over the boundaries (mean occupancy = slot_steps / steps_run)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ callers
    def submit(self, x: Any, uint8_nhwc: bool = False) -> Future:
        """Queue images (validated as ``Purifier.purify`` validates them); the future's result is
        (purified float32 NCHW, logits of the purified images)."""
        job = _Job(self.pur.prepare(x, uint8_nhwc), Future())
        job.purified = np.empty_like(job.x)
        job.logits = np.empty((len(job.x), *self.work.logits.shape[1:]), np.float32)
        job.future.set_running_or_notify_cancel()
        with self.cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            self.queue.append(job)
            self.cond.notify()
        return job.future

    def start(self) -> "ContinuousScheduler":
        """Run step boundaries on a worker thread whenever there is work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="zeropur-continuous", daemon=True)
            self._thread.start()
        return self

    def run_until_idle(self) -> None:
        """Without a worker thread: run step boundaries until every queued image is done."""
        while self.step():
            pass

    def close(self) -> None:
        """Stop the worker; requests still queued or in flight fail with ``SchedulerClosed``."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for job in {id(j): j for j in [*self.queue, *self.slots.job] if j is not None}.values():
            if not job.future.done():
                job.future.set_exception(SchedulerClosed("the scheduler was closed before this request finished"))
        self.queue.clear()

    def __enter__(self) -> "ContinuousScheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self._closed and not self.queue and not self._busy():
                    self.cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - every request in flight learns why, the worker goes on
                self._fail_all(e)

    # ------------------------------------------------------------------ one step boundary
    def _busy(self) -> bool:
        return any(j is not None for j in self.slots.job)

    def step(self) -> bool:
        """One step boundary (see the module docstring); returns whether work remains."""
        s, r, k, cfg = self.slots, self.pur.runner, self.pur.kernels, self.cfg
        self._admit()
        occupied = np.flatnonzero([j is not None for j in s.job])
        if len(occupied) == 0:
            return False
        self.steps_run += 1
        self.slot_steps += len(occupied)
        gs = occupied[(s.stage[occupied] == GS) & (s.step[occupied] < cfg.gs_steps)]
        if len(gs):
            b = self._gather(gs, "x_in", "x", "m")
            schedule.gs_step(r, k, b, cfg)
            self._scatter(gs, b, "x", "m")
            s.step[gs] += 1
        if self.has_ap:
            begin = occupied[(s.stage[occupied] == GS) & (s.step[occupied] >= cfg.gs_steps)]
            if len(begin):
                b = self._gather(begin, "x_in", "x")
                schedule.ap_begin(r, b)
                self._scatter(begin, b, "fine", *b.ap_consts)
                s.stage[begin], s.step[begin] = AP, 0
            ap = occupied[(s.stage[occupied] == AP) & (s.step[occupied] < cfg.ap_steps)]
            if len(ap):
                b = self._gather(ap, "x_in", "fine", *s.ap_consts)
                schedule.ap_step(r, k, b, cfg)
                self._scatter(ap, b, "fine")
                s.step[ap] += 1
            done = occupied[(s.stage[occupied] == AP) & (s.step[occupied] >= cfg.ap_steps)]
        else:
            done = occupied[s.step[occupied] >= cfg.gs_steps]
        if len(done):
            self._finish(done, "fine" if self.has_ap else "x")
        return bool(self.queue) or self._busy()

    def _admit(self) -> None:
        s = self.slots
        free = [i for i, j in enumerate(s.job) if j is None]
        new: list[int] = []
        with self.cond:
            while free and self.queue:
                job = self.queue[0]
                while free and job.admitted < len(job.x):
                    i = free.pop(0)
                    s.job[i], s.row[i] = job, job.admitted
                    s.x_in[i] = job.x[job.admitted]
                    job.admitted += 1
                    new.append(i)
                if job.admitted == len(job.x):
                    self.queue.popleft()
        if new:
            idx = np.array(new)
            b = self._gather(idx, "x_in")
            schedule.gs_begin(self.pur.runner, b)
            self._scatter(idx, b, "x", "m")
            s.stage[idx], s.step[idx] = GS, 0

    def _finish(self, idx: np.ndarray, result: str) -> None:
        s = self.slots
        b = self._gather(idx, result)
        schedule.classify(self.pur.runner, b, getattr(b, result))
        logits = self.pur.runner.download(b.logits)
        for n, i in enumerate(idx):
            job, row = s.job[i], s.row[i]
            job.purified[row] = getattr(s, result)[i]
            job.logits[row] = logits[n]
            job.done += 1
            s.job[i] = None
            if job.done == len(job.x):
                job.future.set_result((job.purified, job.logits))

    def _fail_all(self, err: BaseException) -> None:
        with self.cond:
            jobs = {id(j): j for j in [*self.queue, *self.slots.job] if j is not None}
            self.queue.clear()
            self.slots.job = [None] * self.capacity
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(err)

    # ------------------------------------------------------------------ slots <-> the graphs' batch
    def _gather(self, idx: np.ndarray, *names: str) -> LoopBuffers:
        b = _rows(self.work, len(idx))
        for name in names:
            src = self.slots.ap_consts[name] if name in self.slots.ap_consts else getattr(self.slots, name)
            dst = b.ap_consts[name] if name in b.ap_consts else getattr(b, name)
            np.take(src, idx, axis=0, out=dst)
        return b

    def _scatter(self, idx: np.ndarray, b: LoopBuffers, *names: str) -> None:
        for name in names:
            dst = self.slots.ap_consts[name] if name in self.slots.ap_consts else getattr(self.slots, name)
            dst[idx] = b.ap_consts[name] if name in b.ap_consts else getattr(b, name)
