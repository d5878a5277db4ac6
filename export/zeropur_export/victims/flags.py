"""The victim flags every command shares (export, suggest-taps, calibrate, eval, bench), and the one function
that turns them into a ``Victim``.

    --victim resnet20                        a zoo architecture
    --victim path/to/net.py:make_net         a factory in a Python file
    --victim package.module:make_net         a factory in an importable module

A factory takes no arguments and returns an ``nn.Module`` (then the input contract is needed: ``--mean
--std --input-shape --num-classes`` or ``--contract FILE``, a JSON object with TapSpec's field names) or a
``Victim`` (which carries its own contract and taps). ``--weights FILE`` loads a state_dict into it
(``weights_only``; DataParallel's ``module.`` prefixes stripped; its sha256 is recorded). Taps: found by
``suggest-taps`` (``--taps auto``, the default for a bare module), or by hand (``--embedding --ila
--lpips``), or from the contract JSON.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from zeropur_rt.errors import ZeroPurError
from zeropur_rt.files import sha256_file

if TYPE_CHECKING:  # torch loads only when a victim is resolved: the parsers stay cheap to build
    from zeropur_export.victims.taps import Victim

CONTRACT_FIELDS = ("mean", "std", "input_shape", "num_classes")
TAP_FIELDS = ("embedding", "ila", "lpips")
TAP_SOURCES = ("auto", "hand", "contract", "declared")


class VictimError(ZeroPurError, ValueError):
    """A --victim, its contract, weights or taps that cannot make a Victim; the message says what is valid."""


@dataclass
class ResolvedVictim:
    victim: "Victim"
    name: str
    spec_text: str  # what --victim said
    weights: str | None
    weights_sha256: str | None
    taps_source: str  # auto | hand | contract | declared (the zoo's or the factory's Victim)
    preset: str | None  # the zoo's preset; None: chosen from the input shape

    def provenance(self) -> dict[str, Any]:
        return dict(victim=self.spec_text, weights=self.weights, weights_sha256=self.weights_sha256,
                    taps_source=self.taps_source)


def add_victim_args(p: argparse.ArgumentParser, *, weights: bool = True, required: bool = False) -> None:
    """The shared victim flags. ``weights=False`` where the command already has its own --weights."""
    g = p.add_argument_group("victim (a zoo name, or your own classifier)")
    g.add_argument("--victim", required=required, metavar="SPEC",
                   help="zoo name, path/to/file.py:factory or package.module:factory (factory() returns an "
                        "nn.Module or a zeropur_export.victims.taps.Victim)")
    if weights:
        g.add_argument("--weights", default=None, help="state_dict file loaded into the factory's module "
                       "(torch.load weights_only; 'module.' prefixes stripped); default: the factory's own weights")
    g.add_argument("--contract", default=None, metavar="FILE",
                   help="JSON with TapSpec field names: mean, std, input_shape, num_classes (and optionally "
                        "embedding, ila, lpips)")
    g.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean of the input contract")
    g.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std of the input contract")
    g.add_argument("--input-shape", default=None, metavar="C,H,W", help="input shape, e.g. 3,32,32")
    g.add_argument("--num-classes", type=int, default=None, metavar="K", help="classes the classifier outputs")
    g.add_argument("--taps", choices=["auto"], default=None,
                   help="auto: the taps suggest-taps finds (the default for a bare nn.Module without hand taps)")
    g.add_argument("--embedding", default=None, metavar="NAME[:in]", help="embedding tap by hand, e.g. fc:in")
    g.add_argument("--ila", nargs="+", default=None, metavar="NAME", help="ILA taps by hand (last two stages)")
    g.add_argument("--lpips", nargs="+", default=None, metavar="NAME", help="LPIPS taps by hand (every stage)")
    add_download_arg(p)


def add_download_arg(p: argparse.ArgumentParser) -> None:
    """``--download``: the one flag that lets a command fetch missing weights or data (zeropur_rt.sources)."""
    p.add_argument("--download", action="store_true", help="fetch missing weights / CIFAR-10 test data from their "
                   "official sources (or $ZEROPUR_MIRROR) into the user cache, hash-checked")


def add_resize_arg(p: argparse.ArgumentParser) -> None:
    """``--resize``: what a command does with --data images of another size than the victim's input."""
    p.add_argument("--resize", choices=["crop", "refuse"], default="crop",
                   help="--data images of another size: scale to cover + centre crop (default), or refuse")


