"""The one progress bar of every command: tqdm on stderr, gone when done, silent for a single item."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm import tqdm


def progress(items: Iterable[Any] | None = None, desc: str = "", total: int | None = None,
             enabled: bool = True, unit: str = "it") -> tqdm:
    """``tqdm(items)`` with our defaults; with ``items=None`` a manual bar (``.update(k)``) of ``total`` units."""
    if total is None and items is not None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True, unit=unit, unit_scale=unit == "B",
                disable=not enabled or (total is not None and total < 2))
