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


@pytest.mark.parametrize("attack,small,large", [("square", 40, 150), ("hopskipjump", 40, 400)])
def test_a_smaller_budget_is_the_first_queries_of_a_larger_one(pur_fast, cifar, attack, small, large):
    """What lets a finished chunk answer another budget (``at_budget``): neither attack's path depends on its
    budget, so the run with the small budget breaks exactly the images the run with the large one broke within
    it, at the same query. A schedule rescaled to the budget (AutoAttack's ``rescale_schedule``) fails this.
    On the bare classifier, whose images take from a few queries to more than the large budget."""
    x, y = cifar[0][:8], cifar[1][:8]
    oracle = qa._oracle(pur_fast, "bare")
    got = {}
    for budget in (small, large):
        if attack == "square":
            got[budget] = qa.square(oracle, x, y, EPS, budget, seed=3)[0]
        else:
            got[budget] = qa.hopskipjump(oracle, x, y, EPS, budget, seed=3, batch=8, classes=10)[0]
    q = got[large]
    assert ((q > 1) & (q <= small)).any() and (q > small).any()  # both sides of the small budget are met
    np.testing.assert_array_equal(got[small], np.where(q > small, -1, q))


def test_eval_reads_finished_chunks_at_another_budget(art20, tmp_path, capsys):
    """A chunk run at 150 queries answers 60 (successes after 60 become failures); one run at 60 answers 150
    where it left no image standing and is run again where it did. Either way the report equals a fresh run,
    and a chunk whose other settings differ is still refused."""
    def square(out: str, queries: int, *extra: str) -> int:
        return main(["eval", "--artifacts", str(art20), "--rows", "0:6", "--batch", "2", "--attacks", "square",
                     "--queries", str(queries), "--seed", "2", "--out", str(tmp_path / out), "--quiet",
                     "--threads", "2", "--set", "gs_steps=1", "ap_steps=1", *extra])

    def report(out: str, queries: int) -> dict:
        assert square(out, queries) == 0, capsys.readouterr().err
        rows = json.loads((tmp_path / out / "eval.json").read_text())["attacks"]
        return next(r for r in rows if r["attack"] == "square")

    small, large = report("small", 60), report("large", 150)
    keys = ("queries_to_success", "queries_to_success_bare", "budgets", "robust_acc", "robust_acc_purified")
    shrunk = report("large", 60)
    assert shrunk["chunks_resumed"] == 6 and all(shrunk[k] == small[k] for k in keys)
    grown = report("small", 150)
    standing = sum(any(v < 0 for v in q[i:i + 2]) for q in (small["queries_to_success"],
                   small["queries_to_success_bare"]) for i in (0, 2, 4))
    assert 0 < standing < 6  # some chunks are read back and some run again: both paths are taken
    assert grown["chunks_resumed"] == 6 - standing and all(grown[k] == large[k] for k in keys)
    capsys.readouterr()
    assert square("small", 150, "--p-init", "0.5") == 2
    assert "other square-purified settings" in capsys.readouterr().err  # only the budget may differ


def test_hopskipjump_chunks_resume_image_by_image(art20, tmp_path, monkeypatch, capsys):
    """HopSkipJump writes each image's result as it finishes, and a chunk stopped part way runs only its
    unfinished images: the entries equal a ``--batch 1`` run's (each image seeded by its row, whatever its
    chunk), and the resumed report equals the uninterrupted one. A randomised purifier's chunks run whole."""
    def hsj(out: str, batch: int, *extra: str) -> dict:
        assert main(["eval", "--artifacts", str(art20), "--rows", "0:4", "--batch", str(batch), "--attacks",
                     "hopskipjump", "--queries", "150", "--seed", "4", "--out", str(tmp_path / out), "--quiet",
                     "--threads", "2", "--set", "gs_steps=1", "ap_steps=1", *extra]) == 0, capsys.readouterr().err
        rows = json.loads((tmp_path / out / "eval.json").read_text())["attacks"]
        return next(r for r in rows if r["attack"] == "hopskipjump")

    def entries(out: str) -> dict:
        return {f.relative_to(tmp_path / out).as_posix(): {k: v for k, v in json.loads(f.read_text()).items()
                                                           if k != "attack_s"}
                for f in sorted((tmp_path / out / "state").glob("hopskipjump-*/*.json"))}

    whole = hsj("whole", 4)
    one_by_one = entries("whole")
    assert len(one_by_one) == 2 * 5  # per target: the chunk and its four images
    hsj("single", 1)
    single = entries("single")
    assert len(single) == 2 * 4
    for name, entry in single.items():
        assert one_by_one[name]["queries_to_success"] == entry["queries_to_success"], name
        assert one_by_one[name]["distance"] == entry["distance"], name
    state = tmp_path / "whole" / "state"
    for target in ("purified", "bare"):
        (state / f"hopskipjump-{target}" / "000000-000004.json").unlink()
        (state / f"hopskipjump-{target}" / "000002-000003.json").unlink()
    attacked = []
    run = qa.hopskipjump
    monkeypatch.setattr(qa, "hopskipjump", lambda *a, **k: attacked.append(len(a[1])) or run(*a, **k))
    resumed = hsj("whole", 4)
    assert attacked == [1, 1]  # image 2, once per target
    for key in ("queries_to_success", "queries_to_success_bare", "budgets"):
        assert resumed[key] == whole[key]
    attacked.clear()
    hsj("random", 4, "random_start=true")
    assert attacked == [4, 1, 1, 1, 1]  # the randomised system's chunk whole; the bare classifier's by image
