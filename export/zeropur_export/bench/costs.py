"""The cost model: forward-equivalents per purification (counted, not assumed) and the CPU's sgemm ceiling.
MACs from the graphs: ``zeropur_rt.macs``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from zeropur_rt.config import ZeroPurConfig

if TYPE_CHECKING:
    from zeropur_export.reference.losses import APMode
    from zeropur_export.victims.taps import Victim


@contextmanager
def count_passes(victim: "Victim") -> Iterator[dict[str, int]]:
    """Counts forward passes through ``victim.net`` per image, and those recorded for autograd (each one is
    back-propagated exactly once by the reference, so it also counts one backward pass)."""
    import torch

    counts = {"forward": 0, "backward": 0}

    def hook(_m, args):
        x = args[0]
        counts["forward"] += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            counts["backward"] += x.shape[0]

    h = victim.net.register_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        h.remove()


def forward_equivalents(victim: "Victim", cfg: ZeroPurConfig, ap_mode: "APMode") -> dict[str, float]:
    """Forward passes, backward passes and F-equivalents per image. With frozen weights a backward pass
    computes input gradients only (one transposed conv per conv): about 1 F of MACs, 2 F by the usual
    convention that also counts weight gradients; both are reported."""
    import torch

    from zeropur_export.reference.purifier import ReferencePurifier

    pur = ReferencePurifier(victim, cfg, ap_mode)
    pur.runner.output_shapes("classifier", 1)  # the runner's one-time shape probe runs forwards too: not counted
    x = torch.rand(2, *victim.spec.input_shape)
    with count_passes(victim) as c:
        pur.purify(x)
    f, b = c["forward"] / 2, c["backward"] / 2
    return dict(forward=f, backward=b, F_bwd1=f + b, F_bwd2=f + 2 * b)


def sgemm_gflops(n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """The best one-thread float32 GEMM rate of each BLAS at hand, in GFLOP/s: torch's and numpy's.

    Both are read because neither is the fastest everywhere. On a 2-core AMD EPYC (Zen 4) VM, torch's BLAS
    (MKL) read 77-91 GFLOP/s and numpy's OpenBLAS 97-100, against 114.6 for an AVX-512 FMA loop
    (benchmarks/fma_peak.c); on the Intel Xeon VMs, torch's BLAS read 160-187. numpy is pinned to one thread
    with threadpoolctl; where that cannot pin its BLAS, a multi-threaded reading can only raise the ceiling,
    never flatter a percentage of it.
    """
    import time

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def best_rate(matmul: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            matmul()
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best / 1e9

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_rate = best_rate(lambda: torch.mm(ta, tb))
    finally:
        torch.set_num_threads(before)
    with threadpool_limits(limits=1, user_api="blas"):
        numpy_rate = best_rate(lambda: a @ b)
    return {"torch": torch_rate, "numpy": numpy_rate}


def cpu_peak_gflops(threads: int = 1, n: int = 1024, repeats: int = 10) -> float:
    """A practical float32 ceiling of ``threads`` cores: ``threads`` x the best one-thread sgemm rate of any
    BLAS at hand (``sgemm_gflops``).

    One thread timed and multiplied, not ``threads`` timed together: the ceiling must not depend on
    OMP_NUM_THREADS (at 1, a BLAS that honours it reports one core's rate against a runtime on two), and on
    a shared machine another process on one core drags a multi-threaded sgemm far down (2-thread OpenBLAS
    measured 41 GFLOP/s beside 97 for one thread) while the best of a few one-thread runs holds. Perfect
    scaling makes it an upper bound of what the threads reach together, so a percentage of it is a lower bound.
    """
    return threads * max(sgemm_gflops(n, repeats).values())
