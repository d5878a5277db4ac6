"""Concurrency: one Purifier called from 8 threads at once gives every caller the serial result (calls are
serialised by the Purifier's lock); two processes exporting into one directory: one wins, the other fails
cleanly and the winner's directory verifies."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from zeropur_rt.manifest import load_manifest  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
import tiny_artifact  # noqa: E402

THREADS, CALLS = 8, 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_artifact.shared_tiny(tmp_path_factory.mktemp("tiny"))


def test_eight_threads_get_the_serial_results(tiny):
    rng = np.random.default_rng(0)
    # two batch sizes, so four threads share each size's buffers (with the lock replaced by a no-op, 34 of
    # these 96 calls returned another result than the serial one)
    inputs = [rng.random((4 if t % 2 else 16, 3, 8, 8), dtype=np.float32) for t in range(THREADS)]
    with Purifier.load(tiny, threads=1) as pur:
        serial = [pur.purify_and_classify(x) for x in inputs]
        got: dict[int, list] = {t: [] for t in range(THREADS)}
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def worker(t: int) -> None:
            try:
                start.wait()
                for _ in range(CALLS):
                    got[t].append(pur.purify_and_classify(inputs[t]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
        for t in range(THREADS):
            assert len(got[t]) == CALLS
            for out, pred in got[t]:
                np.testing.assert_array_equal(out, serial[t][0])
                np.testing.assert_array_equal(pred, serial[t][1])


def test_closed_purifier_refuses_clearly(tiny):
    from zeropur_rt.errors import ZeroPurError
    pur = Purifier.load(tiny, threads=1)
    pur.close()
    with pytest.raises(ZeroPurError, match="closed"):
        pur.purify(np.zeros((1, 3, 8, 8), np.float32))


def test_two_exports_into_one_directory(tmp_path):
    out = tmp_path / "art"
    cmd = [sys.executable, str(ROOT / "tests" / "fuzz" / "tiny_artifact.py"), str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    # the loser either met the winner's lock mid-export or, starting late, its finished directory
    assert ("another export into" in loser or "already exists; pass --force" in loser) and "Traceback" not in loser, loser
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dir, no lock file left
