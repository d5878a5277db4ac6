"""GPU tests of the torch runner on CUDA: the reference's gradients + our CUDA kernels on torch's stream,
eager and CUDA-graph replayed, against the reference's own torch kernels on the same GPU gradients.

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

from zeropur_export.reference.steps import TorchKernels  # noqa: E402
from zeropur_export.reference.torch_runner import load_purifier  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    # Bit-level comparisons need the same convolution algorithms on every call, and float32, not TF32.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="module")
def x8(cifar):
    return np.ascontiguousarray(cifar[0][:8])


def test_graph_replay_equals_eager_bit_for_bit(art20, victim20, x8):
    with load_purifier(art20, "cuda", victim=victim20, cuda_graph=False) as eager, \
            load_purifier(art20, "cuda", victim=victim20, cuda_graph=True) as graphed:
        a = eager.purify(x8)
        b = graphed.purify(x8)  # eager run, then capture
        assert graphed.graph_captured(8)
        c = graphed.purify(x8[::-1].copy())  # replays see new inputs, not the captured ones
        d = graphed.purify(x8)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert np.array_equal(b.view(np.uint32), d.view(np.uint32))
        assert np.array_equal(c.view(np.uint32), eager.purify(x8[::-1].copy()).view(np.uint32))
        assert not np.array_equal(a, x8)  # it purified something
        assert not graphed.graph_captured(3)
        graphed.purify(x8[:3])
        graphed.purify(x8[:3])
        assert graphed.graph_captured(3)


def test_cuda_kernels_match_the_reference_kernels_on_the_same_gradients(art20, victim20, x8):
    with load_purifier(art20, "cuda", victim=victim20) as dev:
        out, pred = dev.purify_and_classify(x8)
        out, pred = dev.purify_and_classify(x8)  # the replayed graph
        runner = dev.runner
        ref = Purifier(runner, TorchKernels(runner.tensor), dev.cfg, input_shape=dev.chw, batch=dev.batch,
                       has_ap=True, cuda_graph=False)
        out_ref, pred_ref = ref.purify_and_classify(x8)
    assert np.array_equal(pred, pred_ref)
    assert np.mean(out == out_ref) >= 0.99, f"identical pixels {np.mean(out == out_ref):.4f}"
    eps = dev.cfg.eps
    assert np.all(np.abs(out - x8) <= eps + 1e-6) and out.min() >= 0 and out.max() <= 1


def test_bad_input(art20, victim20, x8):
    with load_purifier(art20, "cuda", victim=victim20) as pur:
        bad = x8.copy()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="(?i)nan|finite"):
            pur.purify(bad)
        with pytest.raises(ValueError):
            pur.purify(np.zeros((pur.max_batch + 1, 3, 32, 32), np.float32))
        with pytest.raises(ValueError, match="pass host images"):
            pur.purify(torch.from_numpy(x8).cuda())
