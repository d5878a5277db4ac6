"""The ZeroPur loop, written once for every backend.

    blur -> gs_grad -> gs_update      (x gs_steps)    Guided Shift
    ap_setup                          (once)
    ap_grad -> ap_update              (x ap_steps)    Adaptive Projection

The schedule issues operations on two small interfaces and never knows which backend it drives:

* a ``Runner`` (``zeropur_rt.runners.base``) executes one exported graph on its own buffers, and owns
  the memory those buffers live in (host arrays, device pointers, torch tensors) and, on a GPU, the stream
  and CUDA-graph capture;
* a ``KernelSet`` launches our kernels (blur, GS update, AP update) on those buffers: the host library
  or numpy twin, the CUDA kernels, or the reference's torch twins.

Every backend (ONNX Runtime on the CPU or a GPU, torch, TensorRT) is a runner plus a kernel set.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.runners.base import Buffer, Runner

STAGES = ("blur", "gs_engine", "gs_update", "ap_setup", "ap_engine", "ap_update", "classify")


class KernelSet(Protocol):
    """Our kernels on a runner's buffers (in place)."""

    name: str

    def blur(self, src: Buffer, dst: Buffer, sigma: float) -> None: ...
    def gs_update(self, x: Buffer, grad: Buffer, m: Buffer, x_in: Buffer, l1: Buffer, cfg: ZeroPurConfig) -> None: ...
    def ap_update(self, x: Buffer, grad: Buffer, x_in: Buffer, cfg: ZeroPurConfig) -> None: ...
    def close(self) -> None: ...


@dataclass
class LoopBuffers:
    """Every tensor of one batch size's loop. A captured CUDA graph bakes these addresses in."""

    n: int
    x_in: Buffer  # the input images
    x: Buffer  # the Guided Shift iterate; after GS, the coarse image
    x_blur: Buffer
    m: Buffer  # GS momentum
    l1: Buffer  # per-sample L1 norms (device scratch of the GS update)
    gs_grad: Buffer
    gs_loss: Buffer
    logits: Buffer
    embedding: Buffer
    fine: Buffer = None  # the Adaptive Projection iterate
    ap_grad: Buffer = None
    ap_consts: dict[str, Buffer] = field(default_factory=dict)  # ap_setup's outputs, ap_grad's inputs

    def items(self) -> list[tuple[str, Buffer]]:
        named = [(k, v) for k, v in vars(self).items() if k not in ("n", "ap_consts") and v is not None]
        return named + list(self.ap_consts.items())


def allocate(runner: Runner, n: int, chw: tuple[int, int, int], has_ap: bool) -> LoopBuffers:
    """The loop's buffers for batch ``n``, shaped by the runner's graphs."""
    img = (n, *chw)
    gs = runner.output_shapes("gs_grad", n)
    cls = runner.output_shapes("classifier", n)
    b = LoopBuffers(n=n, x_in=runner.alloc(img, "x_in"), x=runner.alloc(img, "x"), x_blur=runner.alloc(img, "x_blur"),
                    m=runner.alloc(img, "m"), l1=runner.alloc((n,), "l1"), gs_grad=runner.alloc(gs["grad"], "gs_grad"),
                    gs_loss=runner.alloc(gs["loss"], "gs_loss"), logits=runner.alloc(cls["logits"], "logits"),
                    embedding=runner.alloc(cls["embedding"], "embedding"))
    if has_ap:
        b.fine = runner.alloc(img, "fine")
        b.ap_grad = runner.alloc(runner.output_shapes("ap_grad", n)["grad"], "ap_grad")
        b.ap_consts = {k: runner.alloc(s, k) for k, s in runner.output_shapes("ap_setup", n).items()}
    return b


