"""Export of every zoo architecture: ONNX checks, TensorRT allowlist, dynamic batch, parity vs the reference,
bad inputs of the CLI/API, tamper detection. ``pytest -s`` prints the parity table."""
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from zeropur_export import cli
from zeropur_export.graphs import onnx_export, trt_ops  # noqa: E402
from zeropur_export.graphs.onnx_export import BatchRange, export_artifacts  # noqa: E402
from zeropur_export.graphs.parity import OrtGraphs, format_table, parity, well_conditioned  # noqa: E402
from zeropur_export.victims.taps import TapSpec, make_victim  # noqa: E402
from zeropur_export.victims.zoo import ZOO, CifarResNet, ResNet50, WideResNet, _randomize_bn, load_victim  # noqa: E402
from zeropur_export.victims.weights import find_weights  # noqa: E402
from zeropur_rt.config import preset, preset_for_shape  # noqa: E402
from zeropur_rt.files import sha256_file  # noqa: E402
from zeropur_export.data import cifar10_test_path, load_cifar10_test, shared_dir, to_nchw_float  # noqa: E402
from zeropur_rt.manifest import ArtifactError, graph_io, load_manifest  # noqa: E402

torch.set_num_threads(2)

# name -> (real weights?, graph batch sizes of the parity check, max batch of the export). The random-weight
# architectures are judged at batch 8 here (their lowerings do not depend on the batch; one batch above 1 checks
# the dynamic dimension) and at 32 by benchmarks/export_parity.py, which judges the whole zoo.
ARCHS = {
    "resnet20": (True, (1, 32), 64),  # the session's shared export (conftest art20)
    "resnet56": (True, (1, 32), 256),
    "preact_resnet18": (False, (1, 8), 256),
    "vgg19_bn": (False, (1, 8), 256),
    "wrn16_2": (False, (1, 8), 16),
    "resnet50_small": (False, (1, 8), 16),
}


def _two_blocks_per_stage(net, stages):
    """Each stage cut to its first two blocks: the first (stride, shortcut convolution) and one identity block."""
    for s in stages:
        setattr(net, s, getattr(net, s)[:2])
    return net


# CI's stand-ins for the zoo's two large architectures, whose full-size export parity (about 10 minutes on 2 cores)
# is benchmarks/export_parity.py's: the same blocks, shortcut convolutions, pooling and taps, hence the same
# lowerings, with two blocks per stage instead of 4 (WRN-28-10) and 3-6 (ResNet-50), at width 2 instead of 10
# (WRN-16-2: block 1 still widens 16 -> 32 through a 1x1 shortcut, as 16 -> 160 does) and at 64x64 instead of
# 224x224 (ResNet-50: every stage still downsamples, layer4 is 2x2). Export time goes with the number of blocks.
REDUCED = {"wrn16_2": ("wrn28_10", lambda: WideResNet(16, 2), None),
           "resnet50_small": ("resnet50", lambda: _two_blocks_per_stage(ResNet50(), ("layer1", "layer2", "layer3",
                                                                                       "layer4")), (3, 64, 64))}
_ROWS: list = []
_TIMES: dict[str, float] = {}


