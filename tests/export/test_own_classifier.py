"""A user's own classifier (tests/export/own_victim.py, not the zoo) with the real ResNet-32 weights, and the user's own
labelled images as .npz, a class-folder tree and a path,label CSV, through the CLIs:
suggest-taps -> calibrate (tiny) -> export --config -> purify -> eval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zeropur_export.data import load_cifar10_test, shared_dir

torch = pytest.importorskip("torch")
from zeropur_export.cli import main as export_main  # noqa: E402
from zeropur_rt.cli import main as rt_main  # noqa: E402

OWN = str(Path(__file__).with_name("own_victim.py"))
WEIGHTS = shared_dir() / "models" / "resnet32-d509ac18.th"
CONTRACT = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--input-shape", "3,32,32", "--num-classes", "10"]
TINY = ["--stage-n", "8,16,24", "--grid-sigma", "0.7", "--grid-eps", "6", "--grid-ila", "u1e-4", "--refine-ap-steps", "",
        "--attack-steps", "2", "--max-clean-drop", "100", "--threads", "2", "--no-progress"]


def _victim(*extra: str) -> list[str]:
    return ["--victim", f"{OWN}:resnet32", "--weights", str(WEIGHTS), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 real CIFAR-10 test images (classes 0-9) as an .npz, as PNGs in a class-folder tree, and as a CSV."""
    if not WEIGHTS.is_file():
        pytest.skip(f"ResNet-32 weights not found at {WEIGHTS} (set ZEROPUR_SHARED)")
    try:
        x, y = load_cifar10_test(stop=48)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from PIL import Image
    root = tmp_path_factory.mktemp("own_data")
    np.savez(root / "d.npz", x=x, y=y)
    lines = ["path,label"]
    for i, (im, lab) in enumerate(zip(x, y)):
        d = root / "tree" / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"img{i:03d}.png")
        lines.append(f"tree/{lab}/img{i:03d}.png,{lab}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return dict(root=root, npz=root / "d.npz", tree=root / "tree", csv=root / "labels.csv", x=x, y=y)


@pytest.fixture(scope="module")
def pipeline(data, tmp_path_factory):
    """suggest-taps -> calibrate (tiny, .npz) -> export --config: the artifact and the files on the way."""
    out = tmp_path_factory.mktemp("own_run")
    contract = out / "contract.json"
    assert export_main(["suggest-taps", "--victim", f"{OWN}:resnet32", *CONTRACT, "--json", str(contract)]) == 0
    assert json.loads(contract.read_text())["ila"] == ["layer2", "layer3"]
    calib = out / "calib"
    rc = export_main(["calibrate", *_victim("--contract", str(contract)), "--data", str(data["npz"]), *TINY,
                      "--out", str(calib)])
    assert rc == 0 and (calib / "calibrated_config.json").is_file()
    art = out / "art"
    assert export_main(["export", *_victim(*CONTRACT, "--taps", "auto"), "--config", str(calib / "calibrated_config.json"),
                        "--out", str(art), "--min-batch", "1", "--opt-batch", "8", "--max-batch", "16"]) == 0
    return dict(out=out, contract=contract, calib=calib, art=art)


def test_suggest_taps_prints_stages_and_explains_a_flat_network(capsys):
    assert export_main(["suggest-taps", "--victim", f"{OWN}:resnet32", "--input-shape", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "embedding  linear:in  (64," in out and "ila        layer2 layer3  (32x16x16, 64x8x8)" in out
    assert "lpips      layer1 layer2 layer3" in out
    assert export_main(["suggest-taps", "--victim", f"{OWN}:tiny_cnn", "--input-shape", "3,32,32"]) == 3
    out = capsys.readouterr().out
    assert "found 1 resolution stage" in out and "--ila A B" in out and "body.3" in out
    assert export_main(["suggest-taps", "--victim", f"{OWN}:nope", "--input-shape", "3,32,32"]) == 2
    assert "callables defined there: Block, OwnResNet32, TinyCNN, resnet32, tiny_cnn" in capsys.readouterr().err


def test_suggestions_match_the_zoo_declared_taps():
    from zeropur_export.victims.taps import suggest_taps
    from zeropur_export.victims.zoo import build_net
    for name in ("resnet20", "resnet50"):
        net, spec, _ = build_net(name)
        s = suggest_taps(net, spec.input_shape)
        assert (s.embedding, s.ila) == (spec.embedding, spec.ila)
        assert set(spec.lpips) <= set(s.lpips)


def test_victim_flag_errors_list_what_is_valid(data, tmp_path):
    from zeropur_export.victims.flags import VictimError, add_victim_args, resolve_victim
    import argparse
    ap = argparse.ArgumentParser()
    add_victim_args(ap)

    def resolve(*argv: str):
        return resolve_victim(ap.parse_args(list(argv)))
    with pytest.raises(VictimError, match="missing --mean, --std"):
        resolve("--victim", f"{OWN}:resnet32", "--input-shape", "3,32,32", "--num-classes", "10")
    with pytest.raises(VictimError, match="not a zoo name .*resnet20"):
        resolve("--victim", "resnet33")
    with pytest.raises(VictimError, match="taps cannot be found automatically.*--embedding NAME:in"):
        resolve("--victim", f"{OWN}:tiny_cnn", *CONTRACT)
    with pytest.raises(VictimError, match="not found in .*valid module names: body, body.0"):
        resolve("--victim", f"{OWN}:tiny_cnn", *CONTRACT, "--embedding", "head:in", "--ila", "bodyy")
    (tmp_path / "c.json").write_text(json.dumps({"mean": [0.5] * 3, "stdd": [1] * 3}))
    with pytest.raises(VictimError, match=r"unknown field\(s\) \['stdd'\]; valid: embedding, ila"):
        resolve("--victim", f"{OWN}:resnet32", "--contract", str(tmp_path / "c.json"))
    with pytest.raises(VictimError, match="returned a Victim"):
        resolve("--victim", f"{OWN}:tiny_victim", *CONTRACT)
    rv = resolve("--victim", f"{OWN}:tiny_victim")
    assert rv.taps_source == "declared" and not rv.victim.spec.supports_ap
    with pytest.raises(ValueError, match="do not fit this architecture"):
        resolve("--victim", f"{OWN}:tiny_cnn", *CONTRACT, "--embedding", "head:in", "--weights", str(WEIGHTS))


def test_own_resnet32_with_real_weights_is_the_zoo_resnet32(data):
    """--weights (DataParallel 'module.' keys) into the separately written module: same logits as the zoo's."""
    from zeropur_export.victims.flags import add_victim_args, resolve_victim
    from zeropur_export.victims.zoo import load_victim
    import argparse
    ap = argparse.ArgumentParser()
    add_victim_args(ap)
    rv = resolve_victim(ap.parse_args(_victim(*CONTRACT)))
    assert rv.taps_source == "auto" and rv.weights_sha256.startswith("d509ac18")
    zoo = load_victim("resnet32", weights=str(WEIGHTS))
    x = torch.from_numpy(data["x"][:8].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    with torch.no_grad():
        torch.testing.assert_close(rv.victim(x), zoo(x), rtol=1e-5, atol=1e-5)


def test_pipeline_npz_purify_and_eval(pipeline, data, tmp_path, capsys):
    m = json.loads((pipeline["art"] / "manifest.json").read_text())
    cfg = json.loads((pipeline["calib"] / "calibrated_config.json").read_text())
    assert m["model"] == "own_victim.resnet32" and m["taps"]["source"] == "auto"
    assert m["weights_sha256"].startswith("d509ac18") and m["config"] == cfg
    rep = json.loads((pipeline["calib"] / "report.json").read_text())
    assert rep["eval_rows"] == [0, 24] and rep["calib_rows"] == [24, 48] and rep["taps_source"] == "contract"
    out = tmp_path / "p.npz"
    assert rt_main(["purify", str(pipeline["art"]), str(data["npz"]), "--out", str(out), "--threads", "2"]) == 0
    with np.load(out) as z:
        assert z["x_purified"].shape == (48, 3, 32, 32) and np.array_equal(z["y"], data["y"])
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert export_main(["eval", *_victim(*CONTRACT), "--artifacts", str(pipeline["art"]), "--data", str(data["npz"]),
                        "--n", "8", "--attacks", "pgd", "--pgd-steps", "2", "--batch", "8", "--quiet",
                        "--out", str(ev)]) == 0
    res = json.loads((ev / "eval.json").read_text())
    assert res["model"] == "own_victim.resnet32" and res["n"] == 8 and res["attacks"][0]["attack"] == "pgd"
    cev = tmp_path / "cev"
    assert export_main(["calibrate", "eval", *_victim(*CONTRACT), "--data", str(data["npz"]), "--rows", "0:8",
                        "--config", str(pipeline["calib"] / "calibrated_config.json"), "--attack-steps", "2",
                        "--no-progress", "--out", str(cev)]) == 0
    assert json.loads((cev / "eval.json").read_text())["results"][0]["calib_rows"] == [24, 48]


@pytest.mark.parametrize("form", ["tree", "csv"])
def test_folder_tree_and_csv_read_the_same_images_and_run_through(form, pipeline, data, tmp_path, capsys):
    from zeropur_rt.datasets import read_dataset
    ds = read_dataset(data[form], (3, 32, 32), num_classes=10)
    order = np.argsort([int(Path(n).stem[3:]) for n in ds.names])  # img<i>: back to the .npz row order
    assert np.array_equal(ds.y[order], data["y"])
    assert np.array_equal(ds.x[order], data["x"].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    assert rt_main(["purify", str(pipeline["art"]), str(data[form]), "--out", str(tmp_path / "p.npz")]) == 0
    assert "accuracy:" in capsys.readouterr().out
    calib = tmp_path / "calib"
    assert export_main(["calibrate", *_victim(*CONTRACT), "--data", str(data[form]), *TINY, "--out", str(calib)]) == 0
    assert json.loads((calib / "report.json").read_text())["n_data"] == 48


def test_bench_own_victim_on_its_artifact(pipeline, data, tmp_path):
    out = tmp_path / "bench"
    assert export_main(["bench", *_victim(*CONTRACT), "--artifacts", str(pipeline["art"]), "--backends", "onnxruntime",
                        "--batch", "2", "--repeats", "1", "--warmup", "0", "--data", str(data["tree"]),
                        "--out", str(out)]) == 0
    assert json.loads((out / "latency.json").read_text())["model"] == "own_victim.resnet32"


def test_bad_data_is_refused_with_the_file_named_and_no_output(data, tmp_path, capsys):
    from PIL import Image

    from zeropur_rt.datasets import DataError, read_dataset
    tree = tmp_path / "tree"
    for c in range(11):  # one class more than the victim has
        (tree / str(c)).mkdir(parents=True)
        Image.fromarray(data["x"][c]).save(tree / str(c) / "a.png")
    with pytest.raises(DataError, match=r"class-count mismatch: 10/a.png has label 10, the model has 10 classes"):
        read_dataset(tree, (3, 32, 32), num_classes=10)
    (tree / "3" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"3/b.png: not a readable image"):
        read_dataset(tree, (3, 32, 32))
    bad_csv = tmp_path / "l.csv"
    bad_csv.write_text("path,label\ntree/0/a.png,0\ntree/1/a.png,\n")
    with pytest.raises(DataError, match=r"l.csv, line 3: missing label"):
        read_dataset(bad_csv, (3, 32, 32))
    big = tmp_path / "big"
    (big / "0").mkdir(parents=True)
    Image.fromarray(data["x"][0]).resize((64, 48)).save(big / "0" / "w.png")
    with pytest.raises(DataError, match=r"w.png is 64x48, the model takes 32x32: resize it first, or use the resize rule 'crop'"):
        read_dataset(big, (3, 32, 32), resize="refuse")
    assert read_dataset(big, (3, 32, 32)).x.shape == (1, 3, 32, 32)  # the stated rule: cover, then centre crop
    out = tmp_path / "calib"
    assert export_main(["calibrate", *_victim(*CONTRACT), "--data", str(tree), *TINY, "--out", str(out)]) == 2
    assert "b.png: not a readable image" in capsys.readouterr().err and not out.exists()
    assert rt_main(["purify", str(tmp_path / "no_artifact"), str(bad_csv)]) == 2


def test_resolution_rule_scales_the_blur_from_the_presets_side():
    from zeropur_rt.config import preset, preset_for_shape
    assert preset_for_shape((3, 32, 32)) == preset("cifar10")
    assert preset_for_shape((3, 224, 224)) == preset("imagenet")
    c64 = preset_for_shape((3, 64, 64))
    assert c64.preset == "cifar10" and c64.blur_sigma == pytest.approx(2 * preset("cifar10").blur_sigma)
    assert c64.gs_step == preset("cifar10").gs_step and c64.eps == preset("cifar10").eps
    c448 = preset_for_shape((3, 448, 448))
    assert c448.preset == "imagenet" and c448.blur_sigma == pytest.approx(2 * preset("imagenet").blur_sigma)
