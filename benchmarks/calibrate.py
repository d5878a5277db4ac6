"""Per-victim calibration of ZeroPur: fit the recipe to a classifier, training-free.

``zeropur-rt calibrate --model resnet20`` searches blur sigma, eps, GS/AP steps and the ILA
weight (raw or normalised) on a held-out calibration slice of the CIFAR-10 test copy
(rows 5000:6000 by default), maximising purified PGD-20 accuracy subject to purified
clean accuracy >= unpurified clean accuracy - ``--max-clean-drop`` (points, same images).

Search: successive halving with shared work. The PGD images are computed once (and cached
on disk). Guided-Shift outputs are cached per (sigma, eps, GS step) with snapshots at every
GS step count of the grid, so AP variants reuse them; each config's per-image results are
kept, so promoting a config to more images only purifies the new images.

  stage 1 (n1 images): GS-only grid  sigma x eps x gs_steps
  stage 2 (n1 images): AP grid (ILA raw / normalised weights) on GS parents (Pareto front) + the paper recipe
  stage 3 (n2 images): the best configs so far + more AP steps for the best AP configs
  stage 4 (n3 images): the finalists; the best one inside the clean budget is chosen

``zeropur-rt calibrate eval --model resnet20 --config paper --config runs/calib_resnet20/calibrated_config.json
--rows 0:1000`` evaluates configs on the evaluation slice (never the calibration slice).

Exit codes: 0 ok, 2 bad input, 3 no config met the clean-accuracy budget (the report is still written).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

EVAL_ROWS = (0, 5000)  # the evaluation slice; calibration must not overlap it
DEFAULT_CALIB_ROWS = "5000:6000"
ATTACK = dict(eps=8 / 255, step=2 / 255, steps=20, random_start=True)
EXIT_BAD_INPUT, EXIT_NO_FEASIBLE = 2, 3


class CalibError(ValueError):
    """Bad input: printed as one clear message, exit code 2."""


# ---------------------------------------------------------------- small helpers
def _progress(total: int, desc: str, enabled: bool = True):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, *_a): ...
            def close(self): ...
            def set_postfix_str(self, *_a, **_k): ...
        return _Null()


def parse_rows(text: str, what: str = "rows") -> tuple[int, int]:
    try:
        a, b = text.split(":")
        start, stop = int(a), int(b)
    except ValueError:
        raise CalibError(f"{what} must look like START:STOP (e.g. 5000:6000), got {text!r}") from None
    if start < 0 or stop <= start:
        raise CalibError(f"{what} {text!r}: need 0 <= START < STOP")
    return start, stop


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CalibError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise CalibError(f"{what}: expected finite numbers, got {text!r}")
    return vals


def _ints(text: str, what: str) -> list[int]:
    vals = _floats(text, what)
    if any(v != int(v) or v < 0 for v in vals):
        raise CalibError(f"{what}: expected integers >= 0, got {text!r}")
    return [int(v) for v in vals]


def parse_ila(text: str) -> list[tuple[bool, float]]:
    """'u1e-4,n0.1' -> [(False, 1e-4), (True, 0.1)]: u = raw dot product, n = normalised."""
    out = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok[0] not in "un":
            raise CalibError(f"--grid-ila: each entry is u<weight> (raw ILA) or n<weight> (normalised ILA), got {tok!r}")
        try:
            w = float(tok[1:])
        except ValueError:
            raise CalibError(f"--grid-ila: bad weight in {tok!r}") from None
        if not math.isfinite(w) or w < 0:
            raise CalibError(f"--grid-ila: weight must be finite and >= 0, got {tok!r}")
        out.append((tok[0] == "n", w))
    if not out:
        raise CalibError("--grid-ila is empty")
    return out


def cfg_key(cfg) -> str:
    d = cfg.to_dict()
    d.pop("preset", None)
    if cfg.ap_steps == 0:  # AP knobs are irrelevant for a GS-only config
        for k in ("ap_step", "ila_weight", "lpips_weight", "ila_normalized", "ila_norm_eps"):
            d.pop(k)
    return json.dumps(d, sort_keys=True)


def cfg_label(cfg) -> str:
    s = f"sigma {cfg.blur_sigma:g}, eps {cfg.eps * 255:.3g}/255, GS {cfg.gs_steps} (step {cfg.gs_step * 255:.3g}/255)"
    if cfg.ap_steps == 0:
        return s + ", AP 0"
    ila = f"n{cfg.ila_weight:g}" if cfg.ila_normalized else f"u{cfg.ila_weight:g}"
    return s + f", AP {cfg.ap_steps} (step {cfg.ap_step * 255:.3g}/255), ILA {ila}"


def _gs_key(cfg) -> tuple:
    return (cfg.blur_sigma, cfg.eps, cfg.gs_step, cfg.momentum, cfg.l1_scope)


# ---------------------------------------------------------------- data, victim, attack
def load_labelled(path: str | None, rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    from zeropur_rt.data import cifar10_test_path, load_cifar10_test
    p = Path(path) if path is not None else cifar10_test_path()
    if not p.is_file():
        raise CalibError(f"data file not found: {p} (pass --data PATH to a .npz with 'x' uint8 N,32,32,3 and 'y' labels)")
    try:
        with np.load(p) as z:
            keys = list(z.keys())
            n = len(z["x"]) if "x" in keys else None
    except Exception as e:  # noqa: BLE001 - zip/pickle errors vary
        raise CalibError(f"cannot read {p} as .npz: {e}") from e
    if "x" not in keys:
        raise CalibError(f"{p} has no 'x' images array (found {keys})")
    if "y" not in keys:
        raise CalibError(f"{p} has no 'y' labels array (found {keys}): calibration and evaluation need labelled images")
    if rows[1] > n:
        raise CalibError(f"rows {rows[0]}:{rows[1]} out of range: {p} holds {n} images")
    x, y = load_cifar10_test(p, rows[0], rows[1])
    return x, y, str(p)


def load_model(model: str, weights: str | None):
    from zeropur_export.weights import KNOWN_WEIGHTS, find_weights
    from zeropur_export.zoo import load_victim, zoo_names
    from zeropur_rt.files import sha256_file
    if model not in zoo_names():
        raise CalibError(f"unknown --model {model!r}; known: {', '.join(zoo_names())}")
    if weights is not None:
        if not Path(weights).is_file():
            raise CalibError(f"--weights file not found: {weights}")
        wpath = Path(weights)
    elif model in KNOWN_WEIGHTS:
        wpath = find_weights(model)
    else:
        raise CalibError(f"{model} has no known pretrained weights: pass --weights FILE")
    victim = load_victim(model, weights=str(wpath))
    if victim.spec.input_shape != (3, 32, 32):
        raise CalibError(f"{model} takes {victim.spec.input_shape} inputs; calibration runs on CIFAR-10 (3, 32, 32)")
    return victim, str(wpath), sha256_file(wpath)


def _torch_on(device: str, threads: int):
    """torch, with ``device`` checked; on CUDA, TF32 off so that the search sees float32 as on the CPU."""
    import torch
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CalibError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CalibError(f"--device {device}: this torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif dev.type != "cpu":
        raise CalibError(f"--device must be cpu or cuda[:i], got {device!r}")
    return torch


def _check_labels(y: np.ndarray, num_classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise CalibError(f"labels must be in 0..{num_classes - 1}, got range {int(y.min())}..{int(y.max())}")


def attacked_images(victim, x, y, rows, weights_sha: str, cache: Path | None, batch: int, attack_steps: int,
                    seed: int, progress: bool):
    """PGD-Linf 8/255 (step 2/255, random start) on the bare classifier; cached on disk by content key."""
    import torch
    from zeropur_export.attacks import pgd_linf
    from zeropur_rt.files import atomic_write_bytes
    key = json.dumps(dict(model=victim.name, weights_sha256=weights_sha, rows=list(rows), seed=seed,
                          device=x.device.type, **{**ATTACK, "steps": attack_steps}), sort_keys=True)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["key"]) == key and z["adv"].shape == tuple(x.shape):
                    return torch.from_numpy(z["adv"]).to(x.device), True
        except Exception:  # noqa: BLE001 - a bad cache is just recomputed
            pass
    out = []
    bar = _progress(len(x), f"PGD-{attack_steps}", progress)
    for i in range(0, len(x), batch):
        out.append(pgd_linf(victim, x[i:i + batch], y[i:i + batch], eps=ATTACK["eps"], step=ATTACK["step"],
                            steps=attack_steps, random_start=ATTACK["random_start"], seed=seed + rows[0] + i))
        bar.update(len(out[-1]))
    bar.close()
    adv = torch.cat(out)
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, adv=adv.cpu().numpy(), key=np.array(key))
        atomic_write_bytes(cache, buf.getvalue())
    return adv, False


def predict(victim, x, batch: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        return torch.cat([victim(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).cpu().numpy()


# ---------------------------------------------------------------- the evaluator (shared GS, incremental rows)
@dataclass
class Record:
    cfg: Any
    stage: str
    n: int = 0
    ok_clean: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # purified clean correct, per row
    ok_adv: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # purified PGD correct, per row
    seconds: float = 0.0
    stages: list = field(default_factory=list)


class Evaluator:
    """Purified accuracy of configs on the first n calibration rows, with GS outputs and results reused."""

    def __init__(self, victim, x_clean, x_adv, y, batch: int = 100, progress: bool = True):
        import torch
        self.torch = torch
        self.victim, self.batch, self.progress = victim, batch, progress
        self.x = torch.cat([x_clean, x_adv])  # clean rows then adversarial rows
        self.N = len(x_clean)
        self.y = np.asarray(y)
        self.base_clean = predict(victim, x_clean, batch) == self.y
        self.base_adv = predict(victim, x_adv, batch) == self.y
        self.gs: dict[tuple, dict[int, Any]] = {}  # gs key -> {steps: tensor (2*n_have, C, H, W) in clean|adv order}
        self.gs_n: dict[tuple, dict[int, int]] = {}
        self.records: dict[str, Record] = {}

    def _rows(self, lo: int, hi: int):
        """Indices into self.x of calibration rows lo:hi, clean and adversarial."""
        return list(range(lo, hi)) + list(range(self.N + lo, self.N + hi))

    def _ensure_gs(self, cfg, steps_set: set[int], n: int, bar) -> None:
        from zeropur_export.reference import ReferencePurifier, blur_torch, gs_update
        torch = self.torch
        k = _gs_key(cfg)
        have = self.gs_n.setdefault(k, {})
        store = self.gs.setdefault(k, {})
        need = {s for s in steps_set if have.get(s, 0) < n}
        if not need:
            return
        lo = min(have.get(s, 0) for s in need)
        pur = ReferencePurifier(self.victim, cfg.replace(ap_steps=0))
        top = max(need)
        idx = self._rows(lo, n)
        new: dict[int, list] = {s: [] for s in need}
        for i in range(0, len(idx), self.batch):
            x_in = self.x[idx[i:i + self.batch]]
            x, m = x_in.clone(), torch.zeros_like(x_in)
            if 0 in need:
                new[0].append(x_in)
            for t in range(1, top + 1):  # identical to ReferencePurifier.guided_shift, with snapshots
                g, _ = pur.gs_grad(x, blur_torch(x, cfg.blur_sigma))
                x, m = gs_update(x, g, m, x_in, pur.cfg)
                if t in need:
                    new[t].append(x)
                bar.update(len(x_in))
        for s in need:
            got = torch.cat(new[s])  # rows lo:n, clean block then adversarial block
            h = n - lo
            c_new, a_new = got[:h], got[h:]
            skip = have.get(s, 0) - lo  # rows already cached for this snapshot
            old = store.get(s)
            if old is None:
                store[s] = torch.cat([c_new[skip:], a_new[skip:]])
            else:
                n_old = have[s]
                store[s] = torch.cat([old[:n_old], c_new[skip:], old[n_old:], a_new[skip:]])
            have[s] = n

    def coarse(self, cfg, lo: int, hi: int):
        t = self.gs[_gs_key(cfg)][cfg.gs_steps]
        n = self.gs_n[_gs_key(cfg)][cfg.gs_steps]
        return self.torch.cat([t[lo:hi], t[n + lo:n + hi]])

    def evaluate(self, cfgs: Iterable, n: int, stage: str) -> list[Record]:
        """Bring every config to n rows (only new rows are purified); GS shared within a call."""
        from zeropur_export.reference import ReferencePurifier
        torch = self.torch
        n = min(n, self.N)
        cfgs = list(dict((cfg_key(c), c) for c in cfgs).values())
        recs = []
        for c in cfgs:
            r = self.records.setdefault(cfg_key(c), Record(c, stage))
            if stage not in r.stages:
                r.stages.append(stage)
            recs.append(r)
        todo = [r for r in recs if r.n < n]
        if not todo:
            return recs
        # work units for the progress bar: image-steps
        groups: dict[tuple, list[Record]] = {}
        for r in todo:
            groups.setdefault(_gs_key(r.cfg), []).append(r)
        total = 0
        for k, rs in groups.items():
            have = self.gs_n.get(k, {})
            need = [r.cfg.gs_steps for r in rs if have.get(r.cfg.gs_steps, 0) < n]
            if need:
                lo = min(min(have.get(s, 0) for s in need), min(r.n for r in rs))
                total += 2 * (n - lo) * max(need)
            total += sum(2 * (n - r.n) * r.cfg.ap_steps for r in rs)
        bar = _progress(max(total, 1), f"{stage} ({len(todo)} cfg, n={n})", self.progress)
        for k, rs in groups.items():
            t0 = time.perf_counter()
            self._ensure_gs(rs[0].cfg, {r.cfg.gs_steps for r in rs}, n, bar)
            gs_share = (time.perf_counter() - t0) / len(rs)
            for r in rs:
                t1 = time.perf_counter()
                lo = r.n
                x_in = torch.cat([self.x[lo:n], self.x[self.N + lo:self.N + n]])
                coarse = self.coarse(r.cfg, lo, n)
                if r.cfg.ap_steps == 0:
                    out = coarse
                else:
                    pur = ReferencePurifier(self.victim, r.cfg, ap_mode="lean")
                    parts = []
                    for i in range(0, len(x_in), self.batch):
                        parts.append(pur.adaptive_projection(x_in[i:i + self.batch], coarse[i:i + self.batch]))
                        bar.update(len(parts[-1]) * r.cfg.ap_steps)
                    out = torch.cat(parts)
                pred = predict(self.victim, out, self.batch)
                h = n - lo
                r.ok_clean = np.concatenate([r.ok_clean, pred[:h] == self.y[lo:n]])
                r.ok_adv = np.concatenate([r.ok_adv, pred[h:] == self.y[lo:n]])
                r.n = n
                r.seconds += gs_share + time.perf_counter() - t1
                bar.set_postfix_str(f"last: clean {100 * r.ok_clean.mean():.1f} rob {100 * r.ok_adv.mean():.1f}")
        bar.close()
        return recs

    # accuracies (percent) of a record on its own n rows, and the unpurified references on the same rows
    def stats(self, r: Record) -> dict[str, float]:
        n = r.n
        return dict(n=n, clean=100 * float(self.base_clean[:n].mean()), pgd=100 * float(self.base_adv[:n].mean()),
                    clean_purified=100 * float(r.ok_clean.mean()), pgd_purified=100 * float(r.ok_adv.mean()),
                    seconds=r.seconds)


def rank(ev: Evaluator, recs: list[Record], budget: float, slack_scale: float, extra_slack: float = 0.0) -> list[Record]:
    """Best first: inside the (relaxed) clean budget by robust accuracy, then the rest by smallest overshoot.

    The relaxation is slack_scale * 100*sqrt(0.25/n) points (one binomial std of a mean at n images),
    so that small-n noise does not drop good configs early; the final choice uses slack 0.
    """
    def key(r: Record):
        s = ev.stats(r)
        slack = slack_scale * 100 * math.sqrt(0.25 / max(r.n, 1)) + extra_slack
        over = (s["clean"] - budget) - s["clean_purified"]
        feasible = over <= slack + 1e-9
        cost = r.cfg.gs_steps + r.cfg.ap_steps
        return (feasible, s["pgd_purified"] if feasible else -over, s["clean_purified"], -cost)
    return sorted(recs, key=key, reverse=True)


def pareto_front(ev: Evaluator, recs: list[Record]) -> list[Record]:
    """Configs not dominated in (purified clean, purified PGD), sorted by purified clean, best first."""
    st = {id(r): ev.stats(r) for r in recs}
    front = []
    for r in recs:
        a = st[id(r)]
        if not any(st[id(o)]["clean_purified"] >= a["clean_purified"] and st[id(o)]["pgd_purified"] >= a["pgd_purified"]
                   and (st[id(o)]["clean_purified"], st[id(o)]["pgd_purified"]) != (a["clean_purified"], a["pgd_purified"])
                   for o in recs):
            front.append(r)
    uniq = {}
    for r in sorted(front, key=lambda r: (r.cfg.gs_steps + r.cfg.ap_steps, r.cfg.eps)):
        uniq.setdefault((st[id(r)]["clean_purified"], st[id(r)]["pgd_purified"]), r)  # ties: the cheapest
    return sorted(uniq.values(), key=lambda r: -st[id(r)]["clean_purified"])


def pick_parents(ev: Evaluator, recs: list[Record], budget: float, slack: float, k: int) -> list[Record]:
    """Up to k GS parents: the most robust inside ``budget`` (relaxed), topped up from the Pareto front."""
    inside = [r for r in rank(ev, recs, budget, slack) if feasible(ev, r, budget + slack * 100 * math.sqrt(0.25 / max(r.n, 1)))]
    out = inside[:max(1, k // 2)] if inside else []
    front = [r for r in pareto_front(ev, recs) if r not in out]
    need = k - len(out)
    if need > 0 and front:
        idx = sorted({int(round(v)) for v in np.linspace(0, len(front) - 1, min(need, len(front)))})
        out += [front[i] for i in idx]
    return out[:k]


def feasible(ev: Evaluator, r: Record, budget: float) -> bool:
    s = ev.stats(r)
    return s["clean_purified"] >= s["clean"] - budget - 1e-9


def acceptable(ev: Evaluator, r: Record, budget: float, min_gain: float) -> bool:
    """Inside the clean budget AND more robust than no purification (else it is an expensive identity)."""
    s = ev.stats(r)
    return feasible(ev, r, budget) and s["pgd_purified"] >= s["pgd"] + min_gain - 1e-9


# ---------------------------------------------------------------- the search
def paper_config():
    from zeropur_rt.config import preset
    return preset("cifar10")


def run_search(ev: Evaluator, args, log) -> tuple[Record | None, list[str]]:
    from zeropur_rt.config import preset
    n1, n2, n3 = args.stage_n
    sigmas, epss, gss = args.grid_sigma, args.grid_eps, args.grid_gs_steps
    notes = []

    # stage 1: GS only
    gs_cfgs = [preset("cifar10", blur_sigma=s, eps=e / 255, gs_steps=g, gs_step=st / 255, ap_steps=0)
               for s in sigmas for e in epss for st in args.grid_gs_step for g in gss]
    recs1 = ev.evaluate(gs_cfgs, n1, "1-gs")
    ranked1 = rank(ev, recs1, args.max_clean_drop, args.slack)
    log(f"stage 1: {len(recs1)} GS-only configs on {ev.stats(recs1[0])['n']} images; best: " +
        "; ".join(_short(ev, r) for r in ranked1[:3]))

    # stage 2: AP variants on GS parents. AP restarts from the input and pulls clean accuracy back, so the
    # parents are the best GS configs inside a widened budget, else spread along the GS Pareto front
    parents = pick_parents(ev, recs1, args.max_clean_drop + args.parent_slack, args.slack, args.ap_parents)
    ap_cfgs = []
    for p in parents:
        for a in args.grid_ap_steps:
            for normed, w in args.grid_ila:
                ap_cfgs.append(p.cfg.replace(ap_steps=a, ap_step=p.cfg.eps / a, ila_weight=w, ila_normalized=normed))
    if args.include_paper:
        ap_cfgs.append(paper_config())
    recs2 = ev.evaluate(ap_cfgs, n1, "2-ap") if ap_cfgs else []
    ranked2 = rank(ev, recs2, args.max_clean_drop, args.slack)
    if recs2:
        log(f"stage 2: {len(recs2)} AP configs on parents [{'; '.join(cfg_label(p.cfg) for p in parents)}]; best: " +
            "; ".join(_short(ev, r) for r in ranked2[:3]))

    # stage 3: the best so far on n2 images, plus more AP steps for the best AP configs
    pool = rank(ev, recs1 + recs2, args.max_clean_drop, args.slack)
    keep = pool[:args.keep]
    extra = []
    best_ap = [r for r in rank(ev, recs2, args.max_clean_drop, args.slack) if r.cfg.ap_steps > 0][:args.refine_top]
    for r in best_ap:
        for a in args.refine_ap_steps:
            if a != r.cfg.ap_steps:
                extra.append(r.cfg.replace(ap_steps=a, ap_step=r.cfg.eps / a))
    recs3 = ev.evaluate([r.cfg for r in keep] + extra, n2, "3-refine")
    ranked3 = rank(ev, recs3, args.max_clean_drop, args.slack)
    log(f"stage 3: {len(recs3)} configs on {ev.stats(recs3[0])['n']} images; best: " +
        "; ".join(_short(ev, r) for r in ranked3[:3]))

    # stage 4: finalists on n3 images; strict budget
    recs4 = ev.evaluate([r.cfg for r in ranked3[:args.final]], n3, "4-final")
    good = lambda r: acceptable(ev, r, args.max_clean_drop, args.min_robust_gain)  # noqa: E731
    ok = [r for r in rank(ev, recs4, args.max_clean_drop, 0.0) if good(r)]
    if not ok:
        # a finalist may have slipped over the budget at full n: try the next candidates of stage 3
        more = [r for r in ranked3[args.final:] if good(r)][:args.final]
        if more:
            notes.append("no stage-3 finalist met the budget at full n; evaluated the next feasible candidates")
            recs4 += ev.evaluate([r.cfg for r in more], n3, "4-final")
            ok = [r for r in rank(ev, recs4, args.max_clean_drop, 0.0) if good(r)]
    log(f"stage 4: {len(recs4)} finalists on {ev.stats(recs4[0])['n']} images: " +
        "; ".join(_short(ev, r) for r in rank(ev, recs4, args.max_clean_drop, 0.0)))
    return (ok[0] if ok else None), notes


def _short(ev: Evaluator, r: Record) -> str:
    s = ev.stats(r)
    return f"[{cfg_label(r.cfg)}] clean {s['clean_purified']:.1f}/{s['clean']:.1f} rob {s['pgd_purified']:.1f} (n={s['n']})"


# ---------------------------------------------------------------- reports
def _rows_table(ev: Evaluator, recs: list[Record], chosen: Record | None, budget: float) -> list[dict]:
    rows = []
    for r in recs:
        s = ev.stats(r)
        c = r.cfg
        rows.append(dict(label=cfg_label(c), chosen=r is chosen, stages=r.stages, blur_sigma=c.blur_sigma,
                         eps_255=round(c.eps * 255, 6), gs_steps=c.gs_steps, gs_step_255=round(c.gs_step * 255, 6),
                         ap_steps=c.ap_steps, ap_step_255=round(c.ap_step * 255, 6) if c.ap_steps else None,
                         ila=(("n" if c.ila_normalized else "u") + f"{c.ila_weight:g}") if c.ap_steps else None,
                         n=s["n"], clean=round(s["clean"], 3), clean_purified=round(s["clean_purified"], 3),
                         pgd=round(s["pgd"], 3), pgd_purified=round(s["pgd_purified"], 3),
                         clean_drop=round(s["clean"] - s["clean_purified"], 3),
                         within_budget=feasible(ev, r, budget), seconds=round(r.seconds, 2),
                         config=c.to_dict()))
    return rows


def write_plot(path: Path, rows: list[dict], budget: float, title: str, attack_steps: int = 20) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from zeropur_rt.files import atomic_write_bytes
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    stages = sorted({max(r["stages"]) for r in rows})
    marks = dict(zip(stages, "o^sD"))
    for st in stages:
        sub = [r for r in rows if max(r["stages"]) == st]
        for gs_only, col in ((True, "tab:blue"), (False, "tab:orange")):
            pts = [r for r in sub if (r["ap_steps"] == 0) == gs_only]
            if pts:
                ax.scatter([-r["clean_drop"] for r in pts], [r["pgd_purified"] for r in pts], s=14 + 0.03 * np.array([r["n"] for r in pts]),
                           marker=marks.get(st, "o"), color=col, alpha=0.6, edgecolors="none",
                           label=f"{'GS only' if gs_only else 'GS+AP'}, last stage {st}")
    paper = [r for r in rows if r["config"] == paper_config().to_dict()]
    for r in paper:
        ax.scatter([-r["clean_drop"]], [r["pgd_purified"]], marker="x", s=90, color="k", label=f"paper recipe (n={r['n']})")
    ch = [r for r in rows if r["chosen"]]
    for r in ch:
        ax.scatter([-r["clean_drop"]], [r["pgd_purified"]], marker="*", s=320, color="tab:red", edgecolors="k",
                   label=f"chosen (n={r['n']})", zorder=5)
    ax.axvline(-budget, color="tab:red", ls="--", lw=1, label=f"clean budget (-{budget:g} points)")
    ax.axvspan(-budget, max(1.0, max([-r["clean_drop"] for r in rows] + [0]) + 1), color="tab:green", alpha=0.06)
    ax.set_xlabel("purified clean acc - unpurified clean acc (points, same images)")
    ax.set_ylabel(f"purified PGD-{attack_steps} accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_markdown(path: Path, rep: dict, rows: list[dict]) -> None:
    from zeropur_rt.files import atomic_write_text
    L = [f"# ZeroPur calibration: {rep['model']}", "",
         f"- weights: `{rep['weights']}` (sha256 {rep['weights_sha256'][:12]}...)",
         f"- calibration rows {rep['calib_rows'][0]}:{rep['calib_rows'][1]} of `{rep['data']}`; attack PGD-Linf "
         f"{rep['attack']['eps_255']:g}/255, step {rep['attack']['step_255']:g}/255, {rep['attack']['steps']} steps, random start, "
         f"on the bare classifier",
         f"- objective: max purified PGD accuracy s.t. purified clean >= unpurified clean - {rep['max_clean_drop']:g} points (same images)",
         f"- unpurified on all {rep['n_calib']} calibration images: clean {rep['unpurified']['clean']:.1f}%, PGD {rep['unpurified']['pgd']:.1f}%",
         f"- configs tried: {len(rows)}; wall time {rep['wall_seconds']:.0f} s (attack {rep['attack_seconds']:.0f} s{', cached' if rep['attack_cached'] else ''})",
         ""]
    if rep["chosen"]:
        c = rep["chosen"]
        L += [f"**Chosen:** {c['label']} -- n={c['n']}: clean {c['clean']:.1f}% -> {c['clean_purified']:.1f}% purified, "
              f"PGD {c['pgd']:.1f}% -> {c['pgd_purified']:.1f}% purified.", ""]
    else:
        L += [f"**No config met the budget.** {rep['message']}", ""]
    for note in rep.get("notes", []):
        L += [f"- note: {note}"]
    L += ["", "Accuracies are on the first n calibration rows; 'clean' and 'PGD' are the unpurified references on the same rows. "
          "Seconds: purification compute attributed to the config (shared Guided-Shift work split among the configs that reuse it).", "",
          "| # | stages | sigma | eps/255 | GS | GS step/255 | AP | AP step/255 | ILA | n | clean | clean purified | PGD | PGD purified | drop | in budget | s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["n"], not rows[i]["within_budget"], -rows[i]["pgd_purified"]))
    for j, i in enumerate(order, 1):
        r = rows[i]
        mark = " **(chosen)**" if r["chosen"] else ""
        L.append(f"| {j}{mark} | {','.join(r['stages'])} | {r['blur_sigma']:g} | {r['eps_255']:.3g} | {r['gs_steps']} | {r['gs_step_255']:.3g} | {r['ap_steps']} | "
                 f"{'' if r['ap_step_255'] is None else format(r['ap_step_255'], '.3g')} | {r['ila'] or ''} | {r['n']} | {r['clean']:.1f} | "
                 f"{r['clean_purified']:.1f} | {r['pgd']:.1f} | {r['pgd_purified']:.1f} | {r['clean_drop']:.1f} | "
                 f"{'yes' if r['within_budget'] else 'no'} | {r['seconds']:.1f} |")
    L += ["", "![trade-off](report.png)", ""]
    atomic_write_text(path, "\n".join(L))


# ---------------------------------------------------------------- calibrate command
def _calib_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-rt calibrate", description=__doc__.split("\n\n")[0],
                                 epilog="Evaluation mode: `zeropur-rt calibrate eval -h`.")
    ap.add_argument("--model", required=True, help="zoo architecture (resnet20, resnet56, ...)")
    ap.add_argument("--weights", default=None, help="weights file (default: the zoo's known pretrained file)")
    ap.add_argument("--data", default=None, help="CIFAR-10 test .npz with 'x' and 'y' (default: <shared>/data/cifar10_test.npz)")
    ap.add_argument("--calib-rows", default=DEFAULT_CALIB_ROWS, help="calibration slice START:STOP (default %(default)s)")
    ap.add_argument("--force-overlap", action="store_true", help="allow a calibration slice overlapping the evaluation rows 0:5000")
    ap.add_argument("--max-clean-drop", type=float, default=3.0, help="clean-accuracy budget in points (default %(default)s)")
    ap.add_argument("--min-robust-gain", type=float, default=1.0,
                    help="the chosen config must beat unpurified PGD accuracy by this many points (default %(default)s)")
    ap.add_argument("--out", default=None, help="output directory (default runs/calib_<model>)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device of the search: cpu (default) or cuda[:i]")
    ap.add_argument("--seed", type=int, default=0, help="PGD random-start seed")
    ap.add_argument("--attack-steps", type=int, default=ATTACK["steps"], help=argparse.SUPPRESS)
    ap.add_argument("--stage-n", default="64,192,1000", help="images per stage: GS/AP screens, refinement, final")
    ap.add_argument("--grid-sigma", default="0.5,0.7,1.0,1.5", help="blur sigmas (paper: 1.8, always tried via the paper recipe)")
    ap.add_argument("--grid-eps", default="4,6,8", help="eps values in /255 units (paper: 10)")
    ap.add_argument("--grid-gs-steps", default="5,10")
    ap.add_argument("--grid-gs-step", default="0.5,1", help="GS step sizes in /255 units (paper: 1)")
    ap.add_argument("--grid-ap-steps", default="10", help="AP steps in stage 2 (ap_step = eps / ap_steps)")
    ap.add_argument("--grid-ila", default="u1e-4,u1e-5,n0.001,n0.003,n0.01",
                    help="ILA variants: u<w> raw dot product (paper: u1e-4), n<w> normalised dot product")
    ap.add_argument("--ap-parents", type=int, default=3, help="GS configs that get the AP grid in stage 2 "
                    "(the best inside budget + parent slack, then spread along the GS clean/robust Pareto front)")
    ap.add_argument("--parent-slack", type=float, default=10.0,
                    help="extra clean-drop points allowed when picking AP parents (AP recovers clean accuracy)")
    ap.add_argument("--refine-ap-steps", default="25,50", help="AP step counts tried in stage 3 for the best AP configs")
    ap.add_argument("--refine-top", type=int, default=1, help="AP configs that get the stage-3 AP-step variants")
    ap.add_argument("--keep", type=int, default=6, help="configs promoted to stage 3")
    ap.add_argument("--final", type=int, default=2, help="configs promoted to the final stage")
    ap.add_argument("--slack", type=float, default=1.0, help="relaxation of the budget at small n, in binomial stds")
    ap.add_argument("--no-paper", dest="include_paper", action="store_false", help="do not evaluate the paper recipe in stage 2")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def _validate_calib_args(ap, args) -> None:
    args.calib = parse_rows(args.calib_rows, "--calib-rows")
    if _overlap(args.calib, EVAL_ROWS) and not args.force_overlap:
        raise CalibError(f"--calib-rows {args.calib_rows} overlaps the evaluation rows {EVAL_ROWS[0]}:{EVAL_ROWS[1]}; "
                         "calibrating on evaluation images inflates the reported accuracy. Use rows >= 5000 "
                         "(default 5000:6000) or pass --force-overlap")
    if not math.isfinite(args.max_clean_drop) or args.max_clean_drop < 0:
        raise CalibError(f"--max-clean-drop must be a finite number >= 0, got {args.max_clean_drop}")
    if not math.isfinite(args.min_robust_gain):
        raise CalibError(f"--min-robust-gain must be a finite number, got {args.min_robust_gain}")
    for name in ("batch", "threads", "ap_parents", "keep", "final", "attack_steps"):
        if getattr(args, name) <= 0:
            raise CalibError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.refine_top < 0 or args.slack < 0 or args.parent_slack < 0:
        raise CalibError("--refine-top, --slack and --parent-slack must be >= 0")
    sn = _ints(args.stage_n, "--stage-n")
    if len(sn) != 3 or min(sn) <= 0 or sorted(sn) != sn:
        raise CalibError(f"--stage-n needs three increasing image counts > 0, got {args.stage_n!r}")
    size = args.calib[1] - args.calib[0]
    args.stage_n = [min(v, size) for v in sn]
    args.grid_sigma = _floats(args.grid_sigma, "--grid-sigma")
    args.grid_eps = _floats(args.grid_eps, "--grid-eps")
    args.grid_gs_steps = _ints(args.grid_gs_steps, "--grid-gs-steps")
    args.grid_ap_steps = _ints(args.grid_ap_steps, "--grid-ap-steps")
    args.refine_ap_steps = _ints(args.refine_ap_steps, "--refine-ap-steps") if args.refine_ap_steps.strip() else []
    if any(v < 0 for v in args.grid_sigma):
        raise CalibError("--grid-sigma values must be >= 0")
    args.grid_gs_step = _floats(args.grid_gs_step, "--grid-gs-step")
    if any(v <= 0 for v in args.grid_eps + args.grid_gs_step):
        raise CalibError("--grid-eps and --grid-gs-step values must be > 0")
    if any(a == 0 for a in args.grid_ap_steps + args.refine_ap_steps):
        raise CalibError("--grid-ap-steps / --refine-ap-steps must be > 0 (GS-only configs are always in stage 1)")
    args.grid_ila = parse_ila(args.grid_ila)


def calibrate(argv: list[str]) -> int:
    ap = _calib_parser()
    args = ap.parse_args(argv)
    _validate_calib_args(ap, args)
    out = Path(args.out or f"runs/calib_{args.model}")
    t_start = time.perf_counter()

    torch = _torch_on(args.device, args.threads)
    from zeropur_rt.files import atomic_write_json
    from zeropur_rt.data import to_nchw_float

    victim, wpath, wsha = load_model(args.model, args.weights)
    victim = victim.to(args.device)
    if not victim.spec.supports_ap:
        raise CalibError(f"{args.model} declares no ILA/LPIPS taps; calibrate searches GS+AP recipes")
    xs, ys, data_path = load_labelled(args.data, args.calib)
    _check_labels(ys, victim.spec.num_classes)
    x = torch.from_numpy(to_nchw_float(xs)).to(args.device)
    y = torch.from_numpy(ys).to(args.device)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"calibrating {args.model} on rows {args.calib[0]}:{args.calib[1]} ({len(x)} images), budget {args.max_clean_drop:g} points")
    t0 = time.perf_counter()
    adv, cached = attacked_images(victim, x, y, args.calib, wsha, out / "pgd_cache.npz", args.batch,
                                  args.attack_steps, args.seed, args.progress)
    t_attack = time.perf_counter() - t0
    ev = Evaluator(victim, x, adv, ys, args.batch, args.progress)
    log(f"PGD-{args.attack_steps} {'(cached) ' if cached else ''}{t_attack:.0f} s; unpurified clean {100 * ev.base_clean.mean():.1f}%, "
        f"PGD {100 * ev.base_adv.mean():.1f}%")

    chosen, notes = run_search(ev, args, log)
    wall = time.perf_counter() - t_start
    recs = list(ev.records.values())
    rows = _rows_table(ev, recs, chosen, args.max_clean_drop)
    n_all = len(x)
    rep: dict[str, Any] = dict(
        model=args.model, weights=wpath, weights_sha256=wsha, data=data_path, calib_rows=list(args.calib), device=args.device,
        n_calib=n_all, max_clean_drop=args.max_clean_drop, min_robust_gain=args.min_robust_gain,
        attack=dict(name="pgd_linf", eps_255=ATTACK["eps"] * 255, step_255=ATTACK["step"] * 255, steps=args.attack_steps,
                    random_start=ATTACK["random_start"], seed=args.seed, target="bare classifier"),
        unpurified=dict(clean=100 * float(ev.base_clean.mean()), pgd=100 * float(ev.base_adv.mean())),
        search=dict(stage_n=args.stage_n, grid_sigma=args.grid_sigma, grid_eps_255=args.grid_eps,
                    grid_gs_steps=args.grid_gs_steps, grid_gs_step_255=args.grid_gs_step, grid_ap_steps=args.grid_ap_steps,
                    grid_ila=[("n" if a else "u") + f"{w:g}" for a, w in args.grid_ila], ap_parents=args.ap_parents,
                    parent_slack=args.parent_slack, refine_ap_steps=args.refine_ap_steps, keep=args.keep,
                    final=args.final, slack=args.slack),
        configs_tried=len(rows), wall_seconds=wall, attack_seconds=t_attack, attack_cached=cached,
        notes=notes, chosen=None, message="", configs=rows,
        paper=next((r for r in rows if r["config"] == paper_config().to_dict()), None))
    code = 0
    if chosen is not None:
        rep["chosen"] = next(r for r in rows if r["chosen"])
        rep["message"] = f"chosen: {cfg_label(chosen.cfg)}"
    else:
        code = EXIT_NO_FEASIBLE
        best = sorted(rows, key=lambda r: (-r["n"], r["clean_drop"]))[:3]
        rep["message"] = (f"no config kept purified clean accuracy within {args.max_clean_drop:g} points of the unpurified "
                          f"{rep['unpurified']['clean']:.1f}% while raising PGD accuracy by >= {args.min_robust_gain:g} points "
                          f"over the unpurified {rep['unpurified']['pgd']:.1f}%; smallest drops at the largest n: " +
                          "; ".join(f"[{r['label']}] drop {r['clean_drop']:.1f}, PGD {r['pgd_purified']:.1f}% (n={r['n']})" for r in best) +
                          ". Raise --max-clean-drop, or widen the grid (e.g. ILA weights between the ones that do nothing and "
                          "the ones that wreck clean accuracy, more AP steps).")
    title = (f"{args.model}: calibration rows {args.calib[0]}:{args.calib[1]}, PGD-{args.attack_steps} 8/255, "
             f"{len(rows)} configs, budget {args.max_clean_drop:g} pts")
    # the report first, the config last: a calibrated_config.json is only ever beside its own report
    atomic_write_json(out / "report.json", rep)
    write_markdown(out / "report.md", rep, rows)
    write_plot(out / "report.png", rows, args.max_clean_drop, title, args.attack_steps)
    cfg_path = out / "calibrated_config.json"
    if chosen is not None:
        atomic_write_json(cfg_path, chosen.cfg.to_dict())
    elif cfg_path.exists():
        cfg_path.unlink()  # a stale config from an earlier run would contradict this report
    log(f"{len(rows)} configs tried in {wall:.0f} s; wrote {out}/report.md, report.json, report.png"
        + (", calibrated_config.json" if chosen is not None else ""))
    if chosen is not None:
        s = ev.stats(chosen)
        log(f"chosen: {cfg_label(chosen.cfg)}\n  n={s['n']}: clean {s['clean']:.1f}% -> {s['clean_purified']:.1f}% purified, "
            f"PGD {s['pgd']:.1f}% -> {s['pgd_purified']:.1f}% purified")
    else:
        print(f"zeropur-rt calibrate: {rep['message']}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- eval command
def _eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-rt calibrate eval",
                                 description="Evaluate ZeroPur configs (clean / PGD-20, without / with purification) on the evaluation slice.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--config", action="append", required=True,
                    help="'paper' (the preset) or a ZeroPurConfig JSON file (e.g. calibrated_config.json); repeatable")
    ap.add_argument("--rows", default="0:1000", help="evaluation rows START:STOP inside 0:5000 (default %(default)s)")
    ap.add_argument("--force-overlap", action="store_true", help="allow rows overlapping a config's calibration slice")
    ap.add_argument("--out", default=None, help="output directory (default runs/eval_<model>)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:i]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack-steps", type=int, default=ATTACK["steps"], help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def _load_config(spec: str):
    """(name, config, calibration rows or None) from 'paper' or a JSON file (sibling report.json gives the rows)."""
    from zeropur_rt.config import ZeroPurConfig
    if spec == "paper":
        return "paper recipe", paper_config(), None
    p = Path(spec)
    if not p.is_file():
        raise CalibError(f"--config {spec!r}: not 'paper' and no such file")
    try:
        d = json.loads(p.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        cfg = ZeroPurConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CalibError(f"--config {p}: not a ZeroPurConfig JSON ({e})") from e
    rows = None
    rep = p.parent / "report.json"
    if rep.is_file():
        try:
            rows = tuple(json.loads(rep.read_text())["calib_rows"])
        except (ValueError, KeyError, TypeError):
            rows = None
    return str(p), cfg, rows


def evaluate(argv: list[str]) -> int:
    ap = _eval_parser()
    args = ap.parse_args(argv)
    rows = parse_rows(args.rows, "--rows")
    if args.batch <= 0 or args.threads <= 0 or args.attack_steps <= 0:
        raise CalibError("--batch, --threads and --attack-steps must be > 0")
    configs = [_load_config(s) for s in args.config]
    calib_default = parse_rows(DEFAULT_CALIB_ROWS)
    for name, _, crow in configs:
        crow = tuple(crow) if crow is not None else None
        for cr in ([crow] if crow else []) + [calib_default]:
            if _overlap(rows, cr) and not args.force_overlap:
                raise CalibError(f"--rows {args.rows} overlaps the calibration rows {cr[0]}:{cr[1]}"
                                 f"{' of ' + name if cr == crow else ' (the default calibration slice)'}; evaluate on rows "
                                 f"inside {EVAL_ROWS[0]}:{EVAL_ROWS[1]} or pass --force-overlap")
    out = Path(args.out or f"runs/eval_{args.model}")
    torch = _torch_on(args.device, args.threads)
    from zeropur_export.reference import ReferencePurifier
    from zeropur_rt.data import to_nchw_float
    from zeropur_rt.files import atomic_write_json, atomic_write_text

    victim, wpath, wsha = load_model(args.model, args.weights)
    victim = victim.to(args.device)
    xs, ys, data_path = load_labelled(args.data, rows)
    _check_labels(ys, victim.spec.num_classes)
    x = torch.from_numpy(to_nchw_float(xs)).to(args.device)
    y = torch.from_numpy(ys).to(args.device)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adv, cached = attacked_images(victim, x, y, rows, wsha, out / "pgd_cache.npz", args.batch, args.attack_steps,
                                  args.seed, args.progress)
    t_attack = time.perf_counter() - t0
    base_clean = 100 * float((predict(victim, x, args.batch) == ys).mean())
    base_pgd = 100 * float((predict(victim, adv, args.batch) == ys).mean())
    print(f"{args.model} rows {rows[0]}:{rows[1]}: clean {base_clean:.1f}%, PGD-{args.attack_steps} {base_pgd:.1f}% "
          f"(attack {t_attack:.0f} s{', cached' if cached else ''})", flush=True)
    results = []
    for name, cfg, crow in configs:
        pur = ReferencePurifier(victim, cfg, ap_mode="lean")
        ok = {"clean": 0, "pgd": 0}
        t1 = time.perf_counter()
        bar = _progress(2 * len(x), f"{Path(name).parent.name or name}", args.progress)
        for i in range(0, len(x), args.batch):
            for k, src in (("clean", x), ("pgd", adv)):
                xp = pur.purify(src[i:i + args.batch])
                ok[k] += int((pur.classify(xp).cpu().numpy() == ys[i:i + args.batch]).sum())
                bar.update(len(xp))
        bar.close()
        secs = time.perf_counter() - t1
        r = dict(config_name=name, label=cfg_label(cfg), config=cfg.to_dict(), calib_rows=list(crow) if crow else None,
                 clean=base_clean, clean_purified=100 * ok["clean"] / len(x), pgd=base_pgd,
                 pgd_purified=100 * ok["pgd"] / len(x), purify_seconds=secs, purify_s_per_image=secs / (2 * len(x)))
        results.append(r)
        print(f"  {name}: clean purified {r['clean_purified']:.1f}%, PGD purified {r['pgd_purified']:.1f}% ({secs:.0f} s)", flush=True)
    rep = dict(model=args.model, weights=wpath, weights_sha256=wsha, data=data_path, rows=list(rows), n=len(x), device=args.device,
               attack=dict(name="pgd_linf", eps_255=8, step_255=2, steps=args.attack_steps, random_start=True, seed=args.seed,
                           target="bare classifier"),
               attack_seconds=t_attack, results=results)
    md = [f"# ZeroPur evaluation: {args.model}, rows {rows[0]}:{rows[1]} ({len(x)} images)", "",
          f"PGD-Linf 8/255, step 2/255, {args.attack_steps} steps, random start, on the bare classifier (not adaptive).", "",
          "| config | recipe | clean | clean, purified | PGD-20 | PGD-20, purified | purify s/img |", "|---|---|---|---|---|---|---|"]
    for r in results:
        md.append(f"| {r['config_name']} | {r['label']} | {r['clean']:.1f}% | {r['clean_purified']:.1f}% | {r['pgd']:.1f}% | "
                  f"{r['pgd_purified']:.1f}% | {r['purify_s_per_image']:.4f} |")
    table = "\n".join(md[4:])
    atomic_write_json(out / "eval.json", rep)
    atomic_write_text(out / "eval.md", "\n".join(md) + "\n")
    print(table)
    print(f"wrote {out}/eval.md, eval.json")
    return 0


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if argv and argv[0] == "eval":
            return evaluate(argv[1:])
        return calibrate(argv)
    except CalibError as e:
        prog = "zeropur-rt calibrate" + (" eval" if argv and argv[0] == "eval" else "")
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
