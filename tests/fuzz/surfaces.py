"""The fuzzed input surfaces: for each, a hypothesis strategy of inputs and a check that runs one input
through the runtime's own entry point and judges the outcome.

Every input must end in a result that passes the surface's checks, or in one of the project's own error
types (defined in ``zeropur_rt`` / ``zeropur_export``) with a message. Anything else (a raw numpy,
onnxruntime, json or Pillow exception, an assertion on the result, a file left in the scratch folder that
the surface did not put there) raises ``FuzzFailure``. The CI tests (``test_fuzz_*.py``) run a few dozen
inputs per surface under hypothesis; ``python -m benchmarks.fuzz`` runs 1e5 and counts.
"""
from __future__ import annotations

import copy
import io
import json
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

PROJECT_PACKAGES = ("zeropur_rt", "zeropur_export")


class FuzzFailure(AssertionError):
    """An input that ended in neither a checked result nor one of the project's errors."""


def project_error(e: BaseException) -> bool:
    """One of the project's own error types, with a message (what every refusal must be)."""
    return type(e).__module__.split(".")[0] in PROJECT_PACKAGES and bool(str(e).strip())


def judged(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("refused:<Type>", None); FuzzFailure for anything else."""
    try:
        return "ok", fn()
    except FuzzFailure:
        raise
    except Exception as e:  # noqa: BLE001 - the point: every exception is judged
        if project_error(e):
            return f"refused:{type(e).__name__}", None
        raise FuzzFailure(f"raw {type(e).__module__}.{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}") from e


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzFailure(what)


@dataclass
class Context:
    """What the checks run against: a real tiny artifact, a purifier over it, and a scratch folder."""

    artifact: Path
    scratch: Path
    purifier: Any = None
    base_manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, artifact: Path, scratch: Path) -> "Context":
        from zeropur_rt.pipeline import Purifier
        scratch.mkdir(parents=True, exist_ok=True)
        pur = Purifier.load(artifact, threads=1)
        return cls(artifact, scratch, pur, json.loads((artifact / "manifest.json").read_text()))

    def fresh(self, name: str) -> Path:
        d = self.scratch / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d


def no_strays(d: Path, expected: set[str]) -> None:
    """The partial-file check: nothing but what the harness itself put into ``d``."""
    stray = sorted(p.name for p in d.iterdir() if p.name not in expected)
    expect(not stray, f"files left behind: {stray}")


def check_images_result(ctx: Context, x: np.ndarray, n: int | None = None) -> np.ndarray:
    """A purified batch: float32 NCHW of the artifact's shape, finite, in [0, 1]; predictions in range."""
    pur = ctx.purifier
    out, pred = pur.purify_and_classify(x)
    expect(out.dtype == np.float32 and out.shape == (len(x), *pur.chw), f"purified {out.dtype} {out.shape}")
    expect(bool(np.isfinite(out).all()) and float(out.min()) >= 0 and float(out.max()) <= 1, "purified out of [0, 1]")
    expect(pred.shape == (len(x),) and bool(((pred >= 0) & (pred < pur.manifest.num_classes)).all()), f"pred {pred}")
    if n is not None:
        expect(len(x) == n, f"{len(x)} images, expected {n}")
    return out


# ----------------------------------------------------------------------------------------- JSON values
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
                | st.sampled_from([0, 1, -1, 2**63, 10**400, 1e308, -0.0, "", "../x", "/etc/passwd", "9.0",
                                   "10.8.0.43", "fp32", "fp16", "a" * 64, "0" * 64]))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=8)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(obj: Any, path: tuple, op: str, value: Any) -> Any:
    if not path:
        return value if op == "set" else obj
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "set":
        parent[last] = value
    elif op == "rename" and isinstance(parent, dict):
        parent[str(value)] = parent.pop(last)
    return obj