class StageTimes:
    """Seconds per stage. Laps are host wall clock; on a device the runner is synchronised first, so a
    timed run is slower than an untimed one (and never captured into a CUDA graph)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync
        self._t = time.perf_counter()

    def start(self) -> None:
        if self._sync:
            self._sync()
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self._sync:
            self._sync()
        t = time.perf_counter()
        self.seconds[stage] += t - self._t
        self._t = t

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class _NoClock:
    def start(self) -> None: ...
    def lap(self, stage: str) -> None: ...


NO_CLOCK = _NoClock()
Observer = Callable[[str, int, Buffer], None]  # (stage "gs" | "coarse" | "ap", step, the iterate's buffer)


@dataclass(frozen=True)
class Draw:
    """A randomised config's choices for one purification: the offsets (inside the eps ball) added to the
    input where Guided Shift and Adaptive Projection start, and the blur sigma of each Guided Shift step."""

    gs_offset: np.ndarray | None
    ap_offset: np.ndarray | None
    sigmas: tuple[float, ...]

    def rows(self, sl: slice) -> "Draw":
        """The draws of images ``sl`` of the batch (a step's sigma is the whole batch's)."""
        return Draw(None if self.gs_offset is None else self.gs_offset[sl],
                    None if self.ap_offset is None else self.ap_offset[sl], self.sigmas)


def draw(cfg: ZeroPurConfig, shape: tuple[int, ...], rng: np.random.Generator) -> Draw | None:
    """One purification's draws for images of ``shape``; None for a deterministic config (no draw at all,
    so a deterministic run consumes nothing from ``rng``)."""
    if not cfg.randomised:
        return None

    def offset() -> np.ndarray | None:
        return rng.uniform(-cfg.eps, cfg.eps, shape).astype(np.float32) if cfg.random_start else None
    j = cfg.blur_sigma_jitter
    sigmas = cfg.blur_sigma * rng.uniform(1 - j, 1 + j, cfg.gs_steps) if j > 0 else [cfg.blur_sigma] * cfg.gs_steps
    return Draw(offset(), offset() if cfg.ap_steps > 0 else None, tuple(float(v) for v in sigmas))


def _start(runner: Runner, dst: Buffer, x_in: Buffer, offset: np.ndarray | None) -> None:
    """``dst`` = the input, or the input moved by ``offset`` and clipped to [0, 1]. The offset is added on the
    host: a randomised run is eager anyway (a captured graph would replay one draw)."""
    if offset is None:
        runner.copy(dst, x_in)
    else:
        runner.upload(dst, np.clip(runner.download(x_in) + offset, 0.0, 1.0).astype(np.float32))


def gs_begin(runner: Runner, b: LoopBuffers, offset: np.ndarray | None = None) -> None:
    """Guided Shift starts from the input (moved by ``offset`` under a random start) with no momentum."""
    _start(runner, b.x, b.x_in, offset)
    runner.zero(b.m)


def gs_step(runner: Runner, kernels: KernelSet, b: LoopBuffers, cfg: ZeroPurConfig, clock: Any = NO_CLOCK,
            sigma: float | None = None) -> None:
    """One Guided Shift step on every sample of ``b``: re-blur (at ``sigma``, else the config's), gradient
    toward the blur, sign step."""
    kernels.blur(b.x, b.x_blur, cfg.blur_sigma if sigma is None else sigma)
    clock.lap("blur")
    runner.run("gs_grad", {"x": b.x, "x_blur": b.x_blur}, {"grad": b.gs_grad, "loss": b.gs_loss})
    clock.lap("gs_engine")
    kernels.gs_update(b.x, b.gs_grad, b.m, b.x_in, b.l1, cfg)
    clock.lap("gs_update")


def ap_begin(runner: Runner, b: LoopBuffers, clock: Any = NO_CLOCK, offset: np.ndarray | None = None) -> None:
    """Adaptive Projection's constants from the input and the coarse image in ``b.x``; ``b.fine`` restarts
    from the input (moved by ``offset`` under a random start)."""
    runner.run("ap_setup", {"x_in": b.x_in, "coarse": b.x}, b.ap_consts)
    _start(runner, b.fine, b.x_in, offset)
    clock.lap("ap_setup")


def ap_step(runner: Runner, kernels: KernelSet, b: LoopBuffers, cfg: ZeroPurConfig, clock: Any = NO_CLOCK) -> None:
    """One Adaptive Projection step on every sample of ``b``."""
    runner.run("ap_grad", {"fine": b.fine, **b.ap_consts}, {"grad": b.ap_grad})
    clock.lap("ap_engine")
    kernels.ap_update(b.fine, b.ap_grad, b.x_in, cfg)
    clock.lap("ap_update")


# The whole-batch loop: every sample of ``b`` takes the same steps together. The per-step functions above
# are also what zeropur_rt.continuous runs, slot by slot, when samples join and leave between steps.


def guided_shift(runner: Runner, kernels: KernelSet, b: LoopBuffers, cfg: ZeroPurConfig,
                 clock: Any = NO_CLOCK, observe: Observer | None = None, drawn: Draw | None = None) -> None:
    """Guided Shift: leaves the coarse image in ``b.x``. ``observe("gs", t, x)`` sees the input of step t,
    ``observe("coarse", gs_steps, x)`` the result."""
    gs_begin(runner, b, drawn and drawn.gs_offset)
    for t in range(cfg.gs_steps):
        if observe:
            observe("gs", t, b.x)
        gs_step(runner, kernels, b, cfg, clock, drawn and drawn.sigmas[t])
    if observe:
        observe("coarse", cfg.gs_steps, b.x)


def adaptive_projection(runner: Runner, kernels: KernelSet, b: LoopBuffers, cfg: ZeroPurConfig,
                        clock: Any = NO_CLOCK, observe: Observer | None = None, drawn: Draw | None = None) -> None:
    """Adaptive Projection from ``b.x_in`` along the coarse image in ``b.x``: leaves the result in ``b.fine``.
    ``observe("ap", t, fine)`` sees the input of step t."""
    ap_begin(runner, b, clock, drawn and drawn.ap_offset)
    for t in range(cfg.ap_steps):
        if observe:
            observe("ap", t, b.fine)
        ap_step(runner, kernels, b, cfg, clock)


def purify(runner: Runner, kernels: KernelSet, b: LoopBuffers, cfg: ZeroPurConfig,
           clock: Any = NO_CLOCK, observe: Observer | None = None, drawn: Draw | None = None) -> Buffer:
    """The whole loop on ``b.x_in``; returns the buffer holding the purified images (the coarse image
    when ``ap_steps == 0``). A randomised config runs with ``drawn`` (``draw``)."""
    clock.start()
    guided_shift(runner, kernels, b, cfg, clock, observe, drawn)
    if cfg.ap_steps == 0:
        return b.x
    adaptive_projection(runner, kernels, b, cfg, clock, observe, drawn)
    return b.fine


def classify(runner: Runner, b: LoopBuffers, images: Buffer) -> None:
    """The victim's logits of ``images`` into ``b.logits``."""
    runner.run("classifier", {"x": images}, {"logits": b.logits, "embedding": b.embedding})
