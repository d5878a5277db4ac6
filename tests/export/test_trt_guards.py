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
from zeropur_rt import validate
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
    assert validate.check_batch(1, BATCH) == 1 and validate.check_batch(256, BATCH) == 256
    assert validate.check_batch(np.int64(7), BATCH) == 7
    with pytest.raises(validate.BatchSizeError, match="exceeds the maximum batch 256.*split the input.*--max-batch"):
        validate.check_batch(257, BATCH)
    with pytest.raises(validate.BatchSizeError, match="below the minimum batch 4"):
        validate.check_batch(2, {"min": 4, "opt": 8, "max": 16})
    with pytest.raises(validate.BatchSizeError, match="integer"):
        validate.check_batch(2.0, BATCH)
    assert issubclass(validate.BatchSizeError, ValueError)


def test_one_device_grammar():
    assert cd.parse_device("cpu") is None and cd.parse_device("cuda") == 0 and cd.parse_device("CUDA:1") == 1
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "tpu:0"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            cd.parse_device(bad)


# ---------------------------------------------------------------- precision recipe per TensorRT version
def test_precision_plan_trt10_fp32_is_plain_float32():
    p32 = bt.precision_plan("10.8.0.43", "fp32")
    assert (p32.set_flags, p32.clear_flags, p32.strongly_typed, p32.onnx_fp16) == ((), ("TF32",), False, False)


def test_precision_plan_fp16_is_strongly_typed_on_trt10_too():
    """Issue 16 item 3: BuilderFlag.FP16 on a weakly typed network lets TensorRT run the norms, divisions
    and floors in half precision; every fp16 build is the strongly typed FP16 copy of the graph."""
    for version in ("10.0.1", "10.3.0.30", "10.13.0.35", "11.4.0.106"):
        p16 = bt.precision_plan(version, "fp16")
        assert p16.strongly_typed and p16.onnx_fp16, version
        assert "FP16" not in p16.set_flags and p16.set_flags == (), version


def test_precision_plan_trt11_is_strongly_typed_from_the_graph():
    p32 = bt.precision_plan("11.4.0.106", "fp32")
    assert p32.strongly_typed and not p32.onnx_fp16 and p32.set_flags == () and p32.clear_flags == ("TF32",)
    p16 = bt.precision_plan("11.0.0", "fp16")
    assert p16.strongly_typed and p16.onnx_fp16 and p16.set_flags == ()  # no FP16 builder flag in 11.x
    assert "FP16 copy of the ONNX graph" in p16.describe() and "strongly typed" in p16.describe()


def test_precision_plan_rejects_old_trt_and_unknown_precision():
    with pytest.raises(ValueError, match=">= 10"):
        bt.precision_plan("8.6.1", "fp32")
    with pytest.raises(ValueError, match="fp32, fp16"):
        bt.precision_plan("10.8.0", "bf16")


# ---------------------------------------------------------------- missing TensorRT / cuda-python / GPU
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is importable here")
def test_clear_error_without_tensorrt(tmp_path):
    with pytest.raises(ImportError, match=r"TensorRT \(>= 10\).*zeropur-rt\[trt-cu12\].*R535.*trt-cu13.*R580.*jetson"):
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
def _write_manifest(d: Path, files: dict[str, str], batch: dict, input_shape=(3, 32, 32)) -> Path:
    """manifest.json for the graphs in ``files`` (graph -> file name in d), hashed as written."""
    from zeropur_rt.config import preset
    from zeropur_rt.files import atomic_write_json, sha256_file
    from zeropur_rt.manifest import FORMAT_VERSION, MANIFEST, Manifest, graph_io

    graphs = {g: dict(zip(("inputs", "outputs"), graph_io(g, 0)), file=f) for g, f in files.items()}
    cfg = preset("cifar10")
    if "ap_grad" not in files:  # a Guided-Shift-only export records ap_steps 0
        cfg = cfg.replace(ap_steps=0)
    m = Manifest(format_version=FORMAT_VERSION, model="tiny", weights_sha256=None, taps={}, config=cfg.to_dict(),
                 input_shape=tuple(input_shape), mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, batch=dict(batch),
                 opset=18, tools={}, graphs=graphs, files={f: sha256_file(d / f) for f in files.values()})
    atomic_write_json(d / MANIFEST, m.to_dict())
    return d


