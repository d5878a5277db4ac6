"""Export a victim's ZeroPur graphs (classifier, gs_grad, ap_setup, ap_grad) into an artifact directory.

Each graph is traced with ``zeropur_export.graphs.decompositions`` from the functions of
``zeropur_export.reference.losses`` (never re-written here), wrapped in a fixed-arity module and
exported with ``torch.onnx.export(dynamo=True)`` with only the batch dimension dynamic.
Everything is written into a temp directory beside the destination, checked (ONNX checker
with full_check, shape inference, TensorRT allowlist, manifest round trip) and renamed into
place at the end: there is never a partial artifact directory.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from zeropur_export.graphs import tracing, trt_ops
from zeropur_export.reference.graph_functions import graph_functions
from zeropur_export.reference.losses import ap_constants, blur_torch
from zeropur_export.victims.taps import Victim
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.errors import ZeroPurError
from zeropur_rt.files import atomic_write_json, default_mode, sha256_file
from zeropur_rt.manifest import FORMAT_VERSION, MANIFEST, PARTIAL_SUFFIX, Manifest, check_manifest, graph_io

DEFAULT_OPSET = 18  # the dynamo exporter emits opset >= 18; TensorRT 10 parses 9..24 (8.6: up to 17)
# What the exported graphs look like, as ``tools.graph_revision``: bumped whenever a change to the exporter changes
# the graphs it writes (never what they compute), so that an artifact directory kept from an older exporter is
# known as one. 2: BatchNorm folded, ReLU masks as HardSigmoid, the option-A shortcut as a selection convolution.
# 3: the self-LPIPS backward in closed form (``lean_loss``).
GRAPH_REVISION = 3
GRAPHS_FULL = ("classifier", "gs_grad", "ap_setup", "ap_grad")
GRAPHS_GS_ONLY = ("classifier", "gs_grad")


class ExportError(ZeroPurError, RuntimeError):
    """The export could not produce a valid artifact directory (nothing was left behind)."""


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 32
    max: int = 256

    def __post_init__(self) -> None:
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)):
            raise ValueError(f"batch sizes must be integers, got {self}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {self.min}, {self.opt}, {self.max}")

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def example_inputs(victim: Victim, cfg: ZeroPurConfig, name: str, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of graph ``name`` (in graph_io order) for tracing and tests."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *victim.spec.input_shape)
    x = torch.rand(shape, generator=g)
    if name == "classifier":
        return [x]
    if name == "gs_grad":
        return [x, blur_torch(x, cfg.blur_sigma)]
    coarse = (x + cfg.eps * torch.sign(torch.rand(shape, generator=g) - 0.5)).clamp(0, 1)
    if name == "ap_setup":
        return [x, coarse]
    if name == "ap_grad":
        with torch.no_grad():
            c = ap_constants(victim, x, coarse, cfg)
        fine = (x + cfg.ap_step * torch.sign(torch.rand(shape, generator=g) - 0.5)).clamp(0, 1)
        return [fine, *c.ila_dir, c.lpips_ref]
    raise KeyError(name)


def _fixed_arity(gm: nn.Module, n: int) -> nn.Module:
    """An nn.Module whose forward takes exactly ``n`` named tensors (torch.export needs named args)."""
    args = ", ".join(f"a{i}" for i in range(n))
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return self.gm({args})\n", ns)  # noqa: S102 - generated, fixed text
    cls = type(f"ZeroPurGraph{n}", (nn.Module,), {"forward": ns["forward"]})
    m = cls()
    m.gm = gm
    return m


@contextlib.contextmanager
def _quiet(verbose: bool):
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_graph(victim: Victim, cfg: ZeroPurConfig, name: str, path: Path, batch: BatchRange,
                 opset: int = DEFAULT_OPSET, verbose: bool = False) -> dict[str, Any]:
    """Trace and export one graph to ``path``; returns {file, inputs, outputs, seconds}."""
    fns = graph_functions(victim, cfg)
    if name not in fns:
        raise ExportError(f"{victim.name} has no {name} graph (Guided Shift only victims export classifier + gs_grad)")
    fn, is_grad = fns[name]
    n_ila = len(victim.spec.ila)
    in_names, out_names = graph_io(name, n_ila)
    trace_b = tracing.pick_trace_batch([*victim.spec.input_shape, *_other_dims(victim, cfg, name)])
    ex = example_inputs(victim, cfg, name, trace_b)
    t0 = time.perf_counter()
    with _quiet(verbose):
        gm = (tracing.trace_grad(fn, ex, with_value="loss" in out_names) if is_grad else tracing.trace(fn, ex))
    t1 = time.perf_counter()
    module = _fixed_arity(gm, len(ex))
    # torch.export's example batch must lie in [min, max] and avoid the specialised sizes 0 and 1
    export_b = min(max(2, batch.min), batch.max)
    if export_b != trace_b:
        ex = example_inputs(victim, cfg, name, export_b)
    if batch.max == 1:
        dyn = None  # a fixed batch of 1
    else:
        bdim = torch.export.Dim("batch", min=batch.min, max=batch.max)
        dyn = {f"a{i}": {0: bdim} for i in range(len(ex))}
    try:
        with _quiet(verbose):
            prog = torch.onnx.export(module, tuple(ex), dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                                     input_names=in_names, output_names=out_names, optimize=True,
                                     external_data=False, verbose=verbose)
            prog.save(str(path))
        _lean_masks(path)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"torch.onnx.export of {name} for {victim.name} failed: {e}") from e
    return {"file": path.name, "inputs": in_names, "outputs": out_names,
            "seconds": {"trace": t1 - t0, "export": time.perf_counter() - t1}}


def _lean_masks(path: Path) -> None:
    """The ReLU-backward masks as HardSigmoid (``tracing.relu_masks_to_hardsigmoid``), rewritten in place."""
    import onnx

    model = onnx.load(str(path))
    if tracing.relu_masks_to_hardsigmoid(model):
        onnx.save(model, str(path))


def _other_dims(victim: Victim, cfg: ZeroPurConfig, name: str) -> list[int]:
    """Every dim of the graph's example inputs other than the batch (the trace batch must avoid them)."""
    if name not in ("ap_setup", "ap_grad"):
        return []
    with torch.no_grad():
        x = torch.full((2, *victim.spec.input_shape), 0.5)
        c = ap_constants(victim, x, x, cfg)
    return [int(s) for t in (*c.ila_dir, c.lpips_ref) for s in t.shape[1:]]


