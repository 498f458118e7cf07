"""A training checkpoint: one typed record with save, load and the model it holds.

Written by training after every epoch (so a run resumes exactly: optimizer, schedule and RNG states
included) and read by the export, which needs only the model, its labels and its preprocessing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from convserve.contract import PreprocessSpec

from .config import TrainConfig, TrainError
from .zoo import get_model


class CheckpointError(ValueError):
    """A file that is not a readable convserve checkpoint."""


def build_model(config: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The untrained network a config describes. Raises TrainError for an unknown arch."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels, dropout=config.dropout)
    if config.arch == "alexnet_small":
        kwargs["width_mult"] = config.width_mult
    try:
        return get_model(config.arch, **kwargs)
    except ValueError as exc:
        raise TrainError(str(exc)) from None


@dataclass
class Checkpoint:
    config: TrainConfig
    epoch: int  # epochs completed
    history: list[dict]  # one metrics record per epoch
    labels: list[str]
    preprocess: PreprocessSpec  # with the training split's mean and std
    split: dict  # {"train": N, "test": M}
    model: dict  # state_dict
    samples: Optional[torch.Tensor] = None  # (n, C, H, W) real test inputs, for the export's parity check
    # what a resumed run needs to continue exactly as an uninterrupted one
    training_state: dict = field(default_factory=dict)  # optimizer, scheduler, generators, torch_rng

    def save(self, path: str) -> None:
        """Write atomically: a run killed while saving leaves the previous checkpoint whole."""
        record = {
            **self.training_state,
            "config": asdict(self.config),
            "epoch": self.epoch,
            "history": self.history,
            "labels": self.labels,
            "preprocess": self.preprocess.to_dict(),
            "split": self.split,
            "model": self.model,
            "samples": self.samples,
        }
        tmp = path + ".tmp"
        torch.save(record, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
        try:
            record = torch.load(path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {path}") from None
        except Exception:
            raise CheckpointError(f"{path} is not a convserve checkpoint (unreadable)") from None
        try:
            return cls(
                config=TrainConfig.from_dict(record["config"]),
                epoch=int(record["epoch"]),
                history=list(record["history"]),
                labels=list(record["labels"]),
                preprocess=PreprocessSpec.from_dict(record["preprocess"]),
                split=dict(record["split"]),
                model=record["model"],
                samples=record.get("samples"),
                training_state={k: record[k] for k in _TRAINING_STATE if k in record},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a convserve checkpoint (missing {exc})") from None

    def build_model(self) -> nn.Module:
        """The trained network, in eval mode."""
        model = build_model(self.config, self.preprocess.channels, len(self.labels))
        model.load_state_dict(self.model)
        return model.eval()


_TRAINING_STATE = ("optimizer", "scheduler", "loader_generator", "augment_generator", "torch_rng")
