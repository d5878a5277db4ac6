"""TapSpec (which module outputs ZeroPur reads) and Victim (a frozen classifier that exposes them)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TapSpec:
    """Module paths ZeroPur reads from a victim, plus its input contract.

    ``embedding``: the GS embedding (rank 2 after the hook). ``ila``: the AP projection
    layers. ``lpips``: the self-LPIPS layers (both rank 4, NCHW). A path names a module's
    output; ``path:in`` names its (first) input, e.g. ``linear:in`` for the pooled features.
    An empty ``ila`` and ``lpips`` means the victim supports Guided Shift only.
    """

    embedding: str
    ila: tuple[str, ...]
    lpips: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def supports_ap(self) -> bool:
        return bool(self.ila) and bool(self.lpips)

    def all_taps(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in (self.embedding, *self.ila, *self.lpips):
            seen.setdefault(t, None)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TapSpec":
        return cls(embedding=d["embedding"], ila=tuple(d["ila"]), lpips=tuple(d["lpips"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), input_shape=tuple(d["input_shape"]), num_classes=int(d["num_classes"]))


def _split(tap: str) -> tuple[str, bool]:
    if tap.endswith(":in"):
        return tap[:-3], True
    return tap, False


class Victim(nn.Module):
    """A frozen classifier in eval mode with normalisation inside and forward hooks on its taps.

    ``forward(x)`` takes images in [0, 1] and returns logits. ``run(x)`` also returns the tap
    tensors. Weights never receive gradients: ZeroPur differentiates w.r.t. the image only.
    """

    def __init__(self, net: nn.Module, spec: TapSpec, name: str = "custom"):
        super().__init__()
        self.net = net.eval()
        self.spec = spec
        self.name = name
        for p in self.net.parameters():
            p.requires_grad_(False)
        c = spec.input_shape[0]
        if len(spec.mean) != c or len(spec.std) != c:
            raise ValueError(f"TapSpec mean/std need {c} values (input_shape {spec.input_shape}), got {spec.mean}, {spec.std}")
        if any(s <= 0 for s in spec.std):
            raise ValueError(f"TapSpec std must be > 0, got {spec.std}")
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, c, 1, 1))
        modules = dict(net.named_modules())
        unknown = [t for t in spec.all_taps() if _split(t)[0] not in modules or _split(t)[0] == ""]
        if unknown:
            valid = ", ".join(n for n in modules if n)
            raise ValueError(f"tap(s) {unknown} not found in {name}; valid module names: {valid}")
        self._captured: dict[str, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self._attach_hooks()
        self._check_ranks()

    def _attach_hooks(self) -> None:
        modules = dict(self.net.named_modules())
        for tap in self.spec.all_taps():
            path, is_input = _split(tap)
            if is_input:
                self._hooks.append(modules[path].register_forward_pre_hook(self._pre_hook(tap)))
            else:
                self._hooks.append(modules[path].register_forward_hook(self._post_hook(tap)))

    def to_dtype(self, dtype: torch.dtype) -> "Victim":
        """An independent copy in another dtype (e.g. float64 for the truth in parity tests)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        try:
            net = copy.deepcopy(self.net).to(dtype)  # without our hooks, whose closures point at self
        finally:
            self._attach_hooks()
        return Victim(net, self.spec, self.name).to(dtype)

    def _pre_hook(self, tap: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if self._captured is not None:
                self._captured[tap] = args[0]
        return hook

    def _post_hook(self, tap: str):
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[tap] = out
        return hook

    def _check_ranks(self) -> None:
        dtype = next(self.net.parameters(), self.mean).dtype
        x = torch.full((1, *self.spec.input_shape), 0.5, dtype=dtype)
        with torch.no_grad():
            logits, taps = self.run(x)
        problems = []
        if logits.dim() != 2 or logits.shape[1] != self.spec.num_classes:
            problems.append(f"logits shape {tuple(logits.shape)} != (N, {self.spec.num_classes})")
        for tap in self.spec.all_taps():
            if tap not in taps:
                problems.append(f"tap {tap!r} was never reached in forward()")
        if self.spec.embedding in taps and taps[self.spec.embedding].dim() != 2:
            problems.append(f"embedding tap {self.spec.embedding!r} has rank {taps[self.spec.embedding].dim()}, "
                            "needs rank 2 (N, D): use the input of the final linear layer, e.g. 'fc:in'")
        for tap in (*self.spec.ila, *self.spec.lpips):
            if tap in taps and taps[tap].dim() != 4:
                problems.append(f"ILA/LPIPS tap {tap!r} has rank {taps[tap].dim()}, needs rank 4 (N, C, H, W)")
        if problems:
            valid = ", ".join(n for n, _ in self.net.named_modules() if n)
            raise ValueError(f"bad TapSpec for {self.name}: " + "; ".join(problems) + f". Valid module names: {valid}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and every tap's tensor from one forward pass."""
        self._captured = {}
        try:
            logits = self.net(self.normalize(x))
            return logits, self._captured
        finally:
            self._captured = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1][self.spec.embedding]


def make_victim(net: nn.Module, taps: TapSpec | dict[str, Any], name: str = "custom") -> Victim:
    """Wrap a user-supplied ``nn.Module`` with tap names (module paths); validates paths and ranks."""
    spec = taps if isinstance(taps, TapSpec) else TapSpec.from_dict(taps)
    return Victim(net, spec, name)



# ---------------------------------------------------------------- tap suggestion from one traced forward pass
@dataclass(frozen=True)
class TapSuggestion:
    """What ``suggest_taps`` found: the taps (None where a role could not be filled), every traced module's
    output shape in call order, the stages, and why a role is missing."""

    embedding: str | None
    ila: tuple[str, ...]
    lpips: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    stages: tuple[str, ...]
    problems: tuple[str, ...]
    embedding_shape: tuple[int, ...] | None = None
    calls: tuple[tuple[str, tuple[int, ...]], ...] = ()  # every module call in order, a reused module once per call
    negative: frozenset[str] = frozenset()  # modules whose output holds negative values: pre-activation

    @property
    def complete(self) -> bool:
        return self.embedding is not None and len(self.ila) == 2 and bool(self.lpips)

    def spec(self, mean: Any, std: Any, input_shape: Any, num_classes: int) -> TapSpec:
        if not self.complete:
            raise ValueError("no taps could be suggested for this network: " + "; ".join(self.problems) +
                             ". " + HAND_TAPS_HINT)
        return TapSpec(embedding=self.embedding, ila=self.ila, lpips=self.lpips, mean=tuple(mean), std=tuple(std),
                       input_shape=tuple(input_shape), num_classes=int(num_classes))


HAND_TAPS_HINT = ("Pass them by hand, as module names from the list above: --embedding NAME:in (the input of the "
                  "final linear layer, rank 2), --ila A B (the outputs of the last two resolution stages, rank 4) and "
                  "--lpips A B ... (every stage output, rank 4); or put embedding/ila/lpips into the --contract JSON")


def suggest_taps(net: nn.Module, input_shape: Any) -> TapSuggestion:
    """Trace one forward pass (forward hooks on every module) of a (1, C, H, W) input and propose taps.

    A *stage* is the last module to finish before the spatial resolution changes: among the modules called
    once per forward with a rank-4 output larger than 1x1, the stretch of the call order at one resolution
    ends with its stage, the outermost (fewest dots) module of the stretch that finishes last (e.g.
    ``layer2``, not the first 1x1 conv of ``layer3.0`` that still runs at layer2's resolution). The embedding is the input of the last ``nn.Linear`` called; the ILA layers
    are the last two stages; the LPIPS layers every stage.
    """
    order: list[tuple[str, tuple[int, ...]]] = []
    calls: dict[str, int] = {}
    lin_in: dict[str, tuple[int, ...]] = {}
    negative: set[str] = set()
    hooks = []

    def post(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                order.append((name, tuple(out.shape)))
                if out.is_floating_point() and bool((out < 0).any()):
                    negative.add(name)
            if isinstance(_m, nn.Linear) and args and isinstance(args[0], torch.Tensor):
                lin_in[name] = tuple(args[0].shape)
        return hook

    for name, m in net.named_modules():
        if name:
            hooks.append(m.register_forward_hook(post(name)))
    was_training = net.training
    try:
        net.eval()
        p = next(net.parameters(), None)
        x = torch.full((1, *input_shape), 0.5, dtype=p.dtype if p is not None else torch.float32)
        with torch.no_grad():
            try:
                net(x)
            except RuntimeError as e:  # a shape the network does not take: say which shape was tried
                raise ValueError(f"one forward pass of a {tuple(x.shape)} input failed ({str(e).splitlines()[0]}); "
                                 "is the input shape right (channels first: C,H,W)?") from None
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    shapes = {n: s for n, s in order}
    problems = []
    linears = [n for n, _ in order if n in lin_in and calls[n] == 1]
    embedding = None
    if not linears:
        problems.append("no nn.Linear layer is called in forward(), so there is no 'input of the final linear layer'")
    elif len(lin_in[linears[-1]]) != 2:
        problems.append(f"the final linear layer {linears[-1]!r} takes a rank-{len(lin_in[linears[-1]])} input, "
                        "the embedding must be rank 2 (N, D)")
    else:
        embedding = f"{linears[-1]}:in"
    spatial = [(n, s) for n, s in order if len(s) == 4 and s[2] * s[3] > 1 and calls[n] == 1]
    runs: list[list[str]] = []  # maximal stretches of the call order at one resolution
    for i, (n, shp) in enumerate(spatial):
        if i == 0 or spatial[i - 1][1][2:] != shp[2:]:
            runs.append([])
        runs[-1].append(n)
    # the outermost module of a stretch (a block's first ops may still run at the old resolution)
    stages = [max(run, key=lambda n, r=run: (-n.count("."), r.index(n))) for run in runs]
    if len(stages) < 2:
        problems.append(f"found {len(stages)} resolution stage(s) (rank-4 outputs whose H x W changes along the "
                        "forward pass); ILA needs two")
    ila = tuple(stages[-2:]) if len(stages) >= 2 else ()
    return TapSuggestion(embedding, ila, tuple(stages) if len(stages) >= 2 else (), shapes, tuple(stages),
                         tuple(problems), lin_in[linears[-1]] if embedding else None, tuple(order), frozenset(negative))


def format_suggestion(s: TapSuggestion) -> str:
    """The traced modules with their shapes (stages marked) and the proposed taps, for the terminal."""
    lines = ["module outputs, in call order (1 image):"]
    total = {n: sum(1 for m, _ in s.calls if m == n) for n, _ in s.calls}
    seen: dict[str, int] = {}
    for n, shp in s.calls or tuple(s.shapes.items()):
        seen[n] = seen.get(n, 0) + 1
        mark = "  <- stage" if n in s.stages else ""
        if total.get(n, 1) > 1:  # a module called more than once has no single output to tap
            mark = f"  (call {seen[n]} of {total[n]}: a reused module, never a tap)"
        elif n in s.stages and n in s.negative:
            mark += " (pre-activation: its output has negative values, so the activation runs outside a module, " \
                    "e.g. F.relu in forward; the taps see features before it)"
        lines.append(f"  {n:40s} {'x'.join(map(str, shp[1:]))}{mark}")
    if s.complete:
        lines += ["", "suggested taps:",
                  f"  embedding  {s.embedding}  ({'x'.join(map(str, s.embedding_shape[1:]))}, the input of the final linear layer)",
                  f"  ila        {' '.join(s.ila)}  ({', '.join('x'.join(map(str, s.shapes[t][1:])) for t in s.ila)})",
                  f"  lpips      {' '.join(s.lpips)}"]
    else:
        lines += ["", "no complete suggestion: " + "; ".join(s.problems) + ".", HAND_TAPS_HINT + "."]
    return "\n".join(lines)
