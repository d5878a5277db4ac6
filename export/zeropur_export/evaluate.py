"""``zeropur-export eval``: robust accuracy of a victim with and without ZeroPur, under the field's attack set.

    zeropur-export eval --models resnet20 --n 500 --out runs/eval_{model}          # every attack, AutoAttack's budgets
    zeropur-export eval --models resnet20 --n 64 --attacks apgd-ce bpda-apgd-ce --adaptive-n 32
    zeropur-export eval --models resnet20 --n 500 --cascade --out runs/eval_{model}_cascade     # worst case, AutoAttack's way

All L-inf at ``--eps`` (8/255). The attacks (``zeropur_export.attack_suite``; ART's PGD/APGD, our
gradients through the defence in ``zeropur_export.adaptive``):

* non-adaptive, crafted on the bare classifier and then purified: ``autoattack`` (AutoAttack's standard
  version, the paper's protocol: APGD-CE, APGD-T, Square in sequence on the survivors, each APGD keeping
  its last misclassified iterate; FAB-T left out), ``pgd`` (``--pgd-steps``), ``pgd-first`` (the same PGD
  stopped at each image's first misclassification: minimal perturbation, first success), ``apgd-ce``,
  ``apgd-dlr``, ``apgd-t`` (targeted DLR against ``--apgd-targets`` classes, the clean logits' runners-up),
  ``--apgd-iter`` (100) iterations;
* ``transfer``: APGD-CE on ``--transfer-from`` (another zoo classifier), then purified;
* black box, only when named: ``square`` (logits) and ``hopskipjump`` (labels) querying the deployed
  purifier, and the bare classifier for contrast, up to ``--queries`` per image on the first ``--query-n``
  images, scored at 100 / 500 / 1000 / 5000 queries (``zeropur_export.query_attacks``);
* adaptive, through the purifier, ``--adaptive-iter`` (100) iterations on the first
  ``--adaptive-n`` images: ``bpda`` (BPDA-PGD, ``--bpda-steps``), ``bpda-apgd-ce|dlr`` (identity
  backward), ``traj-apgd-ce|dlr`` (identity backward averaged over ``--trajectory-points``
  iterates of the loop), ``unrolled-apgd-ce|dlr`` (the exact gradient of the reference loop with
  a straight-through sign); ``--eot`` draws per gradient for a randomised purifier.

An image is robust against an attack if every candidate the attack made is classified right
after purification; the worst-case rows ask that of every attack (AutoAttack's per-image rule).
``--cascade`` runs AutoAttack's protocol instead: the attacks in order of cost, each on the images
every earlier one (and the clean image) left robust, so the worst case over the whole set reaches
hundreds of images on a CPU; its per-attack figures are cumulative, not standalone.
Chunks of ``--batch`` images are kept as they finish (``<out>/state``): rerun the same command to
resume, ``--fresh`` to start over. JSON + markdown are written atomically at the end of each model.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from zeropur_export.attack_suite import ATTACKS, DEFAULT, QUERY, WORST, bits
from zeropur_export.build import describe
from zeropur_rt.config import ZeroPurConfig, parse_sets
from zeropur_rt.files import atomic_write_json, atomic_write_text
from zeropur_rt.progress import progress

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def _require_art() -> ModuleType:
    """The ART glue module; without ART its ImportError says how to install it."""
    return importlib.import_module("zeropur_export.art_preprocessor")


def parse_rows(s: str) -> tuple[int, int]:
    a, sep, b = s.partition(":")
    try:
        start, stop = int(a or 0), int(b)
    except ValueError:
        raise ValueError(f"--rows must be START:STOP (e.g. 0:200), got {s!r}") from None
    if not sep or start < 0 or stop <= start:
        raise ValueError(f"--rows must be START:STOP with 0 <= START < STOP, got {s!r}")
    return start, stop


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-export eval", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", dest="models", nargs="+", default=None,
                    help="zoo architectures (default resnet20); or --victim")
    ap.add_argument("--models", dest="models", nargs="+", help=argparse.SUPPRESS)  # the old spelling, still taken
    ap.add_argument("--n", type=int, default=100, help="images: test rows 0..N-1 (default 100)")
    ap.add_argument("--rows", default=None, help="START:STOP test rows (default 0:N); overrides --n")
    ap.add_argument("--attacks", nargs="+", default=list(DEFAULT), help=f"any of {', '.join(ATTACKS)} (default: all "
                    f"but the query attacks {', '.join(QUERY)})")
    ap.add_argument("--eps", type=float, default=8.0, help="L-inf budget in 1/255 units (default 8)")
    ap.add_argument("--pgd-steps", type=int, default=20, help="steps of pgd and pgd-first (default 20)")
    ap.add_argument("--apgd-iter", type=int, default=100, help="APGD iterations (AutoAttack: 100)")
    ap.add_argument("--apgd-targets", type=int, default=9, help="APGD-T target classes (AutoAttack: 9)")
    ap.add_argument("--transfer-from", default=None, help="zoo model the transfer attack is crafted on "
                    "(default resnet56; resnet20 for resnet56)")
    ap.add_argument("--adaptive-iter", type=int, default=100, help="APGD iterations of the adaptive attacks")
    ap.add_argument("--adaptive-n", type=int, default=None, help="adaptive attacks on the first K images only")
    ap.add_argument("--unrolled-iter", type=int, default=None, help="iterations of the unrolled attacks, ~5 purifications "
                    "each (default: --adaptive-iter)")
    ap.add_argument("--unrolled-n", type=int, default=None, help="unrolled attacks on the first K images only "
                    "(default: --adaptive-n)")
    ap.add_argument("--bpda-steps", type=int, default=20, help="BPDA-PGD steps")
    ap.add_argument("--queries", type=int, default=5000, help="most queries per image of square / hopskipjump, and "
                    "autoattack's Square budget (AutoAttack: 5000)")
    ap.add_argument("--query-n", type=int, default=None, help="query attacks on the first K images only")
    ap.add_argument("--p-init", type=float, default=0.8, help="Square's initial share of pixels (AutoAttack: 0.8)")
    ap.add_argument("--ce", choices=["ce", "stable-ce"], default="ce", help="loss of pgd, pgd-first, autoattack's "
                    "APGD-CE and the APGD-CE attacks: cross-entropy (published figures) or softplus of the "
                    "log-sum-exp margin, which does not round to 0 at large margins")
    ap.add_argument("--trajectory-points", type=int, default=8, help="iterates the trajectory BPDA averages over")
    ap.add_argument("--cascade", action="store_true", help="AutoAttack's protocol: each attack (cheapest first) on "
                    "the images still robust; reports the worst case over every attack on all N images")
    ap.add_argument("--eot", type=int, default=1, help="EOT draws per adaptive gradient, for a randomised config "
                    "(--set random_start=true ...); 1 is exact for a deterministic one")
    ap.add_argument("--fresh", action="store_true", help="discard this --out's finished chunks instead of resuming")
    ap.add_argument("--batch", type=int, default=32, help="images per attack / purifier call (<= artifact max batch)")
    ap.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    ap.add_argument("--backend", default="onnxruntime", help=f"purifier backend: {', '.join(BACKENDS)}")
    ap.add_argument("--device", default=None, help="purifier device (default: the backend's own)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--recipe", default=None, help="zoo models: paper, calibrated or a config JSON (default: the shipped "
                    "calibrated recipe where there is one), exported once into artifacts/<model>-<recipe>")
    ap.add_argument("--artifacts", default=None, help="artifact dir, used with the config it was exported with; may "
                    "contain {model}; with --recipe, where that recipe is exported")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="purifier loop overrides, e.g. gs_steps=2 eps=8/255 (not the baked loss weights)")
    ap.add_argument("--data", default=None, help="CIFAR-10 test .npz (default <shared>/data/cifar10_test.npz)")
    ap.add_argument("--out", default=None, help="output folder (default runs/eval_<model>); may contain {model}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--resize", choices=["crop", "refuse"], default="crop",
                    help="--data images of another size: scale to cover + centre crop (default), or refuse")
    from zeropur_export.victim_cli import add_victim_args
    add_victim_args(ap)
    return ap


def validate_args(args: argparse.Namespace) -> None:
    if args.victim and args.models:
        raise ValueError("pass --models (zoo) or --victim (one classifier), not both")
    if args.victim and args.recipe:
        raise ValueError("--recipe names a zoo recipe; with --victim pass --artifacts (exported with your config)")
    if args.victim and ":" in args.victim and not args.data:
        raise ValueError("--victim needs --data (an .npz, a folder with one subfolder per class, or a path,label CSV)")
    args.own = None
    if args.victim:
        from zeropur_export.victim_cli import resolve_victim
        args.own = resolve_victim(args)
        args.models = [args.own.name]
    args.models = args.models or ["resnet20"]
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {', '.join(ATTACKS)}")
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKENDS)}")
    args.rows = parse_rows(args.rows) if args.rows else (0, args.n)
    if args.rows[1] <= args.rows[0]:
        raise ValueError(f"need at least one image, got --n {args.n}")
    for name in ("pgd_steps", "apgd_iter", "apgd_targets", "adaptive_iter", "bpda_steps", "trajectory_points", "eot",
                 "batch", "threads", "queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("adaptive_n", "unrolled_n", "unrolled_iter", "query_n"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cascade and (args.adaptive_n or args.unrolled_n):
        raise ValueError("--cascade attacks every image still robust; --adaptive-n / --unrolled-n do not apply")
    if args.cascade and set(args.attacks) & set(QUERY):
        raise ValueError(f"the query attacks ({', '.join(QUERY)}) are scored per budget; run them without --cascade")
    args.unrolled_iter = args.unrolled_iter if args.unrolled_iter is not None else args.adaptive_iter
    args.unrolled_n = args.unrolled_n if args.unrolled_n is not None else args.adaptive_n
    if not 0 < args.eps <= 255:
        raise ValueError(f"--eps is in 1/255 units and must be in (0, 255], got {args.eps}")
    args.overrides = parse_sets(args.set)


def _dir_for(template: str, model: str, n_models: int) -> Path:
    """``template`` with {model} filled in; without one, a subfolder per model when there are several."""
    if "{model}" in template:
        return Path(template.format(model=model))
    return Path(template) / model if n_models > 1 else Path(template)


class Evaluator:
    """One model: the purifier, the attack crafter, the resumable ledger, and batched prediction."""

    def __init__(self, model: str, args: argparse.Namespace, log: Callable[[str], None]):
        from zeropur_export.build import default_recipe, ensure_artifacts, load_backend, recipe_artifacts
        self.model, self.args, self.log = model, args, log
        _require_art()
        if args.own is not None:
            from zeropur_export.build import victim_artifacts
            self.art_dir = victim_artifacts(args.own, args.artifacts, log=log)
        elif args.artifacts and not args.recipe:
            self.art_dir = ensure_artifacts(model, _dir_for(args.artifacts, model, len(args.models)), log=log)
        else:
            art = _dir_for(args.artifacts, model, len(args.models)) if args.artifacts else None
            self.art_dir = recipe_artifacts(model, args.recipe or default_recipe(model), art, log=log)[1]
        self.pur = load_backend(self.art_dir, args.backend, args.device, args.threads, args.overrides)
        if args.batch > self.pur.max_batch:
            raise ValueError(f"--batch {args.batch} does not fit artifact {self.art_dir} (max batch "
                             f"{self.pur.max_batch}); use a smaller --batch or re-export with a larger --max-batch")
        self.source = None
        if "transfer" in args.attacks:
            self.source = args.transfer_from or ("resnet20" if model == "resnet56" else "resnet56")
            if self.source == model:
                raise ValueError(f"--transfer-from {self.source} is the attacked model itself; name another zoo model")

    def load(self) -> None:
        """The heavy part (victim weights, ART classifiers), after every model passed the checks."""
        from zeropur_export.attack_suite import Crafter
        from zeropur_export.zoo import load_victim
        self.victim = self.args.own.victim if self.args.own is not None else load_victim(self.model)
        source = None
        if self.source:
            from zeropur_export.art_preprocessor import art_classifier
            src = load_victim(self.source)
            if tuple(src.spec.input_shape) != tuple(self.pur.chw) or src.spec.num_classes != self.pur.manifest.num_classes:
                raise ValueError(f"transfer source {self.source} takes {tuple(src.spec.input_shape)} images and "
                                 f"{src.spec.num_classes} classes, {self.model} {tuple(self.pur.chw)} and "
                                 f"{self.pur.manifest.num_classes}: drop 'transfer' from --attacks")
            source = art_classifier(src, src.spec.num_classes, tuple(src.spec.input_shape))
        self.crafter = Crafter(self.victim, self.pur, self.args, source, self.source or "")

    def _chunks(self, n: int) -> list[slice]:
        b = self.args.batch
        return [slice(i, min(n, i + b)) for i in range(0, n, b)]

    def purified_pred(self, x: np.ndarray, desc: str = "", bar: bool = False) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        for sl in progress(self._chunks(len(x)), desc, enabled=bar and not self.args.quiet):
            out[sl] = self.pur.purify_and_classify(x[sl])[1]
        return out

    def run(self, x: np.ndarray, y: np.ndarray, out_dir: Path) -> dict[str, Any]:
        from zeropur_export.attack_suite import ADAPTIVE, Ledger, run_attack, run_cascade, worst_rows
        a, log = self.args, self.log
        res: dict[str, Any] = dict(model=self.model, artifact_dir=str(self.art_dir), backend=a.backend,
                                   threads=a.threads, rows=list(a.rows), n=len(x), seed=a.seed, eps=a.eps / 255,
                                   eps_255=a.eps, purifier_config=self.pur.cfg.to_dict(), overrides=a.overrides,
                                   batch=a.batch)
        settings = {k: res[k] for k in ("model", "artifact_dir", "backend", "seed", "eps", "purifier_config")}
        ledger = Ledger(out_dir / "state", dict(settings, data=str(a.data or "cifar10_test")), fresh=a.fresh)
        t0 = time.perf_counter()
        clean_bare = self.crafter.bare.predict(x, batch_size=a.batch).argmax(1) == y
        t1 = time.perf_counter()
        self.pur.reseed(a.seed)
        clean_pur = self.purified_pred(x, f"{self.model} purify clean", bar=True) == y
        t2 = time.perf_counter()
        res["clean"] = dict(n=len(x), acc=100 * float(clean_bare.mean()), acc_purified=100 * float(clean_pur.mean()),
                            classify_s=t1 - t0, purify_s=t2 - t1, correct=bits(clean_bare),
                            correct_purified=bits(clean_pur))
        log(f"{self.model} clean: {res['clean']['acc']:.1f}% bare, {res['clean']['acc_purified']:.1f}% purified "
            f"({len(x)} images, purify {t2 - t1:.1f} s)")
        rows: list[dict[str, Any]] = []
        res["attacks"] = rows
        if a.cascade:
            res["cascade"] = run_cascade(a.attacks, self.crafter, ledger, x, y, np.arange(*a.rows), clean_pur, a.seed,
                                         a.batch, self.purified_pred, a.quiet, lambda m: log(f"{self.model} {m}"))
            return res
        for name in a.attacks:
            limit = a.unrolled_n if name.startswith("unrolled-") else a.adaptive_n if name in ADAPTIVE else \
                a.query_n if name in QUERY else None
            k = len(x) if limit is None else min(len(x), limit)
            if name in QUERY:
                from zeropur_export.query_attacks import run_query_attack
                row = run_query_attack(name, self.crafter, ledger, x[:k], y[:k], np.arange(a.rows[0], a.rows[0] + k),
                                       a.seed, a.batch, a.quiet)
            else:
                row = run_attack(name, self.crafter, ledger, x[:k], y[:k], np.arange(a.rows[0], a.rows[0] + k),
                                 a.seed, a.batch, self.purified_pred, a.quiet)
            rows.append(row)
            resumed = f", {row['chunks_resumed']} of {row['chunks']} chunks resumed" if row["chunks_resumed"] else ""
            log(f"{self.model} {name:17s}: {row['robust_acc']:5.1f}% bare, {row['robust_acc_purified']:5.1f}% "
                f"purified ({k} images, attack {row['attack_s']:.1f} s, purify {row['purify_s']:.1f} s{resumed})")
        rows += worst_rows(rows)
        for r in rows:
            r.update(clean_acc=100 * float(clean_bare[:r["n"]].mean()),
                     clean_acc_purified=100 * float(clean_pur[:r["n"]].mean()))
        return res


def _iterations(p: dict[str, Any]) -> str:
    it = str(p.get("max_iter", f"{p['queries']} queries" if "queries" in p else "-"))
    if p.get("targets"):
        it += f" x {p['targets']} targets"
    if p.get("eot", 1) > 1:
        it += f" x EOT {p['eot']}"
    return it


def _cascade_markdown(res: dict[str, Any]) -> list[str]:
    c, stages = res["clean"], res["cascade"]
    worst = stages[-1]["robust_acc_purified"]  # --attacks takes one or more
    wrong = c["n"] - c["correct_purified"].count("1")
    lines = [f"**Worst case over every attack: {worst:.1f}%** of {c['n']} images (AutoAttack's cascade: each attack, "
             "cheapest first, on the images the clean image and every earlier attack left robust; each figure is "
             "cumulative).",
             "",
             "| attack | kind | iterations | images attacked | broken | ZeroPur, robust after | attack s | purify s |",
             "|---|---|---|---|---|---|---|---|",
             f"| clean | - | - | {c['n']} | {wrong} | {c['acc_purified']:.1f}% | - | {c['purify_s']:.1f} |"]
    for r in stages:
        lines.append(f"| {r['attack']} | {r['group']} | {_iterations(r['params'])} | {r['attacked']} | {r['broken']} | "
                     f"{r['robust_acc_purified']:.1f}% | {r['attack_s']:.1f} | {r['purify_s']:.1f} |")
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The report: clean, then the worst cases, then each attack, with its budget and wall time."""
    cfg = res["purifier_config"]
    lines = [f"### {res['model']}: robust accuracy, L-inf eps {res['eps_255']:g}/255",
             "",
             f"Test rows {res['rows'][0]}:{res['rows'][1]} ({res['n']} images), seed {res['seed']}, purifier "
             f"{res['backend']} ({res['threads']} threads), {describe(ZeroPurConfig.from_dict(cfg))}. Robust = "
             "classified right after purification for every candidate the attack made.",
             ""]
    if "cascade" in res:
        lines += _cascade_markdown(res)
    else:
        from zeropur_export.query_attacks import markdown as query_markdown
        lines += _attack_table(res) + query_markdown(res["attacks"])
    lines += ["", "Attack s: wall time crafting the adversarial images (adaptive attacks purify inside it); purify s: "
              "purifying them for the ZeroPur column. Command: `zeropur-export eval " + " ".join(res["argv"]) + "`"]
    return "\n".join(lines)


