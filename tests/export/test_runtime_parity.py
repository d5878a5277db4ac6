"""The runtime Purifier (ONNX Runtime CPU + host kernels) against the torch reference, and its torch-facing parts."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from benchmarks.runtime_parity import (float32_floor, format_agreement, free_running,  # noqa: E402
                                      reference_outputs, summary, teacher_forced)
from zeropur_rt.pipeline import Purifier  # noqa: E402


@pytest.fixture(scope="module")
def pur(art20):
    return Purifier.load(art20, threads=2)


def test_teacher_forced_gradient_parity_every_step(pur, victim20, cifar):
    rows = teacher_forced(pur, victim20, cifar[0][:16])
    assert len(rows) == 10 + 3 + 50
    print(f"\nteacher-forced on 16 images: {summary(rows)}")
    # Every call meets 2x the float32 spread and 1e-3, on the whole batch or (ParityRow.ok) on every
    # sample but isolated ReLU-mask flips, which torch f32 itself shows at other steps.
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_free_running_agrees_with_reference_at_least_as_well_as_float32_allows(pur, victim20, cifar):
    """Free-running, pixels drift apart over 60 sign steps in any two float32 implementations: the
    reference against itself with oneDNN off (another convolution summation order) is the floor."""
    x, y = cifar[0][:64], cifar[1][:64]
    ref = reference_outputs(victim20, pur.cfg, x, batch=32)
    r = free_running(pur, victim20, x, y, batch=32, reference=ref)
    print("\n" + format_agreement("runtime vs reference, 64 images", r))
    assert r["same_prediction"] >= 63 / 64
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: no second convolution order to measure the float32 floor with")
    floor = float32_floor(victim20, pur.cfg, x, y, batch=32, reference=ref)
    print(format_agreement("float32 floor", floor, tested="reference with oneDNN off"))
    if floor["same_pixels"] == 1.0:
        pytest.skip("oneDNN off changed no convolution's rounding on this machine: the floor is not measurable")
    assert r["same_prediction"] >= floor["same_prediction"]
    assert r["same_pixels"] >= floor["same_pixels"]
    # (the purified accuracies part by at most the differing predictions, bounded by the floor's just above)


def test_a_torch_tensor_is_taken_as_its_array(art20, cifar):
    p = Purifier.load(art20, overrides=dict(gs_steps=2, ap_steps=2))
    assert np.array_equal(p.purify(torch.from_numpy(cifar[0][:2])), p.purify(cifar[0][:2]))


def test_torch_backend_is_build_time_and_cuda_needs_a_gpu(art20, victim20):
    from zeropur_export.reference.torch_runner import load_purifier
    with pytest.raises(ValueError, match="needs the build-time package"):
        Purifier.load(art20, backend="torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu runs the device loop")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        load_purifier(art20, device="cuda", victim=victim20)
