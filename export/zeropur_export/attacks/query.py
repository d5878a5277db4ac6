"""Black-box query attacks against the deployed system, purify then classify, and against the bare classifier.

What an edge endpoint exposes is its output, not its gradients. Two attackers query it:

* ``square``: score-based, Square Attack on the returned logits (AutoAttack's settings: L-inf, margin loss,
  p_init 0.8, no schedule rescaling; ``zeropur_export.attacks.autoattack.square_linf``);
* ``hopskipjump``: decision-based, labels only (ART's ``HopSkipJump``, L-inf, through a ``BlackBoxClassifier``
  whose answers are one-hot labels).

Each runs through ``zeropur_rt.Purifier`` on an artifact (the backend eval loads: ONNX Runtime by default),
``logits(purify(x))``, and, for contrast, through the same artifact's classifier alone. A randomised recipe
(random start, sigma jitter) is queried as deployed: every query is a fresh draw, from the purifier's
generator reseeded per chunk, so a resumed run draws what the uninterrupted one drew.

Scoring, per image: query 1 is the unperturbed image; an image is broken at the first query whose image lies
in the eps ball around it and is labelled wrong (for a randomised purifier: labelled wrong by that query's
draw, which is what the attacker sees). Robust accuracy at budget B: images not broken within B queries; the
median queries to success is taken over the images broken after query 1 (the clean image answered right).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np

from zeropur_export.attacks.autoattack import square_linf
from zeropur_export.attacks.suite import ATTACKS, Crafter, Ledger, bits
from zeropur_rt.progress import progress

QUERY_ATTACKS = ("square", "hopskipjump")
BUDGETS = (100, 500, 1000, 5000)
TARGETS = ("purified", "bare")
HSJ = dict(max_iter=100000, max_eval=10000, init_eval=100, init_size=100)  # ART's defaults; the budget binds


def budgets(queries: int) -> list[int]:
    """The report's budgets: the standard ones below the run's maximum, and the maximum itself."""
    return [b for b in BUDGETS if b < queries] + [queries]


class _Stop(Exception):
    """Raised inside ART's HopSkipJump to end one image's attack: it succeeded or spent its budget."""


def _oracle(pur: Any, target: str) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of the deployed system (``purified``) or of its classifier alone (``bare``), in artifact-sized calls."""
    def logits_of(v: np.ndarray) -> np.ndarray:
        v = np.clip(v, 0.0, 1.0).astype(np.float32, copy=False)
        out = []
        for i in range(0, len(v), pur.max_batch):
            part = v[i:i + pur.max_batch]
            out.append(pur.logits(pur.purify(part) if target == "purified" else part))
        return np.concatenate(out)
    return logits_of


