"""The reference purifier against tests/export/oracle.py (ZeroPur from the paper's equations, sharing no code with the
project), in float64 on real ResNet-20 weights and real CIFAR-10 images, clean and PGD, step by step.

The reference drives the runtime's own schedule (zeropur_rt.schedule) over its own losses, and the runtime's graphs
are exported from those losses: a bug in either is invisible to a reference-vs-runtime comparison, and shows here.
Float64 makes the comparison exact: sign steps from the same iterate land on the same float64 values, so every
iterate must be bit-identical, and each step's gradient equal to 1e-12 (the two sides sum in different orders).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import oracle  # noqa: E402
from zeropur_rt.config import preset  # noqa: E402

GRAD_RTOL = 1e-12  # float64 summation order: ~1e-15 measured; a real change of the math is >= 1e-8


def oracle_victim(v64) -> oracle.OracleVictim:
    """The float64 victim's bare network and tap names; mean/std as the victim holds them (float32 constants)."""
    return oracle.OracleVictim(v64.net, v64.mean.flatten().tolist(), v64.std.flatten().tolist(), v64.spec.embedding,
                               v64.spec.ila, v64.spec.lpips)


@pytest.fixture(scope="module")
def v64(victim20):
    return victim20.to_dtype(torch.float64)


@pytest.fixture(scope="module")
def clean_and_pgd(victim20, cifar):
    """4 clean test images and 4 PGD-10 (8/255) images of the next 4, as float64."""
    from zeropur_export.attacks.pgd import pgd_linf
    x, y = cifar
    adv = pgd_linf(victim20, torch.from_numpy(x[4:8]), torch.from_numpy(y[4:8]), steps=10, seed=0)
    return torch.cat([torch.from_numpy(x[:4]), adv]).double()


def assert_same_run(ref, v64, x: torch.Tensor, cfg, recipe: oracle.Recipe) -> None:
    """The reference's iterates bit-identical to the oracle's, and its gradients at every oracle iterate equal to
    GRAD_RTOL: GS step t (blur of x_t, gradient, momentum), ILA guide, AP step t."""
    want = oracle.purify(oracle_victim(v64), x, recipe)
    out, it = ref.purify_with_iterates(x)
    assert len(it.gs_x) == len(want.gs_x) and len(it.ap_x) == len(want.ap_x)
    for t, (a, b) in enumerate(zip(it.gs_x, want.gs_x)):
        assert np.array_equal(a, b.numpy()), f"GS iterate {t}: max |diff| {np.abs(a - b.numpy()).max():.3e}"
    assert np.array_equal(it.coarse, want.coarse.numpy()), "coarse image"
    for t, (a, b) in enumerate(zip(it.ap_x, want.ap_x)):
        assert np.array_equal(a, b.numpy()), f"AP iterate {t}: max |diff| {np.abs(a - b.numpy()).max():.3e}"
    assert torch.equal(out, want.out)
    worst = 0.0
    for t, xt in enumerate(want.gs_x):
        xb = oracle.blur(xt, recipe.blur_sigma)
        g, _ = ref.gs_grad(xt, xb)
        e = float((g - want.gs_grad[t]).norm() / want.gs_grad[t].norm())
        assert e <= GRAD_RTOL, f"GS gradient at step {t}: relative error {e:.2e}"
        worst = max(worst, e)
    if want.ap_x:
        c = ref.ap_setup(x, want.coarse)
        for d, name in zip(oracle.ila_directions(oracle_victim(v64), x, want.coarse, recipe), v64.spec.ila):
            got = c.ila_dir[list(v64.spec.ila).index(name)]
            assert float((got - d).abs().max()) <= GRAD_RTOL * float(d.abs().max()), f"ILA guide {name}"
        for t, ft in enumerate(want.ap_x):
            g = ref.ap_grad(ft, c)
            n = float(want.ap_grad[t].norm())
            e = float((g - want.ap_grad[t]).norm()) / n if n > 0 else float(g.abs().max())
            assert e <= GRAD_RTOL, f"AP gradient at step {t}: relative error {e:.2e}"
            worst = max(worst, e)
    print(f"\noracle vs reference: iterates bit-identical over {len(want.gs_x)} GS + {len(want.ap_x)} AP steps, "
          f"worst gradient relative error {worst:.2e}")


