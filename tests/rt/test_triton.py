"""The Triton model repository against a real tritonserver (2.51, from the nvidia-pytriton 0.7.0 wheel; see
zeropur_rt/serving/server.py for where the binary comes from) on loopback ports, over HTTP and gRPC.

The served outputs must equal ``Purifier``'s for the same images whatever batches Triton's dynamic batcher
formed: the ZeroPur math is per sample and ONNX Runtime's CPU graphs are batch-independent, so equality
is exact. Skipped, with the reason, where no tritonserver can be found or fetched.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from zeropur_rt.cli import main as cli  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402
from zeropur_rt.serving.repository import RepoOptions, write_repository  # noqa: E402
from zeropur_rt.serving.server import TritonServer, TritonUnavailable, find_triton  # noqa: E402

SHORT = dict(gs_steps=2, ap_steps=3)
DELAY_US = 200_000  # long enough that requests sent together are batched together on a busy 2-core CI box


@pytest.fixture(scope="module")
def repo(art20, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    return write_repository(art20, out, RepoOptions(instances=1, threads=1, max_queue_delay_us=DELAY_US,
                                                    preferred=(8, 16), classify_model=True,
                                                    continuous_model=True, overrides=SHORT))


@pytest.fixture(scope="module")
def server(repo):
    try:
        install = find_triton()
    except TritonUnavailable as e:
        pytest.skip(f"no tritonserver: {e}")
    with TritonServer(repo, install) as s:
        yield s


@pytest.fixture(scope="module")
def pur(art20):
    p = Purifier.load(art20, threads=1, overrides=SHORT)
    yield p
    p.close()


@pytest.fixture(scope="module")
def images(cifar):
    x = cifar[0][:24]
    return x, np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _input(mod, name: str, arr: np.ndarray):
    dtype = {np.float32: "FP32", np.float64: "FP64", np.uint8: "UINT8"}[arr.dtype.type]
    i = mod.InferInput(name, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return i


def test_outputs_equal_purifier_whatever_the_batches(server, pur, images):
    x, u8 = images
    requests = [(0, 1), (1, 3), (3, 4), (4, 7), (7, 8), (8, 10), (10, 11), (11, 14), (14, 16), (16, 19), (19, 24)]
    results: dict[int, dict[str, np.ndarray]] = {}

    def send(k: int, sl: tuple[int, int]) -> None:
        mod = httpclient if k % 2 else grpcclient
        client = mod.InferenceServerClient(server.http if k % 2 else server.grpc)
        inp = _input(mod, "IMAGE_U8", u8[slice(*sl)]) if k % 3 == 0 else _input(mod, "IMAGE", x[slice(*sl)])
        r = client.infer("zeropur", [inp])
        results[k] = {n: r.as_numpy(n) for n in ("PURIFIED", "LOGITS", "LABEL")}
    threads = [threading.Thread(target=send, args=(k, sl)) for k, sl in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == len(requests)
    for k, sl in enumerate(requests):
        xs = pur.prepare(u8[slice(*sl)], uint8_nhwc=True) if k % 3 == 0 else x[slice(*sl)]
        ref = pur.purify(xs)
        logits = pur.logits(ref)
        got = results[k]
        assert np.array_equal(got["PURIFIED"], ref) and np.array_equal(got["LOGITS"], logits)
        assert np.array_equal(got["LABEL"][:, 0], logits.argmax(1))
    stats = server.statistics("zeropur")["model_stats"][0]
    assert int(stats["inference_count"]) == 24
    assert int(stats["execution_count"]) < len(requests)  # the dynamic batcher did merge requests


def test_bad_requests_name_the_problem_and_the_server_keeps_serving(server, pur, images):
    x, _ = images
    client = httpclient.InferenceServerClient(server.http)
    nan = x[:2].copy()
    nan[1, 0, 5, 5] = np.nan
    bad = [([_input(httpclient, "IMAGE", nan)], "NaN"),
           ([_input(httpclient, "IMAGE", x[:1] * 2)], "must lie in \\[0, 1\\]"),
           ([_input(httpclient, "IMAGE", x[:1, :, :, :31].copy())], "unexpected shape for input 'IMAGE'"),
           ([_input(httpclient, "IMAGE", x[:1].astype(np.float64))], "data-type is 'FP64'"),
           ([_input(httpclient, "IMAGE", np.zeros((65, 3, 32, 32), np.float32))], "batch-size must be <= 64"),
           ([_input(httpclient, "IMAGE", x[:1]), _input(httpclient, "IMAGE_U8", np.zeros((1, 32, 32, 3), np.uint8))],
            "exactly one of IMAGE"),
           ([], "request has 0 inputs")]
    for inputs, match in bad:
        with pytest.raises(Exception, match=match):  # tritonclient's InferenceServerException
            client.infer("zeropur", inputs)
        assert server.alive()
    r = client.infer("zeropur", [_input(httpclient, "IMAGE", x[:2])])
    assert np.array_equal(r.as_numpy("PURIFIED"), pur.purify(x[:2]))
    g = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(Exception, match="NaN"):
        g.infer("zeropur", [_input(grpcclient, "IMAGE", nan)])
    r = g.infer("zeropur_classify", [_input(grpcclient, "IMAGE", x[:3])])
    assert np.array_equal(r.as_numpy("LOGITS"), pur.logits(x[:3]))


def test_continuous_model_over_a_grpc_stream(server, pur, images):
    """The decoupled model: every request joins the running batch at a loop-step boundary."""
    x, _ = images
    client = grpcclient.InferenceServerClient(server.grpc)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        slices = [(0, 2), (2, 3), (3, 7), (7, 8), (8, 12)]
        for k, sl in enumerate(slices):
            client.async_stream_infer("zeropur_continuous", [_input(grpcclient, "IMAGE", x[slice(*sl)])], request_id=str(k))
        nan = x[:1].copy()
        nan[0, 0, 0, 0] = np.nan
        client.async_stream_infer("zeropur_continuous", [_input(grpcclient, "IMAGE", nan)], request_id="bad")
        out, errors = {}, {}
        for _ in range(len(slices) + 1):
            result, error = got.get(timeout=300)
            if error is not None:
                errors[len(errors)] = str(error)
            else:
                out[result.get_response().id] = result.as_numpy("PURIFIED")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "NaN" in errors[0]
    for k, sl in enumerate(slices):
        assert np.array_equal(out[str(k)], pur.purify(x[slice(*sl)]))


def test_repository_writer_and_cli(art20, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli(["triton-repo", str(art20), "--out", str(out), "--preferred", "4", "32",
                "--max-queue-delay-us", "500", "--instances", "3", "--threads", "1", "--classify-model"]) == 0
    cfg = (out / "zeropur" / "config.pbtxt").read_text()
    assert "max_batch_size: 64" in cfg and "preferred_batch_size: [ 4, 32 ]" in cfg
    assert "max_queue_delay_microseconds: 500" in cfg and "count: 3 kind: KIND_CPU" in cfg
    assert (out / "zeropur_classify" / "1" / "model.py").is_file() and not (out / "zeropur_continuous").exists()
    assert (out / "zeropur" / "artifact" / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temp directory left behind
    assert cli(["triton-repo", str(art20), "--out", str(out)]) == 2  # exists, no --force
    assert cli(["triton-repo", str(art20), "--out", str(tmp_path / "r2"), "--preferred", "65"]) == 2
    assert "preferred batch sizes" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert cli(["triton-repo", str(art20), "--out", str(out), "--force", "--no-dynamic-batching"]) == 0
    assert "dynamic_batching" not in (out / "zeropur" / "config.pbtxt").read_text()


def test_load_benchmark_tiny(server, tmp_path, monkeypatch):
    """benchmarks/load.py's runs against the served models: every request counted, nothing lost."""
    pytest.importorskip("matplotlib", reason="the load report's plot needs matplotlib (the dev extra)")
    # a script of the checkout: its folder goes last on the path, after the installed zeropur_rt it runs against
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(__file__).resolve().parents[2])])
    from benchmarks.load import run_load, write_report
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    runs = [run_load(server, "zeropur", "dynamic", "closed", 2, x, 1, 4, 30, 60),
            run_load(server, "zeropur", "dynamic", "open", 50, x, 2, 4, 30, 60),
            run_load(server, "zeropur_continuous", "continuous", "open", 50, x, 1, 4, 30, 60)]
    for r in runs:
        assert (r.sent, r.answered, r.refused, r.lost) == (4, 4, 0, 0), r
        assert r.throughput > 0 and r.p50_ms <= r.p99_ms
    assert runs[0].mean_batch >= 1 and runs[2].mean_batch is None
    write_report(runs, tmp_path, {"note": "CI"})
    assert "lost = 0 over 12 requests" in (tmp_path / "load.md").read_text()
    assert (tmp_path / "load.png").stat().st_size > 0 and len(json.loads((tmp_path / "load.json").read_text())["runs"]) == 3