def _victim(name):
    if name in REDUCED:
        full, ctor, shape = REDUCED[name]
        torch.manual_seed(0)
        net = ctor()
        _randomize_bn(net, 0)  # non-trivial BatchNorm statistics, as load_victim(random_init=True) gives
        spec = ZOO[full][1]
        return make_victim(net, dataclasses.replace(spec, input_shape=shape or spec.input_shape), name)
    real = ARCHS[name][0]
    if real:
        f = shared_dir() / "models"
        if not f.is_dir() or not any(f.glob(f"{name}-*.th")):
            pytest.skip(f"{name} real weights not found under {f} (set ZEROPUR_SHARED to the shared folder)")
        return load_victim(name)
    v = load_victim(name, random_init=True)
    return well_conditioned(v) if name == "vgg19_bn" else v


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    cache: dict[str, tuple] = {}

    def get(name):
        if name == "resnet20" and name not in cache:
            cache[name] = (request.getfixturevalue("victim20"), preset("cifar10"), request.getfixturevalue("art20"))
        if name not in cache:
            v = _victim(name)
            cfg = preset_for_shape(v.spec.input_shape, ZOO[REDUCED[name][0] if name in REDUCED else name][2])
            out = tmp_path_factory.mktemp("art") / name
            t = time.perf_counter()
            sha = sha256_file(find_weights(name)) if ARCHS[name][0] else None
            export_artifacts(v, cfg, out, batch=BatchRange(1, min(32, ARCHS[name][2]), ARCHS[name][2]),
                             weights_sha256=sha)
            _TIMES[name] = time.perf_counter() - t
            cache[name] = (v, cfg, out)
        return cache[name]

    yield get
    if _TIMES:
        print("\nexport seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in _TIMES.items()))
    if _ROWS:
        print("\n" + format_table(_ROWS))


def _params():
    return list(ARCHS)


@pytest.mark.parametrize("name", _params())
def test_export_checks(exported, name):
    v, cfg, out = exported(name)
    m = load_manifest(out)
    expected = ("classifier", "gs_grad", "ap_setup", "ap_grad") if v.spec.supports_ap else ("classifier", "gs_grad")
    assert tuple(m.graphs) == expected
    assert sorted(m.files) == sorted([f"{g}.onnx" for g in expected])
    assert m.model == name and m.opset == onnx_export.DEFAULT_OPSET and m.input_shape == v.spec.input_shape
    assert (m.weights_sha256 is not None) == ARCHS[name][0]
    for g, spec in m.graphs.items():
        path = out / spec["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
        assert trt_ops.check_model(model) == [], g
        ins, outs = graph_io(g, m.n_ila)
        assert [i.name for i in model.graph.input] == ins == spec["inputs"]
        assert [o.name for o in model.graph.output] == outs == spec["outputs"]
        for i in model.graph.input:  # batch dynamic, everything else static
            dims = i.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value, (g, i.name)
            assert all(d.dim_value > 0 for d in dims[1:]), (g, i.name)
        used = {n.op_type for n in model.graph.node}
        assert not used & {"Scatter", "ScatterElements", "ScatterND", "MaxUnpool"}


@pytest.mark.parametrize("name", _params())
def test_parity(exported, name, cifar_or_none):
    """Each graph batch size is judged over >= 8 samples (8 single-image calls at batch 1): one image
    alone is luck, since a single float32 ReLU / max-pool decision flip moves its error by 5e-5..4e-4."""
    v, cfg, out = exported(name)
    og = OrtGraphs(out)
    rows = []
    for b in ARCHS[name][1]:
        n = max(8, b)
        g = torch.Generator().manual_seed(100 + b)
        x = torch.rand((n, *v.spec.input_shape), generator=g)
        rows += parity(v, cfg, og, x, "random", seed=b, graph_batch=b)
        if v.spec.input_shape == (3, 32, 32) and cifar_or_none is not None:
            rows += parity(v, cfg, og, torch.from_numpy(cifar_or_none[:n]), "cifar10", seed=b, graph_batch=b)
    _ROWS.extend(rows)
    print("\n" + format_table(rows))
    bad = [r for r in rows if not r.ok]
    assert not bad, format_table(bad)


@pytest.fixture(scope="module")
def cifar_or_none():
    if not cifar10_test_path().is_file():
        return None
    return to_nchw_float(load_cifar10_test(stop=32)[0])


def test_ap_grad_finite_at_zero_lpips_distance(exported):
    v, cfg, out = exported("resnet20")
    og = OrtGraphs(out)
    x = torch.rand(3, 3, 32, 32)
    consts = og.run("ap_setup", [x, x])  # coarse == x_in: every ila_dir is 0 too
    (g,) = og.run("ap_grad", [x, *consts])
    assert np.all(np.isfinite(g))


class _OddHead(torch.nn.Module):
    """A user's classifier whose GS embedding (the 10 logits) is no multiple of the cosine's block."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(6, 6, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(6, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_user_victim_with_padded_cosine_blocks_exports_and_agrees(tmp_path):
    torch.manual_seed(0)
    spec = TapSpec(embedding="head", ila=("body.1",), lpips=("body.1", "body.3"), mean=(0.5,) * 3, std=(0.25,) * 3,
                   input_shape=(3, 12, 12), num_classes=10)
    v = make_victim(_OddHead().eval(), spec)
    cfg = preset("cifar10")
    out = export_artifacts(v, cfg, tmp_path / "odd", batch=BatchRange(1, 4, 8))
    assert trt_ops.check_model(onnx.load(str(out / "gs_grad.onnx"))) == []  # 10 logits padded to 3 blocks of 4
    rows = parity(v, cfg, OrtGraphs(out), torch.rand((8, 3, 12, 12), generator=torch.Generator().manual_seed(1)),
                  "random", graph_batch=1)
    assert rows and all(r.ok for r in rows), format_table(rows)


# ---------------------------------------------------------------- CLI / API bad inputs
def _no_leftovers(parent: Path, name: str):
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, left


def test_cli_unknown_architecture(tmp_path, capsys):
    assert cli.main(["export", "resnet9000", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture" in err and "resnet20" in err
    assert not (tmp_path / "a").exists()


def test_make_victim_bad_tap():
    spec = TapSpec(embedding="linear:in", ila=("layer9",), lpips=("layer1",), mean=(0.5,) * 3, std=(0.5,) * 3,
                   input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match="not found"):
        make_victim(CifarResNet(3), spec)


def test_cli_missing_weights_file(tmp_path, capsys):
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--weights", str(tmp_path / "nope.th")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_known_weights_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZEROPUR_SHARED", str(tmp_path / "empty"))
    monkeypatch.delenv("ZEROPUR_WEIGHTS", raising=False)
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--weights-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_no_known_weights_needs_flag(tmp_path, capsys):
    assert cli.main(["export", "preact_resnet18", "--out", str(tmp_path / "a")]) == 2
    assert "--weights" in capsys.readouterr().err


def test_cli_corrupt_weights(tmp_path, capsys):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint" * 10)
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--weights", str(bad)]) == 2
    assert "cannot read weights" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    _no_leftovers(tmp_path, "a")


def test_cli_weights_hash_mismatch(tmp_path, capsys, monkeypatch):
    # a file with the known name but other bytes: find_weights -> verify_sha256 refuses it
    d = tmp_path / "w"
    d.mkdir()
    (d / "resnet20-12fca82f.th").write_bytes(b"tampered")
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--weights-dir", str(d)]) == 2
    assert "is not the published resnet20-12fca82f.th: sha256" in capsys.readouterr().err
    # an explicit file with an explicit expected hash
    f = tmp_path / "w.th"
    torch.save(CifarResNet(3).state_dict(), f)
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--weights", str(f), "--weights-sha256", "0" * 64]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_bad_config(tmp_path, capsys):
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--random-init", "--set", "nope=1"]) == 2
    assert "unknown config field" in capsys.readouterr().err
    assert cli.main(["export", "resnet20", "--out", str(tmp_path / "a"), "--random-init", "--min-batch", "8",
                     "--opt-batch", "4"]) == 2
    assert "min-batch" in capsys.readouterr().err


def test_cli_existing_dir_without_force(tmp_path, capsys):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", "resnet20", "--out", str(out), "--random-init"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_api_unwritable_out_dir(tmp_path):
    v = load_victim("resnet20", random_init=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        export_artifacts(v, preset("cifar10"), blocker / "art")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                export_artifacts(v, preset("cifar10"), ro / "art")
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o700)


def test_api_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    v = load_victim("resnet20", random_init=True)
    calls = []

    def fake_export_graph(victim, cfg, name, path, batch, opset, verbose):
        calls.append(name)
        if len(calls) == 2:
            raise onnx_export.ExportError("boom")
        path.write_bytes(b"partial")
        return {"file": path.name, "inputs": [], "outputs": [], "seconds": {"trace": 0, "export": 0}}

    monkeypatch.setattr(onnx_export, "export_graph", fake_export_graph)
    with pytest.raises(onnx_export.ExportError, match="boom"):
        export_artifacts(v, preset("cifar10"), tmp_path / "art", check=False)
    assert not (tmp_path / "art").exists()
    _no_leftovers(tmp_path, "art")


def test_tampered_artifact_is_refused(exported, tmp_path):
    _, _, out = exported("resnet20")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    load_manifest(copy)
    f = copy / "gs_grad.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest hash"):
        load_manifest(copy)


def test_manifest_records_config(exported):
    _, _, out = exported("resnet20")
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["ila_weight"] == preset("cifar10").ila_weight
    assert m["batch"] == {"min": 1, "opt": 32, "max": ARCHS["resnet20"][2]}
    assert set(m["tools"]) >= {"torch", "onnx", "onnxscript"}
    assert m["tools"]["graph_revision"] == str(onnx_export.GRAPH_REVISION)


def test_reused_artifacts_of_an_older_graph_revision_are_named(exported, tmp_path):
    """ensure_artifacts reuses a valid directory; one an older exporter wrote (no revision, no BatchNorm
    folding) still loads and runs, and the log says it is not this exporter's graphs."""
    from zeropur_export.artifacts import ensure_artifacts
    _, _, out = exported("resnet20")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    said: list[str] = []
    assert ensure_artifacts("resnet20", old, log=said.append) == old and said == []
    m = json.loads((old / "manifest.json").read_text())
    for k in ("graph_revision", "bn_folded"):
        m["tools"].pop(k, None)
    (old / "manifest.json").write_text(json.dumps(m))
    assert ensure_artifacts("resnet20", old, log=said.append) == old
    assert len(said) == 1 and f"revision 1, this exporter writes revision {onnx_export.GRAPH_REVISION}" in said[0]
    assert "remove the directory to export it again" in said[0]


def test_api_force_replaces_existing(tmp_path, monkeypatch):
    v = load_victim("resnet20", random_init=True)
    tag = []

    def fake_export_graph(victim, cfg, name, path, batch, opset, verbose):
        path.write_bytes(f"{name}{len(tag)}".encode())
        return {"file": path.name, "inputs": [], "outputs": [], "seconds": {"trace": 0, "export": 0}}

    monkeypatch.setattr(onnx_export, "export_graph", fake_export_graph)
    out = export_artifacts(v, preset("cifar10"), tmp_path / "art", check=False)
    with pytest.raises(FileExistsError, match="force"):
        export_artifacts(v, preset("cifar10"), out, check=False)
    tag.append(1)
    export_artifacts(v, preset("cifar10"), out, check=False, force=True)
    assert (out / "classifier.onnx").read_bytes() == b"classifier1"
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
