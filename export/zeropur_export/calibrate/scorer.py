"""The search's scorer: purified accuracy of many configs on the first n calibration rows.

Two things make a search of dozens of configs affordable:

* Guided Shift is shared. Configs that differ only in the GS step count or in their AP knobs walk one
  GS trajectory, so it runs once per (sigma, eps, GS step, momentum, L1 scope) and keeps a snapshot at
  every step count asked for; AP variants start from a cached snapshot.
* Results are incremental. Each config keeps its per-row outcomes, so promoting it to more rows
  purifies only the new rows.

The purification itself is the one ZeroPur loop (``zeropur_rt.schedule``) through ``ReferencePurifier``:
its GS iterates are the snapshots, its ``project`` the AP from a snapshot.

The rows come in blocks: the clean images, then each attack's images crafted on the bare classifier
(PGD always; APGD-CE and APGD-DLR for the worst-case objective), all purified alike. A short
BPDA-PGD through each config's own purifier (``bpda_steps`` > 0) is the one config-dependent attack.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from zeropur_export.attacks.pgd import pgd_linf
from zeropur_export.reference.purifier import ReferencePurifier
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.progress import progress as progress_bar

from .common import ATTACK, cfg_key, predict


def gs_key(cfg: ZeroPurConfig) -> tuple:
    """The knobs that fix a GS trajectory; configs equal in these share their snapshots."""
    return (cfg.blur_sigma, cfg.eps, cfg.gs_step, cfg.momentum, cfg.l1_scope)


OBJECTIVES = ("pgd", "worst")
WORST_OF = ("apgd-ce", "apgd-dlr", "bpda")  # the worst-case objective: robust only if robust against all three


@dataclass
class Record:
    cfg: ZeroPurConfig
    stage: str
    n: int = 0
    ok: dict[str, np.ndarray] = field(default_factory=dict)  # block ("clean", "pgd", ...) -> purified correct, per row
    seconds: float = 0.0
    stages: list[str] = field(default_factory=list)

    @property
    def ok_clean(self) -> np.ndarray:
        return self.ok.get("clean", np.zeros(0, bool))

    @property
    def ok_adv(self) -> np.ndarray:
        return self.ok.get("pgd", np.zeros(0, bool))


class ConfigScorer:
    """Purified accuracy of configs on the first n calibration rows, with GS outputs and results reused.
    ``x_adv``: the PGD images, or a dict of attack name -> images ("pgd" among them)."""

    def __init__(self, victim: Any, x_clean: torch.Tensor, x_adv: torch.Tensor | Mapping[str, torch.Tensor], y: Any,
                 batch: int = 100, progress: bool = True, objective: str = "pgd", bpda_steps: int = 0,
                 seed: int = 0, first_row: int = 0):
        self.victim, self.batch, self.progress = victim, batch, progress
        blocks = {"clean": x_clean, **({"pgd": x_adv} if isinstance(x_adv, torch.Tensor) else dict(x_adv))}
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "worst" and (bpda_steps < 1 or not {"apgd-ce", "apgd-dlr"} <= set(blocks)):
            raise ValueError("the worst-case objective needs APGD-CE and APGD-DLR images and bpda_steps >= 1")
        self.objective, self.bpda_steps, self.seed, self.first_row = objective, bpda_steps, seed, first_row
        self.names = list(blocks)
        self.x = torch.cat(list(blocks.values()))  # block after block, N rows each
        self.N = len(x_clean)
        self.y = np.asarray(y)
        self.base = {k: predict(victim, v, batch) == self.y for k, v in blocks.items()}
        self.base_clean, self.base_adv = self.base["clean"], self.base["pgd"]
        # gs key -> {step count: host array (blocks * rows held, C, H, W), block after block}
        self.gs: dict[tuple, dict[int, np.ndarray]] = {}
        self.gs_n: dict[tuple, dict[int, int]] = {}  # gs key -> {step count: rows held}
        self.records: dict[str, Record] = {}

    def _rows(self, lo: int, hi: int) -> list[int]:
        """Indices into self.x of calibration rows lo:hi, in every block."""
        return [b * self.N + i for b in range(len(self.names)) for i in range(lo, hi)]

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
            _, it = pur.purify_with_iterates(self.x[idx[i:i + self.batch]])
            after = [*it.gs_x, it.coarse]  # after[t]: the iterate after t GS steps (gs_x[t] is step t's input)
            for s in need:
                new[s].append(after[s])
            bar.update(len(it.coarse) * max(top, 1))
        h, nb = n - lo, len(self.names)
        for s in need:
            got = np.concatenate(new[s])  # rows lo:n, block after block
            skip = have.get(s, 0) - lo  # rows already held for this snapshot
            fresh = [got[b * h:(b + 1) * h][skip:] for b in range(nb)]
            old, n_old = store.get(s), have.get(s, 0)
            held = [old[b * n_old:(b + 1) * n_old] for b in range(nb)] if old is not None else [got[:0]] * nb
            store[s] = np.concatenate([part for b in range(nb) for part in (held[b], fresh[b])])
            have[s] = n

    def coarse(self, cfg: ZeroPurConfig, lo: int, hi: int) -> np.ndarray:
        """The GS output of ``cfg`` for calibration rows lo:hi, block after block."""
        t = self.gs[gs_key(cfg)][cfg.gs_steps]
        n = self.gs_n[gs_key(cfg)][cfg.gs_steps]
        return np.concatenate([t[b * n + lo:b * n + hi] for b in range(len(self.names))])

    def _work(self, groups: dict[tuple, list[Record]], n: int) -> int:
        """Image-steps the call will purify: the progress bar's units."""
        total = 0
        for k, rs in groups.items():
            have = self.gs_n.get(k, {})
            need = [r.cfg.gs_steps for r in rs if have.get(r.cfg.gs_steps, 0) < n]
            if need:
                lo = min(min(have.get(s, 0) for s in need), min(r.n for r in rs))
                total += len(self.names) * (n - lo) * max(max(need), 1)
            total += sum(len(self.names) * (n - r.n) * r.cfg.ap_steps for r in rs)
            total += sum(self.bpda_steps * (n - r.n) * (r.cfg.gs_steps + r.cfg.ap_steps) for r in rs)
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
        for b, name in enumerate(self.names):
            r.ok[name] = np.concatenate([r.ok.get(name, np.zeros(0, bool)), pred[b * h:(b + 1) * h] == self.y[lo:n]])
        if self.bpda_steps:
            r.ok["bpda"] = np.concatenate([r.ok.get("bpda", np.zeros(0, bool)), self._bpda(r.cfg, lo, n, bar)])
        r.n = n

    def _bpda(self, cfg: ZeroPurConfig, lo: int, n: int, bar: Any) -> np.ndarray:
        """Purified correct, per clean row lo:n, after a short BPDA-PGD through ``cfg``'s own purifier."""
        from zeropur_export.attacks.adaptive import BPDAModel
        pur = ReferencePurifier(self.victim, cfg)
        model = BPDAModel(self.victim, lambda a: pur.purify(torch.from_numpy(a)).cpu().numpy())
        ok = []
        for i in range(lo, n, self.batch):
            j = min(n, i + self.batch)
            yt = torch.from_numpy(self.y[i:j]).to(self.x.device)
            adv = pgd_linf(model, self.x[i:j], yt, eps=ATTACK["eps"], step=ATTACK["step"], steps=self.bpda_steps,
                           seed=self.seed + self.first_row + i)
            ok.append(pur.classify(pur.purify(adv)).cpu().numpy() == self.y[i:j])
            bar.update((j - i) * self.bpda_steps * (cfg.gs_steps + cfg.ap_steps))
        return np.concatenate(ok)

    def stats(self, r: Record) -> dict[str, float]:
        """Accuracies (percent) of a record on its own n rows, and the unpurified references on the same rows.
        ``robust`` / ``robust_base`` are the objective's: PGD, or the worst case over APGD-CE, APGD-DLR and BPDA
        (whose unpurified reference is the bare classifier's worst case over the two APGD runs)."""
        n = r.n
        s = dict(n=n, clean=100 * float(self.base_clean[:n].mean()), pgd=100 * float(self.base_adv[:n].mean()),
                 clean_purified=100 * float(r.ok_clean.mean()), pgd_purified=100 * float(r.ok_adv.mean()),
                 seconds=r.seconds)
        s["robust"], s["robust_base"] = s["pgd_purified"], s["pgd"]
        if self.objective == "worst":
            s["worst"] = 100 * float(np.all([self.base[k][:n] for k in WORST_OF[:2]], 0).mean())
            s["worst_purified"] = 100 * float(np.all([r.ok[k] for k in WORST_OF], 0).mean())
            s["robust"], s["robust_base"] = s["worst_purified"], s["worst"]
        return s
