"""The eval command's Evaluator: one model's purifier, attack crafter, resumable ledger and batched prediction."""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from zeropur_export.artifacts import ensure_artifacts, load_backend, recipe_artifacts, victim_artifacts
from zeropur_export.attacks.suite import QUERY, bits
from zeropur_export.recipes import default_recipe
from zeropur_rt.progress import progress


def require_art() -> ModuleType:
    """The ART glue module; without ART its ImportError says how to install it."""
    return importlib.import_module("zeropur_export.attacks.art_bridge")


def dir_for(template: str, model: str, n_models: int) -> Path:
    """``template`` with {model} filled in; without one, a subfolder per model when there are several."""
    if "{model}" in template:
        return Path(template.format(model=model))
    return Path(template) / model if n_models > 1 else Path(template)


class Evaluator:
    """One model: the purifier, the attack crafter, the resumable ledger, and batched prediction."""

    def __init__(self, model: str, args: argparse.Namespace, log: Callable[[str], None]):
        self.model, self.args, self.log = model, args, log
        require_art()
        if args.own is not None:
            self.art_dir = victim_artifacts(args.own, args.artifacts, log=log)
        elif args.artifacts and not args.recipe:
            self.art_dir = ensure_artifacts(model, dir_for(args.artifacts, model, len(args.models)), log=log)
        else:
            art = dir_for(args.artifacts, model, len(args.models)) if args.artifacts else None
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
        from zeropur_export.attacks.suite import Crafter
        from zeropur_export.victims.zoo import load_victim
        self.victim = self.args.own.victim if self.args.own is not None else load_victim(self.model)
        source = None
        if self.source:
            from zeropur_export.attacks.art_bridge import art_classifier
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
        from zeropur_export.attacks.suite import ADAPTIVE, Ledger, run_attack, run_cascade, worst_rows
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
                from zeropur_export.attacks.query import run_query_attack
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
