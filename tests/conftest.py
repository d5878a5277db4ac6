"""Shared fixtures: real data and weights from the shared folder, skipped with a reason when absent.

Deploy-safe: only numpy and ``zeropur_rt`` at import (``tests/rt`` runs in an install without torch); the build
side is imported inside the fixtures that export, and ``$ZEROPUR_TEST_ART20`` spares even those.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from zeropur_rt import sources


@pytest.fixture(autouse=True)
def _zeropur_environment_unchanged():
    """A test that leaves a ``ZEROPUR_*`` variable changed (``--download`` sets one for the rest of the process)
    breaks whatever test its worker runs next, and that order differs from run to run under pytest-xdist: the
    test that leaked fails here instead, by name. Runs after monkeypatch's undo."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ZEROPUR_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("ZEROPUR_")}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"this test left {changed} changed in os.environ: set them through monkeypatch"


def cifar10_test_path() -> Path:
    return sources.shared_dir() / "data" / sources.CIFAR10_NPZ


def _need(path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set ZEROPUR_SHARED to the shared folder)")


@pytest.fixture(scope="session")
def cifar_uint8():
    """Rows 0..999 of the CIFAR-10 test copy as stored: (uint8 NHWC, int64 labels)."""
    _need(cifar10_test_path(), "CIFAR-10 test data")
    with np.load(cifar10_test_path()) as z:
        return z["x"][:1000], z["y"][:1000].astype(np.int64)


@pytest.fixture(scope="session")
def cifar(cifar_uint8):
    """The same rows as (float32 NCHW in [0,1], int64 labels), the runtime's input form."""
    x, y = cifar_uint8
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255), y


@pytest.fixture(scope="session")
def victim20():
    torch = pytest.importorskip("torch")
    _need(sources.shared_dir() / "models" / "resnet20-12fca82f.th", "ResNet-20 weights")
    from zeropur_export.victims.zoo import load_victim
    torch.set_num_threads(2)
    return load_victim("resnet20")


@pytest.fixture(scope="session")
def victim56():
    pytest.importorskip("torch")
    _need(sources.shared_dir() / "models" / "resnet56-4bfd9763.th", "ResNet-56 weights")
    from zeropur_export.victims.zoo import load_victim
    return load_victim("resnet56")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="session")
def art20(tmp_path_factory, request):
    """ResNet-20 (real weights, paper recipe) exported once per test session.

    ``$ZEROPUR_TEST_ART20`` names an already exported ResNet-20 directory instead (a GPU box
    whose torch build is not the one the exporter is tested with); its manifest is verified.
    """
    if os.environ.get("ZEROPUR_TEST_ART20"):
        from zeropur_rt.manifest import load_manifest
        d = Path(os.environ["ZEROPUR_TEST_ART20"])
        if load_manifest(d).model != "resnet20":
            raise ValueError(f"$ZEROPUR_TEST_ART20={d} is not a resnet20 artifact directory")
        return d
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_export.victims.weights import find_weights
    from zeropur_rt.config import preset
    from zeropur_rt.files import sha256_file
    victim20 = request.getfixturevalue("victim20")  # torch, only where the artifact is exported here
    out = tmp_path_factory.mktemp("artifacts") / "resnet20"
    return export_artifacts(victim20, preset("cifar10"), out, model="resnet20",
                            weights_sha256=sha256_file(find_weights("resnet20")), batch=(1, 32, 64))
