"""Where the data and weights come from: one table (``sources.json``), a user cache, verified downloads.

Lookup order, the same for every file: the command's flag, the environment variable, the shared folder
(``../shared`` or ``$ZEROPUR_SHARED``), the user cache (``$ZEROPUR_CACHE``, else
``$XDG_CACHE_HOME/zeropur-rt``, else ``~/.cache/zeropur-rt``). A file found nowhere is downloaded into the
cache when ``--download`` (or ``ZEROPUR_DOWNLOAD=1``) allows it; otherwise the error lists every place
looked and the one command that fixes it (``zeropur-export fetch``).

Every download is checked against the table's size and sha256 (and md5 where the source publishes one)
before it is renamed into place, so an interrupted or tampered transfer leaves nothing loadable. There is
no switch that turns the check off. ``$ZEROPUR_MIRROR`` replaces each official URL by ``MIRROR/<file>``
(air-gapped users mirror the real files); ``$ZEROPUR_SOURCES`` names a JSON file whose entries replace
the table's by name (a mirror of other bytes must say which bytes).
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from zeropur_rt.errors import DownloadError, MissingFileError
from zeropur_rt.files import atomic_write_bytes, default_mode, sha256_file

TABLE = Path(__file__).with_name("sources.json")
SOURCES_ENV, MIRROR_ENV, CACHE_ENV, DOWNLOAD_ENV = "ZEROPUR_SOURCES", "ZEROPUR_MIRROR", "ZEROPUR_CACHE", "ZEROPUR_DOWNLOAD"
SHARED_ENV, WEIGHTS_ENV, DATA_ENV = "ZEROPUR_SHARED", "ZEROPUR_WEIGHTS", "ZEROPUR_DATA"
CIFAR10_NPZ = "cifar10_test.npz"
FETCH_HINT = "run `zeropur-export fetch` once (or add --download to this command)"
# The shared folder's CIFAR-10 copy, recognised by its file hash so that reports can name it.
KNOWN_COPIES = {"2dc403fb86e4d8af35f7bb62a7a0de9b625816524edb0f89c2e790811964a251":
                "CIFAR-10 test, JPEG-derived copy (about 10 points under the original)"}


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "weights" or "cifar10-archive"
    file: str
    sha256: str
    url: str
    size: int | None = None
    md5: str | None = None

    @property
    def download_url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV)
        return f"{mirror.rstrip('/')}/{self.file}" if mirror else self.url


def table() -> dict[str, Source]:
    """The sources table: ``sources.json``, with the entries of ``$ZEROPUR_SOURCES`` replacing its own."""
    raw = {k: v for k, v in json.loads(TABLE.read_text()).items() if not k.startswith("_")}
    override = os.environ.get(SOURCES_ENV)
    if override:
        try:
            extra = json.loads(Path(override).read_text())
        except (OSError, ValueError) as e:
            raise DownloadError(f"${SOURCES_ENV}={override} is not a readable JSON table ({e})") from None
        raw.update({k: v for k, v in extra.items() if not k.startswith("_")})
    try:
        return {k: Source(name=k, **v) for k, v in raw.items()}
    except TypeError as e:
        raise DownloadError(f"bad entry in the sources table ({e}); fields: kind, file, sha256, url, size, md5") from None


def source(name: str) -> Source:
    t = table()
    if name not in t:
        raise ValueError(f"no source named {name!r}; known: {', '.join(sorted(t))}")
    return t[name]


def shared_dir() -> Path:
    """The shared folder: ``$ZEROPUR_SHARED``, else ``../shared`` beside the working directory or the checkout."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base.parent / "shared").is_dir():
            return base.parent / "shared"
    return Path.cwd().parent / "shared"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zeropur-rt"


def download_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def allow_download() -> None:
    """What ``--download`` does: later lookups in this process may fetch a missing file into the cache."""
    os.environ[DOWNLOAD_ENV] = "1"


def _missing(what: str, looked: list[Path], fix: str) -> MissingFileError:
    return MissingFileError(f"{what} not found; looked in: {', '.join(str(p) for p in looked)}; {fix}")