def _tiny_artifact(d: Path) -> Path:
    d.mkdir()
    for g in ("classifier", "gs_grad"):
        (d / f"{g}.onnx").write_bytes(b"not really onnx")
    return _write_manifest(d, {g: f"{g}.onnx" for g in ("classifier", "gs_grad")}, BATCH)


def test_build_engines_cli_errors(tmp_path, capsys):
    eng = pytest.importorskip("zeropur_export.engines.builder")
    from zeropur_export.engines.cli import main_build_engines
    assert main_build_engines([str(tmp_path / "nothing")]) == 2
    assert "nothing: no such directory" in capsys.readouterr().err
    art = _tiny_artifact(tmp_path / "art")
    with pytest.raises(SystemExit) as ei:  # argparse refuses an unknown precision
        main_build_engines([str(art), "--precision", "int8"])
    assert ei.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    if not HAVE_TRT:
        assert main_build_engines([str(art)]) == 3
        assert "TensorRT (>= 10)" in capsys.readouterr().err
    # the manifest is untouched by a failed build
    from zeropur_rt.manifest import load_manifest
    assert load_manifest(art).engines == {}
    assert eng.timing_cache_path(art, (8, 7), "10.3.0.30").name == "timing_cache.sm87.trt10.3.bin"


def test_engines_up_to_date(tmp_path):
    eng = pytest.importorskip("zeropur_export.engines.builder")
    from zeropur_rt.manifest import load_manifest
    art = _tiny_artifact(tmp_path / "art")
    m = load_manifest(art)
    key = bt.engine_key((9, 0), "10.8.0.43", "fp32")
    assert not eng.engines_up_to_date(art, m, key, "10.8.0.43")
    m.engines[key] = record(graphs=("classifier", "gs_grad"))
    assert not eng.engines_up_to_date(art, m, key, "10.8.0.43")  # files missing
    for g in m.engines[key]["graphs"].values():
        (art / g["file"]).write_bytes(b"plan")
        m.files[g["file"]] = "0" * 64
    assert eng.engines_up_to_date(art, m, key, "10.8.0.43")
    assert eng.engines_up_to_date(art, m, key, "10.8.0.51")  # another build number loads the same engines
    m.engines[key]["batch"] = {"min": 1, "opt": 2, "max": 4}
    assert not eng.engines_up_to_date(art, m, key, "10.8.0.43")


def test_patch_upgrade_makes_engines_stale_for_builder_and_runtime(tmp_path):
    """Issue 16 item 6: after TensorRT 10.8.0 -> 10.8.1 the key (major.minor) is the same; the runtime
    refuses the 10.8.0 engines, so build-engines must rebuild them instead of calling them up to date."""
    eng = pytest.importorskip("zeropur_export.engines.builder")
    from zeropur_rt.manifest import load_manifest
    art = _tiny_artifact(tmp_path / "art")
    m = load_manifest(art)
    key = bt.engine_key((9, 0), "10.8.1.2", "fp32")
    assert key == bt.engine_key((9, 0), "10.8.0.43", "fp32")
    m.engines[key] = record(trt="10.8.0.43", graphs=("classifier", "gs_grad"))
    for g in m.engines[key]["graphs"].values():
        (art / g["file"]).write_bytes(b"plan")
        m.files[g["file"]] = "0" * 64
    with pytest.raises(bt.EngineMismatchError, match="build-engines"):
        bt.select_engines(m.engines, (9, 0), "10.8.1.2")
    assert not eng.engines_up_to_date(art, m, key, "10.8.1.2")
    assert eng.engines_up_to_date(art, m, key, "10.8.0.43")


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
    from zeropur_export.engines.fp16 import onnx_fp16_copy
    src, dst = tmp_path / "t.onnx", tmp_path / "t.fp16.onnx"
    _tiny_onnx(src)
    onnx_fp16_copy(src, dst)
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


