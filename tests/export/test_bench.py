"""`zeropur-export bench` on a tiny setting (so it cannot rot), its cost model, its --set handling and bad input;
`zeropur-rt bench` (deploy time, no torch); `zeropur-export demo` and the command line around them."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_export.cli import main  # noqa: E402

TINY = ["--model", "resnet20", "--repeats", "1", "--warmup", "0", "--set", "gs_steps=1", "ap_steps=1"]


def test_bench_tiny_writes_table_json_and_plot(art20, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--artifacts", str(art20), "--batch", "1", "2", "--workers", "1", "2",
                 "--out", str(out)]) == 0
    res = json.loads((out / "latency.json").read_text())
    assert {(r["backend"], r["workers"], r["batch"]) for r in res["rows"]} == {
        (b, w, n) for b, w in (("released", None), ("lean", None), ("onnxruntime", 1), ("onnxruntime", 2)) for n in (1, 2)}
    assert all(r["p50_s"] > 0 and r["speedup_vs_released"] > 0 for r in res["rows"])
    md = (out / "latency.md").read_text()
    assert (out / "latency.png").stat().st_size > 1000 and "| onnxruntime (2 workers) | 2 |" in md
    assert "| onnxruntime (1 worker) | 2 |" in md and "| released | 2 |" in md
    # a single image on two workers: the session it ran on was measured, and the table says which
    probed = [(r["workers"], r["batch"]) for r in res["rows"] if "single_image" in r]
    assert probed == [(2, 1)] and "one-thread worker's (same bytes: " in md
    # the runtime rows carry the Purifier's stage timings, every stage of the loop present
    for r in res["rows"]:
        assert ("stages_pct" in r) == (r["backend"] == "onnxruntime")
    pct = next(r for r in res["rows"] if r["backend"] == "onnxruntime")["stages_pct"]
    assert {"blur", "gs_engine", "gs_update", "ap_setup", "ap_engine", "ap_update"} <= set(pct)
    assert sum(pct.values()) == pytest.approx(100)
    fe = res["cost_model"]
    # one GS step: x, blur(x) forward + 1 backward; one lean AP step: 1 forward + 1 backward; setup: 2 forwards
    assert fe["fe_lean"]["forward"] == 1 * 2 + 2 + 1 * 1 and fe["fe_lean"]["backward"] == 2
    assert fe["fe_released"]["forward"] > fe["fe_lean"]["forward"]
    macs = fe["macs"]["per_graph"]
    assert 2.9 * macs["classifier"] < macs["gs_grad"] < 3.01 * macs["classifier"]  # 2 forwards + input-grad backward
    assert 1.9 * macs["classifier"] < macs["ap_grad"] < 2.01 * macs["classifier"]
    # the sgemm ceiling is read before and after the timings; the larger one is every percentage's base
    assert len(fe["peak_gflops_readings"]) == 2 and fe["peak_gflops"] == max(fe["peak_gflops_readings"]) > 0
    # each reading is threads x the faster of the two BLAS libraries' one-thread rates, both named in the table
    for reading, blas in zip(fe["peak_gflops_readings"], fe["sgemm_one_thread_gflops"]):
        assert set(blas) == {"torch", "numpy"} and reading == res["threads"] * max(blas.values())
    assert "torch's " in md and "numpy's " in md
    assert "x vs released" in capsys.readouterr().out


def test_bench_torch_fast_row(art20, tmp_path):
    """The fast torch runner's row (compiled in the warm-up call, which is not timed)."""
    out = tmp_path / "fast"
    assert main(["bench", *TINY, "--warmup", "1", "--artifacts", str(art20), "--backends", "released", "torch-fast", "--batch", "2",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "latency.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["released", "torch-fast"]
    # no timed assert (a loaded CI box can make any row slow): the ratio is the two rows' own medians
    assert rows[1]["speedup_vs_released"] == pytest.approx(rows[0]["p50_s"] / rows[1]["p50_s"])
    assert "| torch-fast | 2 |" in (out / "latency.md").read_text()


def test_bench_set_parses_fractions_and_booleans_for_every_row(art20, tmp_path):
    """The one --set parser: 8/255 is a fraction, false is False (the old bench parser made it True)."""
    out = tmp_path / "set"
    assert main(["bench", *TINY, "--set", "eps=8/255", "ila_normalized=false", "--backends", "lean", "onnxruntime",
                 "--artifacts", str(art20), "--batch", "1", "--out", str(out)]) == 0
    cfg = json.loads((out / "latency.json").read_text())["config"]
    assert cfg["eps"] == pytest.approx(8 / 255) and cfg["ila_normalized"] is False
    assert cfg["gs_steps"] == 1 and cfg["ap_steps"] == 1
    # the eps -> ap_step rule of ZeroPurConfig.replace: one AP step travels the whole (new) eps, as the preset does
    assert cfg["ap_step"] == pytest.approx(8 / 255)


def test_bench_refuses_a_baked_field(art20, tmp_path, capsys):
    out = tmp_path / "baked"
    assert main(["bench", *TINY, "--set", "ila_weight=1e-3", "--artifacts", str(art20), "--batch", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ila_weight is baked into the exported ap_grad graph" in err and "re-export" in err
    assert not out.exists()


def test_bench_sweep_tiny(art20, tmp_path):
    out = tmp_path / "sweep"
    assert main(["bench", *TINY, "--artifacts", str(art20), "--sweep", "--sweep-n", "4", "--sweep-gs", "0", "1",
                 "--sweep-ap", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["gs_steps"], r["ap_steps"]) for r in rows] == [(0, 1), (1, 1)]
    assert (out / "sweep.png").is_file()


def test_bench_bad_input_leaves_no_json(art20, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["bench", *TINY, "--artifacts", str(art20), "--batch", "65", "--out", str(out)]) == 2
    assert "do not fit this artifact (1..64)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["bench", *TINY, "--set", "eps=8/0", "--artifacts", str(art20), "--out", str(out)]) == 2
    assert "--set eps=8/0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--artifacts", str(art20), "--backends", "cuda-magic", "--out", str(out)])
    assert "unknown backend" in capsys.readouterr().err


def test_demo_runs_the_calibrated_recipe_by_default(victim20, cifar, tmp_path, capsys, monkeypatch):
    """The first run shows the shipped calibrated recipe, says so, and its artifacts are that recipe's only."""
    from zeropur_export.recipes import recipe_config
    from zeropur_rt.manifest import load_manifest
    monkeypatch.chdir(tmp_path)                     # the default artifacts/<model>-<recipe> lands here
    art = tmp_path / "artifacts" / "resnet20-calibrated"
    assert main(["demo", "--n", "2", "--batch", "2", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "recipe calibrated (sigma 0.7, eps 6/255, GS 5 x 1/255, AP 50 x 0.12/255, ILA 0.0001)" in out
    assert "| resnet20 | calibrated |" in out and "ap_engine" in out
    _, cfg, _ = recipe_config("resnet20", "calibrated")
    assert load_manifest(art).config == cfg.to_dict()
    (res,) = json.loads((tmp_path / "d.json").read_text())
    assert res["recipe"] == "calibrated" and res["backend"] == "onnxruntime" and res["n"] == 2
    # the directory holds the calibrated export: the paper recipe may not reuse it
    assert main(["demo", "--n", "2", "--recipe", "paper", "--artifacts", str(art)]) == 2
    assert "exported with another config" in capsys.readouterr().err


def test_demo_reference_backend_no_export(victim20, cifar, tmp_path, capsys):
    assert main(["demo", "--n", "2", "--batch", "2", "--backend", "reference", "--recipe", "paper",
                 "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "| resnet20 | paper |" in out and "torch reference (lean AP), no export" in out
    (res,) = json.loads((tmp_path / "d.json").read_text())
    assert res["config"]["gs_steps"] == 10 and res["config"]["blur_sigma"] == 1.8 and res["kernels"] == "torch"


def test_cli_commands_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["-h"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("export", "build-engines", "calibrate", "demo", "bench", "eval"))
    with pytest.raises(SystemExit):
        main(["bench", "-h"])                       # the command's own parser answers its -h
    assert "--sweep" in capsys.readouterr().out
    assert main(["demo", "--recipe", "calibrated", "--model", "resnet32"]) == 2
    assert "no calibrated recipe ships for resnet32" in capsys.readouterr().err
    assert main(["export", "resnet20", "--out", str(tmp_path / "a"), "--random-init", "--set", "eps=8/0"]) == 2
    assert "--set eps=8/0" in capsys.readouterr().err


def test_rt_bench_times_the_runtime_without_torch(art20, tmp_path):
    """`zeropur-rt bench` (deploy time) in a fresh interpreter: a row per worker count and batch, stage shares of
    every stage, the single-image probe on the two-worker batch-1 row alone, achieved GFLOP/s from the graphs'
    MACs, and torch never imported."""
    import subprocess
    import sys
    out = tmp_path / "rt"
    code = ("import sys; from zeropur_rt.cli import main; "
            f"rc = main(['bench', {str(art20)!r}, '--threads', '2', '--workers', '1', '2', '--batch', '1', '3', "
            f"'--repeats', '2', '--set', 'gs_steps=1', 'ap_steps=2', '--out', {str(out)!r}]); "
            "assert 'torch' not in sys.modules, 'zeropur-rt bench imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "latency.json").read_text())
    assert [(r["workers"], r["batch"], r["repeats"]) for r in res["rows"]] == [(1, 1, 2), (1, 3, 2), (2, 1, 2), (2, 3, 2)]
    for r in res["rows"]:
        assert r["p50_s"] > 0 and r["s_per_image"] == pytest.approx(r["p50_s"] / r["batch"])
        assert {"blur", "gs_engine", "gs_update", "ap_setup", "ap_engine", "ap_update"} <= set(r["stages_pct"])
        assert sum(r["stages_pct"].values()) == pytest.approx(100)
        assert ("single_image" in r) == (r["workers"] == 2 and r["batch"] == 1)
        assert r["achieved_gflops"] == pytest.approx(2 * res["macs_per_image"] * r["batch"] / r["p50_s"] / 1e9)
    assert res["config"]["gs_steps"] == 1 and res["config"]["ap_steps"] == 2
    md = (out / "latency.md").read_text()
    assert "| onnxruntime (2 workers) | cpu | 3 |" in md and "single images ran on the" in md
    assert md.strip() in proc.stdout


def test_rt_bench_bad_input_writes_nothing(art20, tmp_path, capsys):
    from zeropur_rt.cli import main
    out = tmp_path / "rt"
    assert main(["bench", str(art20), "--batch", "1", "65", "--out", str(out)]) == 2
    assert "batch of 65 images exceeds the maximum batch 64" in capsys.readouterr().err
    assert main(["bench", str(art20), "--repeats", "0", "--out", str(out)]) == 2
    assert "need --repeats >= 1" in capsys.readouterr().err
    few = tmp_path / "few.npz"
    np.savez(few, x=np.zeros((2, 32, 32, 3), np.uint8))
    assert main(["bench", str(art20), "--batch", "4", "--data", str(few), "--out", str(out)]) == 2
    assert "holds 2 images; the largest --batch needs 4" in capsys.readouterr().err
    assert not out.exists()
