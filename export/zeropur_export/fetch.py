"""``zeropur-export fetch``: the zoo weights and the CIFAR-10 test set into the user cache, hash-checked. Needs no
torch (deploy-only installs run it); the lookup and the download are ``zeropur_rt.sources``."""
from __future__ import annotations

import argparse
from typing import Sequence

from zeropur_rt import sources

DESCRIPTION = ("Download the zoo weights and the CIFAR-10 test set from their official sources (or $ZEROPUR_MIRROR) "
               "into the user cache, hash-checked. Needs no torch.")


def add_fetch_args(p: argparse.ArgumentParser) -> None:
    names = sorted(sources.table())
    p.add_argument("--models", dest="models", nargs="+", help=argparse.SUPPRESS)  # the plural spelling, also taken
    p.add_argument("--model", dest="models", nargs="+", default=None, metavar="MODEL",
                   help=f"weights to fetch (default: all of {', '.join(n for n in names if n != 'cifar10')})")
    p.add_argument("--data-only", action="store_true", help="fetch only the CIFAR-10 test set")
    p.add_argument("--weights-only", action="store_true", help="fetch only the weights")
    p.add_argument("--pngs", default=None, metavar="DIR", help="also write the first --n test images as PNG files "
                   "in one folder per class (a folder zeropur-rt purify / classify reads; needs Pillow)")
    p.add_argument("--n", type=int, default=16, help="images written by --pngs (default 16)")


def run_fetch(args: argparse.Namespace) -> None:
    """Every named source into the user cache (or found where it already is), then the PNG sample."""
    table = sources.table()
    weights = args.models or [n for n, s in table.items() if s.kind == "weights"]
    names = ([] if args.weights_only else ["cifar10"]) + ([] if args.data_only else weights)
    for name, path in zip(names, sources.fetch(names)):
        print(f"{name}: {sources.describe_data(path) if name == 'cifar10' else path.name}\n  at {path}")
    if args.pngs:
        from zeropur_export.data import load_cifar10_test
        from zeropur_rt.images import write_class_folders
        x, y = load_cifar10_test(None, 0, args.n)
        print(f"wrote {write_class_folders(args.pngs, x, y)} ({args.n} PNG images, one folder per class)")
    print(f"cache: {sources.cache_dir()} (${sources.CACHE_ENV} moves it)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export fetch", description=DESCRIPTION)
    add_fetch_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run_fetch(make_parser().parse_args(argv))
    return 0
