"""``zeropur-export suggest-taps``: trace your classifier once and propose its taps (``taps.suggest_taps``)."""
from __future__ import annotations

import argparse
import sys

from torch import nn

from zeropur_export.victims.flags import (CONTRACT_FIELDS, VictimError, add_victim_args, contract_of, load_factory,
                                          resolve_victim)
from zeropur_export.victims.taps import Victim, format_suggestion, suggest_taps
from zeropur_rt.files import atomic_write_json


def main_suggest_taps(argv: list[str] | None = None) -> int:
    """``zeropur-export suggest-taps``: trace one forward pass and print the taps it proposes."""
    ap = argparse.ArgumentParser(prog="zeropur-export suggest-taps", description=main_suggest_taps.__doc__)
    add_victim_args(ap, required=True)
    ap.add_argument("--json", default=None, help="also write the suggestion (a --contract file) to this JSON file")
    args = ap.parse_args(argv)
    try:
        if ":" not in args.victim:
            rv = resolve_victim(args)
            net, shape = rv.victim.net, rv.victim.spec.input_shape
            contract = {k: getattr(rv.victim.spec, k) for k in CONTRACT_FIELDS}
        else:
            factory, _ = load_factory(args.victim)
            net = factory()
            net = net.net if isinstance(net, Victim) else net
            if not isinstance(net, nn.Module):
                raise VictimError(f"--victim {args.victim!r}: the factory returned {type(net).__name__}, not an nn.Module")
            contract = contract_of(args)
            if "input_shape" not in contract:
                raise VictimError("suggest-taps needs the input shape: --input-shape C,H,W (or --contract FILE)")
            shape = tuple(contract["input_shape"])
    except VictimError as e:
        print(f"zeropur-export suggest-taps: error: {e}", file=sys.stderr)
        return 2
    s = suggest_taps(net, shape)
    print(format_suggestion(s))
    if args.json and s.complete:
        atomic_write_json(args.json, {**{k: list(v) if isinstance(v, tuple) else v for k, v in contract.items()},
                                      "embedding": s.embedding, "ila": list(s.ila), "lpips": list(s.lpips)})
        print(f"wrote {args.json}")
    if s.complete:
        print("\nuse them: --taps auto (the default for a bare nn.Module), or the names above by hand")
    return 0 if s.complete else 3

