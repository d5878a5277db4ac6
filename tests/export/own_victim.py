"""A classifier that is not in the zoo, written here independently of ``zeropur_export.victims.zoo``: a CIFAR
ResNet-32 (He et al.'s option-A shortcut as channel padding of a strided view) whose parameter names
follow the published akamaster checkpoint, so the real ``resnet32-d509ac18.th`` loads into it through
``--weights``; and a small CNN without any stage structure, for the hand-taps path."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2 if down else 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.extra = c_out - c_in  # channels the shortcut pads with zeros
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x[:, :, ::2, ::2] if self.down else x
        if self.extra:
            skip = F.pad(skip, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + skip)


class OwnResNet32(nn.Module):
    def __init__(self, classes: int = 10, per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = [16, 16, 32, 64]
        for i in range(1, 4):
            blocks = [Block(widths[i - 1] if j == 0 else widths[i], widths[i], down=(i > 1 and j == 0))
                      for j in range(per_stage)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.linear(h.mean(dim=(2, 3)))


def resnet32() -> nn.Module:
    """The factory ``--victim tests/export/own_victim.py:resnet32`` calls; weights come from ``--weights``."""
    return OwnResNet32()


class TinyCNN(nn.Module):
    """No resolution stages (one resolution, then a global pool): suggest-taps cannot propose ILA layers."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def tiny_victim():
    """A factory that returns a ready ``Victim`` (its own contract and hand taps: Guided Shift only)."""
    from zeropur_export.victims.taps import TapSpec, make_victim
    return make_victim(tiny_cnn(), TapSpec(embedding="head:in", ila=(), lpips=(), mean=(0.5, 0.5, 0.5),
                                           std=(0.25, 0.25, 0.25), input_shape=(3, 32, 32), num_classes=10), "tiny")