# ----------------------------------------------------------------------------------------- manifest
GRAPHS = ("classifier", "gs_grad", "ap_setup", "ap_grad")
FILE_OPS = ("none", "none", "none", "flip", "truncate", "empty", "delete", "symlink_out", "symlink_in", "swap_graphs",
            "manifest_bytes", "manifest_symlink", "dir_instead")

engine_records = st.dictionaries(
    st.text(max_size=16) | st.just("sm90.trt10.8.fp32"),
    st.fixed_dictionaries({}, optional={
        "compute_capability": st.sampled_from(["9.0", "sm90", "8.7", "x", "", [9, 0]]) | json_scalars,
        "tensorrt": st.sampled_from(["10.8.0.43", "10.3", "11.0.0", "", "x.y"]) | json_scalars,
        "precision": st.sampled_from(["fp32", "fp16", "int8"]) | json_scalars,
        "batch": st.just({"min": 1, "opt": 4, "max": 16}) | json_values,
        "graphs": st.dictionaries(st.sampled_from(GRAPHS) | st.text(max_size=6),
                                  st.fixed_dictionaries({"file": st.sampled_from([f"{g}.onnx" for g in GRAPHS]) | json_scalars})
                                  | json_values, max_size=4) | json_values,
    }) | json_values, max_size=3)


@st.composite
def manifest_inputs(draw: Any) -> dict[str, Any]:
    return {"mutations": draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "set", "delete", "rename"]),
                                                  json_values), max_size=4)),
            "engines": draw(st.none() | engine_records),
            "file_op": draw(st.sampled_from(FILE_OPS)),
            "file_index": draw(st.integers(0, 10**6)),
            "raw": draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
                        | st.sampled_from([b"[" * 100000, b'{"a":' * 50000, b"\xff\xfe", b"{}", b"null",
                                           b'{"format_version": 1}', ("1" * 5000).encode()]))}


def check_manifest(ctx: Context, case: dict[str, Any]) -> str:
    """Write a mutated manifest (and maybe damage a file) into a copy of the tiny artifact; load it. A manifest
    that loads must then give a working purifier (Purifier.load + one purify) and a judged engine selection."""
    from zeropur_rt.engine_record import select_engines
    from zeropur_rt.manifest import load_manifest
    from zeropur_rt.pipeline import Purifier

    d = ctx.fresh("manifest") / "art"
    shutil.copytree(ctx.artifact, d)
    m = copy.deepcopy(ctx.base_manifest)
    if case["engines"] is not None:
        m["engines"] = case["engines"]
    for idx, op, value in case["mutations"]:
        paths = _paths(m)
        m = _mutate(m, paths[idx % len(paths)], op, value)
    text = json.dumps(m, allow_nan=True).encode() if not isinstance(m, bytes) else m
    files = sorted(p.name for p in d.iterdir() if p.suffix == ".onnx")
    victim = d / files[case["file_index"] % len(files)]
    op = case["file_op"]
    outside = d.parent / "outside.onnx"
    if op == "flip":
        b = bytearray(victim.read_bytes())
        b[case["file_index"] % len(b)] ^= 1 << (case["file_index"] % 8)
        victim.write_bytes(bytes(b))
    elif op == "truncate":
        victim.write_bytes(victim.read_bytes()[: case["file_index"] % victim.stat().st_size])
    elif op == "empty":
        victim.write_bytes(b"")
    elif op == "delete":
        victim.unlink()
    elif op == "symlink_out":  # the same bytes, outside the directory: the hash alone would pass it
        shutil.copy(victim, outside)
        victim.unlink()
        victim.symlink_to(outside)
    elif op == "symlink_in":
        other = d / files[(case["file_index"] + 1) % len(files)]
        victim.unlink()
        victim.symlink_to(other.name)
    elif op == "swap_graphs" and isinstance(m, dict) and isinstance(m.get("graphs"), dict):
        g = m["graphs"]
        if isinstance(g.get("classifier"), dict) and isinstance(g.get("gs_grad"), dict):
            g["classifier"]["file"], g["gs_grad"]["file"] = g["gs_grad"].get("file"), g["classifier"].get("file")
        text = json.dumps(m, allow_nan=True).encode()
    elif op == "manifest_bytes":
        text = case["raw"]
    (d / "manifest.json").write_bytes(text)
    if op == "manifest_symlink":
        (d.parent / "m.json").write_bytes(text)
        (d / "manifest.json").unlink()
        (d / "manifest.json").symlink_to(d.parent / "m.json")
    elif op == "dir_instead":
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()

    outcome, man = judged(lambda: load_manifest(d))
    if outcome != "ok":
        return outcome
    damaged = op in ("flip", "truncate", "empty", "delete", "symlink_out", "symlink_in")
    expect(not (damaged and victim.name in man.files), f"{victim.name} damaged ({op}) and still accepted")

    def use() -> None:
        if man.engines:
            select_engines(man.engines, "9.0", "10.8.0.43", graphs=list(man.graphs), batch=man.batch, artifact_dir=d)
    outcome, _ = judged(use)
    if outcome != "ok":
        return outcome

    def run() -> None:
        with Purifier.load(d, threads=1) as pur:
            x = np.full((max(1, man.batch["min"]), *pur.chw), 0.5, np.float32) if np.prod(man.input_shape) < 1 << 16 else None
            if x is not None and len(x) <= pur.max_batch:
                out, pred = pur.purify_and_classify(x)
                expect(out.shape == x.shape and bool(np.isfinite(out).all()), "purified result malformed")
    outcome, _ = judged(run)
    return "loaded+" + outcome


