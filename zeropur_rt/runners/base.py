"""What a runner is and what runners share.

* ``Runner``: the interface the schedule drives. A runner executes one exported graph on buffers it
  allocates, and owns the memory those buffers live in (host arrays, device pointers, torch tensors) and,
  on a GPU, the stream and CUDA-graph capture. A device runner also says where it runs
  (``DeviceRunner``), so that the pipeline can launch the CUDA kernels beside its graphs.
* ``HostMemory``: the buffers of a host runner; ``DeviceBuffer``: one buffer of a device runner.
* ``call_graph``: one graph call on host arrays, outside the loop, on any runner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Protocol

import numpy as np

Buffer = Any  # whatever the runner allocates: a numpy array, a device buffer, a torch tensor


class Runner(Protocol):
    """Executes exported graphs on buffers it allocates. Host runners: numpy buffers, no capture."""

    name: str
    device: str
    on_device: bool  # its buffers live on a GPU (then it is a ``DeviceRunner``)

    def alloc(self, shape: tuple[int, ...], name: str) -> Buffer: ...
    def run(self, graph: str, inputs: Mapping[str, Buffer], outputs: Mapping[str, Buffer]) -> None: ...
    def output_shapes(self, graph: str, n: int) -> dict[str, tuple[int, ...]]: ...
    def copy(self, dst: Buffer, src: Buffer) -> None: ...
    def zero(self, buf: Buffer) -> None: ...
    def upload(self, dst: Buffer, src: np.ndarray) -> None: ...
    def download(self, src: Buffer) -> np.ndarray: ...
    def sync(self) -> None: ...
    def capture(self, enqueue: Callable[[], None]) -> Callable[[], None] | None: ...
    def release(self, buffers: list[Buffer], n: int | None = None) -> None: ...
    def close(self) -> None: ...


class DeviceRunner(Runner, Protocol):
    """A runner whose buffers are ``DeviceBuffer``s on one CUDA device: what it says about where it runs."""

    ordinal: int  # the CUDA device

    def stream_handle(self) -> Any:
        """The stream its graphs run on now (a CUstream or its integer handle): kernels launched on it
        order with the graphs, and are captured with them."""

    def device_context(self) -> ContextManager[None]:
        """A context under which its CUDA context is the calling thread's current one."""


@dataclass(frozen=True)
class DeviceBuffer:
    """Device memory of one loop tensor: float32, C-contiguous. ``owner`` keeps it alive where the runner
    does not (a torch tensor)."""

    ptr: int
    shape: tuple[int, ...]
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape, dtype=np.int64))


class HostMemory:
    """Buffers of a host runner: numpy arrays; the loop runs eagerly (nothing to capture)."""

    on_device = False

    def alloc(self, shape: tuple[int, ...], name: str) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def zero(self, buf: np.ndarray) -> None:
        buf.fill(0)

    def upload(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def download(self, src: np.ndarray) -> np.ndarray:
        return src.copy()

    def sync(self) -> None:
        pass

    def capture(self, enqueue: Callable[[], None]) -> None:
        return None

    def release(self, buffers: list[Any], n: int | None = None) -> None:
        pass


def call_graph(runner: Runner, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call of ``graph`` on host arrays: buffers allocated for the call, the outputs downloaded, the
    buffers released."""
    n = len(next(iter(feeds.values())))
    ins = {k: runner.alloc(np.shape(v), k) for k, v in feeds.items()}
    outs = {k: runner.alloc(s, k) for k, s in runner.output_shapes(graph, n).items()}
    try:
        for k, v in feeds.items():
            runner.upload(ins[k], v)
        runner.run(graph, ins, outs)
        return {k: runner.download(b) for k, b in outs.items()}
    finally:
        runner.release([*ins.values(), *outs.values()])
