"""Human-readable summaries of an artifact: what ``zeropur-rt info`` prints by default (``--json`` is the raw manifest)."""
from __future__ import annotations

from fractions import Fraction
from typing import Any

from zeropur_rt.manifest import Manifest


def per_255(value: float) -> str:
    """An intensity as the fraction of 255 it is (8/255, 0.2/255): how budgets are written in the field."""
    k = Fraction(value * 255).limit_denominator(100)
    if abs(float(k) - value * 255) < 1e-9:
        return f"{k.numerator}/255" if k.denominator == 1 else f"{float(k):g}/255"
    return f"{value * 255:.4g}/255"


def describe_config(cfg: dict[str, Any]) -> str:
    parts = [f"eps {per_255(cfg['eps'])}",
             f"Guided Shift {cfg['gs_steps']} x {per_255(cfg['gs_step'])} (step rule {cfg.get('gs_step_rule', 'fixed')}, "
             f"blur sigma {cfg['blur_sigma']:g}, "
             f"momentum {cfg['momentum']:g}, L1 per {cfg['l1_scope']})",
             f"Adaptive Projection {cfg['ap_steps']} x {per_255(cfg['ap_step'])} (ILA weight {cfg['ila_weight']:g}"
             f"{', normalised' if cfg.get('ila_normalized') else ''}, LPIPS weight {cfg['lpips_weight']:g})"]
    if cfg.get("random_start") or cfg.get("blur_sigma_jitter"):
        parts.append(f"randomised (random start {cfg.get('random_start')}, sigma jitter {cfg.get('blur_sigma_jitter')})")
    return "; ".join(parts)


def describe_manifest(m: Manifest) -> str:
    weights = (f"sha256 {m.weights_sha256[:16]}..." if m.weights_sha256 else
               "NO WEIGHTS FILE: random init or the factory's own parameters (unverified)")
    recipe = (m.calibration or {}).get("recipe") or m.config.get("preset", "?")
    return "\n".join([
        f"model        {m.model}, {m.num_classes} classes, input {'x'.join(map(str, m.input_shape))} (C,H,W)",
        f"weights      {weights}",
        f"recipe       {recipe}: {describe_config(m.config)}",
        *([f"             WARNING: {m.calibration['budget']}"] if (m.calibration or {}).get("budget") else []),
        f"batch        {m.batch.get('min')}..{m.batch.get('max')} (opt {m.batch.get('opt')})",
        f"graphs       {', '.join(sorted(m.graphs))} (ONNX opset {m.opset}, revision {m.tools.get('graph_revision', '?')})",
        f"engines      {', '.join(sorted(m.engines)) or 'none (zeropur-export build-engines adds TensorRT engines)'}",
        f"files        {len(m.files)} verified (sha256 ok)"])
