"""Data and weights from their sources: the real download code against a loopback HTTP server.

The server holds files in the official layout (a CIFAR-10 python archive made here, weight bytes); the sources
table is pointed at them with their own hashes through ``$ZEROPUR_SOURCES``, as an air-gapped mirror would be.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from zeropur_rt import sources
from zeropur_rt.errors import DownloadError, MissingFileError


def cifar_archive(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A ``cifar-10-python.tar.gz`` in the official layout: a pickled dict of bytes keys, data rows R, G, B planes."""
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y],
             b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(x))]}
    meta = {b"num_cases_per_batch": 10000, b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, obj in (("test_batch", batch), ("batches.meta", meta)):
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def entry(path: Path, kind: str) -> dict:
    data = path.read_bytes()
    return {"kind": kind, "file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "url": f"https://example.invalid/{path.name}"}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest's output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/cut/"):  # announce the whole file, send half, hang up: a broken-off transfer
            data = (Path(self.directory) / self.path[5:]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """The files a mirror serves, made once: a CIFAR-10 archive of random images and some weight bytes."""
    www = tmp_path_factory.mktemp("www")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 10000)
    cifar_archive(www / "cifar-10-python.tar.gz", x, y)
    (www / "resnet20-12fca82f.th").write_bytes(b"weights bytes " * 1000)
    return www, x, y


@pytest.fixture
def mirror(official_files, tmp_path, monkeypatch):
    """A loopback server over the official files; the cache, the shared folder and the table point inside tmp_path."""
    www, x, y = official_files
    table = {"cifar10": entry(www / "cifar-10-python.tar.gz", "cifar10-archive"),
             "resnet20": entry(www / "resnet20-12fca82f.th", "weights")}
    (tmp_path / "table.json").write_text(json.dumps(table))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k, v in {"ZEROPUR_SOURCES": tmp_path / "table.json", "ZEROPUR_CACHE": tmp_path / "cache",
                 "ZEROPUR_SHARED": tmp_path / "no_shared",
                 "ZEROPUR_MIRROR": f"http://127.0.0.1:{server.server_address[1]}",
                 "ZEROPUR_DOWNLOAD": "0"}.items():  # set, not deleted: monkeypatch restores only what it saw set,
        monkeypatch.setenv(k, str(v))               # and allow_download() below must not outlive the test
    for k in ("ZEROPUR_DATA", "ZEROPUR_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)
    yield dict(x=x, y=y, www=www, table=table, cache=tmp_path / "cache", port=server.server_address[1])
    server.shutdown()


def loadable(cache: Path) -> list[str]:
    """Every file a later lookup could pick up (temp files start with a dot and are never looked up)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_fetch_converts_the_official_archive_and_names_it(mirror):
    path, = sources.fetch(["cifar10"])
    assert path == mirror["cache"] / "data" / "cifar10_test.npz"
    with np.load(path) as z:
        assert np.array_equal(z["x"], mirror["x"]) and np.array_equal(z["y"], mirror["y"])
    assert loadable(mirror["cache"]) == ["data/cifar10_test.npz"]  # the 163 MiB archive is not kept
    sha = mirror["table"]["cifar10"]["sha256"]
    assert f"converted from cifar-10-python.tar.gz sha256 {sha}" in sources.describe_data(path)
    assert sources.cifar10_test_file() == path  # found in the cache from now on, no network


def test_weights_come_from_the_mirror_and_are_found_afterwards(mirror):
    with pytest.raises(MissingFileError, match=r"zeropur-export fetch --model resnet20") as e:
        sources.weights_file("resnet20")
    assert "no_shared/models/resnet20-12fca82f.th" in str(e.value) and "cache/weights" in str(e.value)
    p = sources.weights_file("resnet20", download=True)
    assert p.read_bytes() == (mirror["www"] / p.name).read_bytes()
    sources.allow_download()  # what --download does
    assert sources.weights_file("resnet20") == p


def test_a_wrong_hash_is_refused_and_leaves_nothing(mirror, tmp_path, monkeypatch):
    table = dict(mirror["table"])
    table["cifar10"] = dict(table["cifar10"], sha256="0" * 64)
    table["resnet20"] = dict(table["resnet20"], sha256="1" * 64)
    (tmp_path / "bad.json").write_text(json.dumps(table))
    monkeypatch.setenv("ZEROPUR_SOURCES", str(tmp_path / "bad.json"))
    with pytest.raises(DownloadError, match="is not the published cifar-10-python.tar.gz .*sha256"):
        sources.fetch(["cifar10"])
    with pytest.raises(DownloadError, match="sha256"):
        sources.weights_file("resnet20", download=True)
    assert loadable(mirror["cache"]) == [] and not list(mirror["cache"].rglob(".*part"))


def test_a_broken_off_transfer_leaves_nothing(mirror, monkeypatch):
    monkeypatch.setenv("ZEROPUR_MIRROR", f"http://127.0.0.1:{mirror['port']}/cut")
    # http.client either raises IncompleteRead or hands back the short body: the size check refuses the latter
    with pytest.raises(DownloadError, match=r"cannot download .*/cut/resnet20|7000 bytes, expected 14000"):
        sources.weights_file("resnet20", download=True)
    with pytest.raises(DownloadError):
        sources.fetch(["cifar10"])
    assert loadable(mirror["cache"]) == []


def test_offline_is_one_line_with_the_url_and_where_to_put_the_file(mirror, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ZEROPUR_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError) as e:
        sources.weights_file("resnet20", download=True)
    msg = str(e.value)
    assert "\n" not in msg and f"http://127.0.0.1:{port}/resnet20-12fca82f.th" in msg
    assert str(mirror["cache"] / "weights" / "resnet20-12fca82f.th") in msg and "ZEROPUR_MIRROR" in msg


def test_lookup_order_flag_env_shared_cache(mirror, tmp_path, monkeypatch):
    def npz(p: Path) -> Path:
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, x=np.zeros((1, 32, 32, 3), np.uint8), y=np.zeros(1, np.int64))
        return p
    cache, shared = npz(mirror["cache"] / "data" / "cifar10_test.npz"), tmp_path / "shared"
    monkeypatch.setenv("ZEROPUR_SHARED", str(shared))
    assert sources.cifar10_test_file() == cache
    npz(shared / "data" / "cifar10_test.npz")
    assert sources.cifar10_test_file() == shared / "data" / "cifar10_test.npz"
    monkeypatch.setenv("ZEROPUR_DATA", str(npz(tmp_path / "env.npz")))
    assert sources.cifar10_test_file() == tmp_path / "env.npz"
    assert sources.cifar10_test_file(npz(tmp_path / "flag.npz")) == tmp_path / "flag.npz"
    with pytest.raises(MissingFileError, match="no such file: .*typo.npz"):
        sources.cifar10_test_file(tmp_path / "typo.npz")


def test_a_tampered_file_in_place_is_refused(mirror):
    (mirror["cache"] / "weights").mkdir(parents=True)
    (mirror["cache"] / "weights" / "resnet20-12fca82f.th").write_bytes(b"other bytes")
    with pytest.raises(DownloadError, match="is not the published resnet20-12fca82f.th"):
        sources.weights_file("resnet20")


def test_the_archive_reader_runs_no_pickled_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    raw = pickle.dumps({b"data": Boom()})
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DownloadError, match="builtins.print is not part of a CIFAR batch"):
        sources.read_cifar10_archive(tmp_path / "evil.tar.gz")


def test_the_shipped_table_matches_the_shared_weights():
    shared = sources.shared_dir() / "models"
    if not shared.is_dir():
        pytest.skip(f"no shared folder at {shared}")
    for name, s in sources.table().items():
        if s.kind == "weights":
            data = (shared / s.file).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (s.size, s.sha256), name
