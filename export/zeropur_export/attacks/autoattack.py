"""AutoAttack's standard version (Croce & Hein, ICML 2020), written from the papers, on a bare classifier.

Why not ART's: ART 1.20's APGD returns its final iterate (and only where that one fools the model), and
its Square queries three times per iteration with one window for the whole batch. AutoAttack's semantics,
which the published figures rest on, are:

* APGD overwrites its output at *every* iterate the model misclassifies, so it returns the last
  misclassified iterate (a strong perturbation, not a minimal one); an image never fooled comes back clean;
* the attacks run in sequence, each on the images every earlier one left robust (the clean image first);
* standard budgets: APGD-CE 100 iterations, one run; APGD-T 100 iterations against each of the 9 runner-up
  classes of the clean logits, one run each; FAB-T (not here: no maintained library installed with this
  project implements it, see ``FAB_T``); Square 5000 queries, p_init 0.8, margin loss.

The model is a torch module from [0, 1] images to logits. ``square_linf`` also serves the query attacks
(``zeropur_export.attacks.query``), which hand it the deployed purifier's logits instead.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zeropur_export.attacks.pgd import stable_cross_entropy

STANDARD = ("apgd-ce", "apgd-t", "square")
FAB_T = ("FAB-T, AutoAttack's third standard attack, is left out: neither ART 1.20 nor any other maintained "
         "library installed with this project implements it")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (untargeted), per image."""
    s, _ = logits.sort(1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    top_other = torch.where(s[:, -1] == z_y, s[:, -2], s[:, -1])
    return -(z_y - top_other) / (s[:, -1] - s[:, -3] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """APGD-T's loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), per image."""
    s, _ = logits.sort(1)
    z_y, z_t = logits.gather(1, y[:, None])[:, 0], logits.gather(1, t[:, None])[:, 0]
    return -(z_y - z_t) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)


def _checkpoints(iters: int) -> list[int]:
    """APGD's step-size checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * iters) for v in p if 0 < v <= 1})


def _project(v: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(v, x - eps), x + eps).clamp(0, 1)


@dataclass
class APGDTrace:
    """What a test needs to check the semantics: every iterate and whether the model misclassified it."""
    iterates: list[torch.Tensor] = field(default_factory=list)
    fooled: list[torch.Tensor] = field(default_factory=list)


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, iters: int = 100, loss: str = "ce",
         target: torch.Tensor | None = None, rho: float = 0.75, alpha: float = 0.75,
         trace: APGDTrace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run (L-inf, initial step 2 eps, one random start drawn from torch's global generator).

    Returns (adv, fooled): adv is the last iterate the model misclassified where there was one, else the clean
    image. ``loss``: "ce", "stable-ce" (softplus of the log-sum-exp margin: CE's value, but no float32
    saturation to 0), "dlr", or "dlr-targeted" with ``target``.
    """
    def losses(z: torch.Tensor) -> torch.Tensor:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        if loss == "stable-ce":
            return stable_cross_entropy(z, y, reduction="none")
        if loss == "dlr":
            return dlr(z, y)
        if loss == "dlr-targeted" and target is not None:
            return dlr_targeted(z, y, target)
        raise ValueError(f"unknown APGD loss {loss!r} (or dlr-targeted without a target)")

    def evaluate(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(v)
            f = losses(z)
            (g,) = torch.autograd.grad(f.sum(), v)
        wrong = z.detach().argmax(1) != y
        if trace is not None:
            trace.iterates.append(v.detach().clone())
            trace.fooled.append(wrong.clone())
        return f.detach(), g.detach(), wrong

    x = x.detach()
    view = (-1,) + (1,) * (x.dim() - 1)
    t = torch.rand(x.shape, dtype=x.dtype) * 2 - 1
    x_k = (x + eps * t / t.abs().flatten(1).max(1).values.clamp_min(1e-12).view(view)).clamp(0, 1)
    f_k, g_k, wrong = evaluate(x_k)
    adv, fooled = x.clone(), wrong.clone()
    adv[wrong] = x_k[wrong]
    f_max, x_max, g_max = f_k.clone(), x_k.clone(), g_k.clone()
    eta = torch.full((len(x),) + view[1:], 2 * eps, dtype=x.dtype)
    x_prev = x_k.clone()
    checks, last_check = _checkpoints(iters), 0
    increases = torch.zeros(len(x))
    eta_at_check, f_max_at_check = eta.clone(), f_max.clone()
    for k in range(iters):
        z = _project(x_k + eta * g_k.sign(), x, eps)
        a = alpha if k > 0 else 1.0  # the first step has no momentum (x_1 = z_1)
        x_new = _project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, eps)
        f_new, g_new, wrong = evaluate(x_new)
        adv[wrong] = x_new[wrong]  # AutoAttack: the last misclassified iterate, overwritten every time
        fooled |= wrong
        increases += (f_new > f_k).float()
        better = f_new > f_max
        f_max[better], x_max[better], g_max[better] = f_new[better], x_new[better], g_new[better]
        x_prev, x_k, f_k, g_k = x_k, x_new, f_new, g_new
        if k + 1 in checks:
            # Halve the step where too few steps raised the loss since the last checkpoint (condition 1),
            # or where neither the step nor the best loss changed over that span (condition 2); restart there
            # from the best point.
            span = k + 1 - last_check
            halve = (increases < rho * span) | ((eta_at_check == eta).flatten(1).all(1) & (f_max_at_check == f_max))
            eta_at_check, f_max_at_check = eta.clone(), f_max.clone()
            eta[halve] /= 2
            x_k[halve], g_k[halve], f_k[halve], x_prev[halve] = x_max[halve], g_max[halve], f_max[halve], x_max[halve]
            increases.zero_()
            last_check = k + 1
    return adv, fooled


_P_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, it: int) -> float:
    """Square's share of pixels changed at iteration ``it``, halved at 10, 50, 200, ... (no rescaling: AutoAttack)."""
    return p_init / 2 ** bisect.bisect_left(_P_STEPS, it)


