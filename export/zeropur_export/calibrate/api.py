"""The Python API: fit ZeroPur to a classifier (``calibrate``) and measure recipes on held-out images
(``evaluate_configs``). Nothing here reads or writes files except the optional PGD cache; a result's
``save`` writes its report."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from zeropur_export.reference.purifier import ReferencePurifier
from zeropur_export.victims.taps import Victim
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.progress import progress as progress_bar

from .attacked_images import apgd_images, attacked_images
from .common import ATTACK, CalibError, cfg_label, labelled, paper_config, predict
from .scorer import OBJECTIVES, WORST_OF, ConfigScorer
from .record_cache import load_records, save_records
from .report import rows_table, write_calibration, write_evaluation
from .search import Grid, run_search

Log = Callable[[str], None]


@dataclass
class CalibrationResult:
    """The chosen recipe (None when no config met the budget) and the report of the whole search
    (``report["configs"]``: one row per config tried; ``report["chosen"]``: the chosen one's row)."""

    config: ZeroPurConfig | None
    report: dict[str, Any]

    def save(self, out: str | Path) -> None:
        """report.json, report.md, report.png and, when a config was chosen, calibrated_config.json."""
        write_calibration(Path(out), self.report, self.config)


@dataclass
class EvaluationResult:
    """Per config: clean and PGD accuracy without and with purification (``report["results"]``)."""

    report: dict[str, Any]

    def save(self, out: str | Path) -> None:
        """eval.json and eval.md."""
        write_evaluation(Path(out), self.report)


def check_settings(*, stage_n: Sequence[int] = (64, 192, 1000), max_clean_drop: float = 3.0,
                   min_robust_gain: float = 1.0, batch: int = 100, attack_steps: int = ATTACK["steps"],
                   name: Callable[[str], str] = lambda f: f) -> None:
    """Raise CalibError on settings a search cannot run with; ``name`` spells a setting in the message."""
    if not math.isfinite(max_clean_drop) or max_clean_drop < 0:
        raise CalibError(f"{name('max_clean_drop')} must be a finite number >= 0, got {max_clean_drop}")
    if not math.isfinite(min_robust_gain):
        raise CalibError(f"{name('min_robust_gain')} must be a finite number, got {min_robust_gain}")
    for f, v in (("batch", batch), ("attack_steps", attack_steps)):
        if v <= 0:
            raise CalibError(f"{name(f)} must be > 0, got {v}")
    sn = list(stage_n)
    if len(sn) != 3 or any(isinstance(v, bool) or v != int(v) for v in sn) or min(sn) <= 0 or sorted(sn) != sn:
        raise CalibError(f"{name('stage_n')} needs three increasing image counts > 0, got {sn}")


def _attack(victim: Victim, x: Any, y: Any, device: str | None, batch: int, progress: bool, attack_steps: int,
            seed: int, first_row: int, pgd_cache: str | Path | None) -> tuple[Victim, Any, np.ndarray, Any, dict[str, Any]]:
    """(victim, images, labels, their PGD images, the attack's report fields), all on one device."""
    victim, xt, ys = labelled(victim, x, y, device)
    t0 = time.perf_counter()
    adv, cached = attacked_images(victim, xt, ys, steps=attack_steps, seed=seed, first_row=first_row, batch=batch,
                                  cache=Path(pgd_cache) if pgd_cache is not None else None, progress=progress)
    info = dict(attack=dict(name="pgd_linf", eps_255=ATTACK["eps"] * 255, step_255=ATTACK["step"] * 255,
                            steps=attack_steps, random_start=ATTACK["random_start"], seed=seed, target="bare classifier"),
                attack_seconds=time.perf_counter() - t0, attack_cached=cached)
    return victim, xt, ys, adv, info


def _worst_case_attacks(victim: Victim, xt: Any, ys: np.ndarray, adv: Any, info: dict[str, Any], batch: int,
                        progress: bool, apgd_iter: int, bpda_steps: int, seed: int, first_row: int,
                        log: Log) -> dict[str, Any]:
    """The worst-case objective's images: PGD (kept for the report), APGD-CE and APGD-DLR on the bare victim."""
    blocks = {"pgd": adv}
    for name in ("apgd-ce", "apgd-dlr"):
        t0 = time.perf_counter()
        blocks[name] = apgd_images(victim, xt, ys, name, iters=apgd_iter, seed=seed, first_row=first_row, batch=batch,
                                   progress=progress)
        info["attack_seconds"] += time.perf_counter() - t0
        log(f"{name.upper()}-{apgd_iter} {time.perf_counter() - t0:.0f} s; unpurified "
            f"{100 * float((predict(victim, blocks[name], batch) == ys).mean()):.1f}%")
    info["objective"] = dict(name="worst", of=["apgd-ce", "apgd-dlr", "bpda"], apgd_iter=apgd_iter,
                             bpda_steps=bpda_steps, bpda="BPDA-PGD through each config's purifier, identity backward, "
                             f"step {ATTACK['step'] * 255:g}/255, random start")
    return blocks


def calibrate(victim: Victim, x: Any, y: Any, *, max_clean_drop: float = 3.0, min_robust_gain: float = 1.0,
              grid: Grid | None = None, stage_n: Sequence[int] = (64, 192, 1000), device: str | None = None,
              batch: int = 100, progress: bool = True, attack_steps: int = ATTACK["steps"], seed: int = 0,
              first_row: int = 0, pgd_cache: str | Path | None = None, log: Log | None = None,
              objective: str = "pgd", apgd_iter: int = 100, bpda_steps: int = 5,
              eval_cache: str | Path | None = None) -> CalibrationResult:
    """Search ZeroPur recipes for ``victim`` on labelled images ``x`` (NCHW float in [0, 1], torch or numpy),
    ``y`` (int labels): maximise purified PGD-20 accuracy subject to purified clean accuracy >= unpurified
    clean accuracy - ``max_clean_drop`` points and purified PGD accuracy >= unpurified + ``min_robust_gain``.

    ``objective="worst"`` scores robustness instead by the per-image worst case over APGD-CE and APGD-DLR
    (``apgd_iter`` iterations, on the bare victim) and a ``bpda_steps``-step BPDA-PGD through each config's
    own purifier; the report keeps the PGD figures beside it, so both objectives show.

    ``stage_n``: images of the screening stages, the refinement and the final (each capped at len(x)).
    ``device``: where the search runs (default: the victim's device; the victim is moved there).
    ``first_row``: the index of x[0] in its data set, which seeds the PGD random start (a slice is attacked
    as in the whole set); ``pgd_cache``: an .npz that keeps the PGD images between runs; ``eval_cache``: a JSON
    file that keeps every config's per-row outcomes, so a rerun with another budget only re-ranks them.
    ``log``: receives one line per stage. Raises CalibError on bad input.
    """
    grid = grid or Grid()
    grid.check()
    check_settings(stage_n=stage_n, max_clean_drop=max_clean_drop, min_robust_gain=min_robust_gain, batch=batch,
                   attack_steps=attack_steps)
    if not victim.spec.supports_ap:
        raise CalibError(f"{victim.name} declares no ILA/LPIPS taps; calibrate searches GS+AP recipes")
    log = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise CalibError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "worst" and min(apgd_iter, bpda_steps) < 1:
        raise CalibError(f"the worst-case objective needs apgd_iter and bpda_steps >= 1, got {apgd_iter}, {bpda_steps}")
    victim, xt, ys, adv, info = _attack(victim, x, y, device, batch, progress, attack_steps, seed, first_row, pgd_cache)
    pgd_seconds = info["attack_seconds"]
    blocks = adv
    if objective == "worst":
        blocks = _worst_case_attacks(victim, xt, ys, adv, info, batch, progress, apgd_iter, bpda_steps, seed,
                                     first_row, log)
    ev = ConfigScorer(victim, xt, blocks, ys, batch, progress, objective=objective,
                   bpda_steps=bpda_steps if objective == "worst" else 0, seed=seed, first_row=first_row)
    log(f"PGD-{attack_steps} {'(cached) ' if info['attack_cached'] else ''}{pgd_seconds:.0f} s; unpurified "
        f"clean {100 * ev.base_clean.mean():.1f}%, PGD {100 * ev.base_adv.mean():.1f}%")
    stage_n = [min(int(v), len(xt)) for v in stage_n]
    if eval_cache is not None and (k := load_records(ev, Path(eval_cache))):
        log(f"{k} configs' outcomes reused from {eval_cache}")
    chosen, notes = run_search(ev, grid, stage_n, max_clean_drop, min_robust_gain, log)
    if eval_cache is not None:
        save_records(ev, Path(eval_cache))

    rows = rows_table(ev, list(ev.records.values()), chosen, max_clean_drop)
    rep: dict[str, Any] = dict(
        model=victim.name, device=str(xt.device), n_calib=len(xt), max_clean_drop=max_clean_drop,
        min_robust_gain=min_robust_gain, attack=info["attack"],
        objective=info.get("objective", dict(name="pgd")),
        unpurified=dict(clean=100 * float(ev.base_clean.mean()), pgd=100 * float(ev.base_adv.mean()),
                        **({"worst": 100 * float(np.all([ev.base[k] for k in WORST_OF[:2]], 0).mean())}
                           if objective == "worst" else {})),
        search=dict(stage_n=stage_n, **grid.to_report()), configs_tried=len(rows),
        wall_seconds=time.perf_counter() - t_start, attack_seconds=info["attack_seconds"],
        attack_cached=info["attack_cached"], notes=notes, chosen=None, message="", configs=rows,
        paper=next((r for r in rows if r["config"] == paper_config(victim.spec.input_shape).to_dict()), None))
    if chosen is not None:
        rep["chosen"] = next(r for r in rows if r["chosen"])
        rep["message"] = f"chosen: {cfg_label(chosen.cfg)}"
    else:
        best = sorted(rows, key=lambda r: (-r["n"], r["clean_drop"]))[:3]
        rep["message"] = (
            f"no config kept purified clean accuracy within {max_clean_drop:g} points of the unpurified "
            f"{rep['unpurified']['clean']:.1f}% while raising {objective} accuracy by >= {min_robust_gain:g} points over "
            f"the unpurified {rep['unpurified'][objective]:.1f}%; smallest drops at the largest n: " +
            "; ".join(f"[{r['label']}] drop {r['clean_drop']:.1f}, {objective} {r['robust']:.1f}% (n={r['n']})" for r in best) +
            ". Raise the budget (--max-clean-drop), or widen the grid (e.g. ILA weights between the ones that do "
            "nothing and the ones that wreck clean accuracy, more AP steps).")
        fallback = max(ev.records.values(), key=lambda r: (r.n, -ev.stats(r)["clean"] + ev.stats(r)["clean_purified"],
                                                           ev.stats(r)["robust"]), default=None)
        if fallback is not None:
            row = next(r for r in rows if r["config"] == fallback.cfg.to_dict())
            rep["fallback"] = dict(row, budget=f"FAILS the budget: clean drop {row['clean_drop']:.1f} points "
                                   f"(budget {max_clean_drop:g}), {objective} {row['robust']:.1f}%")
    return CalibrationResult(chosen.cfg if chosen is not None else None, rep)


def evaluate_configs(victim: Victim, x: Any, y: Any,
                     configs: Mapping[str, ZeroPurConfig] | Sequence[tuple[str, ZeroPurConfig]], *,
                     device: str | None = None, batch: int = 100, progress: bool = True,
                     attack_steps: int = ATTACK["steps"], seed: int = 0, first_row: int = 0,
                     pgd_cache: str | Path | None = None, log: Log | None = None) -> EvaluationResult:
    """Clean and PGD accuracy of ``victim`` on labelled images, without and with each named config's
    purification. Evaluate on images the configs were not calibrated on. Arguments as ``calibrate``'s."""
    check_settings(batch=batch, attack_steps=attack_steps)
    named = list(configs.items()) if isinstance(configs, Mapping) else list(configs)
    log = log or (lambda _msg: None)
    victim, xt, ys, adv, info = _attack(victim, x, y, device, batch, progress, attack_steps, seed, first_row, pgd_cache)
    base_clean = 100 * float((predict(victim, xt, batch) == ys).mean())
    base_pgd = 100 * float((predict(victim, adv, batch) == ys).mean())
    log(f"{victim.name}, {len(xt)} images: clean {base_clean:.1f}%, PGD-{attack_steps} {base_pgd:.1f}% "
        f"(attack {info['attack_seconds']:.0f} s{', cached' if info['attack_cached'] else ''})")
    results = []
    for name, cfg in named:
        pur = ReferencePurifier(victim, cfg)
        ok = {"clean": 0, "pgd": 0}
        t1 = time.perf_counter()
        bar = progress_bar(desc=Path(name).parent.name or name, total=2 * len(xt), enabled=progress)
        for i in range(0, len(xt), batch):
            for k, src in (("clean", xt), ("pgd", adv)):
                xp = pur.purify(src[i:i + batch])
                ok[k] += int((pur.classify(xp).cpu().numpy() == ys[i:i + batch]).sum())
                bar.update(len(xp))
        bar.close()
        secs = time.perf_counter() - t1
        results.append(dict(config_name=name, label=cfg_label(cfg), config=cfg.to_dict(), clean=base_clean,
                            clean_purified=100 * ok["clean"] / len(xt), pgd=base_pgd,
                            pgd_purified=100 * ok["pgd"] / len(xt), purify_seconds=secs,
                            purify_s_per_image=secs / (2 * len(xt))))
        log(f"  {name}: clean purified {results[-1]['clean_purified']:.1f}%, PGD purified "
            f"{results[-1]['pgd_purified']:.1f}% ({secs:.0f} s)")
    return EvaluationResult(dict(model=victim.name, n=len(xt), device=str(xt.device), **info, results=results))
