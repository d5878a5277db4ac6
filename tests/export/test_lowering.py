"""Each lowering of a backward ATen op into forward ops, checked against autograd in float64."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from zeropur_export.graphs import decompositions as lowering, tracing  # noqa: E402
from zeropur_export.victims.zoo import _OptionAShortcut  # noqa: E402

from conftest import rel_err  # noqa: E402

aten = torch.ops.aten
TOL = 1e-12


def _grad(f, x, g_out):
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)
    (g,) = torch.autograd.grad(y, x, g_out)
    return g


def _targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def _traced_vs_autograd(f, shape, batches=(3, 5), seed=0):
    """grad of sum(f(x) * w) traced with the lowering table (batch symbolic) vs autograd, at 2 batch sizes."""
    torch.manual_seed(seed)

    def loss(x):
        return torch.sin(f(x)).sum()  # a non-uniform output gradient (cos(y))

    gm = tracing.trace(torch.func.grad(loss), [torch.rand(batches[0], *shape, dtype=torch.float64)])
    for b in batches:
        x = torch.randn(b, *shape, dtype=torch.float64)
        want = torch.func.grad(loss)(x)
        got = gm(x)
        assert got.shape == want.shape
        assert rel_err(got, want) < TOL, (b, rel_err(got, want))
    return gm


# ---------------------------------------------------------------- convolution_backward -> Conv (stride 1) / ConvTranspose
@pytest.mark.parametrize("k,stride,padding,dilation,groups,size", [
    (3, 1, 1, 1, 1, 8), (3, 2, 1, 1, 1, 9), (3, 2, 1, 1, 1, 8), (1, 2, 0, 1, 1, 7), (7, 2, 3, 1, 1, 15),
    (3, 1, 2, 2, 1, 8), (3, 2, 1, 1, 2, 10), (3, 3, 0, 1, 4, 11), ((3, 5), (2, 1), (1, 2), (1, 2), 1, 9),
    # stride 1 becomes a Conv with the flipped kernel: unpadded, under-padded, grouped (stays ConvTranspose)
    (3, 1, 0, 1, 1, 8), (5, 1, 1, 1, 1, 8), ((3, 5), 1, (1, 0), 1, 1, 7), (3, 1, 1, 1, 2, 8),
])
def test_convolution_backward(k, stride, padding, dilation, groups, size):
    torch.manual_seed(0)
    cin, cout = 4, 8
    kk = (k, k) if isinstance(k, int) else k
    w = torch.randn(cout, cin // groups, *kk, dtype=torch.float64)
    x = torch.randn(2, cin, size, size + 1, dtype=torch.float64)
    f = lambda t: F.conv2d(t, w, None, stride, padding, dilation, groups)  # noqa: E731
    y = f(x)
    g_out = torch.randn_like(y)
    want = _grad(f, x, g_out)
    st, pd, dl = [stride] * 2 if isinstance(stride, int) else stride, [padding] * 2 if isinstance(padding, int) \
        else padding, [dilation] * 2 if isinstance(dilation, int) else dilation
    got, gw, gb = lowering.LOWERINGS[aten.convolution_backward.default](
        g_out, x, w, None, st, pd, dl, False, [0, 0], groups, [True, False, False])
    assert gw is None and gb is None
    assert rel_err(got, want) < TOL


def test_convolution_backward_of_transposed_conv():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    f = lambda t: F.conv_transpose2d(t, w, None, 2, 1, 1)  # noqa: E731
    g_out = torch.randn_like(f(x))
    want = _grad(f, x, g_out)
    got = lowering.LOWERINGS[aten.convolution_backward.default](
        g_out, x, w, None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1, [True, False, False])[0]
    assert rel_err(got, want) < TOL


def test_convolution_backward_refuses_weight_gradients():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="frozen|freezes"):
        lowering.LOWERINGS[aten.convolution_backward.default](
            torch.randn(1, 3, 3, 3, dtype=torch.float64), x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [True, True, False])


def test_conv_traced_has_conv_transpose_only():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    gm = _traced_vs_autograd(lambda t: F.conv2d(t, w, None, 2, 1), (3, 9, 9))
    t = _targets(gm)
    assert "aten.convolution.default" in t and not any("backward" in s for s in t)


# ---------------------------------------------------------------- threshold_backward (ReLU) -> mask multiply
def test_threshold_backward_is_mask_multiply():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    x[0, 0, 0, :3] = 0.0  # exact zeros: ReLU's gradient there is 0
    g_out = torch.randn_like(x)
    want = _grad(F.relu, x, g_out)
    got = lowering.LOWERINGS[aten.threshold_backward.default](g_out, F.relu(x), 0)
    assert rel_err(got, want) < TOL
    gm = _traced_vs_autograd(F.relu, (3, 5, 5))
    t = _targets(gm)
    assert "aten.where.self" not in t and "aten.gt.Scalar" in t


# ---------------------------------------------------------------- eval BatchNorm backward -> per-channel scale
def test_batchnorm_eval_backward():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    for p in bn.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    g_out = torch.randn_like(x)
    want = _grad(bn, x, g_out)
    got = lowering.LOWERINGS[aten.native_batch_norm_backward.default](
        g_out, x, bn.weight, bn.running_mean, bn.running_var, None, None, False, bn.eps, [True, False, False])[0]
    assert rel_err(got, want) < TOL
    gm = _traced_vs_autograd(bn, (5, 4, 4))
    assert not any("backward" in s for s in _targets(gm))


# ---------------------------------------------------------------- avg pool backward -> ConvTranspose
@pytest.mark.parametrize("k,s,p,ceil,incl,div,size", [
    (2, 2, 0, False, True, None, 8), (3, 2, 1, False, True, None, 9), (3, 2, 1, False, False, None, 9),
    (3, 2, 1, True, False, None, 8), (3, 2, 0, True, True, None, 8), (2, 2, 0, False, True, 3, 7),
    (3, 1, 1, False, False, None, 6),
])
def test_avg_pool2d_backward(k, s, p, ceil, incl, div, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
    f = lambda t: F.avg_pool2d(t, k, s, p, ceil, incl, div)  # noqa: E731
    g_out = torch.randn_like(f(x))
    want = _grad(f, x, g_out)
    got = lowering.LOWERINGS[aten.avg_pool2d_backward.default](g_out, x, [k, k], [s, s], [p, p], ceil, incl, div)
    assert rel_err(got, want) < TOL


# ---------------------------------------------------------------- adaptive avg pool backward
@pytest.mark.parametrize("out,size", [(1, 7), (2, 8), (3, 8), ((2, 3), 7)])
def test_adaptive_avg_pool2d_backward(out, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    f = lambda t: F.adaptive_avg_pool2d(t, out)  # noqa: E731
    g_out = torch.randn_like(f(x))
    want = _grad(f, x, g_out)
    got = lowering.LOWERINGS[aten._adaptive_avg_pool2d_backward.default](g_out, x)
    assert rel_err(got, want) < TOL


# ---------------------------------------------------------------- max pool backward -> index-free mask
@pytest.mark.parametrize("k,s,p,ceil,size", [(2, 2, 0, False, 8), (3, 2, 1, False, 9), (3, 2, 1, False, 8),
                                             (3, 2, 0, True, 8), (2, 1, 0, False, 5)])
def test_max_pool2d_backward_index_free(k, s, p, ceil, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)  # continuous values: no ties
    f = lambda t: F.max_pool2d(t, k, s, p, 1, ceil)  # noqa: E731
    g_out = torch.randn_like(f(x))
    want = _grad(f, x, g_out)
    got = lowering.LOWERINGS[aten.max_pool2d_with_indices_backward.default](
        g_out, x, [k, k], [s, s], [p, p], [1, 1], ceil, None)
    assert rel_err(got, want) < TOL


def test_max_pool_traced_has_no_indices_or_scatter():
    gm = _traced_vs_autograd(lambda t: F.max_pool2d(t, 3, 2, 1), (3, 9, 9))
    t = _targets(gm)
    assert "aten.max_pool2d_with_indices.default" not in t
    assert not any("scatter" in s or "backward" in s or "index" in s for s in t), t


# ---------------------------------------------------------------- slice_backward -> Pad / Reshape
@pytest.mark.parametrize("dim,start,end,step", [(2, 0, None, 2), (3, 1, None, 2), (2, 1, 6, 1), (1, 1, 3, 1),
                                                (3, 2, 7, 3), (2, -5, None, 2)])
def test_slice_backward(dim, start, end, step):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 9, dtype=torch.float64)
    idx = [slice(None)] * 4
    idx[dim] = slice(start, end, step)
    f = lambda t: t[tuple(idx)]  # noqa: E731
    g_out = torch.randn_like(f(x))
    want = _grad(f, x, g_out)
    e = end if end is not None else 2 ** 63 - 1
    got = lowering.LOWERINGS[aten.slice_backward.default](g_out, list(x.shape), dim, start, e, step)
    assert rel_err(got, want) < TOL


# ---------------------------------------------------------------- forward pad keeps the batch symbolic
@pytest.mark.parametrize("pad", [(0, 0, 0, 0, 4, 4), (1, 2), (-1, 2, 0, -2), (0, 0, 3, 0)])
def test_constant_pad_nd(pad):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    got = lowering.LOWERINGS[aten.constant_pad_nd.default](x, list(pad), 0.0)
    assert torch.equal(got, F.pad(x, pad))


def test_option_a_shortcut_gradient_keeps_dynamic_batch():
    sc = _OptionAShortcut(8)
    _traced_vs_autograd(lambda t: sc(t), (4, 8, 8), batches=(3, 6))


def test_small_net_end_to_end():
    """conv/BN/ReLU/max-pool/avg-pool/option-A/linear: the traced gradient graph equals autograd at 2 batch sizes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.Conv2d(8, 8, 3, 2, 1, groups=2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 2 * 2, 5)).double().eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2)
    for p in net.parameters():
        p.requires_grad_(False)
    gm = _traced_vs_autograd(net, (3, 16, 16))
    assert not any("backward" in s or "scatter" in s for s in _targets(gm))


def test_decomposition_table_overrides_core():
    table = lowering.decomposition_table()
    for op, fn in lowering.LOWERINGS.items():
        assert table[op] is fn