def _attack_table(res: dict[str, Any]) -> list[str]:
    c = res["clean"]
    lines = ["| attack | kind | images | iterations | no purification | ZeroPur | attack s | purify s |",
             "|---|---|---|---|---|---|---|---|",
             f"| clean | - | {c['n']} | - | {c['acc']:.1f}% | {c['acc_purified']:.1f}% | - | {c['purify_s']:.1f} |"]
    worst = [r for r in res["attacks"] if r["group"] == "worst"]
    for r in sorted(worst, key=lambda r: r["attack"] != WORST) + [r for r in res["attacks"] if r["group"] != "worst"]:
        note = "" if r["n"] == c["n"] else f" (clean {r['clean_acc']:.1f}% / {r['clean_acc_purified']:.1f}%)"
        name = f"**{r['attack']}**" if r["group"] == "worst" else r["attack"]
        its = "-" if r["group"] == "worst" else _iterations(r["params"])
        lines.append(f"| {name} | {r['group']} | {r['n']}{note} | {its} | {r['robust_acc']:.1f}% | "
                     f"{r['robust_acc_purified']:.1f}% | {r['attack_s']:.1f} | {r['purify_s']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    _require_art()
    import torch

    from zeropur_export.bench import machine_info
    from zeropur_export.onnx_export import UNVERIFIED_WEIGHTS
    from zeropur_rt import sources
    from zeropur_rt.data import load_cifar10_test, to_nchw_float
    from zeropur_rt.manifest import load_manifest
    torch.set_num_threads(args.threads)
    log = print
    # The data first (seconds), then every model's artifact, batch and overrides, before any attack runs.
    own_data = args.own is not None and args.data
    data_file = None if own_data else sources.cifar10_test_file(args.data)
    data_name = f"{args.data} (your data)" if own_data else sources.describe_data(data_file)
    evals = [Evaluator(m, args, log) for m in args.models]
    if args.own is not None and args.data:
        from zeropur_export.build import victim_data
        ds, split = victim_data(args.data, args.own.victim, args.resize)
        if args.rows[1] > len(ds):
            raise ValueError(f"rows {args.rows[0]}:{args.rows[1]} out of range: {args.data} holds {len(ds)} images")
        if args.rows[1] > split["eval_rows"][1]:
            log(f"note: rows {args.rows[0]}:{args.rows[1]} reach past the evaluation half 0:{split['eval_rows'][1]} "
                "(calibrate uses the second half)")
        x, ys = ds.x[args.rows[0]:args.rows[1]], ds.y[args.rows[0]:args.rows[1]]
    else:
        xs, ys = load_cifar10_test(data_file, *args.rows)
        x = to_nchw_float(xs)
    machine = machine_info()
    for ev in evals:
        ev.load()
        out = _dir_for(args.out or "runs/eval_{model}", ev.model, len(args.models))
        t0 = time.perf_counter()
        res = ev.run(x, ys, out)
        weights = load_manifest(ev.art_dir).weights_sha256
        res.update(wall_s=time.perf_counter() - t0, machine=machine, art_version=__import__("art").__version__,
                   argv=sys.argv[1:] if argv is None else list(argv), data=data_name,
                   weights_sha256=weights)
        md = markdown(res) + (f"\n\nData: {data_name}. Weights: "
                              + (f"sha256 {weights[:12]}." if weights else f"{UNVERIFIED_WEIGHTS}."))
        atomic_write_text(out / "eval.md", md + "\n")
        atomic_write_json(out / "eval.json", res)
        print("\n" + md + f"\n\nwrote {out}/eval.json, eval.md ({res['wall_s']:.0f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