def test_reference_is_the_oracle_on_the_paper_recipe(v64, clean_and_pgd):
    """The whole CIFAR recipe (10 GS + 50 AP steps) from the preset, against the oracle's own copy of the paper's
    numbers (not read from the config: a wrong preset or default is caught too)."""
    from zeropur_export.reference.purifier import ReferencePurifier
    cfg = preset("cifar10")
    assert_same_run(ReferencePurifier(v64, cfg), v64, clean_and_pgd, cfg, oracle.Recipe())


@pytest.mark.parametrize("change", [dict(eps=8 / 255, gs_steps=3, ap_steps=6), dict(gs_steps=2, ap_steps=3,
                                                                                   ila_normalized=True)])
def test_reference_is_the_oracle_on_changed_recipes(v64, clean_and_pgd, change):
    """A changed eps (the AP step follows it by the config's rule; the oracle applies the paper's, eps / ap_steps)
    and the normalised ILA."""
    from zeropur_export.reference.purifier import ReferencePurifier
    cfg = preset("cifar10").replace(**change)
    recipe = oracle.Recipe(**change)
    assert_same_run(ReferencePurifier(v64, cfg), v64, clean_and_pgd[2:6], cfg, recipe)


def test_oracle_blur_is_the_numpy_twins(cifar):
    """The oracle's Pillow blur (running sums) equals the kernels' numpy twin (explicit taps), at several sigmas
    (including one whose box radius is below 1 and the jittered range)."""
    from zeropur_rt.kernels import numpy_twin
    x = cifar[0][:6]
    for sigma in (0.4, 1.0, 1.35, 1.8, 2.25, 3.0):
        want = numpy_twin.blur(x, sigma)
        got = oracle.blur(torch.from_numpy(x), sigma).numpy()
        assert np.array_equal(got, want), f"sigma {sigma}"


def test_oracle_imports_nothing_of_the_project():
    """The oracle's own imports (parsed), and what importing it loads (in a fresh interpreter)."""
    src = Path(oracle.__file__)
    names = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= {"__future__", "math", "contextlib", "dataclasses", "typing", "numpy", "torch"}, names
    code = f"import sys; sys.path.insert(0, {str(src.parent)!r}); import oracle; " \
           "print(sorted(m for m in sys.modules if m.startswith('zeropur')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gs_step_rules(v64, clean_and_pgd):
    """The presets and shipped recipes keep the older code's GS step (1/255, "fixed"); the newest code's rule
    (eps / gs_steps) follows eps and the step count, and the reference runs it as the oracle does."""
    import json

    from zeropur_export.reference.purifier import ReferencePurifier
    from zeropur_rt.config import GS_STEP_RULES, ZeroPurConfig
    from zeropur_rt.errors import ConfigError
    for name in ("cifar10", "cifar100", "imagenet"):
        assert preset(name).gs_step_rule == "fixed" and preset(name).gs_step == 1 / 255
    recipes = sorted((Path(__file__).resolve().parents[2] / "export/zeropur_export/recipes").glob("*.json"))
    assert recipes and all(json.loads(p.read_text())["gs_step_rule"] in GS_STEP_RULES for p in recipes)
    fixed = preset("cifar10").replace(eps=8 / 255, gs_steps=4)
    assert fixed.gs_step == 1 / 255
    new = preset("cifar10", gs_step_rule="eps_over_steps", eps=8 / 255)
    assert new.gs_step == (8 / 255) / 10 and new.replace(gs_steps=4).gs_step == (8 / 255) / 4
    assert new.replace(eps=6 / 255).gs_step == (6 / 255) / 10 and new.replace(gs_step_rule="fixed").gs_step == 1 / 255
    with pytest.raises(ConfigError, match="not eps / gs_steps"):
        ZeroPurConfig(eps=8 / 255, gs_step_rule="eps_over_steps")
    with pytest.raises(ConfigError, match="gs_step_rule must be one of"):
        ZeroPurConfig(gs_step_rule="newest")
    change = dict(eps=8 / 255, gs_steps=4, ap_steps=2)
    cfg = preset("cifar10", gs_step_rule="eps_over_steps").replace(**change)
    assert_same_run(ReferencePurifier(v64, cfg), v64, clean_and_pgd[:4], cfg,
                    oracle.Recipe(gs_step_rule="eps_over_steps", **change))
