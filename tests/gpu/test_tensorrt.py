"""GPU tests of the TensorRT backend: engine builds, FP32 gradient parity, the Purifier on TensorRT
against the torch reference, the device-resident loop, and CUDA graph replay bit for bit.

Skipped, with the reason, where TensorRT, cuda-python or a CUDA device is missing.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from zeropur_rt.kernels import cuda as zc

if importlib.util.find_spec("tensorrt") is None:
    pytest.skip("TensorRT Python bindings not installed (pip install 'zeropur-rt[trt]')", allow_module_level=True)
_ok, _why = zc.cuda_python_available()
if not _ok:
    pytest.skip(f"no GPU path: {_why}", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_export.engines import build_engines  # noqa: E402
from zeropur_rt import engine_record as bt  # noqa: E402
from zeropur_rt.manifest import load_manifest  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

GRAPHS = ("classifier", "gs_grad", "ap_setup", "ap_grad")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def trt_art20(art20):
    """The session's ResNet-20 artifact (batch 1/32/64) with fp32 engines built for this GPU."""
    rec = build_engines(art20, precision="fp32")
    return art20, rec


@pytest.fixture(scope="module")
def pur_trt(trt_art20):
    pur = Purifier.load(trt_art20[0], backend="tensorrt", device="cuda")
    yield pur
    pur.close()


@pytest.fixture(scope="module")
def pur_ort(art20):
    return Purifier.load(art20, threads=2)


def test_engines_built_and_recorded(trt_art20):
    art, rec = trt_art20
    m = load_manifest(art)  # hashes of the engines verified too
    import tensorrt as trt
    cc = zc.CudaKernels().compute_capability
    key = bt.engine_key(cc, trt.__version__, "fp32")
    assert key in m.engines and set(m.engines[key]["graphs"]) == set(GRAPHS)
    for g in GRAPHS:
        f = m.engines[key]["graphs"][g]["file"]
        assert f == bt.engine_filename(g, cc, trt.__version__, "fp32") and f in m.files and (art / f).is_file()
    assert (art / f"timing_cache.{bt.sm_tag(cc)}.trt{bt.trt_major_minor(trt.__version__)}.bin").is_file()
    logs = []
    build_engines(art, precision="fp32", log=logs.append)  # second call: nothing to do
    assert any("up to date" in s for s in logs)


def test_resnet56_engines_build(victim56, tmp_path):
    from zeropur_export.onnx_export import export_artifacts
    from zeropur_rt.config import preset
    art = export_artifacts(victim56, preset("cifar10"), tmp_path / "r56", model="resnet56", batch=(1, 8, 16))
    rec = build_engines(art, precision="fp32")
    assert set(rec["graphs"]) == set(GRAPHS)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    pur = Purifier.load(art, backend="tensorrt", device="cuda", overrides={"gs_steps": 2, "ap_steps": 3})
    ort = Purifier.load(art, overrides={"gs_steps": 2, "ap_steps": 3}, threads=2)
    assert rel_err(pur.logits(x), ort.logits(x)) < 1e-4
    pur.close()


def test_fp32_gradients_match_onnxruntime_and_torch(pur_trt, pur_ort, victim20, cifar):
    from zeropur_export.reference import ReferencePurifier, blur_torch
    x = cifar[0][:16]
    xb = blur_torch(torch.from_numpy(x), pur_trt.cfg.blur_sigma).numpy()
    coarse = np.clip(x + pur_trt.cfg.eps * np.sign(np.random.default_rng(0).random(x.shape) - 0.5), 0, 1).astype(np.float32)
    feeds = {"classifier": {"x": x}, "gs_grad": {"x": x, "x_blur": xb}, "ap_setup": {"x_in": x, "coarse": coarse}}
    feeds["ap_grad"] = pur_ort.run_graph("ap_setup", feeds["ap_setup"]) | {"fine": coarse}
    ref = ReferencePurifier(victim20, pur_trt.cfg)
    torch_grad = ref.gs_grad(torch.from_numpy(x), torch.from_numpy(xb))[0].numpy()
    for g in GRAPHS:
        a, b = pur_trt.run_graph(g, feeds[g]), pur_ort.run_graph(g, feeds[g])
        for name in b:
            assert a[name].shape == b[name].shape and a[name].dtype == np.float32
            assert rel_err(a[name], b[name]) < 1e-4, f"{g}.{name}: TensorRT vs ONNX Runtime {rel_err(a[name], b[name]):.2e}"
    assert rel_err(pur_trt.run_graph("gs_grad", feeds["gs_grad"])["grad"], torch_grad) < 1e-4