def square(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, eps: float, queries: int,
           seed: int, p_init: float = 0.8, bar: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(queries to success, or -1, per image; the L-inf of each image's last point). Query 1 is the clean image."""
    clean_wrong = logits_of(x).argmax(1) != y
    if bar is not None:
        bar.update(len(x))
    q = np.where(clean_wrong, 1, -1)
    linf = np.zeros(len(x))
    todo = np.flatnonzero(~clean_wrong)
    if len(todo) and queries > 1:
        best, s = square_linf(logits_of, x[todo], y[todo], eps, queries - 1, p_init, seed,
                              on_query=bar.update if bar is not None else None)
        q[todo] = np.where(s > 0, s + 1, -1)
        linf[todo] = np.abs(best - x[todo]).reshape(len(todo), -1).max(1)
    return q, linf


def hopskipjump(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, eps: float,
                queries: int, seed: int, batch: int, classes: int, bar: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """ART's HopSkipJump (L-inf, untargeted), one image at a time, on labels only, stopped at the first query
    inside the eps ball that is labelled wrong or when the budget is spent. Its starting point is a uniform-
    noise image the system labels wrong, searched with a seeded generator (ART's own search is unseeded)."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier
    q = np.full(len(x), -1)
    closest = np.full(len(x), np.inf)
    for i in range(len(x)):
        used = [0]

        def labels(v: np.ndarray, i: int = i, used: list[int] = used) -> np.ndarray:
            take = min(len(v), queries - used[0])
            if take <= 0:
                raise _Stop
            pred = logits_of(v[:take]).argmax(1)
            if bar is not None:
                bar.update(take)
            dist = np.abs(v[:take] - x[i]).reshape(take, -1).max(1)
            closest[i] = min(closest[i], float(dist[pred != y[i]].min(initial=np.inf)))
            hit = np.flatnonzero((pred != y[i]) & (dist <= eps + 1e-6))
            if len(hit):
                q[i] = used[0] + int(hit[0]) + 1
                raise _Stop
            used[0] += take
            if take < len(v):
                raise _Stop
            return np.eye(classes, dtype=np.float32)[pred]

        rng = np.random.default_rng(seed + i)
        np.random.seed(seed + i)  # HopSkipJump's own draws come from numpy's global generator
        try:
            labels(x[i:i + 1])
            init = None
            for _ in range(HSJ["init_size"] // 10):
                noise = rng.uniform(0, 1, size=(10, *x.shape[1:])).astype(np.float32)
                wrong = np.flatnonzero(labels(noise).argmax(1) != y[i])
                if len(wrong):
                    init = noise[wrong[0]]
                    break
            if init is None:
                continue  # nothing the system labels wrong to start from: the attack cannot begin
            clf = BlackBoxClassifier(labels, tuple(x.shape[1:]), classes, clip_values=(0.0, 1.0))
            att = HopSkipJump(clf, targeted=False, norm=np.inf, batch_size=batch, verbose=False, **HSJ)
            att.generate(x[i:i + 1], x_adv_init=init[None].copy())
        except _Stop:
            pass
    return q, closest


def at_budget(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """A finished chunk read at this run's budget, or None where it cannot answer.

    Neither attack's path depends on its budget (Square's schedule is not rescaled to it; HopSkipJump's only
    stops it), so a run with budget B is the first B queries of a run with more. A chunk run with more queries
    answers a smaller budget (a success after it becomes a failure, its distance unknown); one run with fewer
    answers a larger budget only where it left no image standing. A chunk whose other settings differ is
    returned as it is, for the ledger's check to refuse."""
    have, want = row["params"].get("queries"), params["queries"]
    same_else = {k: v for k, v in row["params"].items() if k != "queries"} == \
        {k: v for k, v in json.loads(json.dumps(params)).items() if k != "queries"}
    if not same_else or have == want:
        return row
    q = np.array(row["queries_to_success"])
    if have < want:
        return dict(row, params=params) if (q > 0).all() else None
    late = q > want
    return dict(row, params=params, queries_to_success=[int(v) for v in np.where(late, -1, q)],
                distance=[None if cut else d for cut, d in zip(late, row["distance"])])


def run_query_attack(name: str, crafter: Crafter, ledger: Ledger, x: np.ndarray, y: np.ndarray, rows: np.ndarray,
                     seed: int, batch: int, quiet: bool) -> dict[str, Any]:
    """One query attack on (x, y), test rows ``rows``, against the purified system and the bare classifier, chunk
    by chunk (finished chunks read back), scored at every budget of ``budgets(--queries)``."""
    o, pur = crafter.o, crafter.pur
    params: dict[str, Any] = dict(queries=o.queries, eps=crafter.eps, backend=o.backend)
    params.update(dict(p_init=o.p_init, loss="margin") if name == "square" else dict(hsj=dict(HSJ, norm="inf")))
    out: dict[str, Any] = {}
    chunks = [(i, min(len(x), i + batch)) for i in range(0, len(x), batch)]
    for target in TARGETS:
        logits_of = _oracle(pur, target)
        parts, resumed = [], 0
        bar = progress(None, f"{name} {target}", total=len(x) * o.queries, enabled=not quiet)
        # HopSkipJump's images are independent where the system answers each alone (see _image_by_image)
        by_image = name == "hopskipjump" and (target == "bare" or not pur.cfg.randomised)

        def attack(a: int, b: int, chunk_seed: int) -> dict[str, Any]:
            pur.reseed(chunk_seed)
            t0 = time.perf_counter()
            if name == "square":
                q, dist = square(logits_of, x[a:b], y[a:b], crafter.eps, o.queries, chunk_seed, o.p_init, bar)
            else:
                q, dist = hopskipjump(logits_of, x[a:b], y[a:b], crafter.eps, o.queries, chunk_seed,
                                      pur.max_batch, crafter.k, bar)
            # distance: square, the L-inf of its best point; HopSkipJump, the smallest L-inf of a query labelled wrong
            return dict(params=params, seed=chunk_seed, attack_s=time.perf_counter() - t0,
                        queries_to_success=[int(v) for v in q],
                        distance=[float(v) if np.isfinite(v) else None for v in dist])
        for a, b in chunks:
            start, stop = int(rows[a]), int(rows[b - 1]) + 1
            subset = None if stop - start == b - a else [int(r) for r in rows[a:b]]
            row = ledger.get(f"{name}-{target}", start, stop, params, subset,
                             adapt=lambda r: at_budget(r, params))
            if row is None:
                if by_image and subset is None:
                    row = _image_by_image(attack, ledger, f"{name}-{target}", rows, a, b, seed + start, params, bar)
                else:
                    row = attack(a, b, seed + start)
                if subset is not None:
                    row["rows"] = subset
                ledger.put(f"{name}-{target}", start, stop, row)
            else:
                resumed += 1
                bar.update((b - a) * o.queries)
            parts.append(row)
        bar.close()
        qs = np.concatenate([r["queries_to_success"] for r in parts])
        out[target] = dict(q=qs, attack_s=sum(r["attack_s"] for r in parts), resumed=resumed, chunks=len(parts))
    return _row(name, out, params, len(x), seed)


def _image_by_image(attack: Callable[[int, int, int], dict[str, Any]], ledger: Ledger, key: str, rows: np.ndarray,
                    a: int, b: int, chunk_seed: int, params: dict[str, Any], bar: Any) -> dict[str, Any]:
    """A HopSkipJump chunk run one image at a time, each image its own ledger entry, so that a chunk stopped
    part way resumes at its first unfinished image (one image at 5000 queries is minutes; a chunk, hours).

    HopSkipJump attacks image i of a chunk alone, from generators seeded ``chunk_seed + i``; where the system
    answers an image the same whatever was asked before (the bare classifier, a deterministic recipe) the image's
    result depends on nothing else in its chunk. So the entry of image i equals that image's part of the chunk,
    and an entry written by a run with ``--batch 1`` is one too. A randomised purifier draws from one generator
    per chunk, so there an image's answers depend on the images before it, and its chunks run whole."""
    parts = []
    for k in range(a, b):
        r = int(rows[k])
        one = ledger.get(key, r, r + 1, params, adapt=lambda row: at_budget(row, params))
        if one is None:
            one = attack(k, k + 1, chunk_seed + k - a)
            ledger.put(key, r, r + 1, one)
        elif bar is not None:
            bar.update(params["queries"])
        parts.append(one)
    return dict(params=params, seed=chunk_seed, attack_s=sum(p["attack_s"] for p in parts),
                queries_to_success=[p["queries_to_success"][0] for p in parts],
                distance=[p["distance"][0] for p in parts])


def _median(q: np.ndarray) -> float | None:
    hit = q[q > 1]
    return float(np.median(hit)) if len(hit) else None


def _row(name: str, out: dict[str, Any], params: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    pur, bare = out["purified"]["q"], out["bare"]["q"]
    robust = {t: (out[t]["q"] < 0) for t in TARGETS}
    by_budget = [dict(queries=b, robust_acc=100 * float(((bare < 0) | (bare > b)).mean()),
                      robust_acc_purified=100 * float(((pur < 0) | (pur > b)).mean()))
                 for b in budgets(params["queries"])]
    return dict(attack=name, group=ATTACKS[name].group, label=ATTACKS[name].label, n=n, seed=seed, params=params,
                robust_acc=100 * float(robust["bare"].mean()), robust_acc_purified=100 * float(robust["purified"].mean()),
                attack_s=out["purified"]["attack_s"], purify_s=0.0, bare_attack_s=out["bare"]["attack_s"],
                linf=float(params["eps"]), candidates=1, chunks=out["purified"]["chunks"] + out["bare"]["chunks"],
                chunks_resumed=out["purified"]["resumed"] + out["bare"]["resumed"], budgets=by_budget,
                median_queries=_median(pur), median_queries_bare=_median(bare),
                queries_to_success=[int(v) for v in pur], queries_to_success_bare=[int(v) for v in bare],
                correct=bits(robust["bare"]), correct_purified=bits(robust["purified"]))


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The query attacks' table: robust accuracy at each budget, bare / purified, and the median queries."""
    rows = [r for r in rows if r["attack"] in QUERY_ATTACKS]
    if not rows:
        return []
    bs = [b["queries"] for b in rows[0]["budgets"]]
    lines = ["", "Query attacks (black box, purify then classify; bare = the classifier alone), robust accuracy "
             "after each budget of queries per image, bare / ZeroPur:", "",
             "| attack | images | " + " | ".join(f"{b} queries" for b in bs) + " | median queries to success, "
             "bare / ZeroPur | attack s, bare / ZeroPur |",
             "|---|---|" + "---|" * len(bs) + "---|---|"]

    def med(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"
    for r in rows:
        cells = " | ".join(f"{b['robust_acc']:.1f}% / {b['robust_acc_purified']:.1f}%" for b in r["budgets"])
        lines.append(f"| {r['attack']} | {r['n']} | {cells} | {med(r['median_queries_bare'])} / "
                     f"{med(r['median_queries'])} | {r['bare_attack_s']:.1f} / {r['attack_s']:.1f} |")
    return lines
