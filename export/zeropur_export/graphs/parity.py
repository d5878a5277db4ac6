"""Parity of exported graphs (ONNX Runtime, float32) against the torch reference.

Truth is the reference in float64 (``victim.double()``); the error of a result is
``||a - truth|| / ||truth||``. The float32 spread is measured on the same inputs on the same
machine: the torch float32 reference run twice, with oneDNN's convolutions and with ATen's own
(another summation order), and the larger of the two errors counts. How large float32 errors are
depends on the CPU's kernels (AVX2 or AVX-512, core count), so a bound tied to one float32
implementation's luck fails on another machine ("2x torch" failed on an AMD EPYC for ResNet-50
gs_grad); the spread of two implementations moves with the machine. An exported graph passes when
its ONNX Runtime float32 error is at most 2x that spread plus a float32 floor (``ABS_FLOOR``, a few
ulps; for gs_grad's gradient the conditioning floor of the cosine, see ``conditioning_floor``) and
below ``MAX_ERR``; ReLU-mask flips are counted apart, no more of them and none worse than torch's second float32
order takes on the same inputs (see ``ParityRow.ok``).
Used by tests/export/test_export.py and benchmarks/export_parity.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from zeropur_export.reference.graph_functions import graph_functions
from zeropur_export.reference.losses import APConstants, ap_constants, ap_loss, blur_torch, gs_loss
from zeropur_export.victims.taps import Victim
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.manifest import graph_io, load_manifest

EPS32 = float(np.finfo(np.float32).eps)
ABS_FLOOR = 4 * EPS32  # ~4.8e-7: a few float32 ulps (a scalar loss can be off by 2 ulps either way)
MAX_ERR = 1e-3
# A sample whose error exceeds this multiple of the batch's median per-sample error has taken a
# float32 ReLU / max-pool decision the other way (a jump of 1e-4..1e-2 over a median of ~1e-6);
# drift from summation order stays within a few times the median.
FLIP_RATIO = 20.0
# Where torch's second float32 order flipped no sample of a row, the one outlier the rule allows has no flip of
# torch's to be measured against; it must still be nearer the truth than half the truth's norm. Wrong samples are
# not: a zeroed one is at 1, a negated one at 2, garbage at ~1 or more; float32 flips seen here reach 2.5e-2
# (random VGG-19-BN, a max-pool tie).
NO_FLIP_CEILING = 0.5


@dataclass
class ParityRow:
    model: str
    graph: str
    output: str
    inputs: str  # "random" / "cifar10" / "fine=x_in"
    batch: int  # samples in the row: one batch, or ``calls`` graph calls of batch // calls images each
    ort_err: float
    torch_err: float
    outliers: int = 0  # flipped samples (error > FLIP_RATIO x the median) that fail the rule on their own
    worst: float = 0.0  # the largest per-sample ORT error
    floor: float = ABS_FLOOR  # the float32 floor of this output's relative error (see conditioning_floor)
    median_ok: bool = True  # the rule holds for the per-sample median errors
    calls: int = 1
    torch_flips: int = 0  # samples where torch's second float32 order flipped (error > FLIP_RATIO x its median)
    worst_outlier: float = 0.0  # the largest error among the ORT outliers
    flip_bound: float = 0.0  # an outlier's largest error: 2x torch's second order's worst flip (NO_FLIP_CEILING without)
    finite: bool = True  # every value of the ORT output is finite

    @property
    def strict_ok(self) -> bool:
        """The rule on the whole batch."""
        return bool(self.finite and np.isfinite(self.ort_err) and self.ort_err <= 2 * self.torch_err + self.floor
                    and self.ort_err <= MAX_ERR)

    @property
    def ok(self) -> bool:
        """The rule on the whole batch, or on every sample but as many ReLU-mask flips as float32 itself takes.

        A float32 pre-activation within rounding of 0 can flip a ReLU mask in one backend and not the other
        (different conv algorithms round differently): that sample's gradient jumps (~1e-4..1e-2) while every
        other sample agrees to ~1e-7. Such a flip is float32's, not the lowering's, when torch's own second
        float32 order (``in_second_float32_order``) takes as many on the same inputs: over >= 8 samples (one
        batch, or single-image calls), the outliers may number torch's second order's flips plus one (a flip
        is a coin toss per decision near 0: either side may take one more), each within 2x that order's worst
        flip (2x as every bound here: the same flip taken by both is the same size only up to float32 noise; where
        that order flipped nothing, within ``NO_FLIP_CEILING``), when the rule holds for the per-sample median
        errors. A sample that is wrong, not flipped (a zeroed or garbage gradient, error ~1), exceeds any
        float32 flip and fails the row; a NaN or Inf anywhere fails it always.
        Samples that miss 2x their own torch error without a flip (say 3e-6 against 1.4e-6) are
        summation-order noise compared with noise: the median rule judges those.
        """
        if self.strict_ok:
            return True
        return bool(self.finite and self.batch >= 8 and np.isfinite(self.worst) and self.median_ok
                    and self.outliers <= self.torch_flips + 1 and self.worst_outlier <= self.flip_bound)


def parity_row(model: str, graph: str, output: str, label: str, ort: np.ndarray, t32: np.ndarray | Sequence[np.ndarray],
               truth: np.ndarray, floor: float = ABS_FLOOR, calls: int = 1) -> ParityRow:
    """One output's errors against the float64 truth, whole batch and per sample. ``t32``: one float32
    reference's result, or several (float32 implementations on the same inputs, torch's second float32 order
    last): each error is compared with the largest of theirs, flips are counted for the last one."""
    refs = [t32] if isinstance(t32, np.ndarray) or np.ndim(t32) == 0 else list(t32)
    b = np.shape(truth)[0] if np.ndim(truth) >= 1 else 1
    finite = bool(np.all(np.isfinite(np.asarray(ort, np.float64))))
    row = ParityRow(model, graph, output, label, b, rel_err(ort, truth), max(rel_err(r, truth) for r in refs),
                    worst=rel_err(ort, truth), floor=floor, calls=calls, finite=finite)
    if np.ndim(truth) >= 1 and b > 1:
        per_ref = np.array([[rel_err(r[i], truth[i]) for i in range(b)] for r in refs])  # (implementations, samples)
        per_o = np.array([rel_err(ort[i], truth[i]) for i in range(b)])
        per_t = per_ref.max(0)
        med_o, med_t = float(np.median(per_o)), float(np.median(per_ref, axis=1).max())
        fails = ~((per_o <= 2 * per_t + floor) & (per_o <= MAX_ERR))
        out_mask = fails & ~(per_o <= FLIP_RATIO * med_o)  # NaN counts as an outlier
        second = per_ref[-1]
        flipped = second > FLIP_RATIO * np.median(second)
        row.outliers = int(out_mask.sum())
        row.worst_outlier = float(np.max(per_o[out_mask], initial=0.0)) if np.all(np.isfinite(per_o)) else float("nan")
        row.torch_flips = int(flipped.sum())
        row.flip_bound = float(2 * second[flipped].max() + floor) if flipped.any() else NO_FLIP_CEILING
        row.worst = float(per_o.max())
        row.median_ok = bool(med_o <= 2 * med_t + floor and med_o <= MAX_ERR)
    return row


def convolution_library(device: str = "cpu") -> tuple[Any, str]:
    """The torch backend module behind ``device``'s convolutions (cuDNN on CUDA, oneDNN on the CPU) and its name."""
    return (torch.backends.cudnn, "cuDNN") if str(device).startswith("cuda") else (torch.backends.mkldnn, "oneDNN")