def test_teacher_forced_parity_on_tensorrt(pur_trt, victim20, cifar):
    from benchmarks.runtime_parity import teacher_forced
    rows = teacher_forced(pur_trt, victim20, cifar[0][:16])
    failing = [r for r in rows if not r.ok]
    assert len(failing) <= len(rows) // 10, failing
    assert all(np.isfinite(r.ort_err) and r.ort_err < 1e-2 for r in rows)


def test_purifier_on_tensorrt_agrees_with_torch_reference(pur_trt, victim20, cifar):
    from benchmarks.runtime_parity import free_running
    x, y = cifar[0][:64], cifar[1][:64]
    r = free_running(pur_trt, victim20, x, y, batch=32)
    print(f"\nTensorRT free-running: same prediction {r['same_prediction']:.4f}, same pixels {r['same_pixels']:.4f}")
    assert r["same_prediction"] >= 63 / 64
    assert abs(r["acc_tested"] - r["acc_reference"]) <= 2 * 100 / 64


def test_batch_above_profile_is_refused(pur_trt):
    hi = pur_trt.runner.batch["max"]
    x = np.zeros((hi + 1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match=f"maximum batch {hi}"):
        pur_trt.purify(x)


def test_engines_for_another_tensorrt_are_refused(trt_art20, tmp_path):
    art = tmp_path / "copy"
    shutil.copytree(trt_art20[0], art)
    raw = json.loads((art / "manifest.json").read_text())
    for rec in raw["engines"].values():
        rec["tensorrt"] = "9.9.9.9"
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(bt.EngineMismatchError, match="build-engines"):
        Purifier.load(art, backend="tensorrt", device="cuda")


@pytest.fixture(scope="module")
def loops(trt_art20):
    with Purifier.load(trt_art20[0], backend="tensorrt", cuda_graph=True) as graph, \
            Purifier.load(trt_art20[0], backend="tensorrt", cuda_graph=False) as plain:
        yield graph, plain


def test_device_loop_agrees_with_onnxruntime(loops, pur_ort, cifar):
    _, plain = loops
    x = cifar[0][:32]
    out_dev, pred_dev = plain.purify_and_classify(x)
    out_host, pred_host = pur_ort.purify_and_classify(x)
    assert np.mean(pred_dev == pred_host) >= 31 / 32
    assert np.max(np.abs(out_dev - out_host)) <= 2 * plain.cfg.eps + 1e-6


def test_cuda_graph_replay_equals_plain_run_bit_for_bit(loops, cifar):
    graph, plain = loops
    for n in (1, 32):
        for i, start in enumerate((0, 100, 200)):  # call 1: plain run + capture; calls 2, 3: replays
            x = cifar[0][start:start + n]
            a = graph.purify(x)
            b = plain.purify(x)
            assert a.view(np.uint32).tobytes() == b.view(np.uint32).tobytes(), f"batch {n} call {i}"
        assert graph.graph_captured(n), f"no CUDA graph captured at batch {n}"
        assert not plain.graph_captured(n)


def test_fp16_engines_build_and_roughly_agree(trt_art20, pur_ort, cifar):
    try:
        build_engines(trt_art20[0], precision="fp16")
    except ImportError as e:
        pytest.skip(str(e))
    pur16 = Purifier.load(trt_art20[0], backend="tensorrt", device="cuda", precision="fp16",
                          overrides={"gs_steps": 3, "ap_steps": 5})
    assert pur16.runner.precision == "fp16"
    x = cifar[0][:32]
    p16 = pur16.classify(x)
    p32 = pur_ort.classify(x)
    assert np.mean(p16 == p32) >= 0.9
    pur16.close()
