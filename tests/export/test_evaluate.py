"""``zeropur-export eval``: ART attacks, the BPDA preprocessor wrapper, the report, and bad input (tiny settings)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("art")
torch = pytest.importorskip("torch")

from zeropur_export.attacks import suite  # noqa: E402
from zeropur_export.attacks.suite import ADAPTIVE, DEFAULT, WORST  # noqa: E402
from zeropur_export.cli import main  # noqa: E402

FAST = ["--set", "gs_steps=1", "ap_steps=1", "--quiet", "--threads", "2"]


@pytest.fixture(scope="module")
def pur20(art20):
    from zeropur_rt import Purifier
    return Purifier.load(art20, threads=2, overrides=dict(gs_steps=1, ap_steps=1))


def test_preprocessor_is_purify_forward_identity_backward(pur20, victim20, cifar):
    from zeropur_export.attacks.art_bridge import ZeroPurPreprocessor, art_classifier, bpda_classifier
    x, y = cifar[0][:6], cifar[1][:6]
    pre = ZeroPurPreprocessor(pur20, batch_size=4)           # two purifier calls: chunking must not change the result
    assert pre.apply_predict and not pre.apply_fit
    out, y_out = pre(x, y)
    np.testing.assert_array_equal(out, pur20.purify(x))
    assert y_out is y and pre.images == 6
    g = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    g_copy = g.copy()
    np.testing.assert_array_equal(pre.estimate_gradient(x, g), g_copy)  # BPDA: incoming gradient unchanged

    # Inside ART's PyTorchClassifier: predict / loss_gradient purify first, then the identity backward,
    # i.e. exactly the bare classifier's gradient taken at the purified images.
    bpda = bpda_classifier(victim20, pur20)
    bare = art_classifier(victim20)
    assert not bpda.all_framework_preprocessing
    xp = pur20.purify(x)
    np.testing.assert_allclose(bpda.predict(x), bare.predict(xp), rtol=1e-5, atol=1e-5)
    y1h = np.eye(10, dtype=np.float32)[y]                  # ART's estimators take one-hot labels
    gb = bpda.loss_gradient(x, y1h)
    np.testing.assert_allclose(gb, bare.loss_gradient(xp, y1h), rtol=1e-5, atol=1e-7)
    assert np.abs(gb).sum() > 0
    # EOT over a deterministic purifier: k samples average to the same gradient, at k purifications a step.
    eot = bpda_classifier(victim20, pur20, eot_samples=3)
    pre_eot = eot.preprocessing_operations[0]
    np.testing.assert_allclose(eot.loss_gradient(x, y1h), gb, rtol=1e-5, atol=1e-7)
    assert pre_eot.calls == 3
    with pytest.raises(ValueError, match="does not fit"):
        ZeroPurPreprocessor(pur20, batch_size=pur20.max_batch + 1)


def _eval(art20, out, *extra):
    return main(["eval", "--models", "resnet20", "--artifacts", str(art20), "--rows", "0:12", "--batch", "8",
                 "--pgd-steps", "3", "--apgd-iter", "3", "--apgd-targets", "2", "--adaptive-iter", "2",
                 "--bpda-steps", "2", "--queries", "20", "--adaptive-n", "6", "--trajectory-points", "3", "--seed", "3",
                 "--out", str(out), *FAST, *extra])


def test_eval_end_to_end_every_attack_resumable(art20, victim20, cifar, tmp_path, capsys):
    """Every attack of the set on a tiny setting (so none can rot), the worst-case rule, and resuming."""
    out = tmp_path / "ev"
    assert _eval(art20, out) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    md = (out / "eval.md").read_text()
    rows = {r["attack"]: r for r in res["attacks"]}
    assert set(DEFAULT) < set(rows) and WORST in rows
    for name in rows:
        assert f"| {name} |" in md or f"| **{name}** |" in md
    assert md.index(WORST) < md.index("| pgd |")          # the worst case comes first
    assert res["n"] == 12 and res["rows"] == [0, 12] and res["seed"] == 3
    assert res["purifier_config"]["gs_steps"] == 1 and res["purifier_config"]["ap_steps"] == 1
    clean = res["clean"]
    y = cifar[1][:12]
    # Bare clean accuracy is the victim's own, image by image.
    with torch.no_grad():
        ref = victim20(torch.from_numpy(cifar[0][:12])).argmax(1).numpy() == y
    assert clean["correct"] == "".join("1" if c else "0" for c in ref) and clean["acc"] > 50
    for name in DEFAULT:
        r = rows[name]
        assert r["attack_s"] > 0 and r["linf"] <= 8 / 255 + 1e-5 and r["chunks_resumed"] == 0
        assert len(r["correct"]) == r["n"] == (6 if name in ADAPTIVE else 12)
        assert r["robust_acc"] == pytest.approx(100 * r["correct"].count("1") / r["n"])
    assert rows["apgd-t"]["candidates"] == 2 and rows["transfer"]["params"]["source"] == "resnet56"
    # A few steps on the bare ResNet-20 must hurt it.
    for name in ("pgd", "pgd-first", "apgd-ce"):
        assert rows[name]["robust_acc"] < clean["acc"]
    # Worst case per image: robust only if robust against every attack (on the images all of them covered).
    w = rows[WORST]
    assert w["n"] == 6
    for i in range(6):
        assert (w["correct_purified"][i] == "1") == all(rows[a]["correct_purified"][i] == "1" for a in DEFAULT)

    # The same command again reads every chunk back (nothing recomputed) and reports the same figures.
    assert _eval(art20, out) == 0
    again = {r["attack"]: r for r in json.loads((out / "eval.json").read_text())["attacks"]}
    for name in DEFAULT:
        assert again[name]["chunks_resumed"] == again[name]["chunks"] >= 1
        assert again[name]["correct_purified"] == rows[name]["correct_purified"]
    # A half-finished run (one chunk file lost) recomputes that chunk alone, seeded as before: same images.
    lost = sorted((out / "state" / "apgd-ce").glob("*.json"))[-1]
    lost.unlink()
    assert _eval(art20, out, "--attacks", "apgd-ce") == 0
    r = json.loads((out / "eval.json").read_text())["attacks"][0]
    assert r["chunks_resumed"] == r["chunks"] - 1 and r["correct"] == rows["apgd-ce"]["correct"]
    capsys.readouterr()
    # Other settings on the same state are refused, --fresh starts over.
    assert _eval(art20, out, "--eps", "4") == 2
    assert "other settings (eps differ)" in capsys.readouterr().err
    assert _eval(art20, out, "--attacks", "pgd", "--pgd-steps", "4") == 2
    assert "other pgd settings" in capsys.readouterr().err
    assert _eval(art20, out, "--attacks", "pgd", "--eps", "4", "--fresh") == 0


def test_cascade_attacks_the_survivors_only_and_resumes(art20, tmp_path, capsys):
    """AutoAttack's protocol: each attack, cheapest first whatever the order asked, meets exactly the images
    the clean image and every earlier attack left robust; no image comes back; a lost chunk of a survivors'
    batch (rows not contiguous) is recomputed alone, to the same figures."""
    out = tmp_path / "casc"
    # No Guided Shift and 1/255: a purifier that keeps most clean images and a PGD step that breaks some, not all.
    cmd = ["eval", "--artifacts", str(art20), "--rows", "0:12", "--batch", "3", "--attacks", "bpda-apgd-ce",
           "unrolled-apgd-ce", "pgd", "--pgd-steps", "1", "--adaptive-iter", "2", "--eps", "1", "--seed", "2",
           "--cascade", "--out", str(out), "--quiet", "--threads", "2", "--set", "gs_steps=0", "ap_steps=2"]
    assert main(cmd) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    stages = res["cascade"]
    assert [s["attack"] for s in stages] == ["pgd", "bpda-apgd-ce", "unrolled-apgd-ce"] and res["attacks"] == []
    alive = suite.unbits(res["clean"]["correct_purified"])
    assert 4 <= alive.sum() < 12 and 0 < stages[0]["broken"] < stages[0]["attacked"]
    for s in stages:
        after = suite.unbits(s["correct_purified"])
        assert s["attacked"] == alive.sum() and not (after & ~alive).any()
        assert s["broken"] == alive.sum() - after.sum()
        assert s["robust_acc_purified"] == pytest.approx(100 * after.mean())
        files = sorted((out / "state" / f"cascade-{s['attack']}").glob("*.json"))
        chunk_rows = [json.loads(f.read_text()).get("rows") or list(range(*map(int, f.stem.split("-"))))
                      for f in files]
        assert sum(chunk_rows, []) == list(np.flatnonzero(alive))
        alive = after
    md = (out / "eval.md").read_text()
    assert f"**Worst case over every attack: {stages[-1]['robust_acc_purified']:.1f}%** of 12 images" in md
    assert md.index("Worst case over every attack") < md.index("| pgd |") < md.index("| bpda-apgd-ce |")
    scattered = [f for f in sorted((out / "state" / "cascade-pgd").glob("*.json")) if '"rows"' in f.read_text()]
    assert scattered, "every survivors' chunk was contiguous: this setting no longer tests scattered rows"
    scattered[0].unlink()
    assert main(cmd) == 0
    again = json.loads((out / "eval.json").read_text())["cascade"]
    assert [s["chunks"] - s["chunks_resumed"] for s in again] == [1, 0, 0]
    assert [s["correct_purified"] for s in again] == [s["correct_purified"] for s in stages]


def _bad(tmp_path, *extra):
    out = tmp_path / "bad"
    rc = main(["eval", "--n", "4", "--out", str(out), *FAST, *extra])
    return rc, out


def test_bad_attack_backend_rows_set(art20, tmp_path, capsys):
    for extra, msg in ((["--attacks", "pgd", "cw"], "unknown attack"),
                       (["--backend", "tvm"], "unknown backend"),
                       (["--rows", "5:2"], "--rows"),
                       (["--set", "nosuch=1"], "unknown config field 'nosuch'"),
                       (["--set", "gs_steps=two"], "--set gs_steps=two"),
                       (["--set", "lpips_weight=2"], "lpips_weight is baked into the exported ap_grad graph"),
                       (["--cascade", "--adaptive-n", "2"], "--adaptive-n / --unrolled-n do not apply")):
        rc, out = _bad(tmp_path, "--artifacts", str(art20), *extra)
        err = capsys.readouterr().err
        assert rc != 0 and msg in err, (extra, err)
        assert not (out / "eval.json").exists()


def test_batch_too_big_for_artifact(art20, tmp_path, capsys):
    rc, out = _bad(tmp_path, "--artifacts", str(art20), "--batch", "65")
    err = capsys.readouterr().err
    assert rc == 2 and "max batch 64" in err
    assert not (out / "eval.json").exists()


def test_no_partial_json_on_error(art20, tmp_path, capsys, monkeypatch):
    def boom(self, name, x, y, seed):
        raise RuntimeError("attack exploded")
    monkeypatch.setattr(suite.Crafter, "craft", boom)
    rc, out = _bad(tmp_path, "--artifacts", str(art20), "--attacks", "pgd")
    assert rc == 2 and "attack exploded" in capsys.readouterr().err
    assert not (out / "eval.json").exists()


def test_art_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "art", None)           # `import art` now raises ImportError
    monkeypatch.delitem(sys.modules, "zeropur_export.attacks.art_bridge", raising=False)
    rc, out = _bad(tmp_path, "--artifacts", str(tmp_path / "nowhere"))
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'zeropur-rt[eval]'" in err
    assert not out.exists()


def test_set_fraction_and_boolean_reach_the_purifier(art20, tmp_path, capsys):
    out = tmp_path / "set"
    rc = main(["eval", "--artifacts", str(art20), "--rows", "0:2", "--batch", "2", "--attacks", "pgd", "--pgd-steps", "1",
               "--out", str(out), *FAST, "--set", "eps=8/255", "ila_normalized=false"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    assert res["overrides"] == dict(gs_steps=1, ap_steps=1, eps=8 / 255, ila_normalized=False)
    assert res["purifier_config"]["eps"] == pytest.approx(8 / 255)


def test_randomised_purifier_under_eot_resumes_to_the_same_figures(art20, tmp_path, capsys):
    """A random start and a jittered blur, attacked with EOT: the purifier's draws are reseeded per chunk, so a
    lost chunk recomputed alone gives the figures the whole run gave."""
    out = tmp_path / "rand"
    cmd = ["eval", "--artifacts", str(art20), "--rows", "0:4", "--batch", "2", "--attacks", "bpda-apgd-ce",
           "unrolled-apgd-ce", "--adaptive-iter", "2", "--eot", "2", "--unrolled-n", "2", "--seed", "1",
           "--out", str(out),
           *FAST, "--set", "random_start=true", "blur_sigma_jitter=0.5"]
    assert main(cmd) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    assert res["purifier_config"]["random_start"] is True and res["purifier_config"]["blur_sigma_jitter"] == 0.5
    rows = {r["attack"]: r for r in res["attacks"]}
    assert rows["bpda-apgd-ce"]["params"]["eot"] == rows["unrolled-apgd-ce"]["params"]["eot"] == 2
    assert "x EOT 2" in (out / "eval.md").read_text()
    for lost in (sorted((out / "state" / a).glob("*.json"))[-1] for a in ("bpda-apgd-ce", "unrolled-apgd-ce")):
        lost.unlink()
    assert main(cmd) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["clean"]["correct_purified"] == res["clean"]["correct_purified"]
    for r in again["attacks"]:
        if r["group"] != "worst":
            assert r["chunks_resumed"] == r["chunks"] - 1
        assert r["correct_purified"] == rows[r["attack"]]["correct_purified"] and r["linf"] == rows[r["attack"]]["linf"]


def test_resume_compares_settings_as_the_run_meant_them(tmp_path, monkeypatch):
    """The run that exports the artifact is handed its absolute path, the rerun the relative one; a state made
    before a config field existed has that field at its default. Neither is another run; other values are."""
    from zeropur_export.attacks.suite import Ledger
    from zeropur_rt.config import ZeroPurConfig
    monkeypatch.chdir(tmp_path)
    cfg = ZeroPurConfig().to_dict()
    older = {k: v for k, v in cfg.items() if k not in ("random_start", "blur_sigma_jitter")}
    Ledger(tmp_path / "state", dict(artifact_dir=str(tmp_path / "artifacts" / "r20"), purifier_config=older))
    Ledger(tmp_path / "state", dict(artifact_dir="artifacts/r20", purifier_config=cfg))
    with pytest.raises(ValueError, match="artifact_dir differ"):
        Ledger(tmp_path / "state", dict(artifact_dir="artifacts/r56", purifier_config=cfg))
    with pytest.raises(ValueError, match="purifier_config differ"):
        Ledger(tmp_path / "state", dict(artifact_dir="artifacts/r20", purifier_config={**cfg, "random_start": True}))