def in_second_float32_order(fn, *args, device: str = "cpu"):
    """``fn(*args)`` with torch's convolutions summed in another float32 order, equally valid: on the CPU ATen's
    im2col + GEMM instead of oneDNN, on CUDA ATen's native kernels instead of cuDNN. None where this torch has
    no such second order (no oneDNN, no cuDNN)."""
    backend, _ = convolution_library(device)
    if not backend.is_available():
        return None
    prev = backend.enabled
    backend.enabled = False  # flags() would also reset the backend's TF32 and determinism settings
    try:
        return fn(*args)
    finally:
        backend.enabled = prev


def conditioning_floor(victim64: Victim, x: torch.Tensor, x_blur: torch.Tensor) -> float:
    """Float32 floor of gs_grad's relative error: d cos / d e has norm sin(angle)/|e| while a rounding
    of cos by ~eps shifts it by ~eps/|e|, so its relative error is >= ~eps / sin(angle) in ANY float32
    implementation (summation order alone moves it). 4 eps / min sin over the batch."""
    with torch.no_grad():
        e, eb = victim64.embed(x.double()), victim64.embed(x_blur.double())
        cos = torch.nn.functional.cosine_similarity(e, eb, dim=1).clamp(-1, 1)
    sin = torch.sqrt(torch.clamp(1 - cos * cos, min=1e-300)).min().item()
    return max(ABS_FLOOR, 4 * EPS32 / sin)


