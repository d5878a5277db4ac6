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
* ``UnrolledModel``: forward = the one loop of ``zeropur_rt.schedule`` over the reference's gradients
  (``TapeRunner``: the runner whose buffers are autograd tensors); backward = the chain rule through
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

from zeropur_export.reference import losses as ref, steps
from zeropur_export.victims.taps import Victim
from zeropur_rt import schedule
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
        self.memo = _LastPurification(lambda a: self.purifier.run(a, iterates=True))

    def path(self, out: np.ndarray, it: Any) -> list[np.ndarray]:
        """The chosen iterates; the input itself (step 0 of GS and of AP) is left out: BPDA there is no purifier."""
        full = list(it.gs_x[1:]) + ([it.coarse] if it.coarse is not None else []) + list(it.ap_x[1:])
        full = [p for p in full if p is not None] + [out]
        picks = np.unique(np.round(np.linspace(len(full) - 1, 0, min(self.points, len(full)))).astype(int))
        return [full[i] for i in picks]

    def sample(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        res = self.memo(_host(x)) if self.eot == 1 else self.purifier.run(_host(x), iterates=True)
        pts = [torch.from_numpy(np.asarray(p)).to(x.device) for p in self.path(res.images, res.iterates)]
        final = self.victim(substitute(x, pts[-1]))
        mean = torch.stack([self.victim(substitute(x, p)) for p in pts]).mean(0)
        # value: the logits of the output; gradient: the mean over the path
        return substitute(mean, final.detach())


# ---------------------------------------------------------------- the unrolled loop (full gradient)
class _Box:
    """A tape runner's buffer: one tensor, replaced (never written in place) by every write."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


class TapeRunner:
    """The schedule's ``Runner`` over autograd: the reference's gradient graphs, buffers that are boxes, and
    every write a new tensor, so the one loop of ``zeropur_rt.schedule`` becomes a differentiable function
    of its input. With ``graph`` each step's gradient keeps its own graph (second order through the victim)
    and the step's gradient is taken at an alias of its input, i.e. in that input alone, as the reference
    takes it; without, nothing is recorded (the attack's forward pass)."""

    name = "tape"

    def __init__(self, victim: Victim, cfg: ZeroPurConfig, graph: bool):
        from zeropur_export.reference.torch_runner import TorchRunner
        self.victim, self.cfg, self.graph = victim, cfg, graph
        self.dtype, self.device = victim.mean.dtype, victim.mean.device
        self._shapes = TorchRunner(victim, cfg, "cpu" if self.device.type == "cpu" else str(self.device))

    def alloc(self, shape: tuple[int, ...], name: str) -> _Box:
        return _Box(torch.zeros(shape, dtype=self.dtype, device=self.device))

    def output_shapes(self, graph: str, n: int) -> dict[str, tuple[int, ...]]:
        return self._shapes.output_shapes(graph, n)

    def copy(self, dst: _Box, src: _Box) -> None:
        dst.t = src.t

    def zero(self, buf: _Box) -> None:
        buf.t = torch.zeros_like(buf.t)

    def upload(self, dst: _Box, src: np.ndarray) -> None:
        dst.t = torch.as_tensor(src, dtype=self.dtype, device=self.device)

    def download(self, src: _Box) -> np.ndarray:
        return src.t.detach().cpu().numpy()

    def sync(self) -> None: ...

    def capture(self, enqueue: Callable[[], None]) -> None:
        return None

    def release(self, buffers: list[Any], n: int | None = None) -> None: ...

    def close(self) -> None: ...

    def _step_grad(self, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x if self.graph and x.requires_grad else x.detach().requires_grad_(True)
            xa = xg.view_as(xg)
            (g,) = torch.autograd.grad(loss_of(xa), xa, create_graph=self.graph)
        return g if self.graph else g.detach()

    def run(self, graph: str, inputs: dict[str, _Box], outputs: dict[str, _Box]) -> None:
        v, t = self.victim, {k: b.t for k, b in inputs.items()}
        if graph == "gs_grad":
            outputs["grad"].t = self._step_grad(lambda x: ref.gs_loss(v, x, t["x_blur"], blur_graph=self.graph), t["x"])
        elif graph == "ap_setup":
            with torch.set_grad_enabled(self.graph):
                c = ref.ap_constants(v, t["x_in"], t["coarse"], self.cfg)
            for i, d in enumerate(c.ila_dir):
                outputs[f"ila_dir_{i}"].t = d
            outputs["lpips_ref"].t = c.lpips_ref
        elif graph == "ap_grad":
            c = ref.APConstants([t[f"ila_dir_{i}"] for i in range(len(v.spec.ila))], t["lpips_ref"])
            outputs["grad"].t = self._step_grad(lambda f: ref.ap_loss(v, f, c, self.cfg), t["fine"])
        else:
            raise ValueError(f"the tape runner runs gs_grad, ap_setup and ap_grad, not {graph!r}")


class TapeKernels:
    """The reference's torch update twins on boxes, with a straight-through sign and blur."""

    name = "tape"

    def blur(self, src: _Box, dst: _Box, sigma: float) -> None:
        dst.t = substitute(src.t, ref.blur_torch(src.t, sigma))

    def gs_update(self, x: _Box, grad: _Box, m: _Box, x_in: _Box, l1: _Box, cfg: ZeroPurConfig) -> None:
        x.t, m.t = steps.gs_update(x.t, grad.t, m.t, x_in.t, cfg, sign=st_sign)

    def ap_update(self, x: _Box, grad: _Box, x_in: _Box, cfg: ZeroPurConfig) -> None:
        x.t = steps.ap_update(x.t, grad.t, x_in.t, cfg, sign=st_sign)

    def close(self) -> None: ...


def _tape(victim: Victim, cfg: ZeroPurConfig, x_in: torch.Tensor, graph: bool) -> tuple[TapeRunner, Any]:
    runner = TapeRunner(victim, cfg, graph)
    b = schedule.allocate(runner, len(x_in), tuple(x_in.shape[1:]), cfg.ap_steps > 0)
    b.x_in.t = x_in
    return runner, b


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _acc(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    return total if g is None else (g if total is None else total + g)


def unrolled_purify_graph(victim: Victim, cfg: ZeroPurConfig, x_in: torch.Tensor,
                          drawn: schedule.Draw | None = None) -> torch.Tensor:
    """The whole loop as one autograd graph (every step's double graph held at once): the plain
    definition that ``UnrolledPurify``'s step-by-step backward is tested against. Small inputs only.
    A random start is added on the host (``schedule``), so this graph holds no path through it."""
    runner, b = _tape(victim, cfg, x_in, graph=True)
    return schedule.purify(runner, TapeKernels(), b, cfg, drawn=drawn).t


class UnrolledPurify(torch.autograd.Function):
    """The schedule's loop on the tape runner; backward = the exact chain rule (straight-through sign and
    blur), re-running one step at a time from the iterates the forward kept, with the forward's draws.
    A random start's clip passes the gradient straight through, like the sign."""

    @staticmethod
    def forward(ctx: Any, x_in: torch.Tensor, victim: Victim, cfg: ZeroPurConfig,  # noqa: D102
                drawn: schedule.Draw | None = None) -> torch.Tensor:
        runner, b = _tape(victim, cfg, x_in.detach(), graph=False)
        gs_states: list[tuple[torch.Tensor, torch.Tensor]] = []
        ap_states: list[torch.Tensor] = []

        def keep(stage: str, t: int, buf: Any) -> None:  # the input of each step: all a re-run needs
            if stage == "gs":
                gs_states.append((b.x.t, b.m.t))
            elif stage == "ap":
                ap_states.append(b.fine.t)

        out = schedule.purify(runner, TapeKernels(), b, cfg, observe=keep, drawn=drawn).t
        ctx.victim, ctx.cfg, ctx.gs_states, ctx.ap_states, ctx.coarse = victim, cfg, gs_states, ap_states, b.x.t
        ctx.sigmas = drawn.sigmas if drawn else [None] * len(gs_states)
        ctx.save_for_backward(x_in)
        return out.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # noqa: D102
        (x_in,) = ctx.saved_tensors
        cfg, kernels = ctx.cfg, TapeKernels()
        runner, b = _tape(ctx.victim, cfg, x_in.detach(), graph=True)
        adj_in: torch.Tensor | None = None
        adj_x = grad_out
        with torch.enable_grad():
            if ctx.ap_states:
                xin_c, coarse_c = _leaf(x_in), _leaf(ctx.coarse)
                b.x_in.t, b.x.t = xin_c, coarse_c
                schedule.ap_begin(runner, b)  # the AP constants, with their graph to (x_in, coarse)
                names = list(b.ap_consts)
                consts = [b.ap_consts[k].t for k in names]
                leaves = [_leaf(c) for c in consts]
                adj_c: list[torch.Tensor | None] = [None] * len(leaves)
                for fine in reversed(ctx.ap_states):
                    f, xi = _leaf(fine), _leaf(x_in)
                    b.fine.t, b.x_in.t = f, xi
                    for k, leaf in zip(names, leaves):
                        b.ap_consts[k].t = leaf
                    schedule.ap_step(runner, kernels, b, cfg)
                    g = torch.autograd.grad(b.fine.t, [f, xi, *leaves], grad_outputs=adj_x, allow_unused=True)
                    adj_x, adj_in = g[0], _acc(adj_in, g[1])
                    adj_c = [_acc(a, c) for a, c in zip(adj_c, g[2:])]
                adj_in = _acc(adj_in, adj_x)  # AP starts from the input
                used = [(c, a) for c, a in zip(consts, adj_c) if a is not None]
                g = torch.autograd.grad([c for c, _ in used], [xin_c, coarse_c], grad_outputs=[a for _, a in used],
                                        allow_unused=True) if used else (None, None)
                adj_in, adj_x = _acc(adj_in, g[0]), g[1] if g[1] is not None else torch.zeros_like(x_in)
            adj_m: torch.Tensor | None = None
            for (x, m), sigma in reversed(list(zip(ctx.gs_states, ctx.sigmas))):
                xl, ml, xi = _leaf(x), _leaf(m), _leaf(x_in)
                b.x.t, b.m.t, b.x_in.t = xl, ml, xi
                schedule.gs_step(runner, kernels, b, cfg, sigma=sigma)
                outs, adjs = ([b.x.t], [adj_x]) if adj_m is None else ([b.x.t, b.m.t], [adj_x, adj_m])
                g = torch.autograd.grad(outs, [xl, ml, xi], grad_outputs=adjs, allow_unused=True)
                adj_x = g[0] if g[0] is not None else torch.zeros_like(x_in)
                adj_m, adj_in = g[1], _acc(adj_in, g[2])
        adj_in = _acc(adj_in, adj_x)  # GS starts from the input
        return adj_in, None, None, None


class UnrolledModel(_Purified):
    """victim(reference loop(x)) with the full gradient through the loop (see ``UnrolledPurify``). A randomised
    ``cfg`` takes its draws from ``draw`` (e.g. the runtime purifier's ``draw``, so both share one seed)."""

    def __init__(self, victim: Victim, cfg: ZeroPurConfig, eot: int = 1,
                 draw: Callable[[tuple[int, ...]], schedule.Draw | None] | None = None):
        super().__init__(victim, eot)
        self.cfg = cfg
        rng = np.random.default_rng(0)
        self.draw = draw or (lambda shape: schedule.draw(cfg, shape, rng))

    def sample(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xv = x.to(self.victim.mean.dtype)
        return self.victim(UnrolledPurify.apply(xv, self.victim, self.cfg, self.draw(tuple(xv.shape)))).to(x.dtype)
