"""GPU tests of the TensorRT backend: engine builds (batch range and fixed batch 1, fp32 and fp16, another
device), FP32 gradient parity, the Purifier on TensorRT against the torch reference, the device-resident
loop with and without CUDA graph replay, one activation buffer, a failed capture and TensorRT's logger.

None of these has run yet: no machine here could install TensorRT (see the README's GPU section).

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
    pytest.skip("TensorRT Python bindings not installed (pip install 'zeropur-rt[trt-cu12]' or '[trt-cu13]')",
                allow_module_level=True)
_ok, _why = zc.cuda_python_available()
if not _ok:
    pytest.skip(f"no GPU path: {_why}", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_export.engines.builder import build_engines  # noqa: E402
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
    from zeropur_export.graphs.onnx_export import export_artifacts
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
    from zeropur_export.reference.losses import blur_torch
    from zeropur_export.reference.purifier import ReferencePurifier
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
    """Every call passes the CPU tests' rule (zeropur_export.graphs.parity.ParityRow.ok), its float32 spread and flips
    measured by the references on this GPU: cuDNN's order and torch's second order (cuDNN off)."""
    from benchmarks.runtime_parity import summary, teacher_forced
    rows = teacher_forced(pur_trt, victim20.to_dtype(torch.float32).to("cuda"), cifar[0][:16])
    print(f"\nTensorRT teacher-forced on 16 images: {summary(rows)}")
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def _gpu_reference_and_floor(victim20, cfg, x, y):
    """The float32 reference on this GPU (cuDNN) and the float32 floor: the same reference with cuDNN off (torch's
    second order), on the same images: how far two correct float32 loops drift apart free-running here."""
    from benchmarks.runtime_parity import float32_floor, reference_outputs
    v = victim20.to_dtype(torch.float32).to("cuda")
    ref = reference_outputs(v, cfg, x, batch=32)
    return v, ref, float32_floor(v, cfg, x, y, batch=32, reference=ref)


def test_purifier_on_tensorrt_agrees_with_torch_reference(pur_trt, victim20, cifar):
    """The CPU tests' rule (tests/export/test_runtime_parity.py): at least as close to the reference as its own float32 floor."""
    from benchmarks.runtime_parity import free_running
    x, y = cifar[0][:64], cifar[1][:64]
    v, ref, floor = _gpu_reference_and_floor(victim20, pur_trt.cfg, x, y)
    r = free_running(pur_trt, v, x, y, batch=32, reference=ref)
    print(f"\nTensorRT free-running: same prediction {r['same_prediction']:.4f}, same pixels {r['same_pixels']:.4f}; "
          f"floor {floor['same_prediction']:.4f}, {floor['same_pixels']:.4f}")
    assert r["same_prediction"] >= 63 / 64
    assert r["same_prediction"] >= floor["same_prediction"] and r["same_pixels"] >= floor["same_pixels"]


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


def test_device_loop_agrees_with_onnxruntime(loops, pur_ort, victim20, cifar):
    _, plain = loops
    x = cifar[0][:32]
    out_dev, pred_dev = plain.purify_and_classify(x)
    out_host, pred_host = pur_ort.purify_and_classify(x)
    assert np.mean(pred_dev == pred_host) >= 31 / 32
    # pixels: the device loop and the host loop part no more than 4x as often as float32 steps part the CPU
    # reference from itself in its second order (each side is one float32 order away from the reference)
    from benchmarks.runtime_parity import float32_floor, reference_outputs
    ref = reference_outputs(victim20, plain.cfg, x, batch=32)
    floor = float32_floor(victim20, plain.cfg, x, cifar[1][:32], batch=32, reference=ref)
    assert 1 - np.mean(out_dev == out_host) <= 4 * (1 - floor["same_pixels"]) + 1 / out_dev.size


def test_cuda_graph_replay_agrees_with_torch_reference(loops, victim20, cifar):
    """The replayed loop against the reference, with the CPU parity tests' rule. Two loops are not compared
    bit for bit: CUDA does not promise that across contexts (split-K, atomics)."""
    from benchmarks.runtime_parity import free_running
    graph, plain = loops
    x, y = cifar[0][:64], cifar[1][:64]
    graph.purify(x[:32])  # first call at batch 32: eager run + capture; the ones below replay
    assert graph.graph_captured(32) and not plain.graph_captured(32)
    v, ref, floor = _gpu_reference_and_floor(victim20, graph.cfg, x, y)
    r = free_running(graph, v, x, y, batch=32, reference=ref)
    print(f"\nTensorRT CUDA graph: same prediction {r['same_prediction']:.4f}, same pixels {r['same_pixels']:.4f}")
    assert r["same_prediction"] >= 63 / 64
    assert r["same_prediction"] >= floor["same_prediction"] and r["same_pixels"] >= floor["same_pixels"]
    for _ in range(2):
        graph.purify(x[:1])
    assert graph.graph_captured(1)


