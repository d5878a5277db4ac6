"""The long fuzz run: every input surface of ``tests/fuzz/surfaces.py``, N hypothesis inputs each, counted.

    python -m benchmarks.fuzz --surface all --examples 100000 --out runs/fuzz.json [--artifact DIR]

Unlike the CI tests (which stop at the first failure and shrink it), this run records every failure and
goes on. The JSON holds, per surface: inputs tried, outcomes (ok / refused:<ErrorType> counts), crashes
(an input that ended in neither a checked result nor a project error; the first 20 with their inputs) and
partial files (a file left in the scratch folder). Exit status 1 when any surface had a crash. Without
--artifact the tiny victim is exported first (tests/fuzz/tiny_artifact.py, a few seconds).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

import surfaces  # noqa: E402
import tiny_artifact  # noqa: E402

from zeropur_rt.files import atomic_write_json  # noqa: E402


def run_surface(name: str, ctx: surfaces.Context, examples: int, seed: int, progress_every: int = 10000) -> dict:
    strategy, check = surfaces.SURFACES[name]
    counts: Counter[str] = Counter()
    crashes: list[dict] = []
    partial = 0
    t0 = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy())
    def one(case):
        nonlocal partial
        try:
            counts[check(ctx, case)] += 1
        except surfaces.FuzzFailure as e:
            kind = "partial" if "files left behind" in str(e) else "crash"
            partial += kind == "partial"
            counts[kind] += 1
            if len(crashes) < 20:
                crashes.append({"kind": kind, "error": str(e)[:2000], "input": repr(case)[:2000]})
                print(f"  {name}: {kind}: {str(e)[:2000]}\n  input: {repr(case)[:2000]}", flush=True)
        n = sum(counts.values())
        if n % progress_every == 0:
            print(f"  {name}: {n} inputs, {time.perf_counter() - t0:.0f} s, {dict(counts)}", flush=True)

    one()
    tried = sum(counts.values())
    return {"inputs_tried": tried, "crashes": counts.get("crash", 0), "partial_files": partial,
            "outcomes": dict(sorted(counts.items())), "seconds": round(time.perf_counter() - t0, 1),
            "failures": crashes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--surface", nargs="+", default=["all"], help=f"all, or some of {', '.join(surfaces.SURFACES)}")
    ap.add_argument("--examples", type=int, default=100000, help="inputs per surface")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", help="an exported tiny (or any) artifact directory; default: export the tiny victim")
    ap.add_argument("--out", default="runs/fuzz.json")
    args = ap.parse_args(argv)
    names = list(surfaces.SURFACES) if "all" in args.surface else args.surface
    unknown = sorted(set(names) - set(surfaces.SURFACES))
    if unknown:
        ap.error(f"unknown surfaces {unknown}; valid: {', '.join(surfaces.SURFACES)}")
    with tempfile.TemporaryDirectory(prefix="zeropur-fuzz-") as tmp:
        art = Path(args.artifact) if args.artifact else tiny_artifact.export_tiny(Path(tmp) / "tiny")
        ctx = surfaces.Context.make(art, Path(tmp) / "scratch")
        report = {"examples_per_surface": args.examples, "seed": args.seed, "artifact": str(art), "surfaces": {}}
        for name in names:
            print(f"{name}: {args.examples} inputs ...", flush=True)
            report["surfaces"][name] = run_surface(name, ctx, args.examples, args.seed)
            r = report["surfaces"][name]
            print(f"{name}: {r['inputs_tried']} tried, {r['crashes']} crashes, {r['partial_files']} partial files, "
                  f"{r['seconds']} s", flush=True)
            atomic_write_json(args.out, report)  # after every surface: a killed run keeps what it finished
        ctx.purifier.close()
    bad = sum(r["crashes"] + r["partial_files"] for r in report["surfaces"].values())
    print(f"wrote {args.out}; {'no crashes, no partial files' if not bad else f'{bad} failures'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
