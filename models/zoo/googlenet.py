"""GoogLeNet (Inception v1) as in Szegedy et al., "Going Deeper with Convolutions" (2014), Table 1.

Unlike torchvision's version it keeps the paper's 5x5 convolutions (torchvision uses 3x3 there),
its local response normalisation, and no batch normalisation, so its parameter counts can be
checked against the paper's table.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._api import ZooCNN, register_model


class ConvReLU(nn.Sequential):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)),
                    ("relu", nn.ReLU(inplace=True)),
                ]
            )
        )


class Inception(nn.Module):
    """Four parallel branches concatenated along channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; pool -> 1x1."""

    def __init__(
        self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = ConvReLU(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvReLU(in_channels, ch3x3red, 1), ConvReLU(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(ConvReLU(in_channels, ch5x5red, 1), ConvReLU(ch5x5red, ch5x5, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvReLU(in_channels, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class AuxClassifier(nn.Module):
    """The paper's auxiliary head: 5x5/3 avg pool, 1x1 conv 128, fc 1024, dropout 70%, fc."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = ConvReLU(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


# (name, in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj): Table 1 of the paper
INCEPTION_TABLE = [
    ("inception3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception3b", 256, 128, 128, 192, 32, 96, 64),
    ("inception4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception4e", 528, 256, 160, 320, 32, 128, 128),
    ("inception5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception5b", 832, 384, 192, 384, 48, 128, 128),
]


class GoogLeNet(ZooCNN):
    def __init__(
        self, *, num_classes: int = 1000, in_channels: int = 3, aux_logits: bool = False, dropout: float = 0.4
    ) -> None:
        super().__init__()
        blocks = {row[0]: Inception(*row[1:]) for row in INCEPTION_TABLE}
        layers: list[tuple[str, nn.Module]] = [
            ("conv1", ConvReLU(in_channels, 64, 7, stride=2, padding=3)),  # 224 -> 112
            ("pool1", nn.MaxPool2d(3, stride=2, ceil_mode=True)),  # 112 -> 56
            ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)),
            ("conv2_reduce", ConvReLU(64, 64, 1)),
            ("conv2", ConvReLU(64, 192, 3, padding=1)),
            ("norm2", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)),
            ("pool2", nn.MaxPool2d(3, stride=2, ceil_mode=True)),  # 56 -> 28
            ("inception3a", blocks["inception3a"]),
            ("inception3b", blocks["inception3b"]),
            ("pool3", nn.MaxPool2d(3, stride=2, ceil_mode=True)),  # 28 -> 14
            *[(f"inception4{s}", blocks[f"inception4{s}"]) for s in "abcde"],
            ("pool4", nn.MaxPool2d(3, stride=2, ceil_mode=True)),  # 14 -> 7
            ("inception5a", blocks["inception5a"]),
            ("inception5b", blocks["inception5b"]),
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # the paper's 7x7/1 average pool at 224
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("dropout", nn.Dropout(dropout)),
                    ("fc", nn.Linear(1024, num_classes)),
                ]
            )
        )
        # The auxiliary heads only train; they are outside `features` so export never sees them.
        self.aux1 = AuxClassifier(512, num_classes) if aux_logits else None
        self.aux2 = AuxClassifier(528, num_classes) if aux_logits else None
        self.feature_taps = {"conv1": "conv1", "conv2": "conv2", **{row[0]: row[0] for row in INCEPTION_TABLE}}
        self.default_input = (in_channels, 224, 224)

    def forward(self, x: torch.Tensor):
        if self.aux1 is None or not self.training:
            return super().forward(x)
        aux = []
        for name, child in self.features.named_children():
            x = child(x)
            if name == "inception4a":
                aux.append(self.aux1(x))
            elif name == "inception4d":
                aux.append(self.aux2(x))
        logits = self.classifier(torch.flatten(self.avgpool(x), 1))
        return logits, aux[1], aux[0]


@register_model()
def googlenet(
    *, num_classes: int = 1000, in_channels: int = 3, aux_logits: bool = False, dropout: float = 0.4
) -> GoogLeNet:
    """GoogLeNet / Inception v1 for 224x224 images, without auxiliary classifiers by default."""
    return GoogLeNet(num_classes=num_classes, in_channels=in_channels, aux_logits=aux_logits, dropout=dropout)
