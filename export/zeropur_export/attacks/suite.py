"""The field's attack set against ZeroPur, image by image, resumable: what ``zeropur-export eval`` runs.

Every attack is L-inf at the same eps. Non-adaptive and transfer attacks craft against a bare
classifier and the result is then purified; adaptive attacks craft through the purifier. An image
counts as robust against an attack if every candidate the attack produced is classified right
after purification, and robust in the worst case if that holds for every attack run on it.

The work is split in chunks of ``--batch`` images. Each finished chunk is written at once
(``<out>/state/<attack>/<start>-<stop>.json``, atomically), so an interrupted run picks up where it
stopped; a chunk is seeded by the run's seed and its first row, so a resumed run gives the same
images as an uninterrupted one. A state folder made with other settings is refused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.files import atomic_write_json
from zeropur_rt.progress import progress


@dataclass(frozen=True)
class AttackSpec:
    group: str  # "non-adaptive" | "transfer" | "adaptive"
    label: str  # the report's name for it


ATTACKS: dict[str, AttackSpec] = {
    "pgd": AttackSpec("non-adaptive", "PGD (CE) on the bare classifier"),
    "pgd-first": AttackSpec("non-adaptive", "PGD stopped at each image's first misclassification (minimal "
                                            "perturbation, first success; not AutoAttack's protocol)"),
    "autoattack": AttackSpec("non-adaptive", "AutoAttack standard (APGD-CE, APGD-T x 9, Square 5000; no FAB-T) on "
                                             "the bare classifier, then purified: the paper's protocol"),
    "apgd-ce": AttackSpec("non-adaptive", "APGD-CE on the bare classifier"),
    "apgd-dlr": AttackSpec("non-adaptive", "APGD-DLR on the bare classifier"),
    "apgd-t": AttackSpec("non-adaptive", "APGD-T (targeted DLR, one run per target class) on the bare classifier"),
    "transfer": AttackSpec("transfer", "APGD-CE on another zoo classifier, transferred"),
    "square": AttackSpec("black-box", "Square (logits, margin loss) querying the deployed system"),
    "hopskipjump": AttackSpec("black-box", "HopSkipJump (labels only) querying the deployed system"),
    "bpda": AttackSpec("adaptive", "BPDA-PGD through the purifier (identity backward)"),
    "bpda-apgd-ce": AttackSpec("adaptive", "BPDA + APGD-CE through the purifier"),
    "bpda-apgd-dlr": AttackSpec("adaptive", "BPDA + APGD-DLR through the purifier"),
    "traj-apgd-ce": AttackSpec("adaptive", "APGD-CE, BPDA averaged over the loop's iterates"),
    "traj-apgd-dlr": AttackSpec("adaptive", "APGD-DLR, BPDA averaged over the loop's iterates"),
    "unrolled-apgd-ce": AttackSpec("adaptive", "APGD-CE, full gradient through the unrolled reference loop "
                                               "(straight-through sign)"),
    "unrolled-apgd-dlr": AttackSpec("adaptive", "APGD-DLR, full gradient through the unrolled reference loop "
                                                "(straight-through sign)"),
}
# The query attacks query the purifier per step (up to --queries purifications per image) and are scored per
# budget: they run when named, not by default, and not in the cascade.
QUERY = ("square", "hopskipjump")
DEFAULT = tuple(k for k in ATTACKS if k not in QUERY)
ADAPTIVE = tuple(k for k, v in ATTACKS.items() if v.group == "adaptive")
WORST = "worst case (every attack)"
# ``--cascade`` order: by purifications per image (1 for the attacks on a bare classifier, 9 for APGD-T,
# about 20 / 100 / 500 for BPDA-PGD / BPDA-APGD / the unrolled gradient), so the costly attacks meet
# only the few images the cheap ones left standing.
CASCADE_ORDER = ("pgd-first", "pgd", "autoattack", "apgd-ce", "apgd-dlr", "transfer", "apgd-t", "bpda", "bpda-apgd-ce",
                 "bpda-apgd-dlr", "traj-apgd-ce", "traj-apgd-dlr", "unrolled-apgd-ce", "unrolled-apgd-dlr")


def bits(a: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in np.asarray(a, dtype=bool))


def unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) == ord("1")


def apgd(clf: Any, eps: float, iters: int, batch: int, loss_type: str, targeted: bool = False) -> Any:
    """ART's APGD with AutoAttack's settings: L-inf, initial step 2 eps, one random start."""
    from art.attacks.evasion import AutoProjectedGradientDescent
    return AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iters, targeted=targeted,
                                        nb_random_init=1, batch_size=batch, loss_type=loss_type, verbose=False)


class Crafter:
    """Makes the adversarial candidates of one attack for one chunk. ``victim`` takes [0, 1] images;
    ``purifier`` is a ``zeropur_rt.Purifier``; ``opts`` the eval arguments (eps in 1/255 units)."""

    def __init__(self, victim: Any, purifier: Any, opts: Any, transfer_source: Any = None, source_name: str = ""):
        from zeropur_export.attacks.art_bridge import art_classifier
        self.victim, self.pur, self.o, self.source, self.source_name = victim, purifier, opts, transfer_source, source_name
        self.eps = opts.eps / 255
        self.k = int(purifier.manifest.num_classes)
        self.chw = tuple(purifier.chw)
        self._art = art_classifier
        self.bare = art_classifier(victim, self.k, self.chw)
        self._models: dict[str, Any] = {}
        self.info: dict[str, Any] | None = None  # what the last craft reports beside its candidates

    def params(self, name: str) -> dict[str, Any]:
        o = self.o
        ce = getattr(o, "ce", "ce")
        if name in ("pgd", "pgd-first"):
            return dict(eps_step=2 / 255, max_iter=o.pgd_steps, random_start=True,
                        stop_at_success=name == "pgd-first", **self._loss(ce))
        if name == "autoattack":
            return dict(version="standard", attacks=["apgd-ce", "apgd-t", "square"], max_iter=o.apgd_iter,
                        targets=o.apgd_targets, queries=o.queries, p_init=0.8, fab_t="not run", **self._loss(ce))
        if name == "bpda":
            return dict(eps_step=2 / 255, max_iter=o.bpda_steps, num_random_init=1, eot=o.eot)
        dlr = "dlr" in name or name == "apgd-t"
        p: dict[str, Any] = dict(eps_step=2 * self.eps, nb_random_init=1,
                                 loss_type="difference_logits_ratio" if dlr else "cross_entropy",
                                 **({} if dlr else self._loss(ce)))
        if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
            p["max_iter"] = o.apgd_iter
        if name == "apgd-t":
            p["targets"] = o.apgd_targets
        if name == "transfer":
            p.update(max_iter=o.apgd_iter, source=self.source_name)
        if name in ADAPTIVE:
            p.update(max_iter=o.adaptive_iter, eot=o.eot)
        if name.startswith("traj-"):
            p["points"] = o.trajectory_points
        if name.startswith("unrolled-"):
            p["max_iter"] = o.unrolled_iter
            p["gradient"] = "reference loop unrolled, straight-through sign and blur, checkpointed per step"
        return p

    @staticmethod
    def _loss(ce: str) -> dict[str, str]:
        """The CE attacks' loss, named in their params only when it is not the published one (so the chunks of
        earlier runs still resume)."""
        return {} if ce == "ce" else dict(ce=ce)

    def _model(self, kind: str) -> Any:
        """The torch module ART differentiates, per gradient kind (made once)."""
        if kind not in self._models:
            from zeropur_export.attacks import adaptive
            if kind == "bpda":
                m = adaptive.BPDAModel(self.victim, self.pur.purify, eot=self.o.eot)
            elif kind == "traj":
                m = adaptive.TrajectoryBPDAModel(self.victim, self.pur, self.o.trajectory_points, eot=self.o.eot)
            else:
                m = adaptive.UnrolledModel(self.victim, self.pur.cfg, eot=self.o.eot, draw=self.pur.draw)
            self._models[kind] = self._art(m, self.k, self.chw)
        return self._models[kind]

    def _apgd(self, clf: Any, p: dict[str, Any], targeted: bool = False) -> Any:
        if p.get("ce") == "stable-ce":
            # ART's own CE saturates; with loss_type None its APGD minimises the estimator's loss, ours
            from art.estimators.classification import PyTorchClassifier

            from zeropur_export.attacks.pgd import StableCrossEntropy
            est = PyTorchClassifier(model=clf.model, loss=StableCrossEntropy(), input_shape=clf.input_shape,
                                    nb_classes=clf.nb_classes, clip_values=(0.0, 1.0), device_type="cpu")
            return apgd(est, self.eps, p["max_iter"], self.o.batch, None, targeted)
        return apgd(clf, self.eps, p["max_iter"], self.o.batch, p["loss_type"], targeted)

    def craft(self, name: str, x: np.ndarray, y: np.ndarray, seed: int) -> list[np.ndarray]:
        """The attack's candidates for (x, y): one array, or one per target class for APGD-T."""
        import torch
        self.info = None
        np.random.seed(seed)  # ART draws its random starts from numpy's global generator
        torch.manual_seed(seed)
        self.pur.reseed(seed)  # a randomised purifier's draws, per chunk: a resumed run draws the same
        p = self.params(name)
        if name in ("pgd", "pgd-first"):
            from zeropur_export.attacks.pgd import pgd_linf
            adv = pgd_linf(self.victim, torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), self.eps,
                           p["eps_step"], p["max_iter"], seed=seed, stop_at_success=p["stop_at_success"],
                           loss=p.get("ce", "ce"))
            return [adv.numpy()]
        if name == "autoattack":
            from zeropur_export.attacks import autoattack
            adv, stages = autoattack.standard(self.victim, x, y, self.eps, p["max_iter"], p["targets"], p["queries"],
                                              seed, p.get("ce", "ce"))
            self.info = dict(stages=[vars(s) for s in stages])
            return [adv]
        if name == "bpda":
            from art.attacks.evasion import ProjectedGradientDescent
            att = ProjectedGradientDescent(self._model("bpda"), norm=np.inf, eps=self.eps, eps_step=p["eps_step"],
                                           max_iter=p["max_iter"], num_random_init=1, batch_size=self.o.batch,
                                           verbose=False)
            return [att.generate(x, y)]
        if name == "apgd-t":
            with torch.no_grad():
                logits = self.victim(torch.from_numpy(x)).numpy()
            ranked = np.argsort(-logits, axis=1)
            others = np.array([[c for c in r if c != t] for r, t in zip(ranked, y)])  # AutoAttack: by clean logit
            att = self._apgd(self.bare, p, targeted=True)
            return [att.generate(x, others[:, j]) for j in range(min(p["targets"], self.k - 1))]
        if name == "transfer":
            return [self._apgd(self.source, p).generate(x, y)]
        if name in ("apgd-ce", "apgd-dlr"):
            return [self._apgd(self.bare, p).generate(x, y)]
        return [self._apgd(self._model(name.split("-", 1)[0]), p).generate(x, y)]


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Run settings as a resume compares them: the artifact as an absolute path (the run that exports it is
    handed one, a later run the relative one), the config with any field added since taking its default."""
    s = dict(settings)
    if isinstance(s.get("artifact_dir"), str):
        s["artifact_dir"] = str(Path(s["artifact_dir"]).resolve())
    if isinstance(s.get("purifier_config"), dict):
        s["purifier_config"] = ZeroPurConfig.from_dict(s["purifier_config"]).to_dict()
    return s


class Ledger:
    """The resumable state of one run: ``root/run.json`` (the settings) and one JSON per finished chunk."""

    def __init__(self, root: Path, settings: dict[str, Any], fresh: bool = False):
        self.root = Path(root)
        head = self.root / "run.json"
        settings = _comparable(settings)
        if head.exists() and not fresh:
            old = _comparable(json.loads(head.read_text()))
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise ValueError(f"{self.root} holds a run made with other settings ({', '.join(diff)} differ); "
                                 "pass --fresh to start over, or another --out")
        elif fresh and self.root.exists():
            for f in sorted(self.root.glob("*/*.json")):
                f.unlink()
        atomic_write_json(head, settings)

    def _path(self, attack: str, start: int, stop: int) -> Path:
        return self.root / attack / f"{start:06d}-{stop:06d}.json"

    def get(self, attack: str, start: int, stop: int, params: dict[str, Any], rows: list[int] | None = None,
            adapt: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> dict[str, Any] | None:
        """A finished chunk, or None. ``rows``: the chunk's rows where they are not all of start:stop. ``adapt``
        reads a chunk made with other settings as one made with ``params`` where it can (None: run it again)."""
        f = self._path(attack, start, stop)
        if not f.exists():
            return None
        row = json.loads(f.read_text())
        if adapt is not None and (row := adapt(row)) is None:
            return None
        if row.get("params") != json.loads(json.dumps(params)):
            raise ValueError(f"{f} was made with other {attack} settings ({row.get('params')} vs {params}); "
                             "pass --fresh to start over, or another --out")
        if row.get("rows") != rows:
            raise ValueError(f"{f} holds other images of rows {start}:{stop} than this run attacks (an earlier "
                             "cascade stage changed?); pass --fresh to start over, or another --out")
        return row

    def put(self, attack: str, start: int, stop: int, row: dict[str, Any]) -> None:
        atomic_write_json(self._path(attack, start, stop), row)


def run_attack(name: str, crafter: Crafter, ledger: Ledger, x: np.ndarray, y: np.ndarray, rows: np.ndarray,
               seed: int, batch: int, purified_pred: Callable[[np.ndarray], np.ndarray], quiet: bool,
               key: str = "") -> dict[str, Any]:
    """One attack over (x, y), test rows ``rows`` (ascending), chunk by chunk (finished chunks read back under
    ``key`` + name), then purified and scored."""
    params = crafter.params(name)
    chunks = [(i, min(len(x), i + batch)) for i in range(0, len(x), batch)]
    parts, resumed = [], 0
    for a, b in progress(chunks, f"{key}{name}", enabled=not quiet):
        start, stop = int(rows[a]), int(rows[b - 1]) + 1
        subset = None if stop - start == b - a else [int(r) for r in rows[a:b]]
        row = ledger.get(key + name, start, stop, params, subset)
        if row is None:
            t0 = time.perf_counter()
            cands = crafter.craft(name, x[a:b], y[a:b], seed + start)
            t1 = time.perf_counter()
            linf = max(float(np.abs(c - x[a:b]).max()) for c in cands)
            if linf > crafter.eps + 1e-5:
                raise RuntimeError(f"{name} left the eps ball on rows {start}:{stop}: L-inf {linf:.5f} > "
                                   f"{crafter.eps:.5f}")
            with_bare = np.all([crafter.bare.predict(c, batch_size=batch).argmax(1) == y[a:b] for c in cands], 0)
            with_pur = np.all([purified_pred(c) == y[a:b] for c in cands], 0)
            row = dict(params=params, seed=seed + start, candidates=len(cands), linf=linf, attack_s=t1 - t0,
                       purify_s=time.perf_counter() - t1, correct=bits(with_bare), correct_purified=bits(with_pur))
            if subset is not None:
                row["rows"] = subset
            if crafter.info is not None:
                row["info"] = crafter.info
            ledger.put(key + name, start, stop, json.loads(json.dumps(row)))
        else:
            resumed += 1
        parts.append(row)
    bare = np.concatenate([unbits(r["correct"]) for r in parts])
    pur = np.concatenate([unbits(r["correct_purified"]) for r in parts])
    attack_s = sum(r["attack_s"] for r in parts)
    return dict(attack=name, group=ATTACKS[name].group, label=ATTACKS[name].label, n=len(x), seed=seed,
                params=params, robust_acc=100 * float(bare.mean()), robust_acc_purified=100 * float(pur.mean()),
                attack_s=attack_s, purify_s=sum(r["purify_s"] for r in parts), attack_s_per_image=attack_s / len(x),
                linf=max(r["linf"] for r in parts), candidates=parts[0]["candidates"], chunks=len(parts),
                chunks_resumed=resumed, correct=bits(bare), correct_purified=bits(pur))


def worst_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image worst case over each group that ran and over every attack, on the images all of them covered."""
    groups = [(f"worst case ({g})", [r for r in rows if r["group"] == g])
              for g in ("non-adaptive", "black-box", "adaptive")]
    out = []
    for label, rs in [*groups, (WORST, rows)]:
        if len(rs) < 2:
            continue
        n = min(r["n"] for r in rs)
        bare = np.all([unbits(r["correct"])[:n] for r in rs], 0)
        pur = np.all([unbits(r["correct_purified"])[:n] for r in rs], 0)
        out.append(dict(attack=label, group="worst", n=n, params=dict(of=[r["attack"] for r in rs]),
                        robust_acc=100 * float(bare.mean()), robust_acc_purified=100 * float(pur.mean()),
                        attack_s=sum(r["attack_s"] for r in rs), purify_s=sum(r["purify_s"] for r in rs),
                        linf=max(r["linf"] for r in rs), correct=bits(bare), correct_purified=bits(pur)))
    return out


