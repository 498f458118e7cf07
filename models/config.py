"""A training run's settings: one typed record, read by training, stored in every checkpoint, and
turned into the `convserve train` flags (one flag per field, its help the field's own).

Pure Python: the command line builds its parser from it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


class TrainError(ValueError):
    """A training run that cannot start: the message says why."""


def _opt(default: Any, help_text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    # data
    dataset: str = _opt("digits", "digits (built in), imagefolder:PATH, cifar10:PATH, mnist:PATH or fashion-mnist:PATH")
    image_size: Optional[int] = _opt(None, "square input side (default: the arch's own, 32 for alexnet_small)")
    augment: Optional[bool] = _opt(
        None,
        "photos: random crop (padding 4) + flip; drawings (digits, MNIST): half of each batch redrawn, rotated,"
        " sheared, narrower or wider, thinner or thicker strokes (default: on, but off for MNIST's 60,000)",
    )
    test_fraction: float = _opt(0.2, "test share for sources without their own test split")
    typed_digits: bool = _opt(
        True, "digits only: also train on the digits typed in the DejaVu faces this machine has (printed shapes)"
    )
    # model
    arch: str = _opt("alexnet_small", "zoo model")
    width_mult: float = _opt(0.5, "alexnet_small only: channel width multiplier (half width trains digits in seconds)")
    dropout: float = _opt(0.3, "dropout before the fully connected layers")
    # optimisation
    epochs: int = _opt(15, "passes over the training split")
    batch_size: int = _opt(64, "images per step, per process")
    lr: float = _opt(2e-3, "peak learning rate")
    optimizer: str = _opt("adamw", "adamw, or sgd (momentum 0.9, nesterov)", choices=("adamw", "sgd"))
    weight_decay: float = _opt(5e-4, "weight decay")
    warmup_epochs: float = _opt(1.0, "linear warm-up epochs, then cosine decay to zero")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    seed: int = _opt(0, "seed for the split, the initial weights, the shuffling and the augmentation")
    # where things go
    device: str = _opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    output: str = _opt("runs/latest", "run folder: checkpoint.pt, metrics.jsonl, curves.png")
    resume: bool = _opt(False, "continue the run in --output from its checkpoint")
    progress: bool = _opt(True, "a progress bar per epoch (on stderr)")

    def dataset_kind(self) -> str:
        """'cifar10:data/cifar' -> 'cifar10': the default model name in the repository."""
        return self.dataset.partition(":")[0].replace("-", "_")

    def check(self) -> TrainConfig:
        """Raise TrainError for settings no run can start with."""
        if self.epochs < 1:
            raise TrainError("--epochs must be at least 1")
        if self.batch_size < 1 or self.lr <= 0:
            raise TrainError("--batch-size and --lr must be positive")
        if self.optimizer not in ("adamw", "sgd"):
            raise TrainError(f"--optimizer must be adamw or sgd, not {self.optimizer!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From a checkpoint's stored config; keys this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