# ----------------------------------------------------------------------------------------- .npz inputs
def _any_array(draw: Any, chw: tuple[int, int, int]) -> np.ndarray:
    c, h, w = chw
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "float16", "int64", "int8", "bool", "complex64",
                                  "uint16", "<U3", "object", "datetime64[s]"]))
    n = draw(st.integers(0, 20))
    shape = draw(st.sampled_from([(n, c, h, w), (n, h, w, c), (n, h, w, 1), (n, c, h), (n, c, h, w + 1), (n,),
                                  (), (n, c, h, w, 1), (n, 1, h, w)]))
    if dtype == "object":
        a = np.empty(shape, dtype=object)
        a.flat[: a.size] = [draw(json_scalars) for _ in range(min(a.size, 3))] + [0] * max(0, a.size - 3)
        return a
    if dtype in ("<U3", "datetime64[s]"):
        return np.zeros(shape, dtype=dtype)
    kind = draw(st.sampled_from(["unit", "unit", "wide", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.random(shape) if kind == "unit" else rng.normal(0, 300, shape)
    if kind == "special" and a.size:
        a.flat[rng.integers(0, a.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1e-9, 1 + 1e-7, 256, -1]))
    if dtype == "uint8" or dtype.startswith("int") or dtype == "uint16":
        a = a * 255 if kind == "unit" else a
    with np.errstate(all="ignore"):
        return a.astype(dtype)


@st.composite
def npz_inputs(draw: Any, chw: tuple[int, int, int] = (3, 8, 8)) -> dict[str, Any]:
    arrays: dict[str, np.ndarray] = {}
    if draw(st.booleans()):  # the forms the reader takes: uint8 NHWC or float NCHW in [0, 1]
        c, h, w = chw
        n = draw(st.integers(0, 20))
        if draw(st.booleans()):  # another image size: the reader's resize rule (crop) or its refusal
            h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        arrays["x"] = (rng.integers(0, 256, (n, h, w, c), dtype=np.uint8) if draw(st.booleans())
                       else rng.random((n, c, h, w)).astype(draw(st.sampled_from(["float32", "float64"]))))
    else:
        arrays[draw(st.sampled_from(["x", "x", "x", "X", "images"]))] = _any_array(draw, chw)
    if draw(st.booleans()):
        n = draw(st.integers(0, 22))
        arrays["y"] = draw(st.sampled_from([
            np.arange(n) % 10, np.full(n, -1), np.full(n, 10**12), np.linspace(0, 9, n), np.full(n, np.nan),
            np.array(["a"] * n), np.zeros((n, 2), np.int64), np.zeros((), np.int64), np.arange(n, dtype=np.uint8)]))
    return {"arrays": arrays, "damage": draw(st.sampled_from(["none", "none", "truncate", "garbage", "pickle", "not_zip"])),
            "cut": draw(st.integers(0, 10**6)), "raw": draw(st.binary(max_size=64))}


def check_npz(ctx: Context, case: dict[str, Any]) -> str:
    """An .npz through the CLI's reader, then every batch through the purifier; the output written atomically."""
    from zeropur_rt.datasets import read_dataset
    from zeropur_rt.files import atomic_write_bytes

    d = ctx.fresh("npz")
    p = d / "in.npz"
    buf = io.BytesIO()
    arrays = case["arrays"]
    if case["damage"] == "pickle":  # object arrays need allow_pickle: the reader must refuse, never unpickle
        arrays = {**arrays, "x": np.array([{"a": 1}, None], dtype=object)}
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if case["damage"] == "truncate":
        data = data[: case["cut"] % max(1, len(data))]
    elif case["damage"] == "garbage":
        data = data[:30] + case["raw"] + data[30 + len(case["raw"]):]
    elif case["damage"] == "not_zip":
        data = case["raw"]
    p.write_bytes(data)
    pur = ctx.purifier
    outcome, res = judged(lambda: read_dataset(p, pur.chw, resize="refuse", labels=False))
    if outcome != "ok":
        no_strays(d, {"in.npz"})
        return outcome
    x, y, names = res.x, res.y, res.names
    expect(isinstance(x, np.ndarray) and x.ndim == 4 and len(names) == len(x), "reader returned a malformed set")
    expect(y is None or (y.dtype == np.int64 and y.shape == (len(x),)), f"labels {None if y is None else (y.dtype, y.shape)}")

    def run() -> None:
        outs = []
        for i in range(0, len(x), pur.max_batch):
            outs.append(check_images_result(ctx, x[i:i + pur.max_batch]))
        b = io.BytesIO()
        np.savez_compressed(b, x_purified=np.concatenate(outs))
        atomic_write_bytes(d / "out.npz", b.getvalue())
    outcome, _ = judged(run)
    no_strays(d, {"in.npz", "out.npz"})
    return "read+" + outcome


# ----------------------------------------------------------------------------------------- calibrated-config JSON
CONFIG_FIELDS = ("eps", "gs_steps", "gs_step", "momentum", "l1_scope", "blur_sigma", "ap_steps", "ap_step",
                 "ila_weight", "lpips_weight", "ila_normalized", "ila_norm_eps", "gs_step_rule", "preset")
config_numbers = (st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans()
                  | st.sampled_from([10**400, 2**64, -1, 0, 1e-320, 0.5, 8 / 255, "8/255", "sample", "batch", None]))


@st.composite
def config_json_inputs(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "any_json", "bytes", "deep"]))
    if kind == "fields":
        obj = draw(st.dictionaries(st.sampled_from(CONFIG_FIELDS) | st.text(max_size=6), config_numbers | json_values, max_size=6))
        return json.dumps(obj, allow_nan=True).encode()
    if kind == "any_json":
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == "deep":
        return b"[" * draw(st.integers(900, 200000))
    return draw(st.binary(max_size=80))