def run_cascade(names: list[str], crafter: Crafter, ledger: Ledger, x: np.ndarray, y: np.ndarray, rows: np.ndarray,
                alive: np.ndarray, seed: int, batch: int, purified_pred: Callable[[np.ndarray], np.ndarray],
                quiet: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """AutoAttack's protocol over the attack set: each attack in ``CASCADE_ORDER`` meets only the images
    every earlier one left robust (``alive``: classified right after purification so far, the clean image
    included). The images left at the end are exactly those the per-image worst case over every attack
    keeps, at a fraction of the cost; each stage's figure is cumulative."""
    alive = np.array(alive, dtype=bool)
    stages = []
    for name in sorted(names, key=CASCADE_ORDER.index):
        idx = np.flatnonzero(alive)
        stage: dict[str, Any] = dict(attack=name, group=ATTACKS[name].group, label=ATTACKS[name].label,
                                     params=crafter.params(name), attacked=len(idx), attack_s=0.0, purify_s=0.0,
                                     chunks=0, chunks_resumed=0, linf=0.0)
        if len(idx):
            r = run_attack(name, crafter, ledger, x[idx], y[idx], rows[idx], seed, batch, purified_pred, quiet,
                           key="cascade-")
            alive[idx[~unbits(r["correct_purified"])]] = False
            stage.update({k: r[k] for k in ("attack_s", "purify_s", "chunks", "chunks_resumed", "linf")})
        stage.update(robust_acc_purified=100 * float(alive.mean()), broken=len(idx) - int(alive.sum()),
                     correct_purified=bits(alive))
        stages.append(stage)
        resumed = f", {stage['chunks_resumed']} of {stage['chunks']} chunks resumed" if stage["chunks_resumed"] else ""
        log(f"cascade {name:17s}: {stage['attacked']} attacked, {stage['broken']} broken, "
            f"{stage['robust_acc_purified']:5.1f}% left (attack {stage['attack_s']:.1f} s{resumed})")
    return stages
