"""AutoAttack's semantics (``zeropur_export.attacks.autoattack``) on the real ResNet-20 and CIFAR-10 rows, tiny budgets."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zeropur_export.attacks import autoattack as aa  # noqa: E402
from zeropur_export.attacks.pgd import stable_cross_entropy  # noqa: E402

EPS = 8 / 255


def test_apgd_returns_the_last_misclassified_iterate(victim20, cifar):
    """Every iterate the model gets wrong overwrites the output (AutoAttack's x_best_adv), so the image that
    comes back is the *last* such iterate, not the first; an image never fooled comes back clean."""
    x, y = torch.from_numpy(cifar[0][:8]), torch.from_numpy(cifar[1][:8])
    trace = aa.APGDTrace()
    torch.manual_seed(0)
    adv, fooled = aa.apgd(victim20, x, y, 0.5 / 255, iters=12, trace=trace)
    assert len(trace.iterates) == 13  # the random start and one per iteration
    wrong = torch.stack(trace.fooled)  # (iterates, images)
    assert torch.equal(fooled, wrong.any(0))
    first_differs = 0
    for i in range(len(x)):
        hits = torch.nonzero(wrong[:, i])[:, 0]
        if not len(hits):
            assert torch.equal(adv[i], x[i])
            continue
        assert torch.equal(adv[i], trace.iterates[int(hits[-1])][i])
        first_differs += not torch.equal(adv[i], trace.iterates[int(hits[0])][i])
        assert (adv[i] - x[i]).abs().max() <= 0.5 / 255 + 1e-6 and 0 <= adv[i].min() and adv[i].max() <= 1
    # The setting must tell "last" from "first", and keep some images robust, or this test checks nothing.
    assert first_differs >= 1 and 0 < fooled.sum() < len(x)


def test_standard_runs_each_attack_on_the_survivors_only(victim20, cifar, monkeypatch):
    """The clean check, then APGD-CE, APGD-T (target by target) and Square, each on exactly the images every
    earlier step left robust on the bare model; a broken image keeps the candidate that broke it."""
    x, y = cifar[0][:16], cifar[1][:16]
    seen: list[tuple[str, np.ndarray, np.ndarray]] = []  # (attack, the images it met, which it broke)
    apgd, square = aa.apgd, aa.square_linf

    def spy_apgd(model, xs, ys, eps, iters=100, loss="ce", target=None, **kw):
        adv, fooled = apgd(model, xs, ys, eps, iters, loss, target, **kw)
        seen.append((f"apgd-{loss}", xs.numpy().copy(), fooled.numpy()))
        return adv, fooled

    def spy_square(logits_of, xs, ys, eps, queries=5000, p_init=0.8, seed=0, on_query=None):
        best, q = square(logits_of, xs, ys, eps, queries, p_init, seed, on_query)
        seen.append(("square", xs.copy(), q > 0))
        return best, q

    monkeypatch.setattr(aa, "apgd", spy_apgd)
    monkeypatch.setattr(aa, "square_linf", spy_square)
    eps = 1 / 255  # weak enough that each stage leaves survivors for the next
    adv, stages = aa.standard(victim20, x, y, eps, iters=3, targets=2, queries=30, seed=1)
    with torch.no_grad():
        clean_ok = victim20(torch.from_numpy(x)).argmax(1).numpy() == y
        adv_ok = victim20(torch.from_numpy(adv)).argmax(1).numpy() == y
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    alive = clean_ok.copy()
    assert [s for s, _, _ in seen] == ["apgd-ce", "apgd-dlr-targeted", "apgd-dlr-targeted", "square"]
    for name, xs, broke in seen:
        idx = np.array([rows[r.tobytes()] for r in xs])
        assert sorted(idx) == list(np.flatnonzero(alive)), name  # exactly the survivors so far
        assert not adv_ok[idx[broke]].any()  # a broken image keeps the candidate that broke it
        alive[idx[broke]] = False
    assert np.array_equal(alive, adv_ok)
    assert [s.attack for s in stages] == list(aa.STANDARD)
    assert stages[0].attacked == clean_ok.sum() and 0 < stages[0].broken < stages[0].attacked
    assert sum(s.broken for s in stages) == clean_ok.sum() - adv_ok.sum()
    assert np.array_equal(adv[adv_ok], x[adv_ok]) and np.abs(adv - x).max() <= eps + 1e-6
    assert np.array_equal(adv[~clean_ok], x[~clean_ok])  # never attacked


def test_square_counts_queries_and_stays_in_the_ball(victim20, cifar):
    x, y = cifar[0][:6], cifar[1][:6]
    calls = []

    def logits_of(v):
        calls.append(len(v))
        with torch.no_grad():
            return victim20(torch.from_numpy(v)).numpy()
    best, q = aa.square_linf(logits_of, x, y, 2 / 255, queries=40, seed=0)
    assert np.abs(best - x).max() <= 2 / 255 + 1e-6 and best.min() >= 0 and best.max() <= 1
    with torch.no_grad():
        wrong = victim20(torch.from_numpy(best)).argmax(1).numpy() != y
    assert np.array_equal(wrong, q > 0) and 0 < (q > 0).sum() < 6 and q.max() <= 40
    # one call per query, holding the images not yet broken: image i is asked q_i times (40 if never broken)
    asked = np.where(q > 0, q, 40)
    assert sum(calls) == asked.sum() and len(calls) == asked.max()
    # AutoAttack's schedule, not rescaled to the budget
    assert [aa.square_fraction(0.8, i) for i in (1, 10, 11, 50, 51, 8000, 8001)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512]


def test_stable_cross_entropy_is_ce_without_the_float32_floor():
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8
    y = torch.arange(64) % 10
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    assert torch.allclose(stable_cross_entropy(z, y, "none"), ce, rtol=1e-10, atol=1e-13)  # float64 CE itself cancels at small values
    big = torch.zeros(1, 10)
    big[0, 3] = 40.0  # margin 40: float32 CE rounds to exactly 0, and so does its gradient
    t = torch.tensor([3])
    assert torch.nn.functional.cross_entropy(big, t).item() == 0.0
    b = big.clone().requires_grad_(True)
    stable_cross_entropy(b, t).backward()
    assert stable_cross_entropy(big, t).item() > 0 and b.grad.abs().max() > 0
    assert stable_cross_entropy(big, torch.nn.functional.one_hot(t, 10)).item() == stable_cross_entropy(big, t).item()


def test_eval_stable_ce_reaches_the_ce_attacks_and_is_recorded(art20, tmp_path, capsys):
    """``--ce stable-ce``: pgd and ART's APGD-CE minimise the stable loss (named in their parameters, so a run
    made with the default loss is not resumed under it), and still break the bare classifier."""
    import json

    from zeropur_export.cli import main
    out = tmp_path / "ce"
    cmd = ["eval", "--artifacts", str(art20), "--rows", "0:4", "--batch", "4", "--attacks", "pgd", "apgd-ce",
           "autoattack", "--pgd-steps", "3", "--apgd-iter", "3", "--apgd-targets", "1", "--queries", "10",
           "--out", str(out), "--quiet", "--threads", "2", "--set", "gs_steps=1", "ap_steps=1"]
    assert main(cmd + ["--ce", "stable-ce"]) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    rows = [r for r in res["attacks"] if r["group"] != "worst"]
    assert [r["attack"] for r in rows] == ["pgd", "apgd-ce", "autoattack"]
    for r in rows:
        assert r["params"]["ce"] == "stable-ce" and r["robust_acc"] < res["clean"]["acc"]
    capsys.readouterr()
    assert main(cmd) == 2  # the same chunks under the default loss: refused, not silently mixed
    assert "other pgd settings" in capsys.readouterr().err
