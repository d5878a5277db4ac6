"""The gradients adaptive attacks take through ZeroPur (``zeropur_export.attacks.adaptive``), on the real ResNet-20."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("art")

from zeropur_export.attacks import adaptive  # noqa: E402
from zeropur_export.attacks.pgd import pgd_linf  # noqa: E402
from zeropur_export.reference.purifier import ReferencePurifier  # noqa: E402
from zeropur_rt import schedule  # noqa: E402
from zeropur_rt.config import ZeroPurConfig  # noqa: E402

@pytest.fixture(scope="module")
def pur_tiny(art20):
    from zeropur_rt import Purifier
    return Purifier.load(art20, threads=2, overrides=dict(gs_steps=2, ap_steps=2))


def _loss_grad(model, x, y):
    xt = torch.from_numpy(x).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xt), torch.from_numpy(y.astype(np.int64)), reduction="sum")
    return torch.autograd.grad(loss, xt)[0].numpy()


@pytest.mark.parametrize("jitter", [0.0, 0.5])
def test_unrolled_loop_is_the_reference_and_its_backward_the_one_graph_chain_rule(victim20, cifar, jitter):
    """Forward: bit-identical to the reference purifier (with a jittered blur: given the same seed). Backward:
    the step-by-step sweep (checkpointed by hand) equals autograd over the whole loop held as one graph, in
    float64, with the forward's draws; and it is not BPDA's identity."""
    v = victim20.to_dtype(torch.float64)
    cfg = ZeroPurConfig(gs_steps=2, ap_steps=2, blur_sigma_jitter=jitter)
    x = torch.from_numpy(cifar[0][:2]).double()
    want = ReferencePurifier(v, cfg, seed=7).purify(x)
    drawn = schedule.draw(cfg, tuple(x.shape), np.random.default_rng(7))
    assert (drawn is None) == (jitter == 0)
    xa = x.clone().requires_grad_(True)
    out = adaptive.UnrolledPurify.apply(xa, v, cfg, drawn)
    assert torch.equal(out, want)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    (g_sweep,) = torch.autograd.grad((out * w).sum(), xa)
    xb = x.clone().requires_grad_(True)
    out_graph = adaptive.unrolled_purify_graph(v, cfg, xb, drawn)
    assert torch.equal(out_graph, want)
    (g_graph,) = torch.autograd.grad((out_graph * w).sum(), xb)
    assert torch.isfinite(g_sweep).all() and g_graph.abs().max() > 0
    assert (g_sweep - g_graph).abs().max() <= 1e-10 * g_graph.abs().max()
    assert (g_sweep - w).abs().max() > 1e-3 * w.abs().max()   # the loop's Jacobian is not the identity
    # With no steps the loop is the identity, and so is its gradient.
    x0 = x.clone().requires_grad_(True)
    out0 = adaptive.UnrolledPurify.apply(x0, v, ZeroPurConfig(gs_steps=0, ap_steps=0))
    assert torch.equal(torch.autograd.grad((out0 * w).sum(), x0)[0], w)


def test_bpda_model_is_victim_at_purified_image_and_matches_art_preprocessor(pur_tiny, victim20, cifar):
    from zeropur_export.attacks.art_bridge import bpda_classifier
    x, y = cifar[0][:4], cifar[1][:4]
    m = adaptive.BPDAModel(victim20, pur_tiny.purify)
    xp = pur_tiny.purify(x)
    with torch.no_grad():
        np.testing.assert_array_equal(m(torch.from_numpy(x)).numpy(), victim20(torch.from_numpy(xp)).numpy())
    g = _loss_grad(m, x, y)
    np.testing.assert_allclose(g, _loss_grad(victim20, xp, y), rtol=1e-6, atol=1e-9)
    # the same BPDA through ART's preprocessing-defence route (two implementations, one answer)
    art = bpda_classifier(victim20, pur_tiny).loss_gradient(x, np.eye(10, dtype=np.float32)[y])
    np.testing.assert_allclose(g / len(x), art, rtol=1e-4, atol=1e-8)
    # one purification for the loss and the gradient at the same point (APGD asks for both)
    m(torch.from_numpy(x))
    assert m.memo.calls == 1 and m.memo.hits >= 2


def test_trajectory_model_averages_the_victim_over_the_iterates(pur_tiny, victim20, cifar):
    x, y = cifar[0][:3], cifar[1][:3]
    res = pur_tiny.run(x, iterates=True)
    out, it = res.images, res.iterates
    m = adaptive.TrajectoryBPDAModel(victim20, pur_tiny, points=64)
    path = m.path(out, it)
    # every iterate after the input: GS inputs 1.., the coarse image, AP inputs 1.., the output
    assert len(path) == (len(it.gs_x) - 1) + 1 + (len(it.ap_x) - 1) + 1
    np.testing.assert_array_equal(path[-1], out)
    with torch.no_grad():
        np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), victim20(torch.from_numpy(out)).numpy(),
                                   rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        p_out = torch.softmax(victim20(torch.from_numpy(out)), 1)
    dl = (p_out - torch.nn.functional.one_hot(torch.from_numpy(y.astype(np.int64)), 10)).float()
    want = np.mean([torch.autograd.grad((z * dl).sum(), z_in)[0].numpy()
                    for z, z_in in ((victim20(t), t) for t in (torch.from_numpy(p).requires_grad_(True) for p in path))], 0)
    np.testing.assert_allclose(_loss_grad(m, x, y), want, rtol=1e-4, atol=1e-7)
    one = adaptive.TrajectoryBPDAModel(victim20, pur_tiny, points=1)
    np.testing.assert_allclose(_loss_grad(one, x, y), _loss_grad(adaptive.BPDAModel(victim20, pur_tiny.purify), x, y),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="points must be >= 1"):
        adaptive.TrajectoryBPDAModel(victim20, pur_tiny, points=0)


def test_unrolled_model_under_a_random_start_averages_its_draws(victim20, cifar):
    """EOT over the purifier's own draws: the forward is the mean of the victim's logits over ``eot``
    purifications that each start somewhere else in the eps ball, and the gradient is finite."""
    cfg = ZeroPurConfig(gs_steps=1, ap_steps=1, random_start=True)
    x = torch.from_numpy(cifar[0][:2])
    def seed_1(shape):
        return schedule.draw(cfg, shape, np.random.default_rng(1))
    m = adaptive.UnrolledModel(victim20, cfg, eot=3, draw=seed_1)
    same = adaptive.UnrolledModel(victim20, cfg, eot=1, draw=seed_1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), same(x))  # three identical draws average to one
    rng = np.random.default_rng(2)
    fresh = adaptive.UnrolledModel(victim20, cfg, eot=3, draw=lambda shape: schedule.draw(cfg, shape, rng))
    ref = ReferencePurifier(victim20, cfg, seed=2)
    with torch.no_grad():
        want = torch.stack([victim20(ref.purify(x)) for _ in range(3)]).mean(0)
        torch.testing.assert_close(fresh(x), want)
    g = _loss_grad(fresh, cifar[0][:2], cifar[1][:2])
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_first_success_pgd_freezes_each_image_where_it_first_fools(victim20, cifar):
    x, y = torch.from_numpy(cifar[0][:16]), torch.from_numpy(cifar[1][:16].astype(np.int64))
    small = dict(eps=1 / 255, step=0.25 / 255)  # a budget that fools some of these images, not all
    a = pgd_linf(victim20, x, y, steps=2, stop_at_success=True, **small)
    b = pgd_linf(victim20, x, y, steps=3, stop_at_success=True, **small)
    with torch.no_grad():
        fooled = victim20(a).argmax(1) != y
    assert 0 < fooled.sum() < 16                       # some fooled after 2 steps, some not yet
    assert torch.equal(a[fooled], b[fooled])           # fooled images no longer move
    assert not torch.equal(a[~fooled], b[~fooled])     # the rest keep going
    full = pgd_linf(victim20, x, y, steps=3, **small)
    assert (full - x).abs().amax((1, 2, 3)).mean() >= (b - x).abs().amax((1, 2, 3)).mean()
