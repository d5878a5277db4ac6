"""The fuzz harnesses' context: the tiny victim exported once per session, a purifier over it, a scratch folder."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fuzz_ctx(tmp_path_factory):
    pytest.importorskip("torch")
    import surfaces
    import tiny_artifact
    art = tiny_artifact.shared_tiny(tmp_path_factory.mktemp("tiny"))
    ctx = surfaces.Context.make(art, tmp_path_factory.mktemp("scratch"))
    yield ctx
    ctx.purifier.close()
