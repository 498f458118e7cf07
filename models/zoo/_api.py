"""Find zoo models by name, as torchvision's `register_model` / `get_model` / `list_models` do."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None):
    """Decorator: make a builder reachable as `get_model(name)`."""

    def wrap(builder):
        key = name or builder.__name__
        if key in _BUILDERS:
            raise ValueError(f"a model named {key!r} is registered already")
        _BUILDERS[key] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build zoo model `name` with the builder's keyword arguments (num_classes, in_channels, ...)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(list_models())}") from None
    return builder(**kwargs)


class ZooCNN(nn.Module):
    """A CNN in three named stages, `features`, `avgpool`, `classifier`, as torchvision lays them out.

    `feature_taps` maps a feature-map name (conv1, inception3a, ...) to the child of `features`
    whose output is that feature map (the activation after the layer): the exporter makes those
    graph outputs.
    """

    features: nn.Sequential
    avgpool: nn.Module
    classifier: nn.Module
    feature_taps: dict[str, str]
    default_input: tuple[int, int, int]  # (C, H, W) the model was laid out for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C', H', W')
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # (B, C' * h * w)
        return self.classifier(x)  # (B, K)

    def forward_with_feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits (B, K), {tap name: feature map (B, C', H', W')}) in one pass."""
        by_child = {child: tap for tap, child in self.feature_taps.items()}
        maps: dict[str, torch.Tensor] = {}
        for child_name, child in self.features.named_children():
            x = child(x)
            if child_name in by_child:
                maps[by_child[child_name]] = x
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x), maps
