"""``zeropur-export check`` (Polygraphy) and the build plan of a batch-1 artifact, on real ResNet-20 exports.

The batch-1 export is what ``--max-batch 1`` writes: static shapes. Issue 16 item 1: it must get an engine
plan (min = opt = max = 1); here shown with the builder's dry run, which needs no TensorRT.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")
check = pytest.importorskip("zeropur_export.engines.check")
from zeropur_export.engines.cli import main_check  # noqa: E402
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def art_b1(tmp_path_factory, victim20):
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_rt.config import preset
    return export_artifacts(victim20, preset("cifar10"), tmp_path_factory.mktemp("b1") / "resnet20", model="resnet20",
                            batch=(1, 1, 1))


def test_batch1_export_is_static_and_gets_an_engine_plan(art_b1, capsys):
    from zeropur_export.engines.builder import onnx_input_dims, plan_build
    from zeropur_export.engines.cli import main_build_engines
    from zeropur_rt.manifest import load_manifest
    m = load_manifest(art_b1)
    assert m.batch == {"min": 1, "opt": 1, "max": 1}
    assert all(d[0] == 1 for g in m.graphs.values() for d in onnx_input_dims(art_b1 / g["file"]).values())
    for trt_version in ("10.3.0.30", "11.4.0.106"):  # JetPack 6.1/6.2, the newest pip TensorRT
        plan = plan_build(art_b1, m, trt_version, "8.7", "fp32")
        assert [gp.graph for gp in plan.graphs] == ["classifier", "gs_grad", "ap_setup", "ap_grad"]
        for gp in plan.graphs:
            for name, (lo, opt, hi) in gp.profiles.items():
                assert lo == opt == hi and lo[0] == 1, (gp.graph, name)
    assert main_build_engines([str(art_b1), "--dry-run", "--trt-version", "10.3.0.30", "--compute-capability", "8.7"]) == 0
    out = capsys.readouterr().out
    assert "engine set sm87.trt10.3.fp32" in out and "ap_grad.sm87.trt10.3.fp32.engine" in out
    assert "fine min (1, 3, 32, 32) opt (1, 3, 32, 32) max (1, 3, 32, 32)" in out


def test_check_passes_on_a_batch1_export(art_b1, capsys):
    assert main_check([str(art_b1)]) == 0
    out = capsys.readouterr().out
    for g in ("classifier", "gs_grad", "ap_setup", "ap_grad"):
        assert f"ok   inspect     {g} " in out and f"ok   onnxruntime {g} @ batch 1 " in out
    if not HAVE_TRT:
        assert "skip tensorrt" in out and "tensorrt is not importable here" in out
    assert "FAIL" not in out


def test_check_compares_every_manifest_batch_size(art20):
    from zeropur_rt.manifest import load_manifest
    sizes = sorted(set(load_manifest(art20).batch.values()))
    rows = check.check_artifact(art20, trt="off", log=lambda s: None)
    ort = [r for r in rows if r.step == "onnxruntime"]
    assert sorted({r.batch for r in ort}) == sizes
    assert len(ort) == 4 * len(sizes) and all(r.ok for r in rows if r.step != "tensorrt")
    assert [r.ok for r in rows if r.step == "tensorrt"] == [None]


def test_check_fails_when_manifest_and_graphs_disagree(art_b1, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(art_b1, bad)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["batch"] = {"min": 1, "opt": 2, "max": 4}  # the graphs have a fixed batch of 1
    (bad / "manifest.json").write_text(json.dumps(raw))
    assert main_check([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL inspect" in out and "fixed batch of 1" in out


def test_comparator_catches_a_wrong_output(art_b1):
    from zeropur_rt.manifest import load_manifest
    from zeropur_rt.pipeline import Purifier
    m = load_manifest(art_b1)
    with Purifier.load(art_b1, threads=1) as pur:
        feeds = check.graph_feeds(pur, 1)["gs_grad"]
        ours = pur.run_graph("gs_grad", feeds)
    ref = check._polygraphy_outputs(art_b1, m, "gs_grad", feeds)
    func = check._compare_func(1e-4, 1e-5, "elemwise")
    assert check._compare(ref, ours, "runtime", func)[0]
    wrong = dict(ours, grad=ours["grad"] * np.float32(1.01))
    ok, detail = check._compare(ref, wrong, "runtime", func)
    assert not ok and "grad max abs" in detail


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is importable here")
def test_check_trt_on_without_tensorrt_is_an_error(art_b1, capsys):
    assert main_check([str(art_b1), "--trt", "on"]) == 2
    assert "tensorrt is not importable" in capsys.readouterr().err
