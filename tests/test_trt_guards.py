"""What of the TensorRT backend can be checked without a GPU or TensorRT (no fake tensorrt module):
engine selection/refusal, batch-range checks, the precision recipe per TensorRT version, the FP16
ONNX copy used by TensorRT 11 builds, and the errors when tensorrt / cuda-python / a GPU is missing.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from zeropur_rt import cuda_driver as cd
from zeropur_rt import engine_record as bt
from zeropur_rt.runners import trt_engine
from zeropur_rt.manifest import ArtifactError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
BATCH = {"min": 1, "opt": 32, "max": 256}
GRAPHS = ("classifier", "gs_grad", "ap_setup", "ap_grad")


def record(cc="9.0", trt="10.8.0.43", precision="fp32", batch=BATCH, graphs=GRAPHS):
    return {"compute_capability": cc, "tensorrt": trt, "precision": precision, "batch": dict(batch),
            "graphs": {g: {"file": bt.engine_filename(g, cc, trt, precision)} for g in graphs}}


def engines(*recs):
    return {bt.engine_key(r["compute_capability"], r["tensorrt"], r["precision"]): r for r in recs}


# ---------------------------------------------------------------- names and versions
def test_engine_names():
    assert bt.engine_key((9, 0), "10.8.0.43", "fp32") == "sm90.trt10.8.fp32"
    assert bt.engine_key("8.7", "10.3.0", "fp16") == "sm87.trt10.3.fp16"
    assert bt.engine_filename("gs_grad", (12, 0), "11.4.0.106", "fp32") == "gs_grad.sm120.trt11.4.fp32.engine"
    assert bt.cc_str("sm90") == "9.0" and bt.cc_str("sm_87") == "8.7" and bt.cc_str((7, 2)) == "7.2"
    assert bt.parse_trt_version("10.8.0.43") == (10, 8, 0, 43)
    assert bt.parse_trt_version("11.4.0.106+cuda13") == (11, 4, 0, 106)
    with pytest.raises(ValueError):
        bt.parse_trt_version("ten")
    with pytest.raises(ValueError, match="precision"):
        bt.engine_key((9, 0), "10.8.0", "int8")


def test_version_compatibility_needs_same_major_minor_patch():
    assert bt.versions_compatible("10.8.0.43", "10.8.0.44")  # build number may differ
    assert not bt.versions_compatible("10.8.0.43", "10.8.1.2")
    assert not bt.versions_compatible("10.8.0", "11.0.0")


# ---------------------------------------------------------------- engine selection / refusal
def test_select_matching_record():
    e = engines(record(), record(cc="8.7", trt="10.3.0.30"))
    key, rec = bt.select_engines(e, (9, 0), "10.8.0.43", graphs=GRAPHS, batch=BATCH)
    assert key == "sm90.trt10.8.fp32" and rec["graphs"]["gs_grad"]["file"] == "gs_grad.sm90.trt10.8.fp32.engine"
    key, _ = bt.select_engines(e, (8, 7), "10.3.0.30", graphs=GRAPHS, batch=BATCH)
    assert key == "sm87.trt10.3.fp32"


def test_select_prefers_fp32_unless_asked():
    e = engines(record(precision="fp16"), record(precision="fp32"))
    assert bt.select_engines(e, (9, 0), "10.8.0.43")[0].endswith(".fp32")
    assert bt.select_engines(e, (9, 0), "10.8.0.43", precision="fp16")[0].endswith(".fp16")
    only16 = engines(record(precision="fp16"))
    assert bt.select_engines(only16, (9, 0), "10.8.0.43")[0].endswith(".fp16")
    with pytest.raises(bt.EngineMismatchError, match="--precision fp32|build-engines"):
        bt.select_engines(only16, (9, 0), "10.8.0.43", precision="fp32")


def test_refuses_other_gpu_with_rebuild_command():
    e = engines(record(cc="8.6"))
    with pytest.raises(bt.EngineMismatchError) as ei:
        bt.select_engines(e, (9, 0), "10.8.0.43", artifact_dir="/art/resnet20")
    msg = str(ei.value)
    assert "sm86" in msg and "sm90" in msg and "zeropur-export build-engines /art/resnet20" in msg
    assert isinstance(ei.value, ArtifactError)  # the CLIs' ValueError handlers print it


def test_refuses_other_tensorrt_version():
    e = engines(record(trt="10.3.0.30"))
    with pytest.raises(bt.EngineMismatchError, match=r"TensorRT 10\.3\.0\.30.*TensorRT 10\.8\.0\.43.*build-engines"):
        bt.select_engines(e, (9, 0), "10.8.0.43")
    with pytest.raises(bt.EngineMismatchError, match="build-engines"):
        bt.select_engines(engines(record(trt="10.8.0.43")), (9, 0), "11.0.0.1")


def test_refuses_no_engines_missing_graph_and_stale_batch():
    with pytest.raises(bt.EngineMismatchError, match="no TensorRT engines.*build-engines DIR"):
        bt.select_engines({}, (9, 0), "10.8.0")
    e = engines(record(graphs=("classifier", "gs_grad")))
    with pytest.raises(bt.EngineMismatchError, match=r"lacks the graphs \['ap_grad', 'ap_setup'\]"):
        bt.select_engines(e, (9, 0), "10.8.0.43", graphs=GRAPHS)
    e = engines(record(batch={"min": 1, "opt": 8, "max": 64}))
    with pytest.raises(bt.EngineMismatchError, match="batch range"):
        bt.select_engines(e, (9, 0), "10.8.0.43", batch=BATCH)
    with pytest.raises(bt.EngineMismatchError, match="malformed"):
        bt.select_engines({"x": "not a record"}, (9, 0), "10.8.0")


# ---------------------------------------------------------------- batch range
def test_batch_range_checks():
    assert bt.check_batch(1, BATCH) == 1 and bt.check_batch(256, BATCH) == 256
    assert bt.check_batch(np.int64(7), BATCH) == 7
    with pytest.raises(bt.BatchSizeError, match="exceeds the maximum batch 256.*split the input.*--max-batch"):
        bt.check_batch(257, BATCH)
    with pytest.raises(bt.BatchSizeError, match="below the minimum batch 4"):
        bt.check_batch(2, {"min": 4, "opt": 8, "max": 16})
    with pytest.raises(bt.BatchSizeError, match="integer"):
        bt.check_batch(2.0, BATCH)
    assert issubclass(bt.BatchSizeError, ValueError)


def test_one_device_grammar():
    assert cd.parse_device("cpu") is None and cd.parse_device("cuda") == 0 and cd.parse_device("CUDA:1") == 1
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "tpu:0"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            cd.parse_device(bad)


# ---------------------------------------------------------------- precision recipe per TensorRT version
def test_precision_plan_trt10_uses_builder_flags():
    p32 = bt.precision_plan("10.8.0.43", "fp32")
    assert (p32.set_flags, p32.clear_flags, p32.strongly_typed, p32.onnx_fp16) == ((), ("TF32",), False, False)
    p16 = bt.precision_plan("10.13.0.35", "fp16")
    assert (p16.set_flags, p16.strongly_typed, p16.onnx_fp16) == (("FP16",), False, False)


def test_precision_plan_trt11_is_strongly_typed_from_the_graph():
    p32 = bt.precision_plan("11.4.0.106", "fp32")
    assert p32.strongly_typed and not p32.onnx_fp16 and p32.set_flags == () and p32.clear_flags == ("TF32",)
    p16 = bt.precision_plan("11.0.0", "fp16")
    assert p16.strongly_typed and p16.onnx_fp16 and p16.set_flags == ()  # no FP16 builder flag in 11.x
    assert "FP16 copy of the ONNX graph" in p16.describe()


def test_precision_plan_rejects_old_trt_and_unknown_precision():
    with pytest.raises(ValueError, match=">= 10"):
        bt.precision_plan("8.6.1", "fp32")
    with pytest.raises(ValueError, match="fp32, fp16"):
        bt.precision_plan("10.8.0", "bf16")


# ---------------------------------------------------------------- missing TensorRT / cuda-python / GPU
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is importable here")
def test_clear_error_without_tensorrt(tmp_path):
    with pytest.raises(ImportError, match=r"TensorRT \(>= 10\).*zeropur-rt\[trt\].*jetson"):
        trt_engine.import_tensorrt()
    from zeropur_rt.runners import load_runner
    with pytest.raises(ImportError, match="TensorRT"):
        load_runner("tensorrt", tmp_path, None, device="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs on a GPU"):
        load_runner("tensorrt", tmp_path, None, device="cpu")  # type: ignore[arg-type]


def test_clear_error_without_cuda_python(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.cuda"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail like an absent package
    with pytest.raises(ImportError, match="cuda-python.*pip install cuda-python"):
        cd.import_driver()


def test_clear_error_without_gpu():
    try:
        drv = cd.import_driver()
        drv.cuInit(0)
        have_driver = True
    except Exception:  # noqa: BLE001 - no cuda-python or no driver library
        have_driver = False
    if have_driver:
        pytest.skip("a CUDA driver is present here")
    with pytest.raises((cd.CudaError, ImportError), match="NVIDIA GPU|cuda-python"):
        cd.CudaDevice(0)


# ---------------------------------------------------------------- build-engines without TensorRT
def _tiny_artifact(d: Path) -> Path:
    from zeropur_rt.config import preset
    from zeropur_rt.files import atomic_write_json, sha256_file
    from zeropur_rt.manifest import FORMAT_VERSION, MANIFEST, Manifest, graph_io

    d.mkdir()
    (d / "classifier.onnx").write_bytes(b"not really onnx")
    ins, outs = graph_io("classifier", 0)
    m = Manifest(format_version=FORMAT_VERSION, model="tiny", weights_sha256=None, taps={}, config=preset("cifar10").to_dict(),
                 input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, batch=dict(BATCH), opset=18,
                 tools={}, graphs={"classifier": {"file": "classifier.onnx", "inputs": ins, "outputs": outs}},
                 files={"classifier.onnx": sha256_file(d / "classifier.onnx")})
    atomic_write_json(d / MANIFEST, m.to_dict())
    return d


def test_build_engines_cli_errors(tmp_path, capsys):
    eng = pytest.importorskip("zeropur_export.engines")
    assert eng.main_build_engines([str(tmp_path / "nothing")]) == 2
    assert "not an artifact directory" in capsys.readouterr().err
    art = _tiny_artifact(tmp_path / "art")
    with pytest.raises(SystemExit) as ei:  # argparse refuses an unknown precision
        eng.main_build_engines([str(art), "--precision", "int8"])
    assert ei.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    if not HAVE_TRT:
        assert eng.main_build_engines([str(art)]) == 3
        assert "TensorRT (>= 10)" in capsys.readouterr().err
    # the manifest is untouched by a failed build
    from zeropur_rt.manifest import load_manifest
    assert load_manifest(art).engines == {}
    assert eng.timing_cache_path(art, (8, 7), "10.3.0.30").name == "timing_cache.sm87.trt10.3.bin"


def test_engines_up_to_date(tmp_path):
    eng = pytest.importorskip("zeropur_export.engines")
    from zeropur_rt.manifest import load_manifest
    art = _tiny_artifact(tmp_path / "art")
    m = load_manifest(art)
    key = bt.engine_key((9, 0), "10.8.0.43", "fp32")
    assert not eng.engines_up_to_date(art, m, key)
    m.engines[key] = record(graphs=("classifier",))
    fname = m.engines[key]["graphs"]["classifier"]["file"]
    assert not eng.engines_up_to_date(art, m, key)  # file missing
    (art / fname).write_bytes(b"plan")
    m.files[fname] = "0" * 64
    assert eng.engines_up_to_date(art, m, key)
    m.engines[key]["batch"] = {"min": 1, "opt": 2, "max": 4}
    assert not eng.engines_up_to_date(art, m, key)


# ---------------------------------------------------------------- the FP16 ONNX copy (TensorRT 11 fp16 builds)
def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    wt = numpy_helper.from_array(rng.standard_normal((4 * 8 * 8, 5)).astype(np.float32) * 0.1, "wt")
    shared = numpy_helper.from_array(np.float32([0.5]), "half")  # used by a float32 op and kept float32
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["r", "half"], ["h"]),
             helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("MatMul", ["f", "wt"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [w, wt, shared])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_onnx_fp16_copy_keeps_float32_io_and_runs(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    eng = pytest.importorskip("zeropur_export.engines")
    src, dst = tmp_path / "t.onnx", tmp_path / "t.fp16.onnx"
    _tiny_onnx(src)
    eng.onnx_fp16_copy(src, dst)
    m = onnx.load(str(dst))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [f32, f32]
    types = {t.name: t.data_type for t in m.graph.initializer}
    assert types == {"w": f16, "wt": f16, "half": f32}
    assert {n.op_type for n in m.graph.node} >= {"Cast", "Conv", "MatMul"}
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, ref):
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-3
        assert not np.array_equal(a, b)  # it really computed in float16
