"""Black-box query attacks (``zeropur_export.attacks.query``) through the runtime Purifier on a real ResNet-20
artifact, tiny budgets: what counts as a success, per-budget scoring, fresh draws, resuming."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("art")
pytest.importorskip("torch")

from zeropur_export.attacks import query as qa  # noqa: E402
from zeropur_export.cli import main  # noqa: E402

EPS = 8 / 255


@pytest.fixture(scope="module")
def pur_fast(art20):
    from zeropur_rt import Purifier
    return Purifier.load(art20, threads=2, overrides=dict(gs_steps=1, ap_steps=1))


@pytest.mark.parametrize("attack", ["square", "hopskipjump"])
def test_success_is_the_first_query_labelled_wrong_inside_the_ball(pur_fast, cifar, attack):
    """Every query is recorded; the query an image is scored broken at is the first one that lies in the eps
    ball around it and that the system labels wrong, and the attack asks nothing after it or past the budget."""
    x, y = cifar[0][:4], cifar[1][:4]
    oracle = qa._oracle(pur_fast, "purified")
    broken = 0
    for i in range(len(x)):
        asked: list[np.ndarray] = []

        def logits_of(v):
            asked.extend(v.copy())
            return oracle(v)
        pur_fast.reseed(0)
        if attack == "square":
            q, _ = qa.square(logits_of, x[i:i + 1], y[i:i + 1], EPS, 60, seed=i)
        else:
            q, _ = qa.hopskipjump(logits_of, x[i:i + 1], y[i:i + 1], EPS, 60, seed=i, batch=8, classes=10)
        pur_fast.reseed(0)  # the same draws again (a deterministic config: the same answers)
        labels = np.concatenate([oracle(np.stack(asked[j:j + 8])).argmax(1) for j in range(0, len(asked), 8)])
        inside = np.abs(np.stack(asked) - x[i]).reshape(len(asked), -1).max(1) <= EPS + 1e-6
        hits = np.flatnonzero(inside & (labels != y[i]))
        assert len(asked) <= 60
        if q[0] > 0:
            broken += 1
            assert len(hits) and hits[0] + 1 == q[0] <= len(asked)  # HopSkipJump asks in batches
            assert attack == "hopskipjump" or q[0] == len(asked)
        else:
            assert not len(hits)
        if attack == "square":
            assert inside.all()  # Square never leaves the ball
    assert broken >= 1


def test_randomised_purifier_answers_each_query_with_a_fresh_draw(art20, cifar):
    from zeropur_rt import Purifier
    pur = Purifier.load(art20, threads=2, overrides=dict(gs_steps=1, ap_steps=1, random_start=True))
    oracle = qa._oracle(pur, "purified")
    x = cifar[0][:2]
    pur.reseed(5)
    a, b = oracle(x), oracle(x)
    assert not np.array_equal(a, b)  # the same image asked twice: two draws
    pur.reseed(5)
    assert np.array_equal(oracle(x), a) and np.array_equal(oracle(x), b)  # reseeded per chunk: a resume draws the same
    bare = qa._oracle(pur, "bare")
    assert np.array_equal(bare(x), bare(x))


def test_eval_query_attacks_per_budget_and_resume(art20, tmp_path, capsys):
    out = tmp_path / "q"
    cmd = ["eval", "--artifacts", str(art20), "--rows", "0:4", "--batch", "2", "--attacks", "square", "hopskipjump",
           "--queries", "120", "--query-n", "3", "--seed", "1", "--out", str(out), "--quiet", "--threads", "2",
           "--set", "gs_steps=1", "ap_steps=1"]
    assert main(cmd) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    rows = {r["attack"]: r for r in res["attacks"]}
    md = (out / "eval.md").read_text()
    assert "| 100 queries | 120 queries |" in md
    for name in ("square", "hopskipjump"):
        r = rows[name]
        assert r["n"] == 3 and r["group"] == "black-box" and [b["queries"] for b in r["budgets"]] == [100, 120]
        for target, key, acc in (("purified", "queries_to_success", "robust_acc_purified"),
                                 ("bare", "queries_to_success_bare", "robust_acc")):
            q = np.array(r[key])
            assert ((q == -1) | ((q >= 1) & (q <= 120))).all()
            assert r[acc] == pytest.approx(100 * (q == -1).mean())
            at = [b[acc] for b in r["budgets"]]
            assert at[0] >= at[1] == r[acc]  # more queries never leave more images robust
        assert r["chunks"] == 4 and r["chunks_resumed"] == 0  # two chunks, each against both targets
    # the bare ResNet-20 falls to 120 Square queries on at least one of these images
    assert rows["square"]["robust_acc"] < 100
    assert main(cmd) == 0
    again = {r["attack"]: r for r in json.loads((out / "eval.json").read_text())["attacks"]}
    for name in ("square", "hopskipjump"):
        assert again[name]["chunks_resumed"] == 4
        assert again[name]["queries_to_success"] == rows[name]["queries_to_success"]
    capsys.readouterr()
    assert main(cmd + ["--cascade"]) == 2
    assert "scored per budget" in capsys.readouterr().err