def check_config_json(ctx: Context, data: bytes) -> str:
    """A calibrated-config file through build_config (what `zeropur-export export --config` reads)."""
    from zeropur_export.recipes import build_config
    from zeropur_rt.config import ZeroPurConfig

    d = ctx.fresh("config")
    p = d / "calibrated_config.json"
    p.write_bytes(data)
    outcome, res = judged(lambda: build_config("cifar10", p))
    if outcome == "ok":
        cfg, prov = res
        expect(ZeroPurConfig.from_dict(cfg.to_dict()) == cfg, "config does not round-trip")
        expect(prov is not None and len(prov["sha256"]) == 64, "no provenance")
    no_strays(d, {"calibrated_config.json"})
    return outcome


# ----------------------------------------------------------------------------------------- --set grammar
set_values = (st.text(max_size=12) | st.integers().map(str) | st.floats(allow_nan=True, allow_infinity=True).map(repr)
              | st.sampled_from(["8/255", "2", "0.01", "sample", "1/0", "0/0", "-1/3", "1e999", "nan", "inf", "true", "off", "YES", "1_000",
                                 "0x10", "  5 ", "١٢", "1" * 5000, "9" * 4000 + "/1", "1/" + "9" * 400, "2**8", "=", ""]))


@st.composite
def set_inputs(draw: Any) -> list[str]:
    def one() -> str:
        if draw(st.integers(0, 5)) == 0:
            return draw(st.text(max_size=20))
        key = draw(st.sampled_from(CONFIG_FIELDS) if draw(st.integers(0, 4)) else st.text(max_size=6))
        sep = draw(st.sampled_from(["=", "=", "=", " = ", "==", ":", ""]))
        return f"{key}{sep}{draw(set_values)}"
    return [one() for _ in range(draw(st.integers(0, 4)))]


