"""The fast torch runner (issue 18): folded BatchNorm, channels-last, torch.compile'd gradient graphs.

It is another implementation of the reference's graphs, so it is judged as the exported graphs are
(``zeropur_export.graphs.parity``: within 2x the float32 spread of two torch float32 implementations on the same
inputs on this machine, against the float64 truth), and its whole loop against the reference's. Here on the
CPU (inductor's C++ backend); on a GPU ``benchmarks.gpu_speed`` measures it with the CUDA graph.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zeropur_rt.pipeline import Purifier  # noqa: E402

N = 8  # images: every graph call of this file has this batch, so each graph is compiled once


@pytest.fixture(scope="module")
def fast20(art20, victim20):
    from zeropur_export.reference.torch_runner import load_purifier
    with load_purifier(art20, victim=victim20, fast=True) as pur:
        yield pur


@pytest.fixture(scope="module")
def x_n(cifar):
    return cifar[0][:N]


def test_fast_graphs_pass_the_export_parity_rule(fast20, victim20, x_n):
    from zeropur_export.graphs.parity import RunnerGraphs, format_table, parity

    graphs = RunnerGraphs(fast20.runner, ("classifier", "gs_grad", "ap_setup", "ap_grad"), len(victim20.spec.ila))
    rows = parity(victim20, fast20.cfg, graphs, torch.from_numpy(x_n), "cifar10")
    assert {r.graph for r in rows} == {"classifier", "gs_grad", "ap_setup", "ap_grad"}
    assert all(r.ok for r in rows), format_table(rows)
    # the runner really is the folded, compiled one, and the caller's victim is left as it was
    assert fast20.runner.compute_victim is not victim20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast20.runner.compute_victim.net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in victim20.net.modules())
    assert all(p.is_contiguous() for p in victim20.net.parameters())
    steps = fast20.runner._steps
    assert {g for g, f in steps.items() if hasattr(f, "_torchdynamo_orig_callable")} == {"gs_grad", "ap_grad"}
    assert set(steps) == {"classifier", "gs_grad", "ap_setup", "ap_grad"}


def test_fast_loop_agrees_with_the_reference(fast20, victim20, x_n):
    """The whole recipe: the purified images classify as the reference's (the loop's float32 drift is the
    same as ONNX Runtime's; tests/export/test_runtime_parity.py measures its floor), and stay in the eps ball."""
    from zeropur_export.reference.purifier import ReferencePurifier

    out, pred = fast20.purify_and_classify(x_n)
    ref_out = ReferencePurifier(victim20, fast20.cfg).purify(torch.from_numpy(x_n))
    ref_pred = victim20(ref_out).argmax(1).numpy()
    assert (pred == ref_pred).mean() >= 7 / 8
    assert np.all(np.abs(out - x_n) <= fast20.cfg.eps + 1e-6)
    # about three quarters of the pixels identical here: the same loop, not a lookalike
    assert np.mean(out == ref_out.numpy()) > 0.25


def test_each_fast_runner_computes_with_its_own_weights(fast20, victim20, x_n):
    """Dynamo caches compilations per code object, shared by every runner, and inductor's freezing treats
    weights as constants: a second network of the same architecture, shapes and batch may share the first
    one's compilation, but never its weights."""
    from zeropur_export.graphs.parity import RunnerGraphs, rel_err
    from zeropur_export.reference.torch_runner import TorchRunner
    from zeropur_export.victims.zoo import load_victim

    other = load_victim("resnet20", random_init=True, seed=3)
    n_ila = len(victim20.spec.ila)
    runners = {name: RunnerGraphs(r, ("gs_grad",), n_ila) for name, r in (
        ("first", fast20.runner), ("other", TorchRunner(other, fast20.cfg, fast=True)),
        ("other_eager", TorchRunner(other, fast20.cfg)))}
    xb = x_n[:, :, ::-1, :].copy()
    g = {name: r.run("gs_grad", [x_n, xb])[0] for name, r in runners.items()}
    assert rel_err(g["other"], g["other_eager"]) < 1e-4 and rel_err(g["other"], g["first"]) > 0.1


