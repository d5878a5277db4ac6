"""``zeropur-export eval``: robust accuracy of zoo victims with and without ZeroPur, attacks from ART.

    zeropur-export eval --models resnet20 resnet56 --n 200 --attacks pgd apgd-ce apgd-dlr bpda \\
        --apgd-iter 100 --bpda-steps 20 --bpda-n 50 --out runs/eval_{model}

Attacks (all L-inf, eps 8/255 by default, from the Adversarial Robustness Toolbox, not our own code):

* ``pgd``: ART ``ProjectedGradientDescent``, step 2/255, ``--pgd-steps`` (20) steps, one random start,
  against the bare classifier; the adversarial images are then purified.
* ``apgd-ce`` / ``apgd-dlr``: ART ``AutoProjectedGradientDescent`` with loss_type ``cross_entropy`` /
  ``difference_logits_ratio`` (AutoAttack's two APGD runs), ``nb_random_init=1``, initial step
  2*eps (AutoAttack's), ``--apgd-iter`` (100, AutoAttack's) iterations, against the bare
  classifier, then purified. When both run, the row ``apgd-ce+dlr (worst)`` counts an image as
  robust only if it survives both (AutoAttack's per-image worst case over the pair).
* ``bpda``: adaptive attack through the purifier. ART ``ProjectedGradientDescent`` (step 2/255,
  ``--bpda-steps`` steps, one random start) on a ``PyTorchClassifier`` whose preprocessing defence
  is ``zeropur_export.art_preprocessor.ZeroPurPreprocessor``: forward = our runtime purifier, backward =
  identity (BPDA), ``--eot`` gradient samples per step (1: ZeroPur is deterministic). Each step
  purifies the batch once per EOT sample, plus two more purifications per image for the
  success rate ART logs at the end (clean and adversarial predictions): steps + 2 purifications
  per image in all, so it is by far the most expensive attack; ``--bpda-n`` limits it to the
  first images of the set (the JSON row records ``purifications_during_attack``).

"Robust accuracy" = accuracy on the attack's output; "without purification" classifies it with
the bare victim (torch), "with ZeroPur" purifies it with the runtime and classifies with the
exported classifier. Per model the report holds clean accuracy with/without purification,
these rows, image counts, seeds and wall times; JSON + markdown are written atomically at the
end of each model (an error leaves no partial file). ``--set`` changes the purifier's loop; a loss
weight baked into the exported graphs is refused (re-export instead).
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

from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_json, atomic_write_text
from zeropur_rt.progress import progress

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "bpda")
BACKENDS = ("onnxruntime", "torch", "tensorrt")
WORST = "apgd-ce+dlr (worst)"


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
    ap.add_argument("--models", nargs="+", default=None, help="zoo architectures (default resnet20); or --victim")
    ap.add_argument("--n", type=int, default=100, help="images: test rows 0..N-1 (default 100)")
    ap.add_argument("--rows", default=None, help="START:STOP test rows (default 0:N); overrides --n")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), help=f"any of {', '.join(ATTACKS)}")
    ap.add_argument("--eps", type=float, default=8.0, help="L-inf budget in 1/255 units (default 8)")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--apgd-iter", type=int, default=100, help="APGD iterations (AutoAttack: 100)")
    ap.add_argument("--bpda-steps", type=int, default=20)
    ap.add_argument("--bpda-n", type=int, default=None, help="BPDA on the first K images only (default: all)")
    ap.add_argument("--eot", type=int, default=1, help="EOT gradient samples per BPDA step (ZeroPur is deterministic: 1)")
    ap.add_argument("--batch", type=int, default=32, help="images per attack / purifier call (<= artifact max batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="onnxruntime", help=f"purifier backend: {', '.join(BACKENDS)}")
    ap.add_argument("--device", default=None, help="purifier device (default: the backend's own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--artifacts", default=None, help="artifact dir, used with the config it was exported with; may "
                    "contain {model} (default artifacts/<model>-paper: the paper recipe, exported if missing)")
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
    for name in ("pgd_steps", "apgd_iter", "bpda_steps", "eot", "batch", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bpda_n is not None and args.bpda_n < 1:
        raise ValueError(f"--bpda-n must be >= 1, got {args.bpda_n}")
    if not 0 < args.eps <= 255:
        raise ValueError(f"--eps is in 1/255 units and must be in (0, 255], got {args.eps}")
    args.overrides = parse_sets(args.set)


def _dir_for(template: str, model: str, n_models: int) -> Path:
    """``template`` with {model} filled in; without one, a subfolder per model when there are several."""
    if "{model}" in template:
        return Path(template.format(model=model))
    return Path(template) / model if n_models > 1 else Path(template)


def _bits(a: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in np.asarray(a, dtype=bool))


class Evaluator:
    """One model: the purifier, the ART classifiers, and batched prediction helpers."""

    def __init__(self, model: str, args: argparse.Namespace, log: Callable[[str], None]):
        from zeropur_export.build import ensure_artifacts, load_backend, recipe_artifacts
        self.model, self.args, self.log = model, args, log
        self.glue = _require_art()
        if args.own is not None:
            from zeropur_export.build import victim_artifacts
            self.art_dir = victim_artifacts(args.own, args.artifacts, log=log)
        elif args.artifacts:
            self.art_dir = ensure_artifacts(model, _dir_for(args.artifacts, model, len(args.models)), log=log)
        else:
            self.art_dir = recipe_artifacts(model, "paper", log=log)[1]
        self.pur = load_backend(self.art_dir, args.backend, args.device, args.threads, args.overrides)
        if args.batch > self.pur.max_batch:
            raise ValueError(f"--batch {args.batch} does not fit artifact {self.art_dir} (max batch "
                             f"{self.pur.max_batch}); use a smaller --batch or re-export with a larger --max-batch")

    def load(self) -> None:
        """The heavy part (victim weights, ART classifier), after every model passed the checks."""
        from zeropur_export.zoo import load_victim
        self.victim = self.args.own.victim if self.args.own is not None else load_victim(self.model)
        self.clf = self.glue.art_classifier(self.victim, self.pur.manifest.num_classes, tuple(self.pur.chw))

    def _chunks(self, n: int) -> list[slice]:
        b = self.args.batch
        return [slice(i, min(n, i + b)) for i in range(0, n, b)]

    def bare_pred(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict(x, batch_size=self.args.batch).argmax(1)

    def purified_pred(self, x: np.ndarray, desc: str) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        for sl in progress(self._chunks(len(x)), desc, enabled=not self.args.quiet):
            out[sl] = self.pur.purify_and_classify(x[sl])[1]
        return out

    def make_attack(self, name: str) -> tuple[Any, dict[str, Any]]:
        from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent
        a, eps = self.args, self.args.eps / 255
        if name == "pgd":
            return ProjectedGradientDescent(self.clf, norm=np.inf, eps=eps, eps_step=2 / 255, max_iter=a.pgd_steps,
                                            num_random_init=1, batch_size=a.batch, verbose=False), \
                dict(eps_step=2 / 255, max_iter=a.pgd_steps, num_random_init=1)
        if name in ("apgd-ce", "apgd-dlr"):
            loss = "cross_entropy" if name == "apgd-ce" else "difference_logits_ratio"
            return AutoProjectedGradientDescent(self.clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=a.apgd_iter,
                                                targeted=False, nb_random_init=1, batch_size=a.batch, loss_type=loss,
                                                verbose=False), \
                dict(eps_step=2 * eps, max_iter=a.apgd_iter, nb_random_init=1, loss_type=loss)
        if name == "bpda":
            self.bpda_clf = self.glue.bpda_classifier(self.victim, self.pur, eot_samples=a.eot, batch_size=a.batch)
            return ProjectedGradientDescent(self.bpda_clf, norm=np.inf, eps=eps, eps_step=2 / 255, max_iter=a.bpda_steps,
                                            num_random_init=1, batch_size=a.batch, verbose=False), \
                dict(eps_step=2 / 255, max_iter=a.bpda_steps, num_random_init=1, eot_samples=a.eot,
                     gradient="BPDA (identity backward through the purifier)")
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")

    def run(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        import torch
        a, log = self.args, self.log
        res: dict[str, Any] = dict(model=self.model, artifact_dir=str(self.art_dir), backend=a.backend,
                                   threads=a.threads, rows=list(a.rows), n=len(x), seed=a.seed, eps=a.eps / 255,
                                   eps_255=a.eps, purifier_config=self.pur.cfg.to_dict(), overrides=a.overrides,
                                   batch=a.batch)
        t0 = time.perf_counter()
        clean_bare = self.bare_pred(x) == y
        t1 = time.perf_counter()
        clean_pur = self.purified_pred(x, f"{self.model} purify clean") == y
        t2 = time.perf_counter()
        res["clean"] = dict(n=len(x), acc=100 * float(clean_bare.mean()), acc_purified=100 * float(clean_pur.mean()),
                            classify_s=t1 - t0, purify_s=t2 - t1, correct=_bits(clean_bare),
                            correct_purified=_bits(clean_pur))
        log(f"{self.model} clean: {res['clean']['acc']:.1f}% bare, {res['clean']['acc_purified']:.1f}% purified "
            f"({len(x)} images, purify {t2 - t1:.1f} s)")
        rows = []
        for name in a.attacks:
            k = len(x) if name != "bpda" or a.bpda_n is None else min(len(x), a.bpda_n)
            xa, ya = x[:k], y[:k]
            attack, params = self.make_attack(name)
            np.random.seed(a.seed)
            torch.manual_seed(a.seed)
            t0 = time.perf_counter()
            adv = np.empty_like(xa)
            for sl in progress(self._chunks(k), f"{self.model} {name}", enabled=not a.quiet):
                adv[sl] = attack.generate(xa[sl], ya[sl])
            t_att = time.perf_counter() - t0
            linf = float(np.abs(adv - xa).max())
            if linf > a.eps / 255 + 1e-5:
                raise RuntimeError(f"{name} left the eps ball: L-inf {linf:.5f} > {a.eps / 255:.5f}")
            bare = self.bare_pred(adv) == ya
            t1 = time.perf_counter()
            pur = self.purified_pred(adv, f"{self.model} purify {name}") == ya
            t_pur = time.perf_counter() - t1
            row = dict(attack=name, n=k, seed=a.seed, params=params, robust_acc=100 * float(bare.mean()),
                       robust_acc_purified=100 * float(pur.mean()), clean_acc=100 * float(clean_bare[:k].mean()),
                       clean_acc_purified=100 * float(clean_pur[:k].mean()), attack_s=t_att, purify_s=t_pur,
                       attack_s_per_image=t_att / k, linf=linf, correct=_bits(bare), correct_purified=_bits(pur))
            if name == "bpda":
                pre = self.bpda_clf.preprocessing_operations[0]
                row.update(purifications_during_attack=pre.images, purify_s_during_attack=pre.seconds)
            rows.append(row)
            log(f"{self.model} {name:9s}: {row['robust_acc']:5.1f}% bare, {row['robust_acc_purified']:5.1f}% purified "
                f"({k} images, attack {t_att:.1f} s, purify {t_pur:.1f} s)")
        byname = {r["attack"]: r for r in rows}
        if "apgd-ce" in byname and "apgd-dlr" in byname:
            ce, dlr = byname["apgd-ce"], byname["apgd-dlr"]
            both = lambda key: np.array([c == "1" and d == "1" for c, d in zip(ce[key], dlr[key])])  # noqa: E731
            bare, pur = both("correct"), both("correct_purified")
            rows.append(dict(attack=WORST, n=ce["n"], seed=a.seed, params=dict(of=["apgd-ce", "apgd-dlr"]),
                             robust_acc=100 * float(bare.mean()), robust_acc_purified=100 * float(pur.mean()),
                             clean_acc=ce["clean_acc"], clean_acc_purified=ce["clean_acc_purified"],
                             attack_s=ce["attack_s"] + dlr["attack_s"], purify_s=ce["purify_s"] + dlr["purify_s"],
                             attack_s_per_image=(ce["attack_s"] + dlr["attack_s"]) / ce["n"],
                             linf=max(ce["linf"], dlr["linf"]), correct=_bits(bare), correct_purified=_bits(pur)))
        res["attacks"] = rows
        return res


def markdown(res: dict[str, Any]) -> str:
    c = res["clean"]
    cfg = res["purifier_config"]
    lines = [f"### {res['model']}: robust accuracy, L-inf eps {res['eps_255']:g}/255",
             "",
             f"Test rows {res['rows'][0]}:{res['rows'][1]} ({res['n']} images), seed {res['seed']}, purifier "
             f"{res['backend']} ({res['threads']} threads), GS {cfg['gs_steps']} x {cfg['gs_step'] * 255:.3g}/255, "
             f"AP {cfg['ap_steps']} steps, eps {cfg['eps'] * 255:.3g}/255. Attacks from ART; PGD/APGD against the bare "
             "classifier then purified; BPDA through the purifier (identity backward).",
             "",
             "| attack | images | steps | no purification | ZeroPur | attack s | purify s |",
             "|---|---|---|---|---|---|---|",
             f"| clean | {c['n']} | - | {c['acc']:.1f}% | {c['acc_purified']:.1f}% | - | {c['purify_s']:.1f} |"]
    for r in res["attacks"]:
        p = r["params"]
        steps = p.get("max_iter", "-")
        if r["attack"] == "bpda" and p.get("eot_samples", 1) > 1:
            steps = f"{steps} x EOT {p['eot_samples']}"
        note = "" if r["n"] == c["n"] else f" (clean on these: {r['clean_acc']:.1f}% / {r['clean_acc_purified']:.1f}%)"
        lines.append(f"| {r['attack']} | {r['n']}{note} | {steps} | {r['robust_acc']:.1f}% | "
                     f"{r['robust_acc_purified']:.1f}% | {r['attack_s']:.1f} | {r['purify_s']:.1f} |")
    lines += ["", "Attack s: wall time generating the adversarial images (for BPDA it includes the purifications "
              "inside the attack); purify s: purifying them for the ZeroPur column."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    _require_art()
    import torch

    from zeropur_export.bench import machine_info
    from zeropur_rt.data import load_cifar10_test, to_nchw_float
    torch.set_num_threads(args.threads)
    log = print
    # Every model's artifact, batch and overrides checked before any attack runs.
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
        xs, ys = load_cifar10_test(args.data, *args.rows)
        x = to_nchw_float(xs)
    machine = machine_info()
    for ev in evals:
        ev.load()
        t0 = time.perf_counter()
        res = ev.run(x, ys)
        res.update(wall_s=time.perf_counter() - t0, machine=machine, art_version=__import__("art").__version__,
                   argv=sys.argv[1:] if argv is None else list(argv))
        md = markdown(res)
        out = _dir_for(args.out or "runs/eval_{model}", ev.model, len(args.models))
        atomic_write_text(out / "eval.md", md + "\n")
        atomic_write_json(out / "eval.json", res)
        print("\n" + md + f"\n\nwrote {out}/eval.json, eval.md ({res['wall_s']:.0f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