def check_sets(ctx: Context, pairs: list[str]) -> str:
    """``--set`` pairs through the one parser, applied to the artifact's config (baked fields refused)."""
    from zeropur_rt.config import ZeroPurConfig, apply_overrides, parse_sets

    base = ctx.purifier.manifest.zeropur_config
    outcome, cfg = judged(lambda: apply_overrides(base, parse_sets(pairs), baked=True))
    if outcome == "ok":
        expect(isinstance(cfg, ZeroPurConfig) and ZeroPurConfig.from_dict(cfg.to_dict()) == cfg, "config malformed")
    return outcome


# ----------------------------------------------------------------------------------------- image-prepare path
class _NoArray:
    pass


@st.composite
def prepare_inputs(draw: Any, chw: tuple[int, int, int] = (3, 8, 8), max_batch: int = 16) -> dict[str, Any]:
    kind = draw(st.sampled_from(["valid", "valid", "valid", "array", "array", "array", "view", "masked", "list",
                                 "ragged", "scalar", "other", "oversize", "broadcast"]))
    c, h, w = chw
    uint8 = draw(st.booleans())
    if kind == "valid":  # the right layout and dtype, any batch size, values at and past the edges
        n = draw(st.integers(0, max_batch + 1))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if uint8:
            return {"x": rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), "uint8": True}
        a = rng.random((n, c, h, w)).astype(draw(st.sampled_from(["float32", "float64"])))
        if a.size and draw(st.booleans()):
            a.flat[rng.integers(0, a.size)] = draw(st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf, -1e-30, 1.0000001,
                                                                    np.nextafter(1, 2), 5e-324]))
        return {"x": a, "uint8": False}
    if kind in ("array", "view", "masked"):
        a = _any_array(draw, chw)
        if kind == "view" and a.ndim == 4 and a.shape[0] > 1:
            a = a[::-1, :, :, :] if draw(st.booleans()) else np.swapaxes(a, 2, 3)
        if kind == "masked" and a.dtype.kind == "f" and a.size:
            a = a.copy()
            a.flat[0] = np.nan
            a = np.ma.masked_array(a, mask=np.isnan(a))
        return {"x": a, "uint8": uint8}
    if kind == "list":
        return {"x": np.random.default_rng(0).random((2, c, h, w)).tolist(), "uint8": uint8}
    if kind == "ragged":
        return {"x": [[0.5] * 3, [0.5]], "uint8": uint8}
    if kind == "scalar":
        return {"x": draw(json_scalars), "uint8": uint8}
    if kind == "oversize":
        n = draw(st.sampled_from([max_batch + 1, 10 * max_batch]))
        return {"x": np.full((n, h, w, c) if uint8 else (n, c, h, w), 100 if uint8 else 0.5,
                             np.uint8 if uint8 else np.float32), "uint8": uint8}
    if kind == "broadcast":  # a huge batch that costs no memory: must be refused before anything scans it
        return {"x": np.broadcast_to(np.float32(0.5), (10**9, c, h, w)), "uint8": False}
    return {"x": draw(st.sampled_from([None, "images", {"x": 1}, _NoArray(), b"\x00" * 10, range(3)])), "uint8": uint8}