def _numbers(text: str, flag: str, kind: Callable[[str], Any], n: int | None = None) -> tuple[Any, ...]:
    try:
        vals = tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise VictimError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals or (n is not None and len(vals) != n):
        raise VictimError(f"{flag}: expected {n or 'some'} comma-separated numbers, got {text!r}")
    return vals


def load_factory(spec: str) -> tuple[Callable[[], Any], str]:
    """(the factory, a short victim name) of ``file.py:factory`` or ``package.module:factory``."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise VictimError(f"--victim {spec!r}: expected a zoo name, path/to/file.py:factory or package.module:factory")
    if where.endswith(".py") or "/" in where or Path(where).is_file():
        path = Path(where)
        if not path.is_file():
            raise VictimError(f"--victim {spec!r}: no such file {path}")
        mod_name = f"zeropur_victim_{path.stem}"
        ms = importlib.util.spec_from_file_location(mod_name, path)
        if ms is None or ms.loader is None:
            raise VictimError(f"--victim {spec!r}: {path} cannot be imported as Python")
        mod = importlib.util.module_from_spec(ms)
        sys.modules[mod_name] = mod  # dataclasses and pickling look the module up by name
        try:
            ms.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's module may raise anything
            sys.modules.pop(mod_name, None)
            raise VictimError(f"--victim {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        short = path.stem
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise VictimError(f"--victim {spec!r}: cannot import module {where!r} ({e})") from e
        short = where.rsplit(".", 1)[-1]
    fn = getattr(mod, attr, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod.__name__)
        raise VictimError(f"--victim {spec!r}: {where} has no callable {attr!r}; callables defined there: "
                          f"{', '.join(found) or 'none'}")
    try:
        inspect.signature(fn).bind()
    except TypeError:
        raise VictimError(f"--victim {spec!r}: the factory must be callable without arguments, its signature is "
                          f"{attr}{inspect.signature(fn)}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return fn, f"{short}.{attr}"


def contract_of(args: argparse.Namespace) -> dict[str, Any]:
    """The input contract and any taps from --contract, then the flags over it."""
    from zeropur_export.victims.taps import TapSpec
    d: dict[str, Any] = {}
    if getattr(args, "contract", None):
        p = Path(args.contract)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VictimError(f"--contract {p}: cannot read it as JSON ({e})") from None
        if not isinstance(d, dict):
            raise VictimError(f"--contract {p}: must hold a JSON object")
        valid = {f.name for f in fields(TapSpec)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise VictimError(f"--contract {p}: unknown field(s) {unknown}; valid: {', '.join(sorted(valid))}")
    if args.mean is not None:
        d["mean"] = _numbers(args.mean, "--mean", float)
    if args.std is not None:
        d["std"] = _numbers(args.std, "--std", float)
    if args.input_shape is not None:
        d["input_shape"] = _numbers(args.input_shape, "--input-shape", int, 3)
    if args.num_classes is not None:
        d["num_classes"] = args.num_classes
    if "input_shape" in d:
        shp = tuple(d["input_shape"])
        if len(shp) != 3 or any(not isinstance(v, int) or v <= 0 for v in shp):
            raise VictimError(f"input shape must be three positive integers C,H,W, got {list(shp)}")
        if shp[0] > 4 and shp[2] in (1, 3, 4):  # H,W,C: the layout images are stored in, not the one torch takes
            raise VictimError(f"input shape {','.join(map(str, shp))} looks channels-last; the input shape is "
                              f"channels first (C,H,W): did you mean --input-shape {shp[2]},{shp[0]},{shp[1]}?")
    if "num_classes" in d and (not isinstance(d["num_classes"], int) or d["num_classes"] < 2):
        raise VictimError(f"--num-classes must be an integer >= 2, got {d['num_classes']!r}")
    return d


def _hand_taps(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {f: getattr(args, f, None) for f in TAP_FIELDS}
    if all(v is None for v in given.values()):
        return None
    if args.taps == "auto":
        raise VictimError("--taps auto and hand taps (--embedding/--ila/--lpips) are exclusive")
    if given["embedding"] is None:
        raise VictimError("hand taps need --embedding (e.g. fc:in); --ila and --lpips may be left out for Guided Shift only")
    return dict(embedding=given["embedding"], ila=tuple(given["ila"] or ()), lpips=tuple(given["lpips"] or ()))


def own_flags(args: argparse.Namespace) -> list[str]:
    """The contract and tap flags given: they describe your own classifier, a zoo victim declares its own."""
    names = ("contract", "mean", "std", "input_shape", "num_classes", "taps", "embedding", "ila", "lpips")
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def resolve_victim(args: argparse.Namespace, spec: str | None = None, *, weights: str | None = None,
                   random_init: bool = False, seed: int = 0) -> ResolvedVictim:
    """The Victim the flags describe (``spec`` overrides ``args.victim``; ``weights`` overrides ``args.weights``)."""
    from torch import nn

    from zeropur_export.victims.taps import TapSpec, Victim, suggest_taps
    from zeropur_export.victims.weights import KNOWN_WEIGHTS, find_weights, load_into
    from zeropur_export.victims.zoo import ZOO, load_victim, zoo_names

    spec = spec or getattr(args, "victim", None)
    if not spec:
        raise VictimError(f"no victim: pass --victim (a zoo name: {', '.join(zoo_names())}; or file.py:factory)")
    weights = weights if weights is not None else getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise VictimError(f"--weights file not found: {weights}")
    contract = contract_of(args)
    hand = _hand_taps(args)
    wsha = sha256_file(weights) if weights else None
    if ":" not in spec:
        if spec not in ZOO:
            raise VictimError(f"--victim {spec!r}: not a zoo name ({', '.join(zoo_names())}) and not "
                              "path/to/file.py:factory or package.module:factory")
        if own_flags(args):
            raise VictimError(f"--victim {spec} is a zoo victim with its declared contract and taps; "
                              f"{', '.join(own_flags(args))} are for your own classifier")
        if weights is None and not random_init and spec in KNOWN_WEIGHTS:
            weights = str(find_weights(spec))  # verifies the known sha256
            wsha = sha256_file(weights)
        v = load_victim(spec, weights=weights, random_init=random_init and weights is None, seed=seed)
        return ResolvedVictim(v, spec, spec, weights, wsha, "declared", ZOO[spec][2])
    factory, name = load_factory(spec)
    try:
        obj = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise VictimError(f"--victim {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    if isinstance(obj, Victim):
        if contract or hand or args.taps:
            raise VictimError(f"--victim {spec!r} returned a Victim, which declares its own contract and taps; "
                              "drop --contract/--mean/--std/--input-shape/--num-classes and the tap flags")
        if weights:
            load_into(obj.net, weights)
        return ResolvedVictim(obj, obj.name if obj.name != "custom" else name, spec, weights, wsha, "declared", None)
    if not isinstance(obj, nn.Module):
        raise VictimError(f"--victim {spec!r}: the factory returned {type(obj).__name__}; it must return a "
                          "torch.nn.Module or a zeropur_export.victims.taps.Victim")
    missing = [f for f in CONTRACT_FIELDS if f not in contract]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise VictimError(f"--victim {spec!r} returned a bare nn.Module: its input contract is missing {flags} "
                          "(or pass --contract FILE with mean, std, input_shape, num_classes)")
    if weights:
        load_into(obj, weights)
    obj.eval()
    c = contract
    if hand is not None:
        taps, source = hand, "hand"
    elif "embedding" in c and args.taps != "auto":
        taps, source = dict(embedding=c["embedding"], ila=tuple(c.get("ila", ())), lpips=tuple(c.get("lpips", ()))), "contract"
    else:
        s = suggest_taps(obj, tuple(c["input_shape"]))
        taps, source = dict(embedding=s.embedding, ila=s.ila, lpips=s.lpips), "auto"
        if not s.complete:
            from zeropur_export.victims.taps import HAND_TAPS_HINT
            raise VictimError(f"--victim {spec!r}: taps cannot be found automatically: {'; '.join(s.problems)}. "
                              f"Run `zeropur-export suggest-taps --victim {spec} ...` to see the modules. {HAND_TAPS_HINT}")
    ts = TapSpec(embedding=taps["embedding"], ila=tuple(taps["ila"]), lpips=tuple(taps["lpips"]),
                 mean=tuple(float(v) for v in c["mean"]), std=tuple(float(v) for v in c["std"]),
                 input_shape=tuple(c["input_shape"]), num_classes=int(c["num_classes"]))
    try:
        v = Victim(obj, ts, name)
    except ValueError as e:
        raise VictimError(str(e)) from e
    return ResolvedVictim(v, name, spec, weights, wsha, source, None)


def preset_name(rv: ResolvedVictim) -> str:
    """The config preset of a resolved victim: the zoo's own, else the one for its input shape."""
    from zeropur_rt.config import preset_for_shape
    return rv.preset or preset_for_shape(rv.victim.spec.input_shape).preset
