"""The four graphs of an artifact as torch functions: thin closures over the reference losses. The exporter traces
them into ONNX (``zeropur_export.graphs``) and the torch runner runs them under autograd."""
from __future__ import annotations

from typing import Any, Callable

from zeropur_export.reference.losses import APConstants, ap_constants, ap_loss_lean, gs_loss
from zeropur_export.victims.taps import Victim
from zeropur_rt.config import ZeroPurConfig


def graph_functions(victim: Victim, cfg: ZeroPurConfig) -> dict[str, tuple[Callable[..., Any], bool]]:
    """name -> (function of the graph inputs, is_gradient). Gradient functions are differentiated
    w.r.t. their first input by ``graphs.tracing.trace_grad``."""
    n_ila = len(victim.spec.ila)

    def classifier(x):
        logits, taps = victim.run(x)
        return logits, taps[victim.spec.embedding]

    def gs(x, x_blur):
        return gs_loss(victim, x, x_blur)

    def setup(x_in, coarse):
        c = ap_constants(victim, x_in, coarse, cfg)
        return (*c.ila_dir, c.lpips_ref)

    def ap(fine, *consts):
        c = APConstants(ila_dir=list(consts[:n_ila]), lpips_ref=consts[n_ila], ila_offset=None)
        return ap_loss_lean(victim, fine, c, cfg)

    fns: dict[str, tuple[Callable[..., Any], bool]] = {"classifier": (classifier, False), "gs_grad": (gs, True)}
    if victim.spec.supports_ap:
        fns["ap_setup"] = (setup, False)
        fns["ap_grad"] = (ap, True)
    return fns
