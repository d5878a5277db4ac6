"""benchmarks/mutants.py kept from rotting: every mutant still patches the tree it was written for, and the harness
tells a planted bug from none (one mutant against one test that must kill it, and the same test unpatched).
The full table (every mutant against the fast part of the suite) is docs/mutants.md's, from
``python -m benchmarks.mutants --out docs/mutants.md``."""
from __future__ import annotations

from benchmarks import mutants

KILLER = ("tests/rt/test_kernels.py::test_exact_clip_boundary_ties",)


def test_every_mutant_patches_one_place_of_todays_tree():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names)) >= 15
    for m in mutants.MUTANTS:
        n = (mutants.ROOT / m.path).read_text().count(m.old)
        assert n == 1, f"{m.name}: its text occurs {n} times in {m.path}: update the mutant with the code"
        assert m.new != m.old


def test_harness_kills_a_planted_bug_and_spares_the_tree():
    clamp = next(m for m in mutants.MUTANTS if m.name == "kernel-no-clamp")
    planted = mutants.judge(clamp, KILLER, timeout=600)
    assert planted.status == "killed" and planted.killer.startswith(KILLER[0]), planted
    clean = mutants.judge(None, KILLER, timeout=600)
    assert clean.status == "survived", clean