def check_prepare(ctx: Context, case: dict[str, Any]) -> str:
    """Images through Purifier.purify_and_classify: validated (dtype, layout, range, NaN/Inf, batch size), purified."""
    pur = ctx.purifier
    x = case["x"]
    snapshot = np.array(x, copy=True) if isinstance(x, np.ndarray) and x.size < 10**6 and x.dtype != object else None
    outcome, res = judged(lambda: pur.purify_and_classify(x, uint8_nhwc=case["uint8"]))
    if outcome == "ok":
        out, pred = res
        n = len(out)
        expect(out.dtype == np.float32 and out.shape == (n, *pur.chw), f"purified {out.dtype} {out.shape}")
        expect(bool(np.isfinite(out).all()) and float(out.min()) >= 0 and float(out.max()) <= 1, "purified out of [0, 1]")
        expect(pred.shape == (n,) and bool(((pred >= 0) & (pred < pur.manifest.num_classes)).all()), "predictions")
        expect(pur.batch["min"] <= n <= pur.max_batch, f"batch {n} outside the artifact's range")
        if isinstance(x, np.ndarray) and not case["uint8"]:
            expect(x.dtype.kind == "f" and bool(np.isfinite(np.asarray(x)).all()), f"accepted {x.dtype} with NaN/Inf")
    if snapshot is not None:
        expect(np.array_equal(np.asarray(x), snapshot, equal_nan=x.dtype.kind in "fc"), "the caller's images were modified")
    return outcome


# ----------------------------------------------------------------------------------------- PNG/JPEG folders, CSV labels
IMAGE_KINDS = ("png", "jpeg", "png", "jpeg", "truncated", "garbage", "empty", "bomb", "dir", "symlink_loop")


def _image_bytes(draw: Any, kind: str) -> bytes | None:
    from PIL import Image
    if kind in ("empty", "dir", "symlink_loop"):
        return b""
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "bomb":  # a valid PNG header claiming 20000 x 20000 pixels, then nothing
        import struct
        import zlib
        ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "LA"] if kind != "jpeg" else ["RGB", "L", "CMYK"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    im = Image.new(mode, (w, h))
    if mode in ("RGB", "L", "RGBA", "CMYK", "LA", "P"):
        bands = len(im.getbands())
        arr = rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
        im = Image.fromarray(arr, mode if mode not in ("P",) else "L").convert(mode) if mode != "CMYK" else im
    buf = io.BytesIO()
    im.save(buf, format="PNG" if kind in ("png", "truncated") else "JPEG")
    data = buf.getvalue()
    return data[: draw(st.integers(0, max(0, len(data) - 1)))] if kind == "truncated" else data


def _write_image(path: Path, kind: str, data: bytes) -> None:
    if kind == "dir":
        path.mkdir()
    elif kind == "symlink_loop":
        path.symlink_to(path.name)
    else:
        path.write_bytes(data)


@st.composite
def folder_inputs(draw: Any) -> dict[str, Any]:
    names = st.sampled_from(["0", "1", "9", "10", "cat", "dog", "²", "१", "-1", "01", ".hidden", "a b", "x" * 300])
    layout = draw(st.sampled_from(["flat", "tree", "tree", "mixed", "empty"]))
    suffixes = st.sampled_from([".png", ".jpg", ".jpeg", ".PNG", ".txt", "", ".webp", ".bmp"])
    files = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(IMAGE_KINDS))
        folder = draw(names) if layout in ("tree", "mixed") and draw(st.integers(0, 4)) else ""
        files.append({"folder": folder, "name": f"im{len(files)}{draw(suffixes)}", "kind": kind,
                      "data": _image_bytes(draw, kind)})
    return {"files": files, "resize": draw(st.sampled_from(["crop", "refuse"]))}