def weights_file(model: str, weights_dir: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """The verified weights file of a table model: flag dir, ``$ZEROPUR_WEIGHTS``, shared/models, cache/weights."""
    src = source(model)
    looked = ([Path(weights_dir)] if weights_dir else []) + \
             ([Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []) + \
             [shared_dir() / "models", cache_dir() / "weights"]
    for d in looked:
        p = d / src.file
        if p.is_file():
            got = sha256_file(p)
            if got != src.sha256:
                raise DownloadError(f"{p} is not the published {src.file}: sha256 {got}, expected {src.sha256}; "
                                    "delete it and fetch it again")
            return p
    if download if download is not None else download_allowed():
        return download_source(src, cache_dir() / "weights" / src.file)
    raise _missing(f"weights {src.file} of {model}", [d / src.file for d in looked],
                   f"run `zeropur-export fetch --model {model}` once (or add --download to this command)")


def cifar10_test_file(path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """The CIFAR-10 test npz: ``path``, ``$ZEROPUR_DATA``, shared/data, cache/data; else fetched and converted."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingFileError(f"no such file: {path} (--data)")
        return Path(path)
    looked = ([Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []) + \
             [shared_dir() / "data" / CIFAR10_NPZ, cache_dir() / "data" / CIFAR10_NPZ]
    for p in looked:
        if p.is_file():
            return p
    if download if download is not None else download_allowed():
        return fetch_cifar10_test()
    raise _missing("the CIFAR-10 test set", looked, FETCH_HINT + ", or pass --data FILE.npz")


def fetch_cifar10_test() -> Path:
    """Download the official archive, verify it, convert its test batch to the cache's npz, drop the archive."""
    src = source("cifar10")
    dest = cache_dir() / "data" / CIFAR10_NPZ
    archive = download_source(src, cache_dir() / "downloads" / src.file)
    try:
        x, y = read_cifar10_archive(archive)
        buf = io.BytesIO()
        np.savez_compressed(buf, x=x, y=y, source=np.array(f"{src.file} sha256 {src.sha256}"))
        atomic_write_bytes(dest, buf.getvalue())
    finally:
        archive.unlink(missing_ok=True)  # 163 MiB; the npz records which archive it came from
    return dest


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the CIFAR batch format, nothing executable."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in pickle protocol 2

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct
            return _reconstruct
        if name == "encode":
            import codecs
            return codecs.encode
        return getattr(np, name)


def read_cifar_batch(f: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC, int64 labels) of one pickled batch of the CIFAR-10/100 python release: a dict with ``b'data'``,
    (N, 3072) uint8 rows (1024 R, 1024 G, 1024 B), and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100).
    Plain containers and numpy arrays only: a batch file runs no pickled code. A ValueError names ``where``."""
    try:
        d = ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{where} is not a CIFAR python batch ({e})") from None
    if not isinstance(d, dict) or b"data" not in d:
        raise ValueError(f"{where} is not a CIFAR python batch (no b'data' key)")
    labels = d.get(b"labels", d.get(b"fine_labels"))
    if labels is None:
        raise ValueError(f"{where} has no b'labels' or b'fine_labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{where}: b'data' must be (N, 3072), got {data.shape}")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, np.asarray(labels, dtype=np.int64)


def read_cifar10_archive(archive: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC, int64 labels) of ``cifar-10-batches-py/test_batch`` in the official python archive."""
    member = "cifar-10-batches-py/test_batch"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            x, y = read_cifar_batch(f, member)
    except (OSError, KeyError, tarfile.TarError, ValueError) as e:
        raise DownloadError(f"{archive} is not the CIFAR-10 python archive (no readable {member}: {e})") from None
    if len(x) != 10000:
        raise DownloadError(f"{archive}: {member} holds {len(x)} images, expected 10000")
    return x, y


def download_source(src: Source, dest: Path, timeout: float = 60.0) -> Path:
    """``src`` into ``dest`` through a temp file; renamed into place only once size and hashes match."""
    from zeropur_rt.progress import progress
    url = src.download_url
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp, \
                progress(None, f"fetch {src.file}", total=src.size, unit="B") as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                sha.update(chunk)
                md5.update(chunk)
                out.write(chunk)
                n += len(chunk)
                bar.update(len(chunk))
        problems = [f"{n} bytes, expected {src.size}"] if src.size is not None and n != src.size else []
        if sha.hexdigest() != src.sha256:
            problems.append(f"sha256 {sha.hexdigest()}, expected {src.sha256}")
        if src.md5 and md5.hexdigest() != src.md5:
            problems.append(f"md5 {md5.hexdigest()}, expected {src.md5}")
        if problems:
            raise DownloadError(f"{url} is not the published {src.file} ({'; '.join(problems)}); discarded")
        os.chmod(tmp, default_mode())
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, DownloadError):
            raise
        why = getattr(e, "reason", None) or e.__class__.__name__ + (f": {e}" if str(e) else "")
        raise DownloadError(f"cannot download {url} ({why}); offline? download it elsewhere and put it at {dest} "
                            f"(sha256 {src.sha256}), or point ${MIRROR_ENV} at a mirror holding {src.file}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch(names: list[str] | None = None) -> list[Path]:
    """Every named source (default: all) into the cache unless already found; their paths."""
    t = table()
    out = []
    for name in names or sorted(t):
        if name not in t:
            raise ValueError(f"no source named {name!r}; known: {', '.join(sorted(t))}")
        out.append(cifar10_test_file(download=True) if t[name].kind == "cifar10-archive"
                   else weights_file(name, download=True))
    return out


def describe_data(path: str | os.PathLike) -> str:
    """Which copy of the data a run read, and a short hash of the file: every report carries this."""
    p = Path(path)
    digest = sha256_file(p)
    name = KNOWN_COPIES.get(digest)
    if name is None:
        with np.load(p) as z:
            name = f"converted from {z['source']}" if "source" in z else "an unrecognised copy"
    return f"{p.name}: {name}, sha256 {digest[:12]}"
