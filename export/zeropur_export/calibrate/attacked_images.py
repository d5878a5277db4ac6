"""The attacks the search defends against, on the bare classifier: PGD-Linf 8/255 (cached on disk by
content), and for the worst-case objective APGD-CE and APGD-DLR (ART, AutoAttack's settings)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeropur_export.attacks.pgd import pgd_linf
from zeropur_rt.files import atomic_write_bytes
from zeropur_rt.progress import progress as progress_bar

from .common import ATTACK


def _fingerprint(victim: Any, x: torch.Tensor, y: np.ndarray) -> str:
    """sha256 of the weights, images and labels: the cache must not outlive any of them."""
    h = hashlib.sha256()
    for name, t in sorted(victim.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()


def attacked_images(victim: Any, x: torch.Tensor, y: np.ndarray, *, steps: int = ATTACK["steps"], seed: int = 0,
                    first_row: int = 0, batch: int = 100, cache: Path | None = None,
                    progress: bool = True) -> tuple[torch.Tensor, bool]:
    """(adversarial images, whether they came from ``cache``). The random start of the batch at ``x[i]`` is
    seeded with ``seed + first_row + i``, so a slice of a data set is attacked as it is in the whole set."""
    key = json.dumps(dict(model=victim.name, content_sha256=_fingerprint(victim, x, y), first_row=first_row, seed=seed,
                          device=x.device.type, **{**ATTACK, "steps": steps}), sort_keys=True)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["key"]) == key and z["adv"].shape == tuple(x.shape):
                    return torch.from_numpy(z["adv"]).to(x.device), True
        except Exception:  # noqa: BLE001 - a bad cache is just recomputed
            pass
    yt = torch.from_numpy(y).to(x.device)
    out = []
    bar = progress_bar(desc=f"PGD-{steps}", total=len(x), enabled=progress)
    for i in range(0, len(x), batch):
        out.append(pgd_linf(victim, x[i:i + batch], yt[i:i + batch], eps=ATTACK["eps"], step=ATTACK["step"],
                            steps=steps, random_start=ATTACK["random_start"], seed=seed + first_row + i))
        bar.update(len(out[-1]))
    bar.close()
    adv = torch.cat(out)
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, adv=adv.cpu().numpy(), key=np.array(key))
        atomic_write_bytes(cache, buf.getvalue())
    return adv, False


def apgd_images(victim: Any, x: torch.Tensor, y: np.ndarray, loss: str, *, iters: int = 100, seed: int = 0,
                first_row: int = 0, batch: int = 100, progress: bool = True) -> torch.Tensor:
    """APGD (``loss``: "apgd-ce" or "apgd-dlr") images against the bare ``victim``, seeded per batch as PGD is."""
    from zeropur_export.attacks.art_bridge import art_classifier
    from zeropur_export.attacks.suite import apgd
    clf = art_classifier(victim, victim.spec.num_classes, tuple(victim.spec.input_shape),
                         device="gpu" if x.device.type == "cuda" else "cpu")
    att = apgd(clf, ATTACK["eps"], iters, batch, "cross_entropy" if loss == "apgd-ce" else "difference_logits_ratio")
    out = []
    bar = progress_bar(desc=f"{loss.upper()}-{iters}", total=len(x), enabled=progress)
    for i in range(0, len(x), batch):
        np.random.seed(seed + first_row + i)  # ART's random start draws from numpy's global generator
        out.append(torch.from_numpy(att.generate(x[i:i + batch].cpu().numpy(), y[i:i + batch])).to(x.device))
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out)