@st.composite
def csv_inputs(draw: Any) -> dict[str, Any]:
    folder = draw(folder_inputs())
    rows = []
    for f in folder["files"]:
        path = f"{f['folder']}/{f['name']}" if f["folder"] else f["name"]
        label = draw(st.sampled_from(["0", "3", "9", "10", "-1", "cat", "dog", "²", "1.5", "", " 2 ", "9" * 5000])
                     | st.text(max_size=5))
        rows.append(draw(st.sampled_from([f"{path},{label}", f'"{path}",{label}', f"{path},{label},extra", path,
                                          f"../{path},{label}", f"/nonexistent/{path},{label}"])))
    header = draw(st.sampled_from(["", "path,label\n", "\ufeffpath,label\n", "PATH , LABEL\n"]))
    text = header + draw(st.sampled_from(["\n", "\r\n"])).join(rows)
    raw = text.encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=40))
    return {**folder, "csv": raw}


def _materialise(root: Path, files: list[dict[str, Any]]) -> None:
    for f in files:
        d = root / f["folder"] if f["folder"] else root
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not (d / f["name"]).exists() and not (d / f["name"]).is_symlink():
                _write_image(d / f["name"], f["kind"], f["data"])
        except OSError:  # a name the filesystem refuses (too long): that file is simply absent
            pass


def _check_set(ctx: Context, src: Path, resize: str) -> str:
    from zeropur_rt.datasets import read_dataset
    pur = ctx.purifier
    outcome, res = judged(lambda: read_dataset(src, pur.chw, resize=resize, labels=False,
                                               num_classes=pur.manifest.num_classes))
    if outcome != "ok":
        return outcome
    x, y, names = res.x, res.y, res.names
    expect(x.dtype == np.float32 and x.shape[1:] == pur.chw and len(x) == len(names) > 0, f"images {x.dtype} {x.shape}")
    expect(bool(np.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1, "images out of [0, 1]")
    expect(y is None or (y.shape == (len(x),) and bool(((y >= 0) & (y < pur.manifest.num_classes)).all())), f"labels {y}")
    outcome, _ = judged(lambda: [check_images_result(ctx, x[i:i + pur.max_batch]) for i in range(0, len(x), pur.max_batch)])
    return "read+" + outcome


def check_folder(ctx: Context, case: dict[str, Any]) -> str:
    """A folder of PNG/JPEG files (flat, or one subfolder per class) through the CLI's reader and the purifier."""
    d = ctx.fresh("folder")
    _materialise(d / "imgs", case["files"])
    (d / "imgs").mkdir(exist_ok=True)
    before = sorted(str(p) for p in d.rglob("*"))
    outcome = _check_set(ctx, d / "imgs", case["resize"])
    expect(sorted(str(p) for p in d.rglob("*")) == before, "the reader changed the folder")
    return outcome


def check_csv(ctx: Context, case: dict[str, Any]) -> str:
    """A path,label CSV (paths relative to its folder) through the CLI's reader and the purifier."""
    d = ctx.fresh("csv")
    _materialise(d, case["files"])
    (d / "labels.csv").write_bytes(case["csv"])
    before = sorted(str(p) for p in d.rglob("*"))
    outcome = _check_set(ctx, d / "labels.csv", case["resize"])
    expect(sorted(str(p) for p in d.rglob("*")) == before, "the reader changed the folder")
    return outcome


SURFACES: dict[str, tuple[Callable[..., Any], Callable[[Context, Any], str]]] = {
    "manifest": (manifest_inputs, check_manifest),
    "npz": (npz_inputs, check_npz),
    "config_json": (config_json_inputs, check_config_json),
    "set_grammar": (set_inputs, check_sets),
    "prepare": (prepare_inputs, check_prepare),
    "folder": (folder_inputs, check_folder),
    "csv": (csv_inputs, check_csv),
}

