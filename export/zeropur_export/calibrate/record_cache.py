"""The search's per-config outcomes kept on disk, so a rerun with another budget or threshold takes seconds.

Each record holds, per config, which calibration rows came out right after purification. They depend only on
the victim, the images (clean and attacked), the labels and the objective's own attack settings, never on the
budget: a rerun that changes ``--max-clean-drop`` or ``--min-robust-gain`` re-ranks the same records. The file
is keyed by a fingerprint of all of those; a cache with another fingerprint is ignored and overwritten.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.files import atomic_write_json, read_json_object

from .common import CalibError, cfg_key
from .scorer import ConfigScorer, Record

FORMAT = 1


def fingerprint(ev: ConfigScorer) -> str:
    """What the records depend on: victim parameters, every image block, labels, objective settings."""
    h = hashlib.sha256()
    for t in list(ev.victim.parameters()) + list(ev.victim.buffers()):
        h.update(t.detach().cpu().numpy().tobytes())
    h.update(ev.x.detach().cpu().numpy().tobytes())
    h.update(np.asarray(ev.y, dtype=np.int64).tobytes())
    h.update(repr((ev.names, ev.objective, ev.bpda_steps, ev.seed, ev.first_row)).encode())
    return h.hexdigest()


def save_records(ev: ConfigScorer, path: Path) -> None:
    recs = [dict(config=r.cfg.to_dict(), stage=r.stage, n=r.n, seconds=r.seconds, stages=r.stages,
                 ok={k: "".join("1" if v else "0" for v in a) for k, a in r.ok.items()}) for r in ev.records.values()]
    atomic_write_json(path, dict(format=FORMAT, fingerprint=fingerprint(ev), records=recs))


def load_records(ev: ConfigScorer, path: Path) -> int:
    """Records of an earlier run on the same inputs into ``ev``; how many (0 for a missing or foreign cache)."""
    if not path.is_file():
        return 0
    raw: dict[str, Any] = read_json_object(path, CalibError, "evaluation cache", f"delete {path} to start afresh")
    if raw.get("format") != FORMAT or raw.get("fingerprint") != fingerprint(ev):
        return 0
    for d in raw["records"]:
        cfg = ZeroPurConfig.from_dict(d["config"])
        ok = {k: np.frombuffer(v.encode(), np.uint8) == ord("1") for k, v in d["ok"].items()}
        ev.records[cfg_key(cfg)] = Record(cfg, d["stage"], int(d["n"]), ok, float(d["seconds"]), list(d["stages"]))
    return len(raw["records"])
