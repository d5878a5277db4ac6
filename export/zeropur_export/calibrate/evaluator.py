"""The search's evaluator: purified accuracy of many configs on the first n calibration rows.

Two things make a search of dozens of configs affordable:

* Guided Shift is shared. Configs that differ only in the GS step count or in their AP knobs walk one
  GS trajectory, so it runs once per (sigma, eps, GS step, momentum, L1 scope) and keeps a snapshot at
  every step count asked for; AP variants start from a cached snapshot.
* Results are incremental. Each config keeps its per-row outcomes, so promoting it to more rows
  purifies only the new rows.

The purification itself is the one ZeroPur loop (``zeropur_rt.schedule``) through ``ReferencePurifier``:
its GS iterates are the snapshots, its ``project`` the AP from a snapshot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from zeropur_export.reference import ReferencePurifier
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.progress import progress as progress_bar

from .common import cfg_key, predict


def gs_key(cfg: ZeroPurConfig) -> tuple:
    """The knobs that fix a GS trajectory; configs equal in these share their snapshots."""
    return (cfg.blur_sigma, cfg.eps, cfg.gs_step, cfg.momentum, cfg.l1_scope)


@dataclass
class Record:
    cfg: ZeroPurConfig
    stage: str
    n: int = 0
    ok_clean: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # purified clean correct, per row
    ok_adv: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # purified PGD correct, per row
    seconds: float = 0.0
    stages: list[str] = field(default_factory=list)


class Evaluator:
    """Purified accuracy of configs on the first n calibration rows, with GS outputs and results reused."""

    def __init__(self, victim: Any, x_clean: torch.Tensor, x_adv: torch.Tensor, y: Any, batch: int = 100,
                 progress: bool = True):
        self.victim, self.batch, self.progress = victim, batch, progress
        self.x = torch.cat([x_clean, x_adv])  # clean rows then adversarial rows
        self.N = len(x_clean)
        self.y = np.asarray(y)
        self.base_clean = predict(victim, x_clean, batch) == self.y
        self.base_adv = predict(victim, x_adv, batch) == self.y
        # gs key -> {step count: host array (2 * rows held, C, H, W), the clean block then the adversarial block}
        self.gs: dict[tuple, dict[int, np.ndarray]] = {}
        self.gs_n: dict[tuple, dict[int, int]] = {}  # gs key -> {step count: rows held}
        self.records: dict[str, Record] = {}

    def _rows(self, lo: int, hi: int) -> list[int]:
        """Indices into self.x of calibration rows lo:hi, clean and adversarial."""
        return list(range(lo, hi)) + list(range(self.N + lo, self.N + hi))

    def _ensure_gs(self, cfg: ZeroPurConfig, steps_set: set[int], n: int, bar: Any) -> None:
        """GS snapshots after each step count of ``steps_set`` for rows 0:n, from one run of the loop."""
        k = gs_key(cfg)
        have = self.gs_n.setdefault(k, {})
        store = self.gs.setdefault(k, {})
        need = {s for s in steps_set if have.get(s, 0) < n}
        if not need:
            return
        lo = min(have.get(s, 0) for s in need)
        top = max(need)
        pur = ReferencePurifier(self.victim, cfg.replace(gs_steps=top, ap_steps=0))
        idx = self._rows(lo, n)
        new: dict[int, list[np.ndarray]] = {s: [] for s in need}
        for i in range(0, len(idx), self.batch):
            _, it = pur.purify(self.x[idx[i:i + self.batch]], iterates=True)
            after = [*it.gs_x, it.coarse]  # after[t]: the iterate after t GS steps (gs_x[t] is step t's input)
            for s in need:
                new[s].append(after[s])
            bar.update(len(it.coarse) * max(top, 1))
        h = n - lo
        for s in need:
            got = np.concatenate(new[s])  # rows lo:n, the clean block then the adversarial block
            c_new, a_new = got[:h], got[h:]
            skip = have.get(s, 0) - lo  # rows already held for this snapshot
            old = store.get(s)
            if old is None:
                store[s] = np.concatenate([c_new[skip:], a_new[skip:]])
            else:
                n_old = have[s]
                store[s] = np.concatenate([old[:n_old], c_new[skip:], old[n_old:], a_new[skip:]])
            have[s] = n

    def coarse(self, cfg: ZeroPurConfig, lo: int, hi: int) -> np.ndarray:
        """The GS output of ``cfg`` for calibration rows lo:hi: the clean block then the adversarial block."""
        t = self.gs[gs_key(cfg)][cfg.gs_steps]
        n = self.gs_n[gs_key(cfg)][cfg.gs_steps]
        return np.concatenate([t[lo:hi], t[n + lo:n + hi]])

    def _work(self, groups: dict[tuple, list[Record]], n: int) -> int:
        """Image-steps the call will purify: the progress bar's units."""
        total = 0
        for k, rs in groups.items():
            have = self.gs_n.get(k, {})
            need = [r.cfg.gs_steps for r in rs if have.get(r.cfg.gs_steps, 0) < n]
            if need:
                lo = min(min(have.get(s, 0) for s in need), min(r.n for r in rs))
                total += 2 * (n - lo) * max(max(need), 1)
            total += sum(2 * (n - r.n) * r.cfg.ap_steps for r in rs)
        return total

    def evaluate(self, cfgs: Iterable[ZeroPurConfig], n: int, stage: str) -> list[Record]:
        """Bring every config to n rows (only new rows are purified); GS shared within a call."""
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
        groups: dict[tuple, list[Record]] = {}
        for r in todo:
            groups.setdefault(gs_key(r.cfg), []).append(r)
        bar = progress_bar(desc=f"{stage} ({len(todo)} cfg, n={n})", total=max(self._work(groups, n), 1),
                           enabled=self.progress)
        for rs in groups.values():
            t0 = time.perf_counter()
            self._ensure_gs(rs[0].cfg, {r.cfg.gs_steps for r in rs}, n, bar)
            gs_share = (time.perf_counter() - t0) / len(rs)
            for r in rs:
                t1 = time.perf_counter()
                self._extend(r, n, bar)
                r.seconds += gs_share + time.perf_counter() - t1
                bar.set_postfix_str(f"last: clean {100 * r.ok_clean.mean():.1f} rob {100 * r.ok_adv.mean():.1f}")
        bar.close()
        return recs

    def _extend(self, r: Record, n: int, bar: Any) -> None:
        """Purify and classify rows r.n:n of ``r``'s config, from its cached GS output."""
        lo, h = r.n, n - r.n
        coarse = self.coarse(r.cfg, lo, n)
        if r.cfg.ap_steps == 0:
            out = torch.from_numpy(coarse).to(self.x.device)
        else:
            x_in = self.x[self._rows(lo, n)]
            pur = ReferencePurifier(self.victim, r.cfg)
            parts = []
            for i in range(0, len(x_in), self.batch):
                parts.append(pur.project(x_in[i:i + self.batch], coarse[i:i + self.batch]))
                bar.update(len(parts[-1]) * r.cfg.ap_steps)
            out = torch.cat(parts)
        pred = predict(self.victim, out, self.batch)
        r.ok_clean = np.concatenate([r.ok_clean, pred[:h] == self.y[lo:n]])
        r.ok_adv = np.concatenate([r.ok_adv, pred[h:] == self.y[lo:n]])
        r.n = n

    def stats(self, r: Record) -> dict[str, float]:
        """Accuracies (percent) of a record on its own n rows, and the unpurified references on the same rows."""
        n = r.n
        return dict(n=n, clean=100 * float(self.base_clean[:n].mean()), pgd=100 * float(self.base_adv[:n].mean()),
                    clean_purified=100 * float(r.ok_clean.mean()), pgd_purified=100 * float(r.ok_adv.mean()),
                    seconds=r.seconds)
