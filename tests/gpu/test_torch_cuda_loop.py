"""GPU tests of the torch-CUDA device loop: torch gradients + our CUDA kernels on torch's stream,
eager and CUDA-graph replayed, against the Purifier's host loop on the same GPU gradients.

Skipped, with the reason, where torch has no CUDA or cuda-python / a CUDA device is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

from zeropur_rt.kernels import cuda as zc

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device (CPU-only build or no GPU)", allow_module_level=True)
_ok, _why = zc.cuda_python_available()
if not _ok:
    pytest.skip(f"no GPU path: {_why}", allow_module_level=True)

from zeropur_rt.backend_torch_cuda import TorchCudaLoop  # noqa: E402
from zeropur_rt.purifier import Purifier  # noqa: E402


@pytest.fixture(scope="module")
def pur(art20):
    # Bit-level comparisons need the same convolution algorithms on every call, and float32, not TF32.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = False
    return Purifier.load(art20, backend="torch", device="cuda")


@pytest.fixture(scope="module")
def x8(cifar):
    return np.ascontiguousarray(cifar[0][:8])


def test_graph_replay_equals_eager_bit_for_bit(pur, x8):
    with TorchCudaLoop(pur, cuda_graph=False) as eager, TorchCudaLoop(pur, cuda_graph=True) as graphed:
        a = eager.purify(x8)
        b = graphed.purify(x8)  # capture + first replay
        assert graphed.graph_captured(8)
        c = graphed.purify(x8[::-1].copy())  # replays see new inputs, not the captured ones
        d = graphed.purify(x8)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert np.array_equal(b.view(np.uint32), d.view(np.uint32))
        assert np.array_equal(c.view(np.uint32), eager.purify(x8[::-1].copy()).view(np.uint32))
        assert not np.array_equal(a, x8)  # it purified something
        assert not graphed.graph_captured(3)
        graphed.purify(x8[:3])
        assert graphed.graph_captured(3)


def test_device_loop_matches_host_loop(pur, x8):
    """Same GPU gradients; CUDA kernels on the device vs host kernels after a copy per step."""
    with TorchCudaLoop(pur, cuda_graph=True) as loop:
        dev, pred_dev = loop.purify_and_classify(x8)
    host, pred_host = pur.purify_and_classify(x8)
    assert np.array_equal(pred_dev, pred_host)
    assert np.mean(dev == host) >= 0.99, f"identical pixels {np.mean(dev == host):.4f}"
    eps = pur.cfg.eps
    assert np.all(np.abs(dev - x8) <= eps + 1e-6) and dev.min() >= 0 and dev.max() <= 1


def test_cuda_tensor_in_cuda_tensor_out(pur, x8):
    with TorchCudaLoop(pur) as loop:
        xt = torch.from_numpy(x8).cuda()
        out = loop.purify(xt)
        assert isinstance(out, torch.Tensor) and out.is_cuda and out.shape == xt.shape
        assert np.array_equal(out.cpu().numpy(), loop.purify(x8))


def test_bad_input(pur, x8, art20):
    with TorchCudaLoop(pur) as loop:
        bad = torch.from_numpy(x8).cuda()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="(?i)nan|finite"):
            loop.purify(bad)
        with pytest.raises(ValueError):
            loop.purify(np.zeros((pur.max_batch + 1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="backend='torch', device='cuda'"):
        TorchCudaLoop(Purifier.load(art20, backend="onnxruntime"))
