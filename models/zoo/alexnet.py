"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-tower layout, and a 32x32 variant."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._api import ZooCNN, register_model


class AlexNet(ZooCNN):
    """torchvision's AlexNet for 3x224x224: five conv layers, three fully connected ones.

    Children of `features` are named (conv1, relu1, pool1, ...) rather than numbered so that
    feature maps, arithmetic rows and ONNX outputs share one vocabulary.
    """

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("conv2", nn.Conv2d(64, 192, kernel_size=5, padding=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("conv3", nn.Conv2d(192, 384, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(384, 256, kernel_size=3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(256, 256, kernel_size=3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
                ]
            )
        )
        # 6x6 at 224x224 input; adaptive so other input sizes still reach the classifier
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("drop6", nn.Dropout(p=dropout)),
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(p=dropout)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("fc8", nn.Linear(4096, num_classes)),
                ]
            )
        )
        self.feature_taps = {f"conv{i}": f"relu{i}" for i in range(1, 6)}
        self.default_input = (in_channels, 224, 224)


class AlexNetSmall(ZooCNN):
    """AlexNet's shape for 32x32 inputs: five 3x3 conv layers with ReLU and three 2x2 max-pools,
    then three fully connected layers with dropout. `width_mult` scales every layer's width.
    """

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError("width_mult must be positive")

        def width(channels: int) -> int:
            return max(8, round(channels * width_mult))

        c1, c2, c3, c4, c5 = (width(c) for c in (64, 192, 384, 256, 256))
        hidden = width(1024)
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", nn.MaxPool2d(kernel_size=2)),  # 32 -> 16
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", nn.MaxPool2d(kernel_size=2)),  # 16 -> 8
                    ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=2)),  # 8 -> 4
                ]
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("drop6", nn.Dropout(p=dropout)),
                    ("fc6", nn.Linear(c5 * 4 * 4, hidden)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(p=dropout)),
                    ("fc7", nn.Linear(hidden, hidden)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("fc8", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        self.feature_taps = {f"conv{i}": f"relu{i}" for i in range(1, 6)}
        self.default_input = (in_channels, 32, 32)


@register_model()
def alexnet(*, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> AlexNet:
    """AlexNet for 224x224 images; 61,100,840 parameters with 1000 classes."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)


@register_model()
def alexnet_small(
    *, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.5
) -> AlexNetSmall:
    """AlexNet-style CNN for 32x32 images (CIFAR-10, digits resized)."""
    return AlexNetSmall(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, dropout=dropout)
