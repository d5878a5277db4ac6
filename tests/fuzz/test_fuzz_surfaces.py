"""A short hypothesis run of every input surface (the long one: ``python -m benchmarks.fuzz``), and the
crashers the fuzzing found, kept as explicit cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import surfaces


# Here rather than in a conftest.py: a second conftest.py would shadow tests/conftest.py as the module
# `conftest` that other tests import from.
@pytest.fixture(scope="session")
def fuzz_ctx(tmp_path_factory):
    """The tiny victim exported once per session, a purifier over it, a scratch folder."""
    pytest.importorskip("torch")
    import tiny_artifact
    art = tiny_artifact.shared_tiny(tmp_path_factory.mktemp("tiny"))
    ctx = surfaces.Context.make(art, tmp_path_factory.mktemp("scratch"))
    yield ctx
    ctx.purifier.close()


SHORT = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(surfaces.SURFACES))
def test_surface_short_run(fuzz_ctx, name):
    strategy, check = surfaces.SURFACES[name]

    @SHORT
    @given(strategy())
    def run(case):
        check(fuzz_ctx, case)
    run()


# ------------------------------------------------------------------ regression cases (each crashed before its fix)
def _manifest_case(**kw):
    case = {"mutations": [], "engines": None, "file_op": "none", "file_index": 0, "raw": b""}
    return {**case, **kw}


@pytest.mark.parametrize("case, outcome", [
    # an engine record without a compute capability: ValueError from the refusal's own message builder
    (_manifest_case(engines={"": {}}), "refused:EngineMismatchError"),
    # classifier and gs_grad files swapped (both hashed): KeyError deep in the loop's buffer allocation
    (_manifest_case(file_op="swap_graphs"), "loaded+refused:ArtifactError"),
    # a graph replaced by a symlink to an identical copy outside the directory: loaded (its hash matched)
    (_manifest_case(file_op="symlink_out"), "refused:ArtifactError"),
    # 100000 nested brackets: RecursionError from json
    (_manifest_case(file_op="manifest_bytes", raw=b"[" * 100000), "refused:ArtifactError"),
    # a 5000-digit integer: ValueError from json's int limit
    (_manifest_case(file_op="manifest_bytes", raw=b"1" * 5000), "refused:ArtifactError"),
    # manifest.json a symlink out of the directory
    (_manifest_case(file_op="manifest_symlink"), "refused:ArtifactError"),
])
def test_manifest_regressions(fuzz_ctx, case, outcome):
    assert surfaces.check_manifest(fuzz_ctx, case) == outcome


@pytest.mark.parametrize("field, value", [("input_shape", [3, 1340, 8]), ("num_classes", 11)])
def test_manifest_that_disagrees_with_its_graphs(fuzz_ctx, tmp_path, field, value):
    """Found by the long run: a manifest whose input shape (or class count) is not its graphs' loaded, then
    ONNX Runtime's InvalidArgument came out of the first purify. Now the runner compares them at load."""
    import shutil

    from zeropur_rt.errors import ArtifactError
    from zeropur_rt.pipeline import Purifier
    d = tmp_path / "art"
    shutil.copytree(fuzz_ctx.artifact, d)
    m = json.loads((d / "manifest.json").read_text())
    m[field] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="the manifest says"):
        Purifier.load(d, threads=1)


def test_manifest_without_ap_graphs_but_ap_steps(fuzz_ctx, tmp_path):
    """Found by the post-fix long run: ap_setup/ap_grad dropped from a manifest whose config still has AP steps
    loaded, then Purifier's bare ValueError. Now load_manifest refuses it."""
    import shutil

    from zeropur_rt.errors import ArtifactError
    from zeropur_rt.manifest import load_manifest
    d = tmp_path / "art"
    shutil.copytree(fuzz_ctx.artifact, d)
    m = json.loads((d / "manifest.json").read_text())
    del m["graphs"]["ap_setup"], m["graphs"]["ap_grad"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="no ap_setup/ap_grad graphs"):
        load_manifest(d)


@pytest.mark.parametrize("pairs", [
    ["eps=" + "9" * 4000 + "/1"],  # OverflowError: the fraction is too large for a float
    ["ap_steps=" + "1" * 5000],    # int's digit limit
    ["eps=1/0"], ["eps=nan"], ["gs_steps=1.5"], ["ila_weight=0"], ["=1"], ["eps"],
])
def test_set_grammar_regressions(fuzz_ctx, pairs):
    assert surfaces.check_sets(fuzz_ctx, pairs) == "refused:ConfigError"


@pytest.mark.parametrize("obj", [{"gs_step": 2.0496557786404187e+219}, {"blur_sigma": 3.013269463522319e+16},
                                 {"eps": 10**400}, {"gs_steps": True}, {"l1_scope": ["sample"]}, {"preset": 3},
                                 {"ila_normalized": "yes"}, [], {"eps": float("nan")}])
def test_config_json_regressions(fuzz_ctx, obj):
    # gs_step=2e219 (finite in float64, not in float32) reached the kernels' own ValueError at the first step;
    # eps=10**400 raised OverflowError (math.isfinite of a huge int); the others passed unchecked or crashed later
    # blur_sigma=3e16 (found in a manifest's config) overflowed the blur kernels' integer weights at the first step
    assert surfaces.check_config_json(fuzz_ctx, json.dumps(obj).encode()) == "refused:ConfigError"
    assert surfaces.check_config_json(fuzz_ctx, b"[" * 100000) == "refused:ConfigError"


@pytest.mark.parametrize("x, uint8", [
    ([[0.5, 0.5, 0.5], [0.5]], False),   # ragged list: numpy's ValueError
    ([[0.5, 0.5, 0.5], [0.5]], True),
    (np.zeros((2, 3, 8, 8), np.float32), True),  # float32 NCHW with uint8_nhwc=True: a bare ValueError
    ("images", True),
    (np.ma.masked_array(np.full((1, 3, 8, 8), np.nan, np.float32), mask=True), False),  # NaN hidden by a mask
    (np.broadcast_to(np.float32(0.5), (10**9, 3, 8, 8)), False),  # huge batch, refused before any scan
    (np.zeros((1, 3, 8, 8), np.float16), False),
    (np.zeros((0, 3, 8, 8), np.float32), False),
])
def test_prepare_regressions(fuzz_ctx, x, uint8):
    assert surfaces.check_prepare(fuzz_ctx, {"x": x, "uint8": uint8}) in ("refused:InputError", "refused:BatchSizeError")
