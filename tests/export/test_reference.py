"""Properties of the reference purifier on real weights and real images."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zeropur_export.reference.losses import ap_loss_recompute, ap_loss_terms, blur_torch  # noqa: E402
from zeropur_export.reference.purifier import ReferencePurifier  # noqa: E402
from zeropur_export.reference.steps import input_grad  # noqa: E402
from zeropur_rt.config import preset  # noqa: E402

from conftest import rel_err  # noqa: E402

CFG = preset("cifar10")


@pytest.fixture(scope="module")
def x64(cifar):
    return torch.from_numpy(cifar[0][:64])


@pytest.fixture(scope="module")
def lean_vs_recompute(victim20, x64):
    # 32 images, a whole purification per formulation; the teacher-forced test below checks AP gradients by step
    lean = ReferencePurifier(victim20, CFG, "lean").purify(x64[:32])
    rec = ReferencePurifier(victim20, CFG, "recompute").purify(x64[:32])
    return lean, rec


def test_lean_and_recompute_ap_agree_end_to_end(victim20, lean_vs_recompute):
    lean, rec = lean_vs_recompute
    same_pred = (victim20(lean).argmax(1) == victim20(rec).argmax(1)).float().mean().item()
    same_px = (lean == rec).float().mean().item()
    print(f"\nlean vs recompute on 32 images: identical predictions {same_pred:.4f}, identical pixels {same_px:.4f}")
    assert same_pred == 1.0
    assert same_px >= 0.95


def test_lean_and_recompute_gradients_teacher_forced(victim20, x64):
    """From the same iterate, lean and re-computing AP gradients differ by float32 noise only: the re-computing
    one (the released code's formulation) passes the graph-parity rule against the float64 truth, its float32
    spread measured by the lean one in torch's two float32 orders on the same inputs."""
    from zeropur_export.graphs.parity import format_table, in_second_float32_order, parity_row
    x_in = x64[:8]
    _, trace = ReferencePurifier(victim20, CFG).purify_with_iterates(x_in)
    coarse = torch.from_numpy(trace.coarse)
    v64 = victim20.to_dtype(torch.float64)
    lean, truth = ReferencePurifier(victim20, CFG, "lean"), ReferencePurifier(v64, CFG, "lean")
    c32 = lean.ap_setup(x_in, coarse)
    c64 = truth.ap_setup(x_in.double(), coarse.double())
    for t in (0, 1, 10, 25, 49):
        fine = torch.from_numpy(trace.ap_x[t])
        g_lean = lean.ap_grad(fine, c32)
        g_rec = input_grad(lambda f: ap_loss_recompute(victim20, f, x_in, coarse, CFG), fine)[0]
        g_true = truth.ap_grad(fine.double(), c64)
        g_alt = in_second_float32_order(lambda: lean.ap_grad(fine, c32))
        assert torch.isfinite(g_lean).all()
        refs = [g_lean.numpy()] + ([] if g_alt is None else [g_alt.numpy()])
        row = parity_row("resnet20", "ap_grad", "grad", f"step {t}", g_rec.numpy(), refs, g_true.numpy())
        print(f"AP step {t}: lean err {rel_err(g_lean, g_true):.2e}, recompute err {rel_err(g_rec, g_true):.2e}")
        assert row.ok, format_table([row])


def test_ap_gradient_is_finite_at_zero_lpips_distance(victim20, x64):
    pur = ReferencePurifier(victim20, CFG)
    x = x64[:4]
    c = pur.ap_setup(x, x)  # coarse == x_in: ILA direction 0, and fine == x_in: LPIPS distance 0
    g = pur.ap_grad(x, c)
    assert torch.isfinite(g).all()
    assert float(g.abs().max()) == 0.0  # both terms are stationary there


def test_batch_independence_per_sample_scope(victim20, x64):
    x = x64[:6]
    pur = ReferencePurifier(victim20, CFG)
    xb = blur_torch(x, CFG.blur_sigma)
    g_batch, _ = pur.gs_grad(x, xb)
    for i in (0, 3, 5):
        g_one, _ = pur.gs_grad(x[i:i + 1], xb[i:i + 1])
        # the batch-mean loss scales each sample's gradient by 1/B; the L1 normalisation removes it
        a = g_batch[i] / g_batch[i].abs().sum()
        b = g_one[0] / g_one[0].abs().sum()
        assert rel_err(a, b) < 1e-4
    together = pur.classify(pur.purify(x))
    alone = torch.cat([pur.classify(pur.purify(x[i:i + 1])) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_batch_l1_scope_couples_samples(victim20, x64):
    x = x64[:6]
    gs_only = dict(ap_steps=0)
    per_sample = ReferencePurifier(victim20, CFG.replace(**gs_only))
    coupled = ReferencePurifier(victim20, CFG.replace(l1_scope="batch", **gs_only))
    diff_sample = (per_sample.purify(x)[:1] != per_sample.purify(x[:1])).float().mean().item()
    diff_batch = (coupled.purify(x)[:1] != coupled.purify(x[:1])).float().mean().item()
    print(f"\nGS output of sample 0, alone vs in a batch of 6: pixels differing, scope=sample {diff_sample:.4f}, "
          f"scope=batch {diff_batch:.4f}")
    assert diff_batch > 0.01
    assert diff_sample < diff_batch / 10


def test_deterministic_on_cpu(victim20, x64):
    pur = ReferencePurifier(victim20, CFG.replace(gs_steps=3, ap_steps=5))
    a, b = pur.purify(x64[:8]), pur.purify(x64[:8])
    assert a.numpy().tobytes() == b.numpy().tobytes()


def test_purified_stays_in_eps_ball_and_unit_box(victim20, lean_vs_recompute, x64):
    lean, _ = lean_vs_recompute
    assert float((lean - x64[:32]).abs().max()) <= CFG.eps + 1e-7
    assert float(lean.min()) >= 0 and float(lean.max()) <= 1


def test_ap_loss_terms_report_paper_scale(victim20, x64):
    pur = ReferencePurifier(victim20, CFG)
    x = x64[:8]
    coarse = ReferencePurifier(victim20, CFG.replace(ap_steps=0)).purify(x)
    c = pur.ap_setup(x, coarse)
    ila, lp = ap_loss_terms(victim20, coarse, c)
    # at fine == coarse the ILA term is -mean ||h(coarse) - h(x_in)||^2 summed over layers: negative
    assert float(ila) < 0 and float(lp) > 0


BAD = [
    (np.zeros((3, 32, 32), np.float32), "rank 4"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
    (np.zeros((1, 1, 32, 32), np.float32), "channels"),
    (np.zeros((1, 3, 31, 32), np.float32), "32x32"),
    (np.zeros((1, 3, 32, 32), np.uint8), "float32 or float64"),
    (np.full((1, 3, 32, 32), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN"),
    (np.full((1, 3, 32, 32), np.inf, np.float32), "NaN or Inf"),
]


@pytest.mark.parametrize("x,msg", BAD, ids=[m for _, m in BAD])
def test_bad_images_give_clear_errors(victim20, x, msg):
    pur = ReferencePurifier(victim20, CFG)
    with pytest.raises(ValueError, match=msg):
        pur.purify(torch.from_numpy(x))


@pytest.mark.parametrize("field,value,msg", [("eps", 0.0, "eps must be > 0"), ("eps", -1.0, "eps must be > 0"),
                                             ("gs_steps", -1, "gs_steps"), ("ap_steps", -2, "ap_steps"),
                                             ("gs_step", 0.0, "gs_step"), ("l1_scope", "pixel", "l1_scope"),
                                             ("eps", float("nan"), "finite")])
def test_bad_config_gives_clear_errors(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        CFG.replace(**{field: value})


def test_gs_only_victim_refuses_ap_steps():
    from zeropur_export.victims.zoo import load_victim
    v = load_victim("vgg19_bn", random_init=True)
    with pytest.raises(ValueError, match="Guided Shift only"):
        ReferencePurifier(v, CFG)
    out = ReferencePurifier(v, CFG.replace(ap_steps=0, gs_steps=2)).purify(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32)
