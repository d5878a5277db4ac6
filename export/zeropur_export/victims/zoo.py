"""Victim classifiers as plain PyTorch modules, each with its declared TapSpec.

Tap choice follows the paper's released code: the GS embedding is the pooled
penultimate feature (the input of the final linear layer), the AP/ILA projection
layers are the outputs of the last two stages, and the self-LPIPS layers are the
outputs of every stage (WRN: its stem too). Paths are module paths inside the
network; ``path:in`` names a module's input instead of its output.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zeropur_export.victims.taps import TapSpec, Victim
from zeropur_export.victims.weights import KNOWN_WEIGHTS, find_weights, load_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


# ---------------------------------------------------------------- CIFAR ResNet-20/32/56 (He et al., option A)
class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: stride-2 subsample, zero-pad channels by planes//4 on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _OptionAShortcut(planes) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR; state_dict keys match akamaster/pytorch_resnet_cifar10 (minus ``module.``)."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(_CifarBasicBlock(cin, planes, stride))
                cin = planes
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


# ---------------------------------------------------------------- PreAct-ResNet-18 (CIFAR)
class _PreActBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for s, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{s}", nn.Sequential(_PreActBlock(cin, planes, stride), _PreActBlock(planes, planes, 1)))
            cin = planes
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---------------------------------------------------------------- WideResNet-28-10 (RobustBench key layout)
class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        sc = x if self.equal_in_out else self.convShortcut(o)
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + sc


class _WideGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _WideGroup(n, ch[0], ch[1], 1)
        self.block2 = _WideGroup(n, ch[1], ch[2], 2)
        self.block3 = _WideGroup(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---------------------------------------------------------------- ResNet-50 (torchvision-compatible keys)
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        sc = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + sc)


class ResNet50(nn.Module):
    """ResNet-50 (v1.5, stride on the 3x3) whose state_dict keys match torchvision's ``resnet50``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layers = []
            for b in range(blocks):
                layers.append(_Bottleneck(cin, planes, stride if b == 0 else 1))
                cin = planes * 4
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- VGG-19-BN (CIFAR head; GS only in the paper)
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19BN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


# ---------------------------------------------------------------- registry
_CIFAR_RESNET_TAPS = dict(
    embedding="linear:in", ila=("layer2", "layer3"), lpips=("layer1", "layer2", "layer3"),
    mean=IMAGENET_MEAN, std=IMAGENET_STD, input_shape=(3, 32, 32), num_classes=10,
)

ZOO: dict[str, tuple[Callable[[], nn.Module], TapSpec, str]] = {
    # name: (constructor, taps, preset)
    "resnet20": (lambda: CifarResNet(3), TapSpec(**_CIFAR_RESNET_TAPS), "cifar10"),
    "resnet32": (lambda: CifarResNet(5), TapSpec(**_CIFAR_RESNET_TAPS), "cifar10"),
    "resnet56": (lambda: CifarResNet(9), TapSpec(**_CIFAR_RESNET_TAPS), "cifar10"),
    "preact_resnet18": (PreActResNet18, TapSpec(
        embedding="linear:in", ila=("layer3", "layer4"), lpips=("layer1", "layer2", "layer3", "layer4"),
        mean=CIFAR10_MEAN, std=CIFAR10_STD, input_shape=(3, 32, 32), num_classes=10), "cifar10"),
    "wrn28_10": (lambda: WideResNet(28, 10), TapSpec(
        embedding="fc:in", ila=("block2", "block3"), lpips=("conv1", "block1", "block2", "block3"),
        mean=CIFAR10_MEAN, std=CIFAR10_STD, input_shape=(3, 32, 32), num_classes=10), "cifar10"),
    "resnet50": (ResNet50, TapSpec(
        embedding="fc:in", ila=("layer3", "layer4"), lpips=("layer1", "layer2", "layer3", "layer4"),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, input_shape=(3, 224, 224), num_classes=1000), "imagenet"),
    "vgg19_bn": (VGG19BN, TapSpec(
        embedding="classifier:in", ila=(), lpips=(),
        mean=CIFAR10_MEAN, std=CIFAR10_STD, input_shape=(3, 32, 32), num_classes=10), "cifar10"),
}


def zoo_names() -> list[str]:
    return sorted(ZOO)


def build_net(name: str) -> tuple[nn.Module, TapSpec, str]:
    """Fresh network (random weights), its TapSpec and its preset name."""
    if name not in ZOO:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(zoo_names())}")
    ctor, spec, preset_name = ZOO[name]
    return ctor(), spec, preset_name


def load_victim(name: str, weights: str | None = None, weights_dir: str | None = None,
                random_init: bool = False, seed: int = 0, download: bool = False) -> Victim:
    """A zoo victim with weights: an explicit file, the known pretrained file, or (``random_init``) seeded random."""

    net, spec, _ = build_net(name)
    if weights is not None:
        load_into(net, weights)
    elif not random_init:
        if name not in KNOWN_WEIGHTS:
            raise ValueError(f"{name} has no known pretrained weights: pass a weights file, or random_init=True for tests")
        load_into(net, find_weights(name, weights_dir, download=download))
    else:
        torch.manual_seed(seed)
        net = build_net(name)[0]
        _randomize_bn(net, seed)
    return Victim(net, spec, name)


def _randomize_bn(net: nn.Module, seed: int) -> None:
    """Give BatchNorm non-trivial running statistics so random-weight victims exercise every term."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
