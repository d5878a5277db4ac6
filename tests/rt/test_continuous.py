"""Continuous batching across loop steps (zeropur_rt.continuous): each image's result equals the whole-batch
loop's for it, bit for bit, however the images joined and left the running batch."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from zeropur_rt.continuous import ContinuousScheduler, SchedulerClosed  # noqa: E402
from zeropur_rt.errors import ConfigError, InputError  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

SHORT = dict(gs_steps=3, ap_steps=4)


@pytest.fixture(scope="module")
def x16(cifar):
    return cifar[0][:16]


def _whole_loop(pur: Purifier, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = pur.purify(x)
    return out, pur.logits(out)


@pytest.mark.parametrize("steps", [SHORT, dict(gs_steps=3, ap_steps=0), dict(gs_steps=0, ap_steps=2),
                                   dict(gs_steps=0, ap_steps=0)])
def test_staggered_arrivals_equal_the_whole_batch_loop(art20, x16, steps):
    pur = Purifier.load(art20, threads=1, overrides=steps)
    ref, ref_logits = _whole_loop(pur, x16)
    sched = ContinuousScheduler(pur, capacity=5)  # fewer slots than images: requests wait, split, and join late
    arrivals = {0: [(0, 3), (3, 4)], 1: [(4, 11)], 2: [(11, 12)], 4: [(12, 16)]}  # step boundary -> requests
    futs = []
    for boundary in range(max(arrivals) + 1):
        futs += [(sl, sched.submit(x16[slice(*sl)])) for sl in arrivals.get(boundary, [])]
        sched.step()
    sched.run_until_idle()
    for sl, f in futs:
        out, logits = f.result(timeout=0)
        assert np.array_equal(out, ref[slice(*sl)]) and np.array_equal(logits, ref_logits[slice(*sl)])
    # images really did share steps at different stages: more than one slot per boundary on average
    assert sched.slot_steps / sched.steps_run > 1.5
    pur.close()


def test_worker_thread_and_uint8_input(art20, cifar):
    pur = Purifier.load(art20, threads=1, overrides=SHORT)
    u8 = np.round(cifar[0][:6] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    ref, _ = _whole_loop(pur, pur.prepare(u8, uint8_nhwc=True))
    with ContinuousScheduler(pur).start() as sched:
        futs = [sched.submit(u8[i:i + 1], uint8_nhwc=True) for i in range(6)]
        out = np.concatenate([f.result(timeout=120)[0] for f in futs])
    assert np.array_equal(out, ref)
    pur.close()


def test_refusals(art20, x16):
    pur = Purifier.load(art20, threads=1, overrides=SHORT)
    with pytest.raises(ConfigError, match="capacity"):
        ContinuousScheduler(pur, capacity=pur.max_batch + 1)
    sched = ContinuousScheduler(pur, capacity=2)
    bad = x16[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        sched.submit(bad)
    pending = sched.submit(x16[:3])
    sched.step()
    sched.close()
    with pytest.raises(SchedulerClosed):
        pending.result(timeout=0)
    with pytest.raises(SchedulerClosed):
        sched.submit(x16[:1])
    batch_l1 = Purifier.load(art20, threads=1, overrides={**SHORT, "l1_scope": "batch"})
    with pytest.raises(ConfigError, match="per-sample"):
        ContinuousScheduler(batch_l1)
    randomised = Purifier.load(art20, threads=1, overrides={**SHORT, "random_start": True})
    with pytest.raises(ConfigError, match="deterministic configs"):
        ContinuousScheduler(randomised)
