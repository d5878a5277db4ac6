"""Gradients through ZeroPur, for adaptive attacks: the victim behind the purifier as a torch module.

Each model here computes ``victim(purify(x))`` in its forward pass and differs only in the backward
pass, i.e. in what an attacker who knows the defence differentiates. Any ART attack then runs on
``art_classifier(model)`` unchanged (ART's APGD re-wraps the module, which keeps all of this):

* ``BPDAModel``: forward = the runtime purifier, backward = the identity (BPDA, Athalye et al. 2018):
  the victim's gradient at the purified image.
* ``TrajectoryBPDAModel``: forward = the runtime purifier with its iterates; backward = the
  victim's Jacobian averaged over ``points`` iterates spread along the loop (the coarse and
  final images among them), each with the identity behind it, applied to the loss gradient at
  the output. An attacker who does not trust the end point alone.
* ``UnrolledModel``: forward = the reference loop in torch; backward = the chain rule through
  every Guided Shift and Adaptive Projection step, second order through the victim (each step is
  itself a gradient), with sign's derivative replaced by the identity (straight-through) and
  the quantised blur's by the identity. Memory stays at one step's double graph: the forward
  keeps only the iterates, and the backward re-runs one step at a time (checkpointing by hand,
  because ``torch.utils.checkpoint`` cannot hold a step that calls ``autograd.grad`` itself).

``eot`` > 1 averages the straight-through outputs of that many purifications (expectation over
transformation), for a randomised purifier; ZeroPur as shipped is deterministic, so 1 is exact.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from zeropur_export import reference as ref
from zeropur_export.taps import Victim
from zeropur_rt.config import ZeroPurConfig


class _Substitute(torch.autograd.Function):
    """Forward: ``value``; backward: the incoming gradient to ``x`` unchanged (exact, unlike x + (v - x).detach())."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def substitute(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _Substitute.apply(x, value.to(x.dtype))


