"""The exported AP loss (closed-form self-LPIPS backward) against autograd of the reference, in float64."""
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from zeropur_export.reference.losses import SelfLpipsDistance, ap_loss_lean  # noqa: E402
from zeropur_export.reference.losses import (LPIPS_DIST_FLOOR_SQ, APConstants, ap_constants, ap_loss,  # noqa: E402
                                             lpips_features, safe_norm)
from zeropur_rt.config import preset  # noqa: E402

from conftest import rel_err  # noqa: E402

CFG = preset("cifar10")


@pytest.fixture(scope="module")
def victim64(victim20):
    from zeropur_export.victims.zoo import load_victim
    return load_victim("resnet20").double()  # its own copy: a deep copy would keep the tap hooks of victim20


@pytest.fixture(scope="module")
def images(cifar):
    g = torch.Generator().manual_seed(0)
    x_in = torch.from_numpy(cifar[0][:8]).double()
    coarse = (x_in + CFG.eps * torch.sign(torch.rand(x_in.shape, generator=g) - 0.5)).clamp(0, 1)
    fine = (x_in + CFG.ap_step * torch.sign(torch.rand(x_in.shape, generator=g) - 0.5)).clamp(0, 1)
    return x_in, coarse, fine


def _grads(victim, fine, c, cfg):
    ref = torch.func.grad_and_value(lambda f: ap_loss(victim, f, c, cfg))(fine)
    lean = torch.func.grad_and_value(lambda f: ap_loss_lean(victim, f, c, cfg))(fine)
    return ref, lean


@pytest.mark.parametrize("with_offsets", [False, True])
def test_lean_ap_loss_is_the_reference_in_float64(victim64, images, with_offsets):
    x_in, coarse, fine = images
    with torch.no_grad():
        c = ap_constants(victim64, x_in, coarse, CFG)
    if not with_offsets:
        c = APConstants(c.ila_dir, c.lpips_ref)  # as the exported graph sees them
    (g_ref, v_ref), (g_lean, v_lean) = _grads(victim64, fine, c, CFG)
    assert abs(float(v_lean - v_ref)) <= 1e-14 * abs(float(v_ref))
    assert rel_err(g_lean.numpy(), g_ref.numpy()) < 1e-12
    assert float(g_ref.abs().max()) > 0


def test_lpips_term_alone_and_its_floor(victim64, images):
    """LPIPS only (ILA weight 0): the closed form carries the whole gradient; at fine == x_in the distance
    is under the floor and both gradients are exactly zero, as the reference's clamp makes them."""
    x_in, coarse, fine = images
    cfg = CFG.replace(ila_weight=0.0)
    with torch.no_grad():
        c = ap_constants(victim64, x_in, coarse, cfg)
    (g_ref, _), (g_lean, _) = _grads(victim64, fine, c, cfg)
    assert rel_err(g_lean.numpy(), g_ref.numpy()) < 1e-12
    (g_ref0, _), (g_lean0, _) = _grads(victim64, x_in.clone(), c, cfg)
    assert float(g_ref0.abs().max()) == 0.0 and float(g_lean0.abs().max()) == 0.0


def test_pixels_with_zero_features_take_the_norm_floor_branch():
    """A tap pixel whose square sum is under the norm floor (all ReLUs off, or nearly) has a floored norm and
    no gradient through it: the closed form must give what autograd gives through ``safe_norm``'s clamp there
    (rare in real taps, so built here)."""
    g = torch.Generator().manual_seed(1)
    taps = [torch.rand(3, 4, 6, 6, generator=g, dtype=torch.float64), torch.rand(3, 8, 3, 3, generator=g, dtype=torch.float64)]
    taps[0][:, :, 2, 3] = 1e-17  # square sum 4e-34, under the floor of 1e-30
    taps[1][1, :, 0, :] = 0
    ref = torch.rand(3, sum(t[0].numel() for t in taps), generator=g, dtype=torch.float64) * 0.01

    def by_autograd(*ts):
        f = lpips_features(SimpleNamespace(spec=SimpleNamespace(lpips=("a", "b"))), dict(zip("ab", ts)))
        return safe_norm(f - ref, 1, floor_sq=LPIPS_DIST_FLOOR_SQ).sum()

    want = torch.func.grad(by_autograd, argnums=(0, 1))(*taps)
    got = torch.func.grad(lambda *ts: SelfLpipsDistance.apply(ref, *ts)[0].sum(), argnums=(0, 1))(*taps)
    for w, h in zip(want, got):
        assert rel_err(h.numpy(), w.numpy()) < 1e-12
    assert float(got[0][:, :, 2, 3].abs().max()) > 0  # the floored pixel still gets the d/n term
