"""What a new user meets on the deploy side: image files in and out, readable info, bad budgets, serve + query.

``serve`` and ``query`` run as the user runs them: two processes, a real tritonserver on loopback between them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
PIL = pytest.importorskip("PIL.Image")

from zeropur_rt.cli import main as rt  # noqa: E402
from zeropur_rt.images import write_class_folders, write_pngs  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

SHORT = ["--set", "gs_steps=2", "ap_steps=3"]


@pytest.fixture(scope="module")
def pngs(cifar, tmp_path_factory):
    x, y = cifar
    u8 = np.round(x[:6] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return write_class_folders(tmp_path_factory.mktemp("imgs") / "images", u8, y[:6]), u8, y[:6]


def test_png_folder_in_png_folder_out_equals_the_purifier_rounded(art20, pngs, tmp_path, capsys):
    folder, u8, y = pngs
    assert rt(["purify", str(art20), str(folder), "--out", str(tmp_path / "out"), "--threads", "1", *SHORT]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "8-bit PNG" in out
    files = sorted((tmp_path / "out").rglob("*.png"))
    assert [str(f.relative_to(tmp_path / "out")) for f in files] == sorted(
        str(f.relative_to(folder)) for f in folder.rglob("*.png"))
    with Purifier.load(art20, threads=1, overrides=dict(gs_steps=2, ap_steps=3)) as pur:
        want = pur.purify(pur.prepare(u8, uint8_nhwc=True))
    got = np.stack([np.asarray(PIL.open(f)) for f in files])  # rows 0..5 sorted by class folder, then row
    order = sorted(range(len(y)), key=lambda i: (str(int(y[i])), f"{i:05d}"))
    expect = (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)[order]
    assert np.array_equal(got, expect)


def test_a_single_image_file_and_the_out_rules(art20, pngs, tmp_path, capsys):
    folder, _, _ = pngs
    one = sorted(folder.rglob("*.png"))[0]
    assert rt(["classify", str(art20), str(one), "--threads", "1"]) == 0
    assert re.search(rf"^{one.name}\t\d$", capsys.readouterr().out, re.M)
    assert rt(["purify", str(art20), str(one), "--threads", "1", *SHORT]) == 0
    assert "nothing saved: pass --out FILE.npz" in capsys.readouterr().out
    assert rt(["purify", str(art20), str(one), "--out", str(tmp_path / "p.png"), *SHORT]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    assert rt(["purify", str(art20), str(one), "--out", str(tmp_path / "p.npz"), "--threads", "1", *SHORT]) == 0
    with np.load(tmp_path / "p.npz") as z:
        assert z["x_purified"].shape == (1, 3, 32, 32) and z["x_purified"].dtype == np.float32


def test_eps_in_pixel_levels_is_refused_with_the_fix(art20, pngs, capsys):
    assert rt(["classify", str(art20), str(pngs[0]), "--set", "eps=8"]) == 2
    assert "did you mean eps=8/255?" in capsys.readouterr().err


def test_info_is_readable_and_json_on_request(art20, capsys):
    assert rt(["info", str(art20)]) == 0
    text = capsys.readouterr().out
    assert "eps 10/255" in text and "Guided Shift 10 x 1/255 (step rule fixed" in text and "verified (sha256 ok)" in text
    assert rt(["info", str(art20), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "resnet20"


def test_write_pngs_refuses_a_nonempty_folder_and_leaves_nothing(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(OSError, match="not an empty folder"):
        write_pngs(tmp_path / "busy", np.zeros((1, 4, 4, 3), np.uint8), ["a.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_serve_then_query_from_another_process(art20, pngs, tmp_path):
    pytest.importorskip("tritonclient.http")
    from zeropur_rt.serving.server import TritonUnavailable, find_triton
    try:
        find_triton()
    except TritonUnavailable as e:
        pytest.skip(f"no tritonserver: {e}")
    folder, u8, y = pngs
    exe = [sys.executable, "-m", "zeropur_rt.cli"]
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen(exe + ["serve", str(art20), "--http-port", "0", "--grpc-port", "0", "--instances", "1",
                                     "--threads", "1", "--seconds", "240", *SHORT],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for _ in range(480):  # the server is ready when serve prints its endpoints
            m = re.search(r"try: zeropur-rt query (http://127\.0\.0\.1:\d+)", (tmp_path / "serve.log").read_text())
            if m or server.poll() is not None:
                url = m and m.group(1)
                break
            time.sleep(0.5)
        assert url, (tmp_path / "serve.log").read_text()[-3000:]
        q = subprocess.run(exe + ["query", url, str(folder), "--batch", "4"], capture_output=True, text=True, timeout=300)
        assert q.returncode == 0, q.stderr
        got = dict(line.split("\t") for line in q.stdout.splitlines() if "\t" in line)
        with Purifier.load(art20, threads=1, overrides=dict(gs_steps=2, ap_steps=3)) as pur:
            pred = pur.classify(pur.purify(pur.prepare(u8, uint8_nhwc=True)))
        want = {f"{int(c)}/{i:05d}.png": str(int(p)) for i, (c, p) in enumerate(zip(y, pred))}
        assert got == want and "accuracy:" in q.stdout
    finally:
        server.terminate()
        server.wait(60)
        log.close()