def square_linf(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, eps: float,
                queries: int = 5000, p_init: float = 0.8, seed: int = 0,
                on_query: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Square Attack (Andriushchenko et al. 2020), L-inf, margin loss, on a score oracle ``logits_of``.

    Query 1 is the stripes initialisation, query q the (q-1)-th square; an image leaves the attack at the
    first query the oracle labels it wrong. Returns (best images, query of success or -1 per image).
    ``on_query(k)`` is called with the images each oracle call held (for progress bars).
    """
    rng = np.random.default_rng(seed)
    n, c, h, w = x.shape
    x = x.astype(np.float32)
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)

    def ask(v: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(logits_of(v), dtype=np.float64)
        if on_query:
            on_query(len(v))
        rows = np.arange(len(v))
        z_y = z[rows, yy]
        other = z.copy()
        other[rows, yy] = -np.inf
        return z_y - other.max(1), z.argmax(1) != yy

    best = np.clip(x + eps * rng.choice([-1.0, 1.0], size=(n, c, 1, w)), lo, hi).astype(np.float32)
    margin, wrong = ask(best, y)
    success = np.where(wrong, 1, -1)
    for it in range(1, queries):
        act = np.flatnonzero(success < 0)
        if not len(act):
            break
        s = min(max(int(round(math.sqrt(square_fraction(p_init, it) * h * w))), 1), h - 1)
        vh, vw = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        cur = best[act][win]
        x_win, lo_w, hi_w = x[act][win], lo[act][win], hi[act][win]
        new = np.clip(x_win + eps * rng.choice([-1.0, 1.0], size=(len(act), c, 1, 1)), lo_w, hi_w)
        for _ in range(10):  # a square that changes nothing is drawn again (the paper's resampling)
            same = np.all(np.abs(new - cur) < 1e-7, axis=(1, 2, 3))
            if not same.any():
                break
            new[same] = np.clip(x_win[same] + eps * rng.choice([-1.0, 1.0], size=(int(same.sum()), c, 1, 1)),
                                lo_w[same], hi_w[same])
        cand = best[act].copy()
        cand[win] = new
        m_new, wrong = ask(cand.astype(np.float32), y[act])
        better = m_new < margin[act]
        best[act[better]] = cand[better]
        margin[act[better]] = m_new[better]
        success[act[wrong]] = it + 1
    return best, success


def targets_by_clean_logits(logits: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """APGD-T's targets: the runners-up of the clean logits, best first, ``k`` per image (the label excluded)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    return np.array([[c for c in r if c != t][:k] for r, t in zip(order, y)])


@dataclass
class Stage:
    attack: str
    attacked: int
    broken: int


def standard(model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, iters: int = 100, targets: int = 9,
             queries: int = 5000, seed: int = 0, ce: str = "ce") -> tuple[np.ndarray, list[Stage]]:
    """AutoAttack standard on ``model`` (eval mode, [0, 1] images): the clean check, then APGD-CE, APGD-T and
    Square, each on the images still robust. Returns the adversarial images (clean where nothing fooled the
    model, or the model got the clean image wrong) and each stage's counts. Each attack reseeds torch's and
    its own generator with ``seed``, as AutoAttack does with its ``seed``."""
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y.astype(np.int64))
    with torch.no_grad():
        clean_logits = model(xt)
    robust = (clean_logits.argmax(1) == yt).numpy()
    adv = x.copy()
    stages = []
    for name in STANDARD:
        idx = np.flatnonzero(robust)
        before = len(idx)
        if name == "apgd-ce" and len(idx):
            torch.manual_seed(seed)
            a, fooled = apgd(model, xt[idx], yt[idx], eps, iters, loss=ce)
            hit = idx[fooled.numpy()]
            adv[hit], robust[hit] = a[fooled].numpy(), False
        elif name == "apgd-t" and len(idx):
            tg = targets_by_clean_logits(clean_logits.numpy(), y, min(targets, clean_logits.shape[1] - 1))
            for j in range(tg.shape[1]):
                idx = np.flatnonzero(robust)
                if not len(idx):
                    break
                torch.manual_seed(seed)
                a, fooled = apgd(model, xt[idx], yt[idx], eps, iters, loss="dlr-targeted",
                                 target=torch.from_numpy(tg[idx, j]))
                hit = idx[fooled.numpy()]
                adv[hit], robust[hit] = a[fooled].numpy(), False
        elif name == "square" and len(idx):
            def logits_of(v: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return model(torch.from_numpy(v)).numpy()
            a, q = square_linf(logits_of, x[idx], y[idx], eps, queries, seed=seed)
            hit = idx[q > 0]
            adv[hit], robust[hit] = a[q > 0], False
        stages.append(Stage(name, before, before - int(robust.sum())))
    return adv, stages