def well_conditioned(victim: Victim, seed: int = 0) -> Victim:
    """He-normal conv weights for a random-init victim whose default init collapses the embedding
    (random VGG-19-BN: 1 - cos(E(x), E(blur x)) ~ 5e-12, so its GS gradient is pure rounding noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in victim.net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return victim


def rel_err(a: np.ndarray, truth: np.ndarray) -> float:
    a, truth = np.asarray(a, np.float64), np.asarray(truth, np.float64)
    n = np.linalg.norm(truth)
    d = np.linalg.norm(a - truth)
    return float(d / n) if n > 0 else float(d)


def _grad(loss_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
    return g.detach(), loss.detach()


def torch_outputs(victim: Victim, cfg: ZeroPurConfig, name: str, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The reference's outputs of graph ``name`` in graph_io order, in the victim's precision."""
    dt = victim.mean.dtype
    ins = [t.to(dt) for t in inputs]
    n_ila = len(victim.spec.ila)
    with torch.no_grad():
        if name == "classifier":
            fn, _ = graph_functions(victim, cfg)["classifier"]
            outs = fn(ins[0])
        elif name == "gs_grad":
            outs = _grad(lambda v: gs_loss(victim, v, ins[1]), ins[0])
        elif name == "ap_setup":
            c = ap_constants(victim, ins[0], ins[1], cfg)
            outs = (*c.ila_dir, c.lpips_ref)
        elif name == "ap_grad":
            c = APConstants(list(ins[1:1 + n_ila]), ins[1 + n_ila], None)
            outs = (_grad(lambda v: ap_loss(victim, v, c, cfg), ins[0])[0],)
        else:
            raise KeyError(name)
    return [o.detach().to(torch.float64).cpu().numpy() for o in outs]


