"""File helpers: sha256, atomic writes (temp file + rename), bounded JSON reads, paths kept inside a root."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from zeropur_rt.errors import OutputError, ZeroPurError

# A JSON file this project reads is a small object: more than this is not one of ours (and json's
# recursive decoder must never meet a file deep enough to overflow the stack).
MAX_JSON_BYTES = 16 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    try:  # Linux exposes the umask without the set-and-restore race of os.umask
        umask = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    A failed write (disk full, file-size limit, permissions) raises OutputError and leaves neither
    ``path`` changed nor the temp file behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must never publish a name whose bytes are not on disk yet
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e} (disk full or a file-size limit?); "
                          "nothing was written") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, error: type[ZeroPurError], what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; anything else (unreadable, not UTF-8, not JSON, too deep or too big,
    not an object) raises ``error`` naming the file and the problem."""
    p = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{what} {p} is {p.stat().st_size} bytes, more than any valid one ({MAX_JSON_BYTES}){tail}")
        raw = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, ZeroPurError):
            raise
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise error(f"{what} {p} is not readable JSON ({why}){tail}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {p} must hold a JSON object, got {type(raw).__name__}{tail}")
    return raw


def inside(root: Path, rel: str) -> Path:
    """``root / rel`` if ``rel`` is a plain relative path that stays inside ``root`` once symlinks are
    resolved; a ValueError otherwise (absolute paths, ``..``, symlinks leading out)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ValueError(f"{rel!r} is not a relative path inside {root}")
    p = root / rel
    real_root = root.resolve()
    if not p.resolve().is_relative_to(real_root):
        raise ValueError(f"{p} points outside {root} (to {p.resolve()})")
    return p
