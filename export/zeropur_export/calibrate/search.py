"""The search: successive halving over a grid of recipes, with the evaluator's shared work.

  stage 1 (n1 images): GS-only grid  sigma x eps x GS step x GS steps
  stage 2 (n1 images): AP grid (ILA raw / normalised weights) on GS parents (Pareto front) + the paper recipe
  stage 3 (n2 images): the best configs so far + more AP steps for the best AP configs
  stage 4 (n3 images): the finalists; the best one inside the clean budget is chosen
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from zeropur_rt.config import preset_for_shape, resolution_scale

from .common import CalibError, cfg_label, paper_config
from .scorer import ConfigScorer, Record


AXES = ("sigma", "eps_255", "gs_steps", "gs_step_255", "ap_steps", "ila")  # the grid proper: its product is tried


class HasStats(Protocol):
    def stats(self, r: Any) -> dict[str, float]: ...


@dataclass(frozen=True)
class Grid:
    """What the search tries. eps and the GS step are in /255 units; ``ila`` holds (normalised, weight)
    pairs: False is the paper's raw ILA dot product, True the normalised one. AP variants travel eps in
    total (ap_step = eps / ap_steps, the presets' rule)."""

    sigma: Sequence[float] = (0.5, 0.7, 1.0, 1.5)
    eps_255: Sequence[float] = (4, 6, 8)
    gs_steps: Sequence[int] = (5, 10)
    gs_step_255: Sequence[float] = (0.5, 1)
    ap_steps: Sequence[int] = (10,)
    ila: Sequence[tuple[bool, float]] = ((False, 1e-4), (False, 1e-5), (True, 0.001), (True, 0.003), (True, 0.01))
    ap_parents: int = 3  # GS configs that get the AP grid: the best inside budget + parent_slack, then the Pareto front
    parent_slack: float = 10.0  # extra clean-drop points allowed when picking AP parents (AP recovers clean accuracy)
    refine_ap_steps: Sequence[int] = (25, 50)  # AP step counts tried in stage 3 for the best AP configs
    refine_top: int = 1  # AP configs that get the stage-3 AP-step variants
    keep: int = 6  # configs promoted to stage 3
    final: int = 2  # configs promoted to the final stage
    slack: float = 1.0  # relaxation of the budget at small n, in binomial stds
    include_paper: bool = True  # the paper recipe competes in stage 2

    def check(self, name: Callable[[str], str] = lambda f: f"grid.{f}") -> None:
        """Raise CalibError on a grid the search cannot run; ``name`` spells a field in the message
        (the CLI spells its flags)."""
        for f in AXES:
            vals = list(getattr(self, f))
            if not vals:
                raise CalibError(f"{name(f)} is empty")
            nums = [w for _, w in vals] if f == "ila" else vals
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in nums):
                raise CalibError(f"{name(f)}: expected finite numbers, got {vals}")
        for f in ("gs_steps", "ap_steps", "refine_ap_steps"):
            if any(not isinstance(v, int) or v < 0 for v in getattr(self, f)):
                raise CalibError(f"{name(f)}: expected integers >= 0, got {list(getattr(self, f))}")
        if any(v < 0 for v in self.sigma):
            raise CalibError(f"{name('sigma')} values must be >= 0")
        if any(v <= 0 for v in [*self.eps_255, *self.gs_step_255]):
            raise CalibError(f"{name('eps_255')} and {name('gs_step_255')} values must be > 0")
        if any(v == 0 for v in [*self.ap_steps, *self.refine_ap_steps]):
            raise CalibError(f"{name('ap_steps')} / {name('refine_ap_steps')} must be > 0 "
                             "(GS-only configs are always in stage 1)")
        if any(w < 0 for _, w in self.ila):
            raise CalibError(f"{name('ila')}: weights must be >= 0")
        for f in ("ap_parents", "keep", "final"):
            if getattr(self, f) <= 0:
                raise CalibError(f"{name(f)} must be > 0, got {getattr(self, f)}")
        if min(self.refine_top, self.slack, self.parent_slack) < 0 or not math.isfinite(self.slack + self.parent_slack):
            raise CalibError(f"{name('refine_top')}, {name('slack')} and {name('parent_slack')} must be >= 0")

    def to_report(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[("grid_" if f.name in AXES else "") + f.name] = list(v) if isinstance(v, (tuple, list)) else v
        d["grid_ila"] = [("n" if normed else "u") + f"{w:g}" for normed, w in self.ila]
        return d


# Named budgets: (grid, stage image counts). ``full`` is the search the README's zoo recipes came from;
# ``quick`` is sized for a first deployment: under 10 minutes on 2 CPU cores for a CIFAR-size ResNet
# (measured in the README), at the price of a coarser grid and fewer final images.
BUDGETS: dict[str, tuple[Grid, tuple[int, int, int]]] = {
    "full": (Grid(), (64, 192, 1000)),
    "quick": (Grid(sigma=(0.5, 0.7, 1.0), eps_255=(6, 8), gs_steps=(5,), gs_step_255=(1,), ap_steps=(10,),
                   ila=((False, 1e-4), (False, 5e-5), (False, 2e-5), (True, 0.003), (True, 0.01)), ap_parents=3,
                   refine_ap_steps=(50,), refine_top=2, keep=3, final=2, include_paper=False), (64, 160, 400)),
}
NEXT_KNOB = {"quick": "--budget full (a wider grid and 1000 final images)",
             "full": "--max-clean-drop (a larger clean budget), or a wider grid (--grid-ila weights between the ones "
                     "that do nothing and the ones that wreck clean accuracy; more --refine-ap-steps)"}


def _noise(n: int) -> float:
    """One binomial std of an accuracy (points) measured on n images: the scale of small-n noise."""
    return 100 * math.sqrt(0.25 / max(n, 1))


def rank(ev: HasStats, recs: list, budget: float, slack_scale: float, extra_slack: float = 0.0) -> list:
    """Best first: inside the (relaxed) clean budget by robust accuracy, then the rest by smallest overshoot;
    configs that gain no robust accuracy over no purification (an expensive identity) come last, so that
    they neither take the refinement nor the final places.

    The relaxation is slack_scale binomial stds, so that small-n noise does not drop good configs early;
    the final choice uses slack 0.
    """
    def key(r: Any) -> tuple:
        s = ev.stats(r)
        slack = slack_scale * _noise(r.n) + extra_slack
        over = (s["clean"] - budget) - s["clean_purified"]
        gains = s["robust"] > s["robust_base"] + 1e-9
        inside = gains and over <= slack + 1e-9
        cost = r.cfg.gs_steps + r.cfg.ap_steps
        return (gains, inside, s["robust"] if inside else -over, s["clean_purified"], -cost)
    return sorted(recs, key=key, reverse=True)


def pareto_front(ev: HasStats, recs: list) -> list:
    """Configs not dominated in (purified clean, purified robust), sorted by purified clean, best first."""
    pt = {id(r): (s["clean_purified"], s["robust"]) for r in recs for s in [ev.stats(r)]}
    front = [r for r in recs
             if not any(o[0] >= pt[id(r)][0] and o[1] >= pt[id(r)][1] and o != pt[id(r)] for o in pt.values())]
    uniq: dict[tuple, Any] = {}
    for r in sorted(front, key=lambda r: (r.cfg.gs_steps + r.cfg.ap_steps, r.cfg.eps)):
        uniq.setdefault(pt[id(r)], r)  # ties: the cheapest
    return sorted(uniq.values(), key=lambda r: -pt[id(r)][0])


def pick_parents(ev: HasStats, recs: list, budget: float, slack: float, k: int) -> list:
    """Up to k GS parents: the most robust inside ``budget`` (relaxed), topped up from the Pareto front."""
    inside = [r for r in rank(ev, recs, budget, slack) if feasible(ev, r, budget + slack * _noise(r.n))]
    out = inside[:max(1, k // 2)] if inside else []
    front = [r for r in pareto_front(ev, recs) if r not in out]
    need = k - len(out)
    if need > 0 and front:
        idx = sorted({int(round(v)) for v in np.linspace(0, len(front) - 1, min(need, len(front)))})
        out += [front[i] for i in idx]
    return out[:k]


def feasible(ev: HasStats, r: Any, budget: float) -> bool:
    s = ev.stats(r)
    return s["clean_purified"] >= s["clean"] - budget - 1e-9


def acceptable(ev: HasStats, r: Any, budget: float, min_gain: float) -> bool:
    """Inside the clean budget AND more robust than no purification (else it is an expensive identity)."""
    s = ev.stats(r)
    return feasible(ev, r, budget) and s["robust"] >= s["robust_base"] + min_gain - 1e-9


def short(ev: ConfigScorer, r: Record) -> str:
    s = ev.stats(r)
    return f"[{cfg_label(r.cfg)}] clean {s['clean_purified']:.1f}/{s['clean']:.1f} rob {s['robust']:.1f} (n={s['n']})"


def run_search(ev: ConfigScorer, grid: Grid, stage_n: Sequence[int], max_clean_drop: float, min_robust_gain: float,
               log: Callable[[str], None]) -> tuple[Record | None, list[str]]:
    """(the chosen record or None, notes on the search's detours)."""
    n1, n2, n3 = stage_n
    budget = max_clean_drop
    notes = []

    # the grid's sigmas are at the victim's preset's own side; other resolutions scale them by the one rule
    shape = tuple(ev.victim.spec.input_shape)
    scale = resolution_scale(shape, paper_config(shape).preset)
    gs_cfgs = [preset_for_shape(shape, blur_sigma=s * scale, eps=e / 255, gs_steps=g, gs_step=st / 255, ap_steps=0)
               for s in grid.sigma for e in grid.eps_255 for st in grid.gs_step_255 for g in grid.gs_steps]
    recs1 = ev.evaluate(gs_cfgs, n1, "1-gs")
    ranked1 = rank(ev, recs1, budget, grid.slack)
    log(f"stage 1: {len(recs1)} GS-only configs on {ev.stats(recs1[0])['n']} images; best: " +
        "; ".join(short(ev, r) for r in ranked1[:3]))

    # AP restarts from the input and pulls clean accuracy back, so the parents are the best GS configs
    # inside a widened budget, else spread along the GS Pareto front
    parents = pick_parents(ev, recs1, budget + grid.parent_slack, grid.slack, grid.ap_parents)
    ap_cfgs = [p.cfg.replace(ap_steps=a, ila_weight=w, ila_normalized=normed)
               for p in parents for a in grid.ap_steps for normed, w in grid.ila]
    if grid.include_paper:
        ap_cfgs.append(paper_config(shape))
    recs2 = ev.evaluate(ap_cfgs, n1, "2-ap") if ap_cfgs else []
    ranked2 = rank(ev, recs2, budget, grid.slack)
    if recs2:
        log(f"stage 2: {len(recs2)} AP configs on parents [{'; '.join(cfg_label(p.cfg) for p in parents)}]; best: " +
            "; ".join(short(ev, r) for r in ranked2[:3]))

    keep = rank(ev, recs1 + recs2, budget, grid.slack)[:grid.keep]
    best_ap = [r for r in ranked2 if r.cfg.ap_steps > 0][:grid.refine_top]
    extra = [r.cfg.replace(ap_steps=a) for r in best_ap for a in grid.refine_ap_steps if a != r.cfg.ap_steps]
    recs3 = ev.evaluate([r.cfg for r in keep] + extra, n2, "3-refine")
    ranked3 = rank(ev, recs3, budget, grid.slack)
    log(f"stage 3: {len(recs3)} configs on {ev.stats(recs3[0])['n']} images; best: " +
        "; ".join(short(ev, r) for r in ranked3[:3]))

    recs4 = ev.evaluate([r.cfg for r in ranked3[:grid.final]], n3, "4-final")
    good = lambda r: acceptable(ev, r, budget, min_robust_gain)  # noqa: E731
    ok = [r for r in rank(ev, recs4, budget, 0.0) if good(r)]
    if not ok:
        # a finalist may have slipped over the budget at full n: try the next candidates of stage 3
        more = [r for r in ranked3[grid.final:] if good(r)][:grid.final]
        if more:
            notes.append("no stage-3 finalist met the budget at full n; evaluated the next feasible candidates")
            recs4 += ev.evaluate([r.cfg for r in more], n3, "4-final")
            ok = [r for r in rank(ev, recs4, budget, 0.0) if good(r)]
    log(f"stage 4: {len(recs4)} finalists on {ev.stats(recs4[0])['n']} images: " +
        "; ".join(short(ev, r) for r in rank(ev, recs4, budget, 0.0)))
    return (ok[0] if ok else None), notes
