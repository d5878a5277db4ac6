"""Launching a real ``tritonserver`` on loopback: finding the binary, free ports, readiness, clean stop.

Where the binary comes from, in order:

1. ``$ZEROPUR_TRITONSERVER``: a Triton install directory (``bin/tritonserver``, ``backends/python``).
2. ``/opt/tritonserver`` (NVIDIA's tritonserver container).
3. The ``nvidia-pytriton`` 0.7.0 wheel (PyPI, 55 MB), which bundles tritonserver 2.51, its Python backend
   and backend stubs for Python 3.8-3.13. ``bundled_server()`` fetches it with ``pip download --no-deps``
   once into ``~/.cache/zeropur-rt/triton`` (``$ZEROPUR_TRITON_CACHE``) and unpacks only the server, the
   Python backend, this interpreter's stub and the shared libraries. The wheel's own Python package
   (which pins numpy<2) is never installed: the stub is a C++ program that embeds *this* interpreter's
   libpython, so the model runs with this environment's numpy, onnxruntime and zeropur_rt.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTRITON = "nvidia-pytriton==0.7.0"


class TritonUnavailable(RuntimeError):
    """No tritonserver binary could be found or fetched (the reason says why)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # --backend-directory
    lib_dirs: tuple[Path, ...] = ()  # extra LD_LIBRARY_PATH entries (the wheel's bundled libraries)


def cache_dir() -> Path:
    return Path(os.environ.get("ZEROPUR_TRITON_CACHE", Path.home() / ".cache" / "zeropur-rt" / "triton"))


def find_triton(fetch: bool = True) -> TritonInstall:
    """The first tritonserver install found (see the module docstring); ``fetch=False`` never downloads."""
    env = os.environ.get("ZEROPUR_TRITONSERVER")
    for root in ([Path(env)] if env else []) + [Path("/opt/tritonserver")]:
        if (root / "bin" / "tritonserver").is_file():
            return TritonInstall(root / "bin" / "tritonserver", root / "backends")
    if env:
        raise TritonUnavailable(f"$ZEROPUR_TRITONSERVER={env} has no bin/tritonserver")
    return bundled_server(fetch)


def bundled_server(fetch: bool = True) -> TritonInstall:
    """The server unpacked from the nvidia-pytriton wheel for this interpreter (fetched on first use)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache_dir() / f"pytriton-0.7.0-py{ver}"
    if not (root / "bin" / "tritonserver").is_file():
        if not fetch:
            raise TritonUnavailable(f"no tritonserver under {root} (fetch=False)")
        _unpack_wheel(_download_wheel(), root, ver)
    return TritonInstall(root / "bin" / "tritonserver", root / "backends", (root / "lib",))


def _download_wheel() -> Path:
    local = os.environ.get("ZEROPUR_PYTRITON_WHEEL")  # an already downloaded wheel
    if local:
        return Path(local)
    dest = cache_dir() / "wheels"
    found = sorted(dest.glob("nvidia_pytriton-0.7.0-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), PYTRITON]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("nvidia_pytriton-0.7.0-*.whl"))
    if r.returncode or not found:
        raise TritonUnavailable(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    return found[0]


def _unpack_wheel(wheel: Path, root: Path, ver: str) -> None:
    """Server, Python backend, this Python's stub and the bundled libraries, renamed into place at the end."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            stub = f"pytriton/tritonserver/python_backend_stubs/{ver}/triton_python_backend_stub"
            if stub not in names:
                raise TritonUnavailable(f"{wheel.name} has no Python backend stub for Python {ver}")
            wanted = {"pytriton/tritonserver/bin/tritonserver": "bin/tritonserver", stub:
                      "backends/python/triton_python_backend_stub"}
            for n in names:
                if n.startswith("pytriton/tritonserver/backends/python/") and not n.endswith("/"):
                    wanted[n] = "backends/python/" + n.rsplit("/", 1)[1]
                elif n.startswith("nvidia_pytriton.libs/") and not n.endswith("/"):
                    wanted[n] = "lib/" + n.rsplit("/", 1)[1]
            for src, dst in wanted.items():
                out = tmp / dst
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(src) as f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g)
                if dst.startswith("bin/") or dst.endswith("_stub"):
                    out.chmod(0o755)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_env(install: TritonInstall) -> dict[str, str]:
    """The stub embeds libpython: point the loader at this interpreter's. The stub's Python ignores
    PYTHONPATH, so the model (triton_model.py) reads this interpreter's zeropur_rt location from
    ZEROPUR_RT_PYTHONPATH: the server runs the caller's zeropur_rt (a source checkout included)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [str(p) for p in install.lib_dirs] + ([libdir] if libdir else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    import zeropur_rt
    env["ZEROPUR_RT_PYTHONPATH"] = str(Path(zeropur_rt.__file__).resolve().parents[1])
    return env


class TritonServer:
    """``with TritonServer(repo) as s:`` a tritonserver on free 127.0.0.1 ports, ready, stopped on exit.

    ``s.http`` / ``s.grpc`` are "127.0.0.1:PORT" for tritonclient; ``s.log()`` is the server's output so far.
    """

    def __init__(self, repo: str | os.PathLike, install: TritonInstall | None = None, *, ready_timeout: float = 120.0,
                 extra_args: list[str] | None = None, log_path: str | os.PathLike | None = None,
                 ports: dict[str, int] | None = None):
        self.repo, self.install = Path(repo), install or find_triton()
        self.fixed_ports = dict(ports or {})  # "http" / "grpc" / "metrics" -> port; the others free ones
        self.ready_timeout, self.extra_args = ready_timeout, list(extra_args or [])
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "TritonServer":
        self.ports = {k: self.fixed_ports.get(k) or free_port() for k in ("http", "grpc", "metrics")}
        self.http, self.grpc = f"127.0.0.1:{self.ports['http']}", f"127.0.0.1:{self.ports['grpc']}"
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        cmd = [str(self.install.binary), f"--model-repository={self.repo}",
               f"--backend-directory={self.install.backends}",
               "--http-address=127.0.0.1", f"--http-port={self.ports['http']}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.ports['grpc']}",
               "--allow-metrics=false", f"--metrics-port={self.ports['metrics']}",
               "--exit-on-error=true", *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_python_env(self.install),
                                         start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode} before it was ready:\n"
                                        + self.log()[-3000:])
            if self._get("/v2/health/ready") == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.ready_timeout:.0f} s:\n" + self.log()[-3000:])

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's per-model statistics (``/v2/models[/MODEL]/stats``)."""
        path = f"/v2/models/{model}/stats" if model else "/v2/models/stats"
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._get("/v2/health/live") == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # tritonserver drains in-flight requests on SIGTERM, then unloads its models
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
