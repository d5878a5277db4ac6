"""What a new user meets on the build side: suggest-taps' warnings, an export without weights, fetch's command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from zeropur_export.cli import main as export_cli  # noqa: E402
from zeropur_export.victims.taps import format_suggestion, suggest_taps  # noqa: E402


class FunctionalReluNet(nn.Module):
    """Activations in forward() (F.relu), and one module called twice: what the zoo's modules never show."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.shared, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = F.relu(self.shared(F.relu(self.shared(x))))
        return self.fc(x.mean((2, 3)))


def make() -> nn.Module:
    torch.manual_seed(0)
    return FunctionalReluNet()


def test_suggest_taps_says_pre_activation_lists_each_call_and_hints_channels_first():
    s = suggest_taps(make(), (3, 32, 32))
    text = format_suggestion(s)
    assert s.stages == ("b1", "b2") and text.count("pre-activation") == 2
    assert "call 1 of 2: a reused module" in text and "call 2 of 2: a reused module" in text
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 3\) input failed .*channels first"):
        suggest_taps(make(), (32, 32, 3))


def test_channels_last_input_shape_is_refused_before_torch_runs(capsys):
    rc = export_cli(["suggest-taps", "--victim", f"{__name__}:make", "--input-shape", "32,32,3"])
    assert rc == 2 and "did you mean --input-shape 3,32,32?" in capsys.readouterr().err


def test_export_without_weights_warns_and_records_it(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "art"
    rc = export_cli(["export", "--victim", "test_first_use_export:make", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                     "--input-shape", "3,32,32", "--num-classes", "10", "--out", str(out), "--max-batch", "4",
                     "--opt-batch", "2"])
    assert rc == 0
    assert "warning: no --weights" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights_sha256"] is None and m["tools"]["weights"].startswith("none: random init")
    from zeropur_rt.cli import main as rt
    assert rt(["info", str(out)]) == 0
    assert "NO WEIGHTS FILE" in capsys.readouterr().out
