"""Per-victim calibration (zeropur_export.calibrate): a tiny search end to end through the CLI and the
Python API, the shared-work evaluator against the reference purifier, and the bad-input cases.
Fast: a handful of images, 1-2 steps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zeropur_rt.config import ZeroPurConfig, preset
from zeropur_export.data import cifar10_test_path, shared_dir

torch = pytest.importorskip("torch")
calib = pytest.importorskip("zeropur_export.calibrate")
from zeropur_export.calibrate import cli, search  # noqa: E402
from zeropur_export.calibrate.scorer import gs_key  # noqa: E402

TINY = ["--model", "resnet20", "--calib-rows", "5000:5012", "--stage-n", "6,9,12", "--grid-sigma", "1.0",
        "--grid-eps", "8", "--grid-gs-steps", "1,2", "--grid-gs-step", "1", "--grid-ap-steps", "1",
        "--grid-ila", "u1e-4,n0.1", "--refine-ap-steps", "2", "--ap-parents", "1", "--keep", "3",
        "--attack-steps", "1", "--no-paper", "--no-progress", "--batch", "16"]


@pytest.fixture(scope="module")
def real():
    for p, what in ((cifar10_test_path(), "CIFAR-10 test data"), (shared_dir() / "models" / "resnet20-12fca82f.th", "ResNet-20 weights")):
        if not p.exists():
            pytest.skip(f"{what} not found at {p} (set ZEROPUR_SHARED)")
    torch.set_num_threads(2)


def _accuracy_of(pct: float, n: int) -> int:
    """The number of correct images behind an accuracy in % over ``n`` images: an integer in [0, n] (a figure
    averaged over batches of unequal sizes, or over the wrong count, is not). Reports round % to 3 decimals."""
    k = pct * n / 100
    assert abs(k - round(k)) <= n * 5e-4 / 100 + 1e-9 and 0 <= round(k) <= n, (pct, n)
    return round(k)


def test_tiny_search_writes_a_loadable_config_and_report(real, tmp_path, capsys):
    out = tmp_path / "cal"
    rc = cli.main(TINY + ["--max-clean-drop", "100", "--out", str(out)])
    assert rc == 0
    cfg = ZeroPurConfig.from_dict(json.loads((out / "calibrated_config.json").read_text()))
    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"]["config"] == cfg.to_dict()
    assert rep["calib_rows"] == [5000, 5012] and rep["configs_tried"] == len(rep["configs"]) == 5
    assert rep["chosen"]["n"] == 12 and rep["chosen"]["within_budget"]
    for r in rep["configs"]:
        assert r["n"] in (6, 9, 12)
        _accuracy_of(r["clean_purified"], r["n"]), _accuracy_of(r["pgd_purified"], r["n"])
    md = (out / "report.md").read_text()
    assert "(chosen)" in md and md.count("\n| ") >= len(rep["configs"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    assert "chosen:" in capsys.readouterr().out


def test_worst_case_objective_scores_the_worst_attack_and_reports_both(real, tmp_path, capsys):
    out = tmp_path / "cal"
    # 12 images under a 2-iteration worst case: whether any config gains a point is a coin flip (ART 1.20.1 here:
    # none does), so no gain is asked for; what is checked is how the worst case is scored and reported
    rc = cli.main(TINY + ["--max-clean-drop", "100", "--out", str(out), "--objective", "worst", "--apgd-iter", "2",
                          "--bpda-steps", "1", "--min-robust-gain", "0"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["objective"]["name"] == "worst" and rep["objective"]["bpda_steps"] == 1
    assert 0 <= rep["unpurified"]["worst"] <= rep["unpurified"]["clean"]
    for r in rep["configs"]:
        # the objective is the worst case, the PGD figure stays beside it
        assert r["robust"] == r["worst_purified"] and 0 <= r["pgd_purified"] <= 100 and r["robust_base"] == r["worst"]
    c = rep["chosen"]
    assert c["worst_purified"] <= c["clean_purified"]
    md = (out / "report.md").read_text()
    assert "worst purified" in md and "max purified worst-case (APGD-CE/DLR-2, BPDA-1) accuracy" in md
    assert "worst case" in capsys.readouterr().out


def test_no_config_in_budget_exits_3_with_the_closest_miss_marked_and_reruns_from_cache(real, tmp_path, capsys):
    out = tmp_path / "cal"
    out.mkdir()
    (out / "calibrated_config.json").write_text("{}")  # stale: must not survive a failed calibration
    argv = [a if a != "1,2" else "3" for a in TINY]  # 3 GS steps of 8/255 wreck clean accuracy
    argv[argv.index("--grid-gs-step") + 1] = "8"
    rc = cli.main(argv + ["--max-clean-drop", "0", "--out", str(out)])
    assert rc == calib.EXIT_NO_FEASIBLE == 3
    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"] is None and "no config" in rep["message"]
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    # the stale {} is replaced by the closest miss, marked; build_config reads it and keeps the mark
    miss = json.loads((out / "calibrated_config.json").read_text())
    assert miss.pop("_budget").startswith("FAILS the budget") and miss == rep["fallback"]["config"]
    from zeropur_export.recipes import build_config
    cfg, prov = build_config("cifar10", out / "calibrated_config.json")
    assert cfg.to_dict() == miss and prov["budget"].startswith("FAILS")
    assert "no config kept purified clean accuracy" in capsys.readouterr().err
    # another threshold re-ranks the cached outcomes: nothing is purified again, the figures are the same
    rc = cli.main(argv + ["--max-clean-drop", "100", "--out", str(out)])
    assert rc == 0
    rep2 = json.loads((out / "report.json").read_text())
    assert f"{len(rep['configs'])} configs' outcomes reused" in capsys.readouterr().out
    before = {r["label"]: (r["n"], r["clean_purified"], r["pgd_purified"]) for r in rep["configs"]}
    assert all(before[r["label"]] == (r["n"], r["clean_purified"], r["pgd_purified"]) for r in rep2["configs"])
    assert "_budget" not in json.loads((out / "calibrated_config.json").read_text())


def test_python_api_returns_a_config_and_a_report(real, tmp_path):
    from zeropur_export.victims.zoo import load_victim
    from zeropur_export.data import load_cifar10_test, to_nchw_float
    victim = load_victim("resnet20")
    xs, ys = load_cifar10_test(None, 5000, 5008)
    x = to_nchw_float(xs)  # numpy in: the API takes torch or numpy images
    grid = calib.Grid(sigma=[1.0], eps_255=[8], gs_steps=[1], gs_step_255=[1], ap_steps=[1], ila=[(True, 0.1)],
                      ap_parents=1, refine_ap_steps=[2], keep=2, final=1, include_paper=False)
    lines: list[str] = []
    res = calib.calibrate(victim, x, ys, max_clean_drop=100, min_robust_gain=-100, grid=grid, stage_n=(4, 6, 8),
                          attack_steps=1, batch=8, progress=False, log=lines.append)
    assert isinstance(res.config, ZeroPurConfig)
    rep = res.report
    assert rep["chosen"]["config"] == res.config.to_dict() and rep["chosen"]["n"] == 8
    assert rep["configs_tried"] == len(rep["configs"]) == 3 and rep["n_calib"] == 8
    assert rep["search"]["stage_n"] == [4, 6, 8] and rep["search"]["grid_ila"] == ["n0.1"]
    assert [line.split(":")[0] for line in lines[1:]] == ["stage 1", "stage 2", "stage 3", "stage 4"]
    for r in rep["configs"]:  # AP variants travel eps in total (the one eps -> ap_step rule)
        if r["ap_steps"]:
            assert r["ap_step_255"] == pytest.approx(r["eps_255"] / r["ap_steps"])
    assert not list(tmp_path.iterdir())  # the API writes nothing unless asked
    res.save(tmp_path)
    assert json.loads((tmp_path / "calibrated_config.json").read_text()) == res.config.to_dict()
    ev = calib.evaluate_configs(victim, x[:4], ys[:4], {"chosen": res.config}, attack_steps=1, batch=4, progress=False)
    (r,) = ev.report["results"]
    assert r["config"] == res.config.to_dict() and ev.report["n"] == 4
    _accuracy_of(r["pgd_purified"], 4), _accuracy_of(r["clean_purified"], 4)
    with pytest.raises(calib.CalibError, match="grid.eps_255"):
        calib.calibrate(victim, x, ys, grid=calib.Grid(eps_255=[0]))
    with pytest.raises(calib.CalibError, match="labels must be in 0..9"):
        calib.calibrate(victim, x, np.full(8, 10), grid=grid, stage_n=(4, 6, 8))


def test_evaluator_matches_reference_purifier_and_extends_incrementally(real):
    from zeropur_export.reference.purifier import ReferencePurifier
    from zeropur_export.victims.zoo import load_victim
    from zeropur_export.data import load_cifar10_test, to_nchw_float
    victim = load_victim("resnet20")
    xs, ys = load_cifar10_test(None, 5000, 5006)
    x = torch.from_numpy(to_nchw_float(xs))
    def noisy(seed):
        return (x + 4 / 255 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))).clamp(0, 1)
    adv, adv2 = noisy(0), noisy(1)  # two attack blocks beside the clean one, as the worst-case objective has
    ev = calib.ConfigScorer(victim, x, {"pgd": adv, "apgd-ce": adv2}, ys, batch=4, progress=False)
    cfg = preset("cifar10", blur_sigma=1.0, eps=8 / 255, gs_steps=2, ap_steps=2, ap_step=4 / 255, ila_weight=0.1,
                 ila_normalized=True)
    gs_only = cfg.replace(ap_steps=0, gs_steps=1)  # a snapshot of the same GS trajectory
    ev.evaluate([cfg, gs_only], 3, "a")
    (r,) = ev.evaluate([cfg], 6, "b")  # only rows 3..5 are new
    ref = ReferencePurifier(victim, cfg)
    ref_gs = ReferencePurifier(victim, cfg.replace(ap_steps=0))  # the same loop, stopped after Guided Shift
    coarse = torch.from_numpy(ev.coarse(cfg, 0, 6))  # rows 0..5 of the clean block, then of each attack's block
    for src, ok, got in ((x, r.ok_clean, coarse[:6]), (adv, r.ok_adv, coarse[6:12]), (adv2, r.ok["apgd-ce"], coarse[12:])):
        np.testing.assert_array_equal(ok, ref.classify(ref.purify(src)).numpy() == ys)
        torch.testing.assert_close(got, ref_gs.purify(src), rtol=0, atol=1e-6)
    assert set(ev.gs[gs_key(cfg)]) == {1, 2}  # one GS trajectory, snapshots after 1 and 2 steps
    ref1 = ReferencePurifier(victim, gs_only)
    rec1 = ev.records[calib.cfg_key(gs_only)]
    assert rec1.n == 3 and rec1.stages == ["a"]
    np.testing.assert_array_equal(rec1.ok_clean, ref1.classify(ref1.purify(x[:3])).numpy() == ys[:3])
    s = ev.stats(r)
    assert s["n"] == 6 and s["clean"] == pytest.approx(100 * float((ref.classify(x).numpy() == ys).mean()))


def test_ranking_prefers_robust_inside_budget():
    class _Ev:
        def stats(self, r):
            return dict(n=1000, clean=80.0, clean_purified=r.cp, robust_base=0.0, robust=r.rob)

    class _R:
        def __init__(self, cp, rob, steps):
            self.cp, self.rob, self.n = cp, rob, 1000
            self.cfg = preset("cifar10", gs_steps=steps, ap_steps=0)

    a, b, c = _R(79.0, 30.0, 5), _R(70.0, 60.0, 5), _R(77.5, 35.0, 5)
    assert search.rank(_Ev(), [a, b, c], budget=3.0, slack_scale=0.0) == [c, a, b]
    identity = _R(80.0, 0.0, 5)  # inside the budget, but no robust gain: last, behind an over-budget config
    assert search.rank(_Ev(), [identity, b, c], budget=3.0, slack_scale=0.0) == [c, b, identity]
    assert search.feasible(_Ev(), c, 3.0) and not search.feasible(_Ev(), b, 3.0)


# ---------------------------------------------------------------- bad input: exit 2 with one clear message
@pytest.mark.parametrize("extra, msg", [
    (["--calib-rows", "4000:5100"], "overlaps the evaluation rows"),
    (["--calib-rows", "0:1000"], "overlaps the evaluation rows"),
    (["--calib-rows", "6000-7000"], "START:STOP"),
    (["--calib-rows", "6000:6000"], "START < STOP"),
    (["--max-clean-drop", "-1"], "--max-clean-drop"),
    (["--max-clean-drop", "nan"], "--max-clean-drop"),
    (["--stage-n", "64,32,128"], "--stage-n"),
    (["--grid-ila", "x0.1"], "--grid-ila"),
    (["--grid-eps", "0"], "--grid-eps"),
    (["--grid-ap-steps", "0"], "--grid-ap-steps"),
])
def test_bad_arguments_exit_2(extra, msg, capsys):
    assert cli.main(["--model", "resnet20", *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and msg in err


def test_unknown_model_and_missing_weights_file(capsys):
    assert cli.main(["--model", "nosuchnet"]) == 2
    assert "unknown --model" in capsys.readouterr().err
    assert cli.main(["--model", "resnet20", "--weights", "/nonexistent/w.th"]) == 2
    assert "--weights file not found" in capsys.readouterr().err


def test_data_without_labels_or_too_few_rows(real, tmp_path, capsys):
    p = tmp_path / "nolabels.npz"
    np.savez(p, x=np.zeros((10, 32, 32, 3), np.uint8))
    assert cli.main(["--model", "resnet20", "--data", str(p), "--calib-rows", "0:10", "--force-overlap"]) == 2
    assert "no 'y' labels" in capsys.readouterr().err
    q = tmp_path / "small.npz"
    np.savez(q, x=np.zeros((10, 32, 32, 3), np.uint8), y=np.zeros(10, np.int64))
    assert cli.main(["--model", "resnet20", "--data", str(q)]) == 2  # default rows 5000:6000
    assert "out of range" in capsys.readouterr().err
    r = tmp_path / "badlabels.npz"
    np.savez(r, x=np.zeros((10, 32, 32, 3), np.uint8), y=np.full(10, 12, np.int64))
    assert cli.main(["--model", "resnet20", "--data", str(r), "--calib-rows", "0:10", "--force-overlap"]) == 2
    assert "labels must be in 0..9" in capsys.readouterr().err
    assert cli.main(["--model", "resnet20", "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluation mode
def test_eval_mode_tiny_and_refuses_the_calibration_slice(real, tmp_path, capsys):
    cal = tmp_path / "cal"
    cal.mkdir()
    cfg = preset("cifar10", blur_sigma=1.0, eps=6 / 255, gs_steps=1, ap_steps=1, ap_step=6 / 255)
    (cal / "calibrated_config.json").write_text(json.dumps(cfg.to_dict()))
    (cal / "report.json").write_text(json.dumps({"calib_rows": [100, 200]}))
    cfgfile = str(cal / "calibrated_config.json")
    base = ["eval", "--model", "resnet20", "--config", cfgfile, "--attack-steps", "1", "--no-progress"]
    assert cli.main(base + ["--rows", "150:160"]) == 2
    assert "overlaps the calibration rows 100:200" in capsys.readouterr().err
    assert cli.main(base + ["--rows", "5500:5510"]) == 2
    assert "default calibration slice" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"eps": 0.1, "bogus": 1}))
    assert cli.main(["eval", "--model", "resnet20", "--config", str(bad)]) == 2
    assert "not a ZeroPurConfig JSON" in capsys.readouterr().err
    out = tmp_path / "ev"
    assert cli.main(base + ["--rows", "0:4", "--out", str(out), "--batch", "4"]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["rows"] == [0, 4] and len(rep["results"]) == 1
    r = rep["results"][0]
    assert r["config"] == cfg.to_dict() and r["calib_rows"] == [100, 200]
    for k in ("clean", "clean_purified", "pgd", "pgd_purified"):
        _accuracy_of(r[k], 4)
    assert "PGD-1, purified" in (out / "eval.md").read_text()  # the table names the attack that ran


def test_parents_come_from_the_pareto_front():
    class _Ev:
        def stats(self, r):
            return dict(n=64, clean=80.0, clean_purified=r.cp, robust_base=0.0, robust=r.rob)

    class _R:
        def __init__(self, cp, rob):
            self.cp, self.rob, self.n = cp, rob, 64
            self.cfg = preset("cifar10", gs_steps=5, ap_steps=0, eps=(cp + rob) / 2550)

    rs = [_R(60, 10), _R(55, 5), _R(50, 20), _R(40, 40), _R(30, 35), _R(20, 45)]
    front = search.pareto_front(_Ev(), rs)
    assert [(r.cp, r.rob) for r in front] == [(60, 10), (50, 20), (40, 40), (20, 45)]
    parents = search.pick_parents(_Ev(), rs, budget=13.0, slack=0.0, k=3)  # nothing inside 80-13
    assert [(r.cp, r.rob) for r in parents] == [(60, 10), (40, 40), (20, 45)]  # both ends and the middle


def test_a_config_without_robustness_gain_is_not_acceptable():
    class _Ev:
        def stats(self, r):
            return dict(n=500, clean=82.0, clean_purified=r[0], robust_base=0.0, robust=r[1])

    assert not search.acceptable(_Ev(), (82.0, 0.0), 3.0, 1.0)  # an expensive identity
    assert search.acceptable(_Ev(), (80.0, 40.0), 3.0, 1.0)
    assert not search.acceptable(_Ev(), (75.0, 40.0), 3.0, 1.0)