class OrtGraphs:
    """ONNX Runtime (CPU) sessions of an artifact directory."""

    def __init__(self, artifact_dir: str | Path, threads: int = 2):
        import onnxruntime as ort

        self.dir = Path(artifact_dir)
        self.manifest = load_manifest(self.dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sessions = {g: ort.InferenceSession(str(self.dir / s["file"]), so, providers=["CPUExecutionProvider"])
                         for g, s in self.manifest.graphs.items()}

    def run(self, name: str, inputs: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        ins, _ = graph_io(name, self.manifest.n_ila)
        return self.sessions[name].run(None, _feed(ins, inputs))


def _feed(names: Sequence[str], inputs: Sequence[torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v,
                                               dtype=np.float32)) for k, v in zip(names, inputs)}


class RunnerGraphs:
    """A host runner's graphs (the fast torch runner, say) behind ``OrtGraphs``' interface, so that ``parity``
    judges them by the same rule."""

    def __init__(self, runner: Any, graphs: Sequence[str], n_ila: int):
        self.runner, self.n_ila = runner, n_ila
        self.sessions = dict.fromkeys(graphs)

    def run(self, name: str, inputs: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        ins, outs = graph_io(name, self.n_ila)
        feed = _feed(ins, inputs)
        shapes = self.runner.output_shapes(name, len(feed[ins[0]]))
        result = {k: np.zeros(shapes[k], np.float32) for k in outs}
        self.runner.run(name, feed, result)
        return [result[k] for k in outs]


def parity(victim: Victim, cfg: ZeroPurConfig, ort_graphs: OrtGraphs | RunnerGraphs, x: torch.Tensor, label: str,
           seed: int = 0, graph_batch: int | None = None) -> list[ParityRow]:
    """Rows for every graph of the artifact on images ``x`` (float32 NCHW in [0,1]).

    ``graph_batch`` (default: all of ``x``) is the batch of each graph call: ``graph_batch=1`` runs
    every image on its own, and the row judges the per-sample errors of those calls together.
    """
    v32 = victim
    v64 = victim.to_dtype(torch.float64)
    g = torch.Generator().manual_seed(seed)
    rows: list[ParityRow] = []
    b = x.shape[0]
    gb = graph_batch or b
    if b % gb:
        raise ValueError(f"{b} images do not split into graph calls of {gb}")
    n_ila = len(victim.spec.ila)

    def chunked(fn, ins) -> list[np.ndarray]:
        """fn on each call's slice of the inputs; batched outputs concatenated, scalar ones stacked."""
        parts = [fn([t[i:i + gb] for t in ins]) for i in range(0, b, gb)]
        return [np.concatenate(p) if np.ndim(p[0]) else np.stack(p) for p in zip(*parts)]

    def add(graph: str, ins32: Sequence[torch.Tensor], ins64: Sequence[torch.Tensor], ort_ins, what: str = label,
            floors: dict[str, float] | None = None):
        truth = chunked(lambda ins: torch_outputs(v64, cfg, graph, ins), ins64)
        t32 = chunked(lambda ins: torch_outputs(v32, cfg, graph, ins), ins32)
        o = chunked(lambda ins: ort_graphs.run(graph, ins), ort_ins)
        _, outs = graph_io(graph, n_ila)

        def judge(refs: Sequence[Sequence[np.ndarray]]) -> list[ParityRow]:
            return [parity_row(victim.name, graph, nm, what, o[i], [r[i] for r in refs], truth[i],
                               (floors or {}).get(nm, ABS_FLOOR), b // gb) for i, nm in enumerate(outs)]
        judged = judge([t32])
        if not all(r.strict_ok for r in judged):
            # the second float32 order is measured where the whole-batch rule misses: its flips and its worst
            # flip bound the outliers (ParityRow.ok), and its error joins the first's in the bound
            alt = in_second_float32_order(chunked, lambda ins: torch_outputs(v32, cfg, graph, ins), ins32)
            if alt is not None:
                judged = judge([t32, alt])
        rows.extend(judged)
        return truth, t32, o

    add("classifier", [x], [x.double()], [x])
    xb = blur_torch(x, cfg.blur_sigma)
    add("gs_grad", [x, xb], [x.double(), xb.double()], [x, xb],
        floors={"grad": conditioning_floor(v64, x, xb)})
    if "ap_setup" in ort_graphs.sessions:
        coarse = (x + cfg.eps * torch.sign(torch.rand(x.shape, generator=g) - 0.5)).clamp(0, 1)
        c64, c32, co = add("ap_setup", [x, coarse], [x.double(), coarse.double()], [x, coarse])
        fine = x.clone()
        for _ in range(3):
            fine = fine - cfg.ap_step * torch.sign(torch.rand(x.shape, generator=g) - 0.5)
            fine = torch.minimum(torch.maximum(fine, x - cfg.eps), x + cfg.eps).clamp(0, 1)
        to_t = lambda arrs, dt: [torch.from_numpy(np.asarray(a)).to(dt) for a in arrs]  # noqa: E731
        add("ap_grad", [fine, *to_t(c32, torch.float32)], [fine.double(), *to_t(c64, torch.float64)], [fine, *co])
        # at fine == x_in the LPIPS distance is 0: the gradient must stay finite (no NaN from sqrt)
        (gz,) = ort_graphs.run("ap_grad", [x, *co])
        finite = bool(np.all(np.isfinite(gz)))
        rows.append(ParityRow(victim.name, "ap_grad", "grad", "fine=x_in", b, 0.0 if finite else float("nan"), 0.0,
                              finite=finite))
    return rows


def format_table(rows: Sequence[ParityRow]) -> str:
    """One line per output; ok: yes (whole-batch rule), yes* (isolated ReLU-mask flips, see ParityRow.ok), NO."""
    lines = [f"{'model':<16} {'graph':<11} {'output':<10} {'inputs':<9} {'batch':>5} {'ORT f32 rel err':>16} "
             f"{'torch f32 rel err':>18} {'f32 floor':>10} {'flips ORT/torch':>15} {'ok':>4}"]
    for r in rows:
        batch = f"{r.batch // r.calls}x{r.calls}" if r.calls > 1 else str(r.batch)
        lines.append(f"{r.model:<16} {r.graph:<11} {r.output:<10} {r.inputs:<9} {batch:>5} {r.ort_err:>16.3e} "
                     f"{r.torch_err:>18.3e} {r.floor:>10.1e} {f'{r.outliers}/{r.torch_flips}':>15} "
                     f"{('yes' if r.strict_ok else 'yes*') if r.ok else 'NO':>4}")
    return "\n".join(lines)
