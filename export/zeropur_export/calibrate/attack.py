"""The attack the search defends against: PGD-Linf 8/255 on the bare classifier, cached on disk by content."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeropur_export.attacks import pgd_linf
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