def test_one_activation_buffer_for_every_context(trt_art20, cifar):
    """Contexts use the runner's one scratch buffer (USER_MANAGED): 8 contexts (4 graphs x 2 batch sizes)
    add less device memory than the engines' activation sizes summed once."""
    with Purifier.load(trt_art20[0], backend="tensorrt", cuda_graph=False) as pur:
        r = pur.runner
        assert r.scratch_bytes == max(256, *(e.device_memory_bytes for e in r.engines.values()))
        free0 = r.cuda.mem_info()[0]
        pur.purify(cifar[0][:1])
        pur.purify(cifar[0][:32])
        used = free0 - r.cuda.mem_info()[0]
        assert len(r._contexts) == 8
        assert used < sum(e.device_memory_bytes for e in r.engines.values()), used


def test_failed_capture_clears_the_runtime_error_and_runs_eagerly(trt_art20, pur_ort, cifar):
    from zeropur_rt.cuda_driver import import_runtime
    rt = import_runtime()
    x = cifar[0][:8]
    with Purifier.load(trt_art20[0], backend="tensorrt", cuda_graph=False) as pur:
        r = pur.runner
        pur.purify(x)  # contexts and shapes set outside the capture
        # A runtime-API synchronisation of a capturing stream is illegal: the capture fails and the
        # runtime's last error is set, as when TensorRT fails inside a capture.
        with pytest.warns(RuntimeWarning, match="capture of the ZeroPur loop failed"):
            assert r.capture(lambda: rt.cudaStreamSynchronize(r.stream)) is None
        assert rt.cudaPeekAtLastError()[0] == rt.cudaError_t.cudaSuccess
        out, pred = pur.purify_and_classify(x)
    assert np.mean(pred == pur_ort.purify_and_classify(x)[1]) >= 7 / 8


def test_logger_reports_errors_to_later_users(tmp_path):
    import tensorrt as trt
    from zeropur_rt.runners.trt_engine import TrtEngine, trt_logger
    first = trt_logger(trt)
    trt.Builder(first)  # TensorRT now holds its global logger
    bad = tmp_path / "gs_grad.sm00.trt0.0.fp32.engine"
    bad.write_bytes(b"\0" * 4096)
    logger = trt_logger(trt)
    assert logger is first
    with pytest.raises(bt.EngineMismatchError) as ei:
        TrtEngine(trt, trt.Runtime(logger), logger, bad, "gs_grad", ["x", "x_blur"], ["grad", "loss"])
    assert "no message" not in str(ei.value)


def test_batch1_artifact_builds_and_runs(victim20, cifar, pur_ort, tmp_path):
    """Issue 16 item 1: a --max-batch 1 export (static shapes) gets engines (profile min = opt = max = 1)."""
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_rt.config import preset
    art = export_artifacts(victim20, preset("cifar10"), tmp_path / "b1", model="resnet20", batch=(1, 1, 1))
    rec = build_engines(art, precision="fp32")
    assert rec["batch"] == {"min": 1, "opt": 1, "max": 1}
    with Purifier.load(art, backend="tensorrt") as pur:
        assert all(e.batch == {"min": 1, "opt": 1, "max": 1} for e in pur.runner.engines.values())
        x = cifar[0][:1]
        assert rel_err(pur.logits(x), pur_ort.logits(x)) < 1e-4
        for _ in range(2):
            pur.purify(x)
        assert pur.graph_captured(1)
        with pytest.raises(ValueError, match="maximum batch 1"):
            pur.purify(cifar[0][:2])


def test_build_on_the_device_asked_for(trt_art20, tmp_path):
    """Issue 16 item 9: the device's context stays current during the build."""
    from zeropur_rt.cuda_driver import CudaDevice
    probe = CudaDevice(0)
    count = int(probe._check(probe.drv.cuDeviceGetCount(), "cuDeviceGetCount"))
    probe.close()
    if count < 2:
        pytest.skip("one CUDA device: nothing to tell device 0 and device N apart")
    art = tmp_path / "copy"
    shutil.copytree(trt_art20[0], art)
    last = CudaDevice(count - 1)
    name, cc = last.name, last.compute_capability
    last.close()
    rec = build_engines(art, precision="fp32", device=count - 1, force=True)
    assert rec["device"] == name and rec["compute_capability"] == f"{cc[0]}.{cc[1]}"
    with Purifier.load(art, backend="tensorrt", device=f"cuda:{count - 1}") as pur:
        assert pur.classify(np.zeros((1, 3, 32, 32), np.float32)).shape == (1,)


def test_fp16_engines_build_and_roughly_agree(trt_art20, pur_ort, cifar):
    try:
        build_engines(trt_art20[0], precision="fp16")
    except ImportError as e:
        pytest.skip(str(e))
    pur16 = Purifier.load(trt_art20[0], backend="tensorrt", device="cuda", precision="fp16",
                          overrides={"gs_steps": 3, "ap_steps": 5})
    assert pur16.runner.precision == "fp16"
    # issue 16 item 3: the FP16 copy of the graph on a strongly typed network, on TensorRT 10 too
    assert pur16.runner.record["strongly_typed"] and pur16.runner.record["onnx_fp16"]
    x = cifar[0][:32]
    p16 = pur16.classify(x)
    p32 = pur_ort.classify(x)
    assert np.mean(p16 == p32) >= 0.9
    pur16.close()