class _StraightThroughSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.sign(v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def st_sign(v: torch.Tensor) -> torch.Tensor:
    """sign(v) forward, identity backward."""
    return _StraightThroughSign.apply(v)


class _LastPurification:
    """The last batch purified, by content: ART's APGD asks for the loss at a point and then for the
    gradient at the same point, and a purification costs 60 victim passes."""

    def __init__(self, purify: Any):
        self.purify, self.key, self.value, self.calls, self.hits = purify, None, None, 0, 0

    def __call__(self, x: np.ndarray) -> Any:
        key = hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()
        if key == self.key:
            self.hits += 1
            return self.value
        self.calls += 1
        self.key, self.value = key, self.purify(x)
        return self.value


def _host(x: torch.Tensor) -> np.ndarray:
    # ART's steps are clipped to [0, 1] but may land a hair outside in float; the purifier refuses those.
    return np.clip(x.detach().cpu().numpy(), 0.0, 1.0).astype(np.float32)


class _Purified(nn.Module):
    """Shared parts: the victim, and EOT averaging over ``sample``."""

    def __init__(self, victim: Victim, eot: int = 1):
        super().__init__()
        if int(eot) < 1:
            raise ValueError(f"eot must be >= 1, got {eot}")
        self.victim, self.eot = victim, int(eot)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """One draw of straight-through logits; forward value = the victim's logits of the purified image."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.eot == 1:
            return self.sample(x)
        return torch.stack([self.sample(x) for _ in range(self.eot)]).mean(0)


class BPDAModel(_Purified):
    """victim(purify(x)), backward through the purifier = identity. ``purify``: float32 NCHW numpy in and out,
    e.g. a ``zeropur_rt.Purifier``'s ``purify``."""

    def __init__(self, victim: Victim, purify: Callable[[np.ndarray], np.ndarray], eot: int = 1):
        super().__init__(victim, eot)
        self.purify = purify
        self.memo = _LastPurification(purify)

    def sample(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p = torch.from_numpy(self.memo(_host(x)) if self.eot == 1 else self.purify(_host(x)))
        return self.victim(substitute(x, p.to(x.device)))


class TrajectoryBPDAModel(_Purified):
    """BPDA at ``points`` iterates of the loop (evenly spread over GS inputs, the coarse image, AP inputs
    and the output; the output always among them), the victim's Jacobians averaged."""

    def __init__(self, victim: Victim, purifier: Any, points: int = 8, eot: int = 1):
        super().__init__(victim, eot)
        if int(points) < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        self.purifier, self.points = purifier, int(points)
        self.memo = _LastPurification(lambda a: self.purifier.purify(a, iterates=True))

    def path(self, out: np.ndarray, it: Any) -> list[np.ndarray]:
        """The chosen iterates; the input itself (step 0 of GS and of AP) is left out: BPDA there is no purifier."""
        full = list(it.gs_x[1:]) + ([it.coarse] if it.coarse is not None else []) + list(it.ap_x[1:])
        full = [p for p in full if p is not None] + [out]
        picks = np.unique(np.round(np.linspace(len(full) - 1, 0, min(self.points, len(full)))).astype(int))
        return [full[i] for i in picks]

    def sample(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out, it = self.memo(_host(x)) if self.eot == 1 else self.purifier.purify(_host(x), iterates=True)
        pts = [torch.from_numpy(np.asarray(p)).to(x.device) for p in self.path(out, it)]
        final = self.victim(substitute(x, pts[-1]))
        mean = torch.stack([self.victim(substitute(x, p)) for p in pts]).mean(0)
        # value: the logits of the output; gradient: the mean over the path
        return substitute(mean, final.detach())


# ---------------------------------------------------------------- the unrolled loop (full gradient)
def _blur_st(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return substitute(x, ref.blur_torch(x, sigma))


def _gs_step(victim: Victim, cfg: ZeroPurConfig, x: torch.Tensor, m: torch.Tensor, x_in: torch.Tensor,
             create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's GS step as a differentiable function of (x, m, x_in)."""
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        # The step's gradient is taken at an alias of x: the partial through the sharp branch only, as in
        # the reference, while the blurred branch's dependence on x stays in the graph for the attacker.
        xa = xg.view_as(xg)
        loss = ref.gs_loss(victim, xa, _blur_st(xg, cfg.blur_sigma), blur_graph=create_graph)
        (g,) = torch.autograd.grad(loss, xa, create_graph=create_graph)
        return ref.gs_update(xg, g, m, x_in, cfg, sign=st_sign if create_graph else torch.sign)


def _ap_step(victim: Victim, cfg: ZeroPurConfig, fine: torch.Tensor, x_in: torch.Tensor, c: ref.APConstants,
             create_graph: bool) -> torch.Tensor:
    with torch.enable_grad():
        fg = fine if fine.requires_grad else fine.detach().requires_grad_(True)
        fa = fg.view_as(fg)  # the step's gradient in fine alone (fine may be x_in, on which the constants depend)
        (g,) = torch.autograd.grad(ref.ap_loss(victim, fa, c, cfg), fa, create_graph=create_graph)
        return ref.ap_update(fg, g, x_in, cfg, sign=st_sign if create_graph else torch.sign)


def _consts(c: ref.APConstants) -> list[torch.Tensor]:
    return [*c.ila_dir, c.lpips_ref, *(c.ila_offset or [])]


def _rebuild(c: ref.APConstants, flat: list[torch.Tensor]) -> ref.APConstants:
    k = len(c.ila_dir)
    return ref.APConstants(flat[:k], flat[k], flat[k + 1:] if c.ila_offset is not None else None)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _acc(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    return total if g is None else (g if total is None else total + g)


def unrolled_purify_graph(victim: Victim, cfg: ZeroPurConfig, x_in: torch.Tensor) -> torch.Tensor:
    """The whole loop as one autograd graph (every step's double graph held at once): the plain
    definition that ``UnrolledPurify``'s step-by-step backward is tested against. Small inputs only."""
    x, m = x_in, torch.zeros_like(x_in)
    for _ in range(cfg.gs_steps):
        x, m = _gs_step(victim, cfg, x, m, x_in, create_graph=True)
    if cfg.ap_steps == 0:
        return x
    c = ref.ap_constants(victim, x_in, x, cfg)
    fine = x_in
    for _ in range(cfg.ap_steps):
        fine = _ap_step(victim, cfg, fine, x_in, c, create_graph=True)
    return fine


class UnrolledPurify(torch.autograd.Function):
    """The reference loop; backward = the exact chain rule (straight-through sign and blur), one step at a time."""

    @staticmethod
    def forward(ctx: Any, x_in: torch.Tensor, victim: Victim, cfg: ZeroPurConfig) -> torch.Tensor:  # noqa: D102
        x_in = x_in.detach()
        x, m = x_in, torch.zeros_like(x_in)
        gs_states = []
        for _ in range(cfg.gs_steps):
            gs_states.append((x, m))
            x, m = (t.detach() for t in _gs_step(victim, cfg, x, m, x_in, create_graph=False))
        ap_states: list[torch.Tensor] = []
        out = x
        if cfg.ap_steps:
            with torch.no_grad():
                c = ref.ap_constants(victim, x_in, x, cfg)
            fine = x_in
            for _ in range(cfg.ap_steps):
                ap_states.append(fine)
                fine = _ap_step(victim, cfg, fine, x_in, c, create_graph=False).detach()
            out = fine
        ctx.victim, ctx.cfg, ctx.gs_states, ctx.ap_states, ctx.coarse = victim, cfg, gs_states, ap_states, x
        ctx.save_for_backward(x_in)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # noqa: D102
        (x_in,) = ctx.saved_tensors
        victim, cfg = ctx.victim, ctx.cfg
        adj_in: torch.Tensor | None = None
        adj_x = grad_out
        with torch.enable_grad():
            if cfg.ap_steps:
                xin_c, coarse_c = _leaf(x_in), _leaf(ctx.coarse)
                c = ref.ap_constants(victim, xin_c, coarse_c, cfg)
                flat = _consts(c)
                leaves = [_leaf(t) for t in flat]
                c_leaf = _rebuild(c, leaves)
                adj_c: list[torch.Tensor | None] = [None] * len(leaves)
                for fine in reversed(ctx.ap_states):
                    f, xi = _leaf(fine), _leaf(x_in)
                    nxt = _ap_step(victim, cfg, f, xi, c_leaf, create_graph=True)
                    g = torch.autograd.grad(nxt, [f, xi, *leaves], grad_outputs=adj_x, allow_unused=True)
                    adj_x, adj_in = g[0], _acc(adj_in, g[1])
                    adj_c = [_acc(a, b) for a, b in zip(adj_c, g[2:])]
                adj_in = _acc(adj_in, adj_x)  # AP starts from the input
                used = [(t, a) for t, a in zip(flat, adj_c) if a is not None]
                g = torch.autograd.grad([t for t, _ in used], [xin_c, coarse_c], grad_outputs=[a for _, a in used],
                                        allow_unused=True) if used else (None, None)
                adj_in, adj_x = _acc(adj_in, g[0]), g[1] if g[1] is not None else torch.zeros_like(x_in)
            adj_m: torch.Tensor | None = None
            for x, m in reversed(ctx.gs_states):
                xl, ml, xi = _leaf(x), _leaf(m), _leaf(x_in)
                nx, nm = _gs_step(victim, cfg, xl, ml, xi, create_graph=True)
                outs, adjs = [nx], [adj_x]
                if adj_m is not None:
                    outs, adjs = [nx, nm], [adj_x, adj_m]
                g = torch.autograd.grad(outs, [xl, ml, xi], grad_outputs=adjs, allow_unused=True)
                adj_x = g[0] if g[0] is not None else torch.zeros_like(x_in)
                adj_m, adj_in = g[1], _acc(adj_in, g[2])
        adj_in = _acc(adj_in, adj_x)  # GS starts from the input
        return adj_in, None, None


class UnrolledModel(nn.Module):
    """victim(reference loop(x)) with the full gradient through the loop (see ``UnrolledPurify``)."""

    def __init__(self, victim: Victim, cfg: ZeroPurConfig):
        super().__init__()
        self.victim, self.cfg = victim, cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xv = x.to(self.victim.mean.dtype)
        return self.victim(UnrolledPurify.apply(xv, self.victim, self.cfg)).to(x.dtype)
