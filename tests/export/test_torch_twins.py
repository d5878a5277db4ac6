"""The reference's torch kernel twins (blur_torch, gs_update, ap_update) against the numpy twin, float32 on the CPU,
bit for bit.

The reference runs its own twins, the runtime the numpy twin / host / CUDA kernels (held to the numpy twin by
tests/rt/test_kernels.py): without this file a change to either side's update or blur would make the reference and the
runtime disagree by a few pixels' sign steps, which every float32 comparison reads as noise.

The one licensed difference: the per-sample L1 norm is summed in torch's order by the twin and in the canonical
256-lane order by the kernels. With gradients whose sums are exact in float32 (small multiples of 2^-10) the two
orders give the same bits, and so must every output; with real-valued gradients the iterate must still be
bit-identical and the momentum equal to the rounding of one division (a few ulps).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zeropur_export.reference import losses as ref, steps  # noqa: E402
from zeropur_rt.blur import blur_images  # noqa: E402
from zeropur_rt.config import ZeroPurConfig  # noqa: E402
from zeropur_rt.kernels import numpy_twin as twin  # noqa: E402

F32 = np.float32
SHAPES = [(1, 3, 32, 32), (5, 3, 7, 5), (3, 1, 16, 16), (2, 3, 33, 31)]


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def case(rng, shape, exact: bool):
    """x near x_in with clip-boundary ties (x on x_in, 0 and 1), one zero-gradient sample, momentum."""
    x_in = rng.random(shape, dtype=F32)
    x_in.reshape(shape[0], -1)[:, :7] = 0.0
    x_in.reshape(shape[0], -1)[:, 7:14] = 1.0
    x = np.clip(x_in + rng.normal(0, 0.03, shape).astype(F32), 0, 1).astype(F32)
    ties = rng.random(shape) < 0.2
    x[ties] = x_in[ties]
    if exact:  # |g| < 1: every partial L1 sum of <= 2^13 terms is an integer multiple of 2^-10 below 2^13, exact
        grad = rng.integers(-1023, 1024, shape).astype(F32) / F32(1024)
        m = rng.integers(-64, 65, shape).astype(F32) / F32(4096)
    else:
        grad = (rng.standard_normal(shape) * rng.choice([1e-4, 1.0, 30.0])).astype(F32)
        m = (rng.standard_normal(shape) * 0.01).astype(F32)
    grad[0] = 0.0
    return x, grad, m, x_in


def torch_gs(x, grad, m, x_in, cfg):
    nx, nm = steps.gs_update(*(torch.from_numpy(a) for a in (x, grad, m)), torch.from_numpy(x_in), cfg)
    return nx.numpy(), nm.numpy()


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gs_update_twins_are_bit_identical(shape, scope):
    for momentum in (1.0, 0.9, 0.0):
        cfg = ZeroPurConfig(momentum=momentum, l1_scope=scope)
        for exact in (True, False):
            x, grad, m, x_in = case(seeded(shape, scope, momentum, exact), shape, exact)
            tx, tm = torch_gs(x, grad, m, x_in, cfg)
            nx, nm = x.copy(), m.copy()
            twin.gs_update(nx, grad, nm, x_in, eps=cfg.eps, step=cfg.gs_step, decay=cfg.momentum, l1_scope=scope)
            assert np.array_equal(tx.view(np.uint32), nx.view(np.uint32)), f"x, momentum {momentum}, exact {exact}"
            if exact:
                assert np.array_equal(tm.view(np.uint32), nm.view(np.uint32)), f"m, momentum {momentum}"
            else:  # the two L1 orders differ by ~1e-7 relative: each g = grad / l1 by as much, and m = g + mu m
                # by that plus its own rounding (a few ulps of |g| + |mu m|, however much the sum cancels)
                scale = np.abs(nm) + np.abs(F32(momentum) * m)
                assert np.all(np.abs(tm - nm) <= 8 * np.finfo(F32).eps * scale), f"m, momentum {momentum}"
            moved = x != nx
            assert np.all(np.abs(nx - x_in) <= F32(cfg.eps) + F32(1e-7)) and moved.any()
            assert np.array_equal(nx[0], np.clip(x[0] - F32(cfg.gs_step) * np.sign(m[0]) * (momentum > 0),
                                                 x_in[0] - F32(cfg.eps), x_in[0] + F32(cfg.eps)).clip(0, 1)), \
                "a zero-gradient sample moves along its momentum alone"


@pytest.mark.parametrize("shape", SHAPES)
def test_ap_update_twins_are_bit_identical(shape):
    cfg = ZeroPurConfig(eps=6 / 255).replace(ap_steps=50)
    x, grad, _, x_in = case(seeded(shape, "ap"), shape, False)
    grad[..., ::3] = 0
    got = steps.ap_update(torch.from_numpy(x), torch.from_numpy(grad), torch.from_numpy(x_in), cfg).numpy()
    want = x.copy()
    twin.ap_update(want, grad, x_in, eps=cfg.eps, step=cfg.ap_step)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(want, x)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.8, 2.7])
def test_blur_twins_are_bit_identical(cifar, sigma):
    """Real images and random ones (odd shapes, values on the quantisation steps k/255 and just below them)."""
    rng = seeded("blur", sigma)
    odd = rng.random((2, 3, 9, 13), dtype=F32)
    odd[0, 0, :4] = np.arange(4 * 13, dtype=F32).reshape(4, 13) / F32(255)
    odd[1, 0, :4] = np.nextafter(odd[0, 0, :4], F32(-1))
    for x in (cifar[0][:16], odd):
        got = ref.blur_torch(torch.from_numpy(x), sigma).numpy()
        assert np.array_equal(got.view(np.uint32), twin.blur(x, sigma).view(np.uint32))


def test_torch_blur_equals_numpy_blur(cifar):
    x = cifar[0][:64]
    for sigma in (0.7, 1.8, 3.0):
        assert np.array_equal(ref.blur_torch(torch.from_numpy(x), sigma).numpy(), blur_images(x, sigma))
