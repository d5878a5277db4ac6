"""`zeropur-rt bench` on a tiny setting (so it cannot rot), its cost model, and its bad-input handling."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_rt.cli import main  # noqa: E402

TINY = ["--model", "resnet20", "--repeats", "1", "--warmup", "0", "--set", "gs_steps=1", "ap_steps=1"]


def test_bench_tiny_writes_table_json_and_plot(art20, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--artifacts", str(art20), "--batch", "1", "2", "--out", str(out)]) == 0
    res = json.loads((out / "latency.json").read_text())
    assert {(r["backend"], r["batch"]) for r in res["rows"]} == {(b, n) for b in ("released", "lean", "onnxruntime") for n in (1, 2)}
    assert all(r["p50_s"] > 0 and r["speedup_vs_released"] > 0 for r in res["rows"])
    assert (out / "latency.png").stat().st_size > 1000 and "| onnxruntime | 2 |" in (out / "latency.md").read_text()
    fe = res["cost_model"]
    # one GS step: x, blur(x) forward + 1 backward; one lean AP step: 1 forward + 1 backward; setup: 2 forwards
    assert fe["fe_lean"]["forward"] == 1 * 2 + 2 + 1 * 1 and fe["fe_lean"]["backward"] == 2
    assert fe["fe_released"]["forward"] > fe["fe_lean"]["forward"]
    macs = fe["macs"]["per_graph"]
    assert 2.9 * macs["classifier"] < macs["gs_grad"] < 3.01 * macs["classifier"]  # 2 forwards + input-grad backward
    assert 1.9 * macs["classifier"] < macs["ap_grad"] < 2.01 * macs["classifier"]
    assert "x vs released" in capsys.readouterr().out


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
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--artifacts", str(art20), "--backends", "cuda-magic", "--out", str(out)])
    assert "unknown backend" in capsys.readouterr().err
