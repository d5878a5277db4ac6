"""BatchNorm folding (zeropur_export.victims.fold) and the ReLU-mask rewrite: leaner graphs, the same function."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from zeropur_export.victims.fold import find_pairs, fold_batchnorm  # noqa: E402
from zeropur_export.graphs.tracing import relu_masks_to_hardsigmoid  # noqa: E402
from zeropur_export.graphs.parity import format_table, parity, torch_outputs  # noqa: E402
from zeropur_rt.config import preset  # noqa: E402


def test_exported_graphs_hold_no_batchnorm(art20):
    manifest = json.loads((art20 / "manifest.json").read_text())
    assert manifest["tools"]["bn_folded"] == "19/19"
    for g, spec in manifest["graphs"].items():
        ops = [n.op_type for n in onnx.load(str(art20 / spec["file"])).graph.node]
        assert "BatchNormalization" not in ops, g
        # every ReLU-backward mask became one HardSigmoid: no Greater -> Cast pair is left
        assert "Greater" not in ops, g
        if g.endswith("_grad"):
            assert ops.count("HardSigmoid") == 19, g


class _TorchGraphs:
    """The folded victim's torch float32 outputs in the shape of parity.OrtGraphs (same judge, same rule)."""

    def __init__(self, victim, cfg):
        self.victim, self.cfg = victim, cfg
        self.sessions = {"classifier": None, "gs_grad": None, "ap_setup": None, "ap_grad": None}

    def run(self, name, inputs):
        ins = [torch.as_tensor(np.asarray(t, dtype=np.float32)) for t in inputs]
        return [o.astype(np.float32) for o in torch_outputs(self.victim, self.cfg, name, ins)]


@pytest.mark.parametrize("which", ["real", "random"])
def test_folded_victim_agrees_within_float32_spread(which, request):
    """Folded vs unfolded: logits and every graph's gradient against the float64 truth of the UNFOLDED
    victim, bounded by the float32 spread of the unfolded reference on the same inputs (parity.py's rule)."""
    if which == "real":
        victim = request.getfixturevalue("victim20")
        x = torch.from_numpy(request.getfixturevalue("cifar")[0][:8])
    else:
        from zeropur_export.victims.zoo import load_victim
        victim = load_victim("resnet20", random_init=True, seed=3)  # non-trivial BatchNorm statistics
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    folded, report = fold_batchnorm(victim)
    assert len(report.folded) == report.batchnorms == 19
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in victim.net.modules())  # the original is untouched
    cfg = preset("cifar10")
    rows = parity(victim, cfg, _TorchGraphs(folded, cfg), x, which)
    assert all(r.ok for r in rows), format_table(rows)


class _Block(nn.Module):
    def __init__(self, reuse: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.reuse = reuse

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if self.reuse:
            out = out + y  # the conv's output is read beside the BN: folding would change it
        return self.bn2(self.conv2(out))


class _Net(nn.Module):
    def __init__(self, reuse: bool = False):
        super().__init__()
        self.block = _Block(reuse)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


@pytest.mark.parametrize("reuse, taps, want", [
    (False, (), [("block.conv", "block.bn"), ("block.conv2", "block.bn2")]),
    (True, (), [("block.conv2", "block.bn2")]),
    (False, ("block.conv",), [("block.conv2", "block.bn2")]),  # a tap on the conv's own output
    (False, ("block.bn:in",), [("block.conv2", "block.bn2")]),  # the BN's input is the conv's output
    (False, ("block.bn", "block", "block.conv:in"), [("block.conv", "block.bn"), ("block.conv2", "block.bn2")]),
])
def test_pairs_that_would_change_a_read_value_are_left(reuse, taps, want):
    assert find_pairs(_Net(reuse).eval(), taps) == want


def test_untraceable_network_is_left_unfolded():
    from zeropur_export.victims.taps import TapSpec, make_victim

    class Branchy(_Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return super().forward(x)

    spec = TapSpec(embedding="fc:in", ila=(), lpips=(), mean=(0.5,) * 3, std=(0.25,) * 3, input_shape=(3, 8, 8),
                   num_classes=2)
    v = make_victim(Branchy(), spec)
    folded, report = fold_batchnorm(v)
    assert folded is v and report.folded == () and "torch.fx" in report.reason


def test_hardsigmoid_mask_is_the_greater_mask():
    """The rewrite is exact on zeros, signed zeros, the smallest normal float32, infinities and ordinary values."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Greater", ["r", "zero"], ["m_bool"]), helper.make_node("Cast", ["m_bool"], ["m"], to=1),
             helper.make_node("Mul", ["m", "g"], ["out"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [16]) for n in ("r", "g", "out")]
    graph = helper.make_graph(nodes, "mask", vi[:2], vi[2:], [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    lean = onnx.ModelProto()
    lean.CopyFrom(model)
    assert relu_masks_to_hardsigmoid(lean) == 1
    onnx.checker.check_model(lean, full_check=True)
    assert [n.op_type for n in lean.graph.node] == ["HardSigmoid", "Mul"]
    tiny = np.finfo(np.float32).tiny
    r = np.array([0, -0.0, tiny, -tiny, 1e-30, 1e-7, 0.5, 3e38, np.inf, -np.inf, -1, 2, 1e-38, 7, -5, 1], np.float32)
    g = np.linspace(-3, 3, 16).astype(np.float32)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"r": r, "g": g})[0]
            for m in (model, lean)]
    np.testing.assert_array_equal(outs[1], outs[0])


def test_option_a_shortcut_as_selection_conv_is_bit_exact():
    from zeropur_export.victims.fold import _SelectConv
    from zeropur_export.victims.zoo import _OptionAShortcut
    y = torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    sc, conv = _OptionAShortcut(32), _SelectConv(16, 8, torch.float32)
    assert torch.equal(sc(y), conv(y))
    # and its input gradient: the lowering's ConvTranspose path gets the same values
    g = torch.randn(4, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (sc, conv):
        yy = y.clone().requires_grad_(True)
        (m(yy) * g).sum().backward()
        grads.append(yy.grad)
    assert torch.equal(*grads)


def test_graph_report_tiny(art20, tmp_path):
    """benchmarks.graph_report on a tiny setting (it cannot rot): node counts, MACs, and the per-shape
    convolution rates that say which layers hold ONNX Runtime's CPU kernels back."""
    from benchmarks import graph_report
    assert graph_report.main(["--artifacts", str(art20), "--batch", "2", "--threads", "1", "--rounds", "1",
                              "--profile", "ap_grad", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "graph_report.json").read_text())
    rows = {r["graph"]: r for r in res["rows"]}
    assert set(rows) == {"classifier", "gs_grad", "ap_setup", "ap_grad"}
    assert all("BatchNormalization" not in r["ops"] and r["macs"] > 0 and r["gflops"] > 0 for r in rows.values())
    (prof,) = res["profile"].values()
    # every Conv kernel the profiler saw is in the per-shape table, ResNet-20's first stage among them
    assert sum(v["nodes"] for v in prof["convs"].values()) == prof["ops"]["Conv"]["nodes"]
    assert "16->16 ch, 3x3, out 32x32" in prof["convs"] and all(v["gflops"] > 0 for v in prof["convs"].values())
    assert "Its Conv nodes by shape" in (tmp_path / "graph_report.md").read_text()
