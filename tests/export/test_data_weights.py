"""Data loading and weight files: real loaders tested on files the tests write themselves."""
import hashlib
import pickle

import numpy as np
import pytest

from zeropur_export.data import load_cifar10_test, load_cifar_pickle_batch, to_nchw_float


def test_cifar_pickle_batch_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = [3, 1, 4, 1, 5]
    rows = x.transpose(0, 3, 1, 2).reshape(5, 3072)  # R plane, G plane, B plane per row
    p = tmp_path / "test_batch"
    p.write_bytes(pickle.dumps({b"data": rows, b"labels": y, b"batch_label": b"testing batch 1 of 1"}))
    xl, yl = load_cifar_pickle_batch(p)
    assert np.array_equal(xl, x) and yl.tolist() == y
    p.write_bytes(pickle.dumps({b"labels": y}))
    with pytest.raises(ValueError, match="b'data'"):
        load_cifar_pickle_batch(p)


def test_cifar10_test_copy_matches_its_readme(cifar):
    x, y = load_cifar10_test()
    assert x.shape == (10000, 32, 32, 3)
    assert hashlib.sha256(x.tobytes()).hexdigest().startswith("b7018a062865e934")
    assert y[:20].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    f = to_nchw_float(x[:2])
    assert f.dtype == np.float32 and f.shape == (2, 3, 32, 32) and f.max() <= 1


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.npz"):
        load_cifar10_test(tmp_path / "nope.npz")
    for k, v in {"ZEROPUR_SHARED": tmp_path / "s", "ZEROPUR_CACHE": tmp_path / "c", "ZEROPUR_DOWNLOAD": "0"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("ZEROPUR_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"looked in: .*s/data/cifar10_test.npz, .*c/data/cifar10_test.npz; "
                       r"run `zeropur-export fetch`"):
        load_cifar10_test()


def test_weights_lookup_verifies_hash(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from zeropur_export.victims.weights import KNOWN_WEIGHTS, find_weights, load_state_dict
    monkeypatch.setenv("ZEROPUR_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("ZEROPUR_SHARED", str(tmp_path / "no_shared"))
    bad = tmp_path / KNOWN_WEIGHTS["resnet20"].filename
    torch.save({"state_dict": {"module.w": torch.zeros(2)}}, bad)
    with pytest.raises(OSError, match="is not the published resnet20-12fca82f.th"):
        find_weights("resnet20")
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        find_weights("resnet20")
    with pytest.raises(ValueError, match="no known pretrained weights"):
        find_weights("wrn28_10")
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_state_dict(corrupt)


def test_download_of_known_weights_from_local_mirror(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from zeropur_export.victims import weights
    from zeropur_export.data import shared_dir
    real = shared_dir() / "models" / "resnet20-12fca82f.th"
    if not real.is_file():
        pytest.skip(f"ResNet-20 weights not found at {real}")
    monkeypatch.setenv("ZEROPUR_MIRROR", real.parent.as_uri())  # the real bytes, checked against the shipped table
    monkeypatch.setenv("ZEROPUR_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.setenv("ZEROPUR_CACHE", str(tmp_path / "cache"))
    p = weights.find_weights("resnet20", download=True)
    assert p == tmp_path / "cache" / "weights" / real.name and p.read_bytes() == real.read_bytes()
