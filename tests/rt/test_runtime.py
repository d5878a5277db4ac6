"""The runtime Purifier (ONNX Runtime CPU + host kernels) on its own: kernels, workers, input forms, guards,
the CLI. Its agreement with the torch reference is ``tests/export/test_runtime_parity.py``."""
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from zeropur_rt.manifest import ArtifactError, load_manifest  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402


@pytest.fixture(scope="module")
def pur(art20):
    return Purifier.load(art20, threads=2)


def test_numpy_and_host_kernels_give_identical_bytes(art20, cifar):
    x = cifar[0][:4]
    a = Purifier.load(art20, kernels="numpy", overrides=dict(gs_steps=3, ap_steps=4)).purify(x)
    b = Purifier.load(art20, kernels="host", overrides=dict(gs_steps=3, ap_steps=4)).purify(x)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("randomised", [False, True])
def test_workers_split_a_batch_and_give_the_unsplit_bytes(art20, cifar, randomised):
    """Three one-thread workers on ten images (shards 3 / 4 / 3) give, image by image, the bytes one one-thread
    session gives the whole batch: images, classes, iterates; a randomised config's draws too (drawn for the
    batch, then split). A single image too, on whichever session it runs (``test_single_image_session``)."""
    from zeropur_rt.errors import ConfigError
    x = cifar[0][:10]
    over = dict(gs_steps=3, ap_steps=4, **(dict(random_start=True, blur_sigma_jitter=0.5) if randomised else {}))
    whole = Purifier.load(art20, threads=1, workers=1, overrides=over, seed=5)
    split = Purifier.load(art20, threads=1, workers=3, overrides=over, seed=5)
    assert (whole.workers, split.workers) == (1, 3)
    ra = whole.run(x, classify=True, timings=True, iterates=True)
    rb = split.run(x, classify=True, timings=True, iterates=True)
    (a, pa, ta, ia), (b, pb, tb, ib) = [(r.images, r.labels, r.times, r.iterates) for r in (ra, rb)]
    assert a.tobytes() == b.tobytes() and np.array_equal(pa, pb)
    assert len(ib.gs_x) == 3 and len(ib.ap_x) == 4
    for u, v in zip([*ia.gs_x, ia.coarse, *ia.ap_x], [*ib.gs_x, ib.coarse, *ib.ap_x]):
        assert u.tobytes() == v.tobytes()
    assert set(ta.seconds) == set(tb.seconds) and tb.total > 0
    assert whole.purify(x[:1]).tobytes() == split.purify(x[:1]).tobytes()   # the next draws, still in step
    assert Purifier.load(art20, threads=2).workers == 2 and Purifier.load(art20, threads=1).workers == 1
    for bad, msg in ((0, "whole number >= 1"), (2.5, "whole number >= 1")):
        with pytest.raises(ConfigError, match=msg):
            Purifier.load(art20, workers=bad)
    with pytest.raises(ConfigError, match="on cuda use workers=1"):
        Purifier.load(art20, device="cuda", workers=2)
    split.close()
    assert all(w.runner is None for w in split._workers.loops)


def test_single_image_session(art20, cifar):
    """With workers, a single image runs on the session the first single-image call measured faster on one
    Guided Shift gradient call (the one-thread worker's where the two disagree on a byte), and it comes out
    with the same bytes whichever session runs it."""
    from zeropur_rt.errors import ConfigError
    x = cifar[0][:1]
    over = dict(gs_steps=2, ap_steps=3)
    auto = Purifier.load(art20, threads=2, overrides=over)
    assert auto.workers == 2 and auto.single_image == "auto" and auto.single_image_probe is None
    out = auto.purify(x)
    probe = auto.single_image_probe
    assert probe["own_ms"] > 0 and probe["worker_ms"] > 0
    faster = "own" if probe["own_ms"] < probe["worker_ms"] else "worker"
    assert auto.single_image == probe["chosen"] == (faster if probe["same_bytes"] else "worker")
    print(f"\nsingle image: {probe}")
    two = auto.purify(cifar[0][:2])  # two images: one per worker, the probe is not taken again
    assert auto.single_image_probe is probe
    for where in ("own", "worker"):
        pinned = Purifier.load(art20, threads=2, overrides=over, single_image=where)
        assert pinned.single_image == where and pinned.purify(x).tobytes() == out.tobytes()
        assert pinned.single_image_probe is None
    one = Purifier.load(art20, threads=1, overrides=over)
    assert one.single_image == "own" and one.purify(x).tobytes() == out.tobytes()
    assert two[:1].tobytes() == out.tobytes()
    with pytest.raises(ConfigError, match="single_image must be one of auto, own, worker"):
        Purifier.load(art20, single_image="fast")
    with pytest.raises(ConfigError, match="needs workers >= 2"):
        Purifier.load(art20, threads=2, workers=1, single_image="worker")


def test_input_forms_agree(art20, cifar, cifar_uint8):
    u8 = cifar_uint8[0][:2]
    p = Purifier.load(art20, overrides=dict(gs_steps=2, ap_steps=2))
    a = p.purify(cifar[0][:2])
    assert np.array_equal(p.purify(u8, uint8_nhwc=True), a)
    res = p.run(cifar[0][:2], classify=True, timings=True)
    assert np.array_equal(res.images, a) and res.labels.shape == (2,) and res.iterates is None
    assert set(res.times.seconds) == {"blur", "gs_engine", "gs_update", "ap_setup", "ap_engine", "ap_update", "classify"}


