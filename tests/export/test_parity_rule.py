"""The graph-parity rule (zeropur_export.graphs.parity.ParityRow.ok) must fail on a wrong sample and pass on float32 noise.

Every export, fold, fast-runner and runtime parity test inherits this rule, so what it lets through they all let
through. A sample whose gradient is zeroed (a lowering that drops a batch row, a runner that misses one output
slice) or a NaN is garbage, not a float32 ReLU flip: the rule's outliers are bounded in number (torch's second
float32 order's flips plus one) and in size (that order's worst flip), and a NaN/Inf fails a row outright.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_export.graphs.parity import OrtGraphs, ParityRow, format_table, parity, parity_row  # noqa: E402


class Corrupted:
    """An artifact's graphs with one output corrupted: ``rows`` of ``graph``'s first output set to ``value``."""

    def __init__(self, graphs: OrtGraphs, graph: str, rows: list[int], value: float):
        self.graphs, self.graph, self.rows, self.value = graphs, graph, rows, value
        self.sessions = graphs.sessions

    def run(self, name, inputs):
        outs = self.graphs.run(name, inputs)
        if name == self.graph:
            outs[0] = np.array(outs[0], copy=True)
            outs[0][self.rows] = self.value
        return outs


@pytest.fixture(scope="module")
def ort20(art20):
    return OrtGraphs(art20)


def _rows(victim20, ort20, cifar, n: int, graphs=None) -> list[ParityRow]:
    from zeropur_rt.config import preset
    return parity(victim20, preset("cifar10"), graphs or ort20, torch.from_numpy(cifar[0][:n]), "cifar10", seed=n)


@pytest.mark.parametrize("n", [8, 16, 32])
def test_todays_export_passes_and_a_zeroed_sample_fails(victim20, ort20, cifar, n):
    """ResNet-20's exported graphs pass at batch n; with one sample's gradient zeroed (gs_grad, then ap_grad),
    the rows of that output fail, whatever batch hides it."""
    rows = _rows(victim20, ort20, cifar, n)
    print("\n" + format_table(rows))
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])
    for graph in ("gs_grad", "ap_grad"):
        bad = _rows(victim20, ort20, cifar, n, Corrupted(ort20, graph, [n // 2], 0.0))
        judged = [r for r in bad if r.graph == graph and r.output == "grad" and r.inputs == "cifar10"]
        print(format_table(judged))
        assert judged and not any(r.ok for r in judged), f"{graph}: a zeroed sample passed at batch {n}"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_value_fails(victim20, ort20, cifar, value):
    """One NaN / Inf in one sample's gradient fails its row, at a batch size (8) where the old rule's defaults
    made the NaN check pass; and the AP gradient at fine == x_in (the LPIPS distance's zero) row fails too."""
    rows = _rows(victim20, ort20, cifar, 8, Corrupted(ort20, "ap_grad", [3], value))
    judged = [r for r in rows if r.graph == "ap_grad"]
    assert len(judged) == 2 and not any(r.ok for r in judged), format_table(judged)
    assert not any(r.finite for r in judged)


def test_outliers_are_bounded_in_number_and_size():
    """The rule itself, on constructed errors: float32-like noise (1e-7) and flips. Torch's second order flipped
    one sample (1e-3): up to two outliers within 2x that pass; five (too many for the whole-batch rule too)
    fail; one ten times worse fails; a zeroed sample fails."""
    rng = np.random.default_rng(1)
    truth = rng.standard_normal((16, 100))
    noise = lambda: truth * (1 + 1e-7 * rng.standard_normal(truth.shape))  # noqa: E731
    second = noise()
    second[2] = truth[2] * (1 + 1e-3)

    def row(flips: dict[int, float], torch_second=second) -> ParityRow:
        got = noise()
        for i, e in flips.items():
            got[i] = truth[i] * (1 + e)
        return parity_row("m", "g", "o", "l", got, [noise(), torch_second], truth)
    assert row({}).strict_ok and row({}).torch_flips == 1
    assert row({5: 5e-4, 9: 8e-4}).ok
    many = row({i: 9e-4 for i in (3, 5, 7, 9, 11)})
    assert not many.strict_ok and many.outliers == 5 and not many.ok
    worse = row({5: 1e-2})
    assert not worse.strict_ok and worse.outliers == 1 and not worse.ok
    assert not row({5: -1.0}).ok
    # torch's second order flipped nothing: one outlier (a flip of 2.5e-2, as random VGG-19-BN shows) passes, two
    # fail, a zeroed or negated sample fails
    quiet = noise()
    assert row({5: 2.5e-2}, quiet).ok and not row({5: 2.5e-2}, quiet).strict_ok
    assert not row({5: 2.5e-2, 9: 1e-3}, quiet).ok
    assert not row({5: -1.0}, quiet).ok and not row({5: -2.0}, quiet).ok