def check_graph(path: Path, name: str, n_ila: int) -> None:
    """ONNX checker (full_check: includes strict shape inference), I/O names, TensorRT allowlist."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path.name} fails the ONNX checker / shape inference: {e}") from e
    ins, outs = graph_io(name, n_ila)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != ins or got_out != outs:
        raise ExportError(f"{path.name} has inputs {got_in} / outputs {got_out}, the format needs {ins} / {outs}")
    bad = trt_ops.check_model(model)
    if bad:
        raise ExportError(f"{path.name} uses operators TensorRT {trt_ops.TRT_VERSION} rejects:\n  " +
                          "\n  ".join(map(str, bad)))


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxscript

    import zeropur_rt

    v = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
         "zeropur_rt": zeropur_rt.__version__, "trt_allowlist": trt_ops.TRT_VERSION}
    try:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


# ---------------------------------------------------------------- destination handling
def _lock_destination(out_dir: Path) -> tuple[int, Path] | None:
    """One export at a time into ``out_dir``: an exclusive flock on ``.NAME.lock`` beside it, held until
    ``_unlock``. The kernel drops it when the holder dies, SIGKILL included, so a lock is never stale; a
    second exporter fails at once instead of racing the first one's rename."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the final rename still never leaves a partial directory
        return None
    lock = out_dir.parent / f".{out_dir.name}.lock"
    for _ in range(10):
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_mode())
        except OSError as e:
            raise PermissionError(f"cannot write the artifact directory {out_dir}: {out_dir.parent} is not writable "
                                  f"({e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"another export into {out_dir} is running (it holds {lock}): wait for it to finish, "
                              "or export to another --out") from None
        try:  # the holder unlinks the file on release: a lock on an unlinked file is no lock, take the new one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd, lock
        except FileNotFoundError:
            pass
        os.close(fd)
    raise ExportError(f"could not lock {lock}: other exports into {out_dir} keep starting; retry")


def _unlock(lock: tuple[int, Path] | None) -> None:
    if lock is not None:
        lock[1].unlink(missing_ok=True)  # unlink while still holding it (see _lock_destination)
        os.close(lock[0])


def _clear_leftovers(out_dir: Path, say: Callable[[str], None]) -> None:
    """Under the lock, what a killed export left beside ``out_dir``: temp dirs (removed) and, if it died
    inside a --force swap, the previous directory (put back when ``out_dir`` is gone, else removed)."""
    name = "".join(f"[{c}]" if c in "*?[" else c for c in out_dir.name)  # glob-escaped
    for p in sorted(out_dir.parent.glob(f".{name}.*{PARTIAL_SUFFIX}")):
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed {p.name}, left by an export that was killed")
    for p in sorted(out_dir.parent.glob(f".{name}.*.old")):
        if not out_dir.exists():
            os.replace(p, out_dir)
            say(f"restored {out_dir} from {p.name} (an export with --force was killed while replacing it)")
        else:
            shutil.rmtree(p, ignore_errors=True)