BAD = [
    (np.zeros((3, 32, 32), np.float32), "rank 4"),
    (np.zeros((1, 3, 16, 16), np.float32), "32x32"),
    (np.zeros((1, 3, 32, 32), np.int32), "float32 or float64"),
    (np.full((1, 3, 32, 32), -0.1, np.float32), r"\[0, 1\]"),
    (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN"),
    (np.zeros((65, 3, 32, 32), np.float32), "maximum batch 64"),
]


@pytest.mark.parametrize("x,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_any_native_call(pur, x, msg):
    with pytest.raises(ValueError, match=msg):
        pur.purify(x)


def test_uint8_flag_checks_layout(pur):
    with pytest.raises(ValueError, match="uint8_nhwc"):
        pur.purify(np.zeros((1, 3, 32, 32), np.uint8), uint8_nhwc=True)


def test_tampered_artifact_is_refused(art20, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(art20, bad)
    f = bad / "gs_grad.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="gs_grad.onnx does not match its manifest hash"):
        Purifier.load(bad)


def test_other_format_version_is_refused(art20, tmp_path):
    import json
    bad = tmp_path / "old"
    shutil.copytree(art20, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 0
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 0.*rebuild"):
        load_manifest(bad)


def test_baked_loss_weights_cannot_be_overridden(art20):
    with pytest.raises(ValueError, match="ila_weight is baked into the exported ap_grad graph"):
        Purifier.load(art20, overrides=dict(ila_weight=1.0))
    assert Purifier.load(art20, overrides=dict(ila_weight=Purifier.load(art20).cfg.ila_weight)).cfg.ap_steps == 50


def test_missing_kernel_library_falls_back_with_warning(art20, monkeypatch, caplog, tmp_path):
    from zeropur_rt.kernels import numpy_twin
    monkeypatch.setenv("ZEROPUR_HOST_LIB", str(tmp_path / "nope.so"))
    with caplog.at_level("WARNING"):
        p = Purifier.load(art20)
    assert p.kernels.impl is numpy_twin
    assert "falling back to the numpy twin" in caplog.text
    with pytest.raises(ValueError, match="kernels='host'"):
        Purifier.load(art20, kernels="host")


def test_onnxruntime_gpu_providers_are_refused_clearly_where_absent(art20):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider: tests/gpu runs it")
    with pytest.raises(ValueError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        Purifier.load(art20, device="cuda")
    with pytest.raises(ValueError, match="no TensorrtExecutionProvider"):
        Purifier.load(art20, device="cuda:0", provider="tensorrt")
    with pytest.raises(ValueError, match="does not run on device 'cpu'"):
        Purifier.load(art20, provider="tensorrt")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        Purifier.load(art20, device="gpu")


def test_cli_purify_classify_info(art20, cifar_uint8, tmp_path, capsys):
    from zeropur_rt.cli import main
    x, y = cifar_uint8[0][:3], cifar_uint8[1][:3]
    src = tmp_path / "in.npz"
    np.savez(src, x=x, y=y)
    out = tmp_path / "out.npz"
    assert main(["purify", str(art20), str(src), "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["x_purified"].shape == (3, 3, 32, 32) and z["pred"].shape == (3,)
    assert main(["classify", str(art20), str(src)]) == 0
    assert main(["info", str(art20)]) == 0
    assert "sha256 ok" in capsys.readouterr().out
    assert main(["purify", str(tmp_path), str(src)]) == 2  # not an artifact directory
    assert "not an artifact directory" in capsys.readouterr().err
    from PIL import Image
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(x[i]).save(folder / f"img{i}.png")
    assert main(["classify", str(art20), str(folder)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.startswith("img")]
    ref = Purifier.load(art20).classify(x[:2], uint8_nhwc=True)
    assert [(n, int(p)) for n, p in lines] == [("img0.png", ref[0]), ("img1.png", ref[1])]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "small.png")
    assert main(["classify", str(art20), str(folder)]) == 2
    assert "resize it first" in capsys.readouterr().err


def test_cli_set_overrides_and_refuses_baked_fields(art20, cifar_uint8, tmp_path, capsys):
    from zeropur_rt.cli import main
    x, y = cifar_uint8[0][:2], cifar_uint8[1][:2]
    src = tmp_path / "in.npz"
    np.savez(src, x=x, y=y)
    out = tmp_path / "out.npz"
    assert main(["purify", str(art20), str(src), "--out", str(out), "--set", "gs_steps=1", "--set", "ap_steps=2",
                 "--set", "eps=8/255"]) == 0
    ref = Purifier.load(art20, overrides=dict(gs_steps=1, ap_steps=2, eps=8 / 255)).purify(x, uint8_nhwc=True)
    with np.load(out) as z:
        assert np.array_equal(z["x_purified"], ref)
    assert main(["purify", str(art20), str(src), "--set", "lpips_weight=2"]) == 2
    assert "lpips_weight is baked" in capsys.readouterr().err
    assert main(["purify", str(art20), str(src), "--set", "gs_steps=two"]) == 2
    assert "gs_steps=two" in capsys.readouterr().err
    # a randomised config through the CLI: --seed makes its draws reproducible
    rand = ["--set", "gs_steps=1", "ap_steps=2", "random_start=true", "blur_sigma_jitter=0.3", "--seed", "4"]
    assert main(["purify", str(art20), str(src), "--out", str(out), *rand]) == 0
    want = Purifier.load(art20, overrides=dict(gs_steps=1, ap_steps=2, random_start=True, blur_sigma_jitter=0.3),
                         seed=4).purify(x, uint8_nhwc=True)
    with np.load(out) as z:
        assert np.array_equal(z["x_purified"], want)
