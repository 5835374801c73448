"""ResNet18 and WideResNet for 32x32 CIFAR images.

Importing this module only defines classes and functions; it is safe in a notebook:

    from model import ResNet18, WideResNet, build_model
    net = build_model("wideresnet", depth=16, widen_factor=4)
"""
import inspect

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation, as in ResNet v1)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: one 3x3 stride-1 convolution and no max-pool."""

    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = (64, 128, 256, 512)
        strides = (1, 2, 2, 2)
        stages, in_channels = [], 64
        for width, stride, blocks in zip(widths, strides, blocks_per_stage):
            stages.append(_make_stage(BasicBlock, in_channels, width, stride=stride, blocks=blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv, dropout, BN-ReLU-conv (Zagoruyko & Komodakis)."""

    def __init__(self, in_channels, out_channels, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        # The projection reads the activated input, as in the paper's reference code.
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k: three stages of (depth - 4) / 6 wide blocks, widths 16k, 32k, 64k."""

    def __init__(self, depth=28, widen_factor=10, dropout=0.0, num_classes=100):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.stages = nn.Sequential(
            _make_stage(WideBasicBlock, 16, widths[0], stride=1, blocks=blocks, dropout=dropout),
            _make_stage(WideBasicBlock, widths[0], widths[1], stride=2, blocks=blocks, dropout=dropout),
            _make_stage(WideBasicBlock, widths[1], widths[2], stride=2, blocks=blocks, dropout=dropout),
        )
        self.bn = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        wide_resnet_init(self)

    def forward(self, x):
        out = self.stages(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wide_resnet_init(model):
    """He-normal (fan_out) convolutions, BatchNorm at identity, a zero classifier bias: the initialisation of the
    widely used PyTorch WideResNet (xternalz/WideResNet-pytorch). The WRN authors' own code draws fan_in He-normal
    convolutions and BatchNorm scales from U(0, 1).

    ResNet18 keeps PyTorch's default initialisation, as kuangliu/pytorch-cifar's does.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def _make_stage(block, in_channels, out_channels, stride, blocks, **block_kwargs):
    layers = [block(in_channels, out_channels, stride, **block_kwargs)]
    layers += [block(out_channels, out_channels, 1, **block_kwargs) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def ResNet18(num_classes=100):
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


MODELS = {"resnet18": ResNet18, "wideresnet": WideResNet}


def build_model(name, num_classes=100, **kwargs):
    """Build a model by name; kwargs go to its constructor (depth, widen_factor, dropout for WideResNet)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    accepted = inspect.signature(MODELS[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name} does not take {', '.join(unknown)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