def _prepare_destination(out_dir: Path, force: bool) -> Path:
    """Checks and a temp dir beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and not force:
        raise FileExistsError(f"artifact directory {out_dir} already exists; pass --force (force=True) to replace it")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=PARTIAL_SUFFIX, dir=parent))
    except PermissionError as e:
        raise PermissionError(f"cannot write the artifact directory {out_dir}: {parent} is not writable ({e})") from e
    except OSError as e:
        raise ExportError(f"cannot create the artifact directory {out_dir} ({e})") from e
    return tmp


def _commit(tmp: Path, out_dir: Path, force: bool) -> None:
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp made it 0700
    old = None
    if out_dir.exists() and not force:  # made by something other than an export (those wait on the lock)
        raise FileExistsError(f"artifact directory {out_dir} appeared during the export; pass --force (force=True) "
                              "to replace it")
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the API
# What the manifest (tools.weights), ``zeropur-rt info`` and every report say of an export with no weights file.
UNVERIFIED_WEIGHTS = "none: random init or the factory's own parameters, no weights file"


def export_artifacts(victim: Victim, cfg: ZeroPurConfig, out_dir: str | os.PathLike, *,
                     batch: BatchRange | Sequence[int] | dict[str, int] = BatchRange(),
                     force: bool = False, weights_sha256: str | None = None, model: str | None = None,
                     opset: int = DEFAULT_OPSET, calibration: dict[str, Any] | None = None,
                     graphs: Sequence[str] | None = None, check: bool = True, verbose: bool = False,
                     log: Callable[[str], None] | None = None, taps_source: str | None = None,
                     fold: bool = True) -> Path:
    """Export ``victim``'s ZeroPur graphs + manifest.json into ``out_dir`` (atomically); returns its path.

    ``victim``: a zoo victim (``zoo.load_victim``) or a user network wrapped by ``taps.make_victim``.
    GS-only victims (no ILA/LPIPS taps) get classifier + gs_grad only. ``cfg``'s ila_weight and
    lpips_weight are baked into ap_grad. ``taps_source`` (auto, hand, contract, declared): how the taps were
    chosen, recorded in the manifest's taps. ``fold``: eval-mode BatchNorm folded into the convolutions
    before tracing (``zeropur_export.victims.fold``; the manifest's ``tools.bn_folded`` says how many).
    """
    if not isinstance(victim, Victim):
        raise TypeError("victim must be a zeropur_export.victims.taps.Victim (wrap your nn.Module with taps.make_victim)")
    if victim.mean.dtype != torch.float32 or any(p.dtype != torch.float32 for p in victim.parameters()):
        raise ValueError("export a float32 victim (the graphs take float32 images)")
    if isinstance(batch, dict):
        batch = BatchRange(**batch)
    elif not isinstance(batch, BatchRange):
        batch = BatchRange(*batch)
    if fold:  # eval-mode BatchNorm into the convolutions before tracing: the same function, fewer nodes
        from zeropur_export.victims.fold import fold_batchnorm
        victim, folded = fold_batchnorm(victim)
    if cfg.ap_steps > 0 and not victim.spec.supports_ap:
        cfg = cfg.replace(ap_steps=0)  # GS only: the manifest's config must not ask for AP graphs that do not exist
    names = tuple(graphs) if graphs is not None else (GRAPHS_FULL if victim.spec.supports_ap else GRAPHS_GS_ONLY)
    out_dir = Path(out_dir).absolute()
    say = log or (lambda s: None)
    lock = _lock_destination(out_dir)
    try:
        _clear_leftovers(out_dir, say)
        tmp = _prepare_destination(out_dir, force)
    except BaseException:
        _unlock(lock)
        raise
    try:
        n_ila = len(victim.spec.ila)
        graph_specs: dict[str, dict[str, Any]] = {}
        for name in names:
            t = time.perf_counter()
            spec = export_graph(victim, cfg, name, tmp / f"{name}.onnx", batch, opset, verbose)
            if check:
                check_graph(tmp / spec["file"], name, n_ila)
            say(f"{name}: traced in {spec['seconds']['trace']:.1f}s, exported in {spec['seconds']['export']:.1f}s, "
                f"total {time.perf_counter() - t:.1f}s")
            graph_specs[name] = {k: spec[k] for k in ("file", "inputs", "outputs")}
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        s = victim.spec
        manifest = Manifest(
            format_version=FORMAT_VERSION, model=model or victim.name, weights_sha256=weights_sha256,
            taps={**s.to_dict(), **({"source": taps_source} if taps_source else {})}, config=cfg.to_dict(), input_shape=tuple(s.input_shape), mean=tuple(s.mean),
            std=tuple(s.std), num_classes=s.num_classes, batch=batch.to_dict(), opset=opset,
            tools={**tool_versions(), "graph_revision": str(GRAPH_REVISION),
                   "weights": "file, sha256 recorded" if weights_sha256 else UNVERIFIED_WEIGHTS,
                   **({"bn_folded": folded.summary()} if fold else {})},
            graphs=graph_specs, files=files, calibration=calibration)
        atomic_write_json(tmp / MANIFEST, manifest.to_dict())
        check_manifest(tmp)  # round trip: what the runtime will read
        _commit(tmp, out_dir, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, (FileExistsError, PermissionError)):  # disk full, EFBIG, ...
            raise ExportError(f"writing the artifact directory {out_dir} failed ({e}); nothing was left behind") from e
        raise
    finally:
        _unlock(lock)
    return out_dir
