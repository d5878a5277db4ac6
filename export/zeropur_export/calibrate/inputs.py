"""The CLI's inputs: row slices, number lists, ILA variants, the labelled data file, the model, config files.
Each bad input is one CalibError naming the flag."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from zeropur_export.victims.weights import KNOWN_WEIGHTS, find_weights
from zeropur_export.victims.zoo import load_victim, zoo_names
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt import sources
from zeropur_export.data import load_cifar10_test
from zeropur_rt.files import sha256_file

from .common import CalibError, paper_config


def parse_rows(text: str, what: str = "rows") -> tuple[int, int]:
    try:
        a, b = text.split(":")
        start, stop = int(a), int(b)
    except ValueError:
        raise CalibError(f"{what} must look like START:STOP (e.g. 5000:6000), got {text!r}") from None
    if start < 0 or stop <= start:
        raise CalibError(f"{what} {text!r}: need 0 <= START < STOP")
    return start, stop


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CalibError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise CalibError(f"{what}: expected finite numbers, got {text!r}")
    return vals


def ints(text: str, what: str) -> list[int]:
    vals = floats(text, what)
    if any(v != int(v) or v < 0 for v in vals):
        raise CalibError(f"{what}: expected integers >= 0, got {text!r}")
    return [int(v) for v in vals]


def parse_ila(text: str) -> list[tuple[bool, float]]:
    """'u1e-4,n0.1' -> [(False, 1e-4), (True, 0.1)]: u = raw dot product, n = normalised."""
    out = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok[0] not in "un":
            raise CalibError(f"--grid-ila: each entry is u<weight> (raw ILA) or n<weight> (normalised ILA), got {tok!r}")
        try:
            w = float(tok[1:])
        except ValueError:
            raise CalibError(f"--grid-ila: bad weight in {tok!r}") from None
        out.append((tok[0] == "n", w))
    if not out:
        raise CalibError("--grid-ila is empty")
    return out


def load_labelled(path: str | None, rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 NHWC images, labels, the file read) of ``rows`` of a CIFAR-10-style .npz."""
    try:
        p = sources.cifar10_test_file(path)
    except FileNotFoundError as e:
        raise CalibError(f"{e}; --data takes a .npz with 'x' uint8 N,32,32,3 and 'y' labels") from None
    try:
        with np.load(p) as z:
            keys = list(z.keys())
            n = len(z["x"]) if "x" in keys else None
    except Exception as e:  # noqa: BLE001 - zip/pickle errors vary
        raise CalibError(f"cannot read {p} as .npz: {e}") from e
    if "x" not in keys:
        raise CalibError(f"{p} has no 'x' images array (found {keys})")
    if "y" not in keys:
        raise CalibError(f"{p} has no 'y' labels array (found {keys}): calibration and evaluation need labelled images")
    if rows[1] > n:
        raise CalibError(f"rows {rows[0]}:{rows[1]} out of range: {p} holds {n} images")
    x, y = load_cifar10_test(p, rows[0], rows[1])
    return x, y, f"{p} ({sources.describe_data(p)})"


def load_model(model: str, weights: str | None) -> tuple[Any, str, str]:
    """(victim, weights path, its sha256) of a zoo model on CIFAR-10 inputs."""
    if model not in zoo_names():
        raise CalibError(f"unknown --model {model!r}; known: {', '.join(zoo_names())}")
    if weights is not None:
        if not Path(weights).is_file():
            raise CalibError(f"--weights file not found: {weights}")
        wpath = Path(weights)
    elif model in KNOWN_WEIGHTS:
        wpath = find_weights(model)
    else:
        raise CalibError(f"{model} has no known pretrained weights: pass --weights FILE")
    victim = load_victim(model, weights=str(wpath))
    if victim.spec.input_shape != (3, 32, 32):
        raise CalibError(f"{model} takes {victim.spec.input_shape} inputs; calibration runs on CIFAR-10 (3, 32, 32)")
    return victim, str(wpath), sha256_file(wpath)


def resolve(args: Any) -> Any:
    """The --victim flags as a ``victims.flags.ResolvedVictim``; every problem a CalibError."""
    from zeropur_export.victims.flags import resolve_victim
    try:
        return resolve_victim(args, weights=args.weights)
    except ValueError as e:  # VictimError, and weights that do not fit
        raise CalibError(str(e)) from None


def load_victim_data(path: str, victim: Any, resize: str) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """(float NCHW images, labels, the path, the split) of a user's labelled data at the victim's input shape.

    The rows are dealt out class by class (``stratified_order``) so that every slice and every prefix the
    search takes is about class-balanced; the first half of that order is the evaluation slice."""
    from zeropur_export.artifacts import victim_data
    try:
        ds, split = victim_data(path, victim, resize, labels=True)
    except ValueError as e:  # DataError
        raise CalibError(str(e)) from None
    if len(ds) < 2:
        raise CalibError(f"{path}: {len(ds)} image(s); calibration needs an evaluation half and a calibration half")
    return ds.x, ds.y, str(path), split


def load_config(spec: str, input_shape: tuple[int, ...] = (3, 32, 32)) -> tuple[str, ZeroPurConfig, tuple[int, int] | None]:
    """(name, config, calibration rows or None) from 'paper' or a JSON file (sibling report.json gives the rows)."""
    if spec == "paper":
        return "paper recipe", paper_config(input_shape), None
    p = Path(spec)
    if not p.is_file():
        raise CalibError(f"--config {spec!r}: not 'paper' and no such file")
    try:
        d = json.loads(p.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        cfg = ZeroPurConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CalibError(f"--config {p}: not a ZeroPurConfig JSON ({e})") from e
    rows = None
    rep = p.parent / "report.json"
    if rep.is_file():
        try:
            rows = tuple(json.loads(rep.read_text())["calib_rows"])
        except (ValueError, KeyError, TypeError):
            rows = None
    return str(p), cfg, rows