# ---------------------------------------------------------------- build plan: fixed batch-1 graphs (issue 16 item 1)
def _static_or_dynamic_artifact(d: Path, batch: dict) -> Path:
    """A classifier + gs_grad artifact of tiny real ONNX graphs, with a fixed batch when batch["max"] == 1
    (as the exporter writes --max-batch 1), else a dynamic one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d.mkdir()
    n = 1 if batch["max"] == 1 else "N"

    def io(name, *dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, *dims] if dims else [])

    w = numpy_helper.from_array(np.ones((48, 10), np.float32), "w")
    graphs = {
        "classifier": helper.make_graph([helper.make_node("Flatten", ["x"], ["embedding"]),
                                         helper.make_node("MatMul", ["embedding", "w"], ["logits"])], "classifier",
                                        [io("x", 3, 4, 4)], [io("logits", 10), io("embedding", 48)], [w]),
        "gs_grad": helper.make_graph([helper.make_node("Sub", ["x", "x_blur"], ["grad"]),
                                      helper.make_node("ReduceSum", ["grad"], ["loss"], keepdims=0)], "gs_grad",
                                     [io("x", 3, 4, 4), io("x_blur", 3, 4, 4)], [io("grad", 3, 4, 4), io("loss")]),
    }
    for g, graph in graphs.items():
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(d / f"{g}.onnx"))
    return _write_manifest(d, {g: f"{g}.onnx" for g in graphs}, batch, input_shape=(3, 4, 4))


def test_input_profile_accepts_fixed_batch_1_and_dynamic_ranges():
    eng = pytest.importorskip("zeropur_export.engines.builder")
    one = {"min": 1, "opt": 1, "max": 1}
    assert eng.input_profile("g", "x", (1, 3, 32, 32), one) == ((1, 3, 32, 32),) * 3
    assert eng.input_profile("g", "x", (-1, 3, 32, 32), BATCH) == ((1, 3, 32, 32), (32, 3, 32, 32), (256, 3, 32, 32))
    assert eng.input_profile("g", "x", (-1, 3, 32, 32), one) == ((1, 3, 32, 32),) * 3
    with pytest.raises(eng.EngineBuildError, match="fixed batch of 1.*re-export"):
        eng.input_profile("g", "x", (1, 3, 32, 32), BATCH)
    with pytest.raises(eng.EngineBuildError, match="dynamic batch dimension at most"):
        eng.input_profile("g", "x", (-1, 3, -1, 32), BATCH)


@pytest.mark.parametrize("batch", [{"min": 1, "opt": 1, "max": 1}, {"min": 1, "opt": 8, "max": 16}])
def test_build_plan_dry_run_without_tensorrt(tmp_path, capsys, batch):
    eng = pytest.importorskip("zeropur_export.engines.builder")
    from zeropur_export.engines.cli import main_build_engines
    from zeropur_rt.manifest import load_manifest
    art = _static_or_dynamic_artifact(tmp_path / "art", batch)
    plan = eng.plan_build(art, load_manifest(art), "10.3.0.30", "8.7", "fp32")
    assert plan.key == "sm87.trt10.3.fp32" and not plan.precision.strongly_typed
    assert [gp.engine for gp in plan.graphs] == ["classifier.sm87.trt10.3.fp32.engine", "gs_grad.sm87.trt10.3.fp32.engine"]
    want = tuple((batch[k], 3, 4, 4) for k in ("min", "opt", "max"))
    assert [gp.profiles for gp in plan.graphs] == [{"x": want}, {"x": want, "x_blur": want}]
    assert main_build_engines([str(art), "--dry-run", "--trt-version", "10.3.0.30", "--compute-capability", "8.7",
                                   "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "sm87.trt10.3.fp16" in out and "strongly typed" in out and f"max ({batch['max']}, 3, 4, 4)" in out
    assert load_manifest(art).engines == {}  # a dry run writes nothing


def test_dry_run_without_versions_says_which_flag(tmp_path, capsys):
    if HAVE_TRT:
        pytest.skip("tensorrt is importable here: the dry run takes its version")
    from zeropur_export.engines.cli import main_build_engines
    art = _static_or_dynamic_artifact(tmp_path / "art", {"min": 1, "opt": 1, "max": 1})
    assert main_build_engines([str(art), "--dry-run"]) == 2
    assert "--trt-version" in capsys.readouterr().err


# ---------------------------------------------------------------- TensorRT's one logger (item 8), activation size (item 10)
def test_error_log_gives_each_caller_its_own_errors():
    log = trt_engine.ErrorLog(keep=3)
    a = log.mark()
    log.add("first")
    b = log.mark()
    log.add("second")
    assert log.since(a) == ["first", "second"] and log.since(b) == ["second"] and log.since(log.mark()) == []
    for i in range(5):
        log.add(f"e{i}")
    assert log.since(a) == ["e2", "e3", "e4"]  # bounded


@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt not installed: the process-wide logger needs trt.ILogger")
def test_one_logger_per_process():
    import tensorrt as trt
    first = trt_engine.trt_logger(trt, verbose=True)
    assert trt_engine.trt_logger(trt) is first and first.verbose is False


def test_engine_device_memory_reads_v2_even_when_zero():
    """Issue 16 item 10: the binding's attribute sets, as documented: 10.0 has device_memory_size only,
    10.1-10.x both, 11.x device_memory_size_v2 only. A v2 of 0 must not fall back to the removed attribute."""
    from types import SimpleNamespace
    assert trt_engine.engine_device_memory(SimpleNamespace(device_memory_size=123)) == 123
    assert trt_engine.engine_device_memory(SimpleNamespace(device_memory_size=5, device_memory_size_v2=7)) == 7
    assert trt_engine.engine_device_memory(SimpleNamespace(device_memory_size_v2=0)) == 0


# ---------------------------------------------------------------- onnxruntime GPU sessions that fell back to the CPU (item 4)
def test_session_on_the_cpu_is_refused_for_a_gpu_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from zeropur_rt.runners.onnxruntime import ProviderLoadError, check_session_providers
    src = tmp_path / "t.onnx"
    _tiny_onnx(src)
    # A real session on the CPU: what onnxruntime hands back when the CUDA EP failed to load.
    got = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_providers()
    assert got[0] == "CPUExecutionProvider"
    check_session_providers(got, "cpu", "gs_grad")
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(ProviderLoadError, match="gs_grad session on CPUExecutionProvider.*failed to load"):
            check_session_providers(got, provider, "gs_grad")
    with pytest.warns(RuntimeWarning, match="TensorRT execution provider"):
        check_session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt", "ap_grad")
    assert issubclass(ProviderLoadError, ImportError)  # the CLIs print it as an error, not a traceback


# ---------------------------------------------------------------- failed capture: the runtime error is cleared (item 7)
def test_clear_error_without_cuda_runtime_bindings(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="runtime bindings.*pip install cuda-python"):
        cd.import_runtime()


# ---------------------------------------------------------------- extras that fit the driver (item 2)
def test_trt_extras_pin_one_cuda_major_each():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11; 3.10 has no TOML reader")
    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from packaging.requirements import Requirement
    for extra, cuda_major, pkg in (("trt-cu12", 12, "tensorrt-cu12"), ("trt-cu13", 13, "tensorrt-cu13")):
        reqs = {r.name: r.specifier for r in map(Requirement, extras[extra])}
        assert set(reqs) == {pkg, "cuda-python"}, extra
        assert reqs["cuda-python"].contains(f"{cuda_major}.9.0") and not reqs["cuda-python"].contains(f"{cuda_major + 1}.0.0")
        assert not reqs["cuda-python"].contains(f"{cuda_major - 1}.9.0")
        assert reqs[pkg].contains("10.13.3.9") and not reqs[pkg].contains("9.3.0")
    assert "tensorrt" not in {Requirement(r).name for r in extras["trt"]}  # the CUDA-13-only metapackage