def test_bf16_is_a_different_precision(victim20, fast20, x_n):
    """bf16 (autocast) is opt-in: its gradients part from float32's by far more than float32 rounding, yet
    point the same way; gpu_speed measures what that does to the loop."""
    from zeropur_export.graphs.parity import RunnerGraphs, rel_err
    from zeropur_export.reference.torch_runner import TorchRunner

    n_ila = len(victim20.spec.ila)
    bf16 = RunnerGraphs(TorchRunner(victim20, fast20.cfg, precision="bf16"), ("gs_grad",), n_ila)
    fp32 = RunnerGraphs(TorchRunner(victim20, fast20.cfg), ("gs_grad",), n_ila)
    xb = x_n[:, :, ::-1, :].copy()  # the images upside down as the GS target: a gradient far from zero
    g16, g32 = bf16.run("gs_grad", [x_n, xb])[0], fp32.run("gs_grad", [x_n, xb])[0]
    cos = float((g16 * g32).sum() / np.linalg.norm(g16) / np.linalg.norm(g32))
    assert 1e-3 < rel_err(g16, g32) < 0.5 and cos > 0.9, (rel_err(g16, g32), cos)


def test_fast_and_precision_options_are_checked(victim20, fast20):
    from zeropur_export.reference.torch_runner import TorchRunner

    cfg = fast20.cfg
    with pytest.raises(ValueError, match="tf32"):
        TorchRunner(victim20, cfg, precision="tf32")
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchRunner(victim20, cfg, precision="fp16")
    with pytest.raises(ValueError, match="autotune=True is an option of the compiled runner"):
        TorchRunner(victim20, cfg, autotune=True)
    with pytest.raises(ValueError, match="recompute"):
        TorchRunner(victim20, cfg, fast=True, ap_mode="recompute")
    assert isinstance(fast20, Purifier)


def test_gpu_speed_report_runs_on_the_cpu(art20, tmp_path, cifar):  # cifar: skipped without the shared data
    """benchmarks.gpu_speed (issue 18's GPU report), tiny and on the CPU so that it cannot rot: every row is
    measured, the compiled runner issues fewer top-level ops per step than eager autograd, and agreement is
    taken on real images."""
    import json

    from benchmarks import gpu_speed
    rc = gpu_speed.main(["--device", "cpu", "--models", "resnet20", "--batches", "2", "--agree-n", "3", "--reps", "1",
                         "--artifacts", str(art20.parent), "--out", str(tmp_path), "--set", "gs_steps=2", "ap_steps=2"])
    report = json.loads((tmp_path / "gpu_speed.json").read_text())
    (row,) = report["rows"]
    assert {"released", "autograd", "fast-fp32", "fast-bf16"} <= set(row) and "fast-tf32" not in row
    assert all(row[v]["ms_per_call"] > 0 and row[v]["gflops"] > 0 for v in ("released", "autograd", "fast-fp32"))
    assert row["fast-fp32"]["kernels_per_step"] < row["autograd"]["kernels_per_step"]
    agree = report["agreement"]["resnet20"]
    # float32 loops part on an image near a decision boundary at most: the fast loop agrees with the reference
    # on every image but one at worst, and no worse than the reference agrees with itself in its second order
    assert agree["n"] == 3 and agree["fast-fp32"]["same_prediction"] >= 100 * 2 / 3 - 1e-9
    if torch.backends.mkldnn.is_available():  # the float32 floor: the reference with oneDNN off, on the same images
        assert agree["float32-floor"]["tested"] == "reference with oneDNN off"
        assert agree["float32-floor"]["same_prediction"] >= 100 * 2 / 3 - 1e-9
        assert agree["fast-fp32"]["same_prediction"] >= agree["float32-floor"]["same_prediction"] - 100 / 3 - 1e-9
        assert "reference with oneDNN off" in (tmp_path / "gpu_speed.md").read_text()
    assert rc == (0 if agree["ok"] else 1)
    assert "| fast-fp32 |" in (tmp_path / "gpu_speed.md").read_text()
    # a short GPU lease runs fewer rows: the released cost (every ratio's base) and the ones asked for
    gpu_speed.main(["--device", "cpu", "--models", "resnet20", "--batches", "2", "--agree-n", "3", "--reps", "1",
                    "--artifacts", str(art20.parent), "--out", str(tmp_path / "few"), "--set", "gs_steps=2",
                    "ap_steps=2", "--variants", "fast-fp32", "--no-floor"])
    few = json.loads((tmp_path / "few" / "gpu_speed.json").read_text())
    assert set(few["rows"][0]) - {"model", "batch", "device"} == {"released", "fast-fp32"}
    assert set(few["agreement"]["resnet20"]) == {"n", "accuracy_reference", "fast-fp32", "ok"}
    with pytest.raises(ValueError, match="fast-tf32 is a mode of NVIDIA GPUs"):
        gpu_speed.main(["--device", "cpu", "--models", "resnet20", "--artifacts", str(art20.parent),
                        "--out", str(tmp_path / "tf32"), "--variants", "fast-tf32"])
