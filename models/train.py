"""Train an AlexNet-style CNN. Training trains; `convserve train` then runs the export.

One process:
    convserve train                                   # digits, alexnet_small, 15 epochs -> model_repository/digits/N
    convserve train --dataset cifar10:data/cifar --epochs 30 --augment
Several processes (DistributedDataParallel; gloo on CPU, NCCL on GPU), one node or many:
    torchrun --nproc-per-node 2 -m convserve train --epochs 15
Resume an interrupted run from its last checkpoint:
    convserve train --output runs/digits --resume
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from convserve.contract import PreprocessSpec
from convserve.cpus import available_cpus

from .checkpoint import Checkpoint, build_model
from .config import TrainConfig, TrainError
from .data import DataError, load_dataset
from .zoo import get_model


@dataclass
class TrainResult:
    config: TrainConfig
    test_accuracy: float
    test_loss: float
    epochs_run: int
    seconds: float
    checkpoint: str  # the last epoch's checkpoint.pt
    labels: list[str]
    preprocess: PreprocessSpec
    history: list = field(default_factory=list)
    rank: int = 0  # this process's rank under torchrun; rank 0 wrote the files


# ---- distributed helpers -----------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda asked for, but torch sees no CUDA device")
        if choice == "cuda" and "LOCAL_RANK" in os.environ:
            choice = f"cuda:{os.environ['LOCAL_RANK']}"
    elif choice != "cpu":
        raise TrainError(f"--device must be auto, cpu or cuda[:N], not {choice!r}")
    return torch.device(choice)


# ---- small helpers -----------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def augment_drawings(x: torch.Tensor, spec: PreprocessSpec, generator: torch.Generator) -> torch.Tensor:
    """Half the batch redrawn as other hands would draw it: rotated (±12°), sheared (±0.25), narrower
    or wider (0.75-1.15), strokes thinner or thicker (a 3x3 erosion or dilation), then blurred
    through the training data's native size and stretched to full range, as the ink step
    (convserve.contract.InkSpec) does to a user's drawing. x: normalised (B, C, H, W)."""
    b, _, h, w = x.shape
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    raw = x * std + mean  # [0, 1], ink light on dark
    stroke = torch.randint(0, 3, (b,), generator=generator)
    raw = torch.where((stroke == 1).view(-1, 1, 1, 1), nn.functional.max_pool2d(raw, 3, 1, 1), raw)
    raw = torch.where((stroke == 2).view(-1, 1, 1, 1), -nn.functional.max_pool2d(-raw, 3, 1, 1), raw)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(12)
    shear = (torch.rand(b, generator=generator) * 2 - 1) * 0.25
    width = 0.75 + torch.rand(b, generator=generator) * 0.4
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the grid maps output to input coordinates: its inverse scales the drawing's width by `width`
    theta = torch.stack(
        [
            torch.stack([cos / width, (-sin + shear) / width, torch.zeros(b)], 1),
            torch.stack([sin, cos, torch.zeros(b)], 1),
        ],
        1,
    ).to(x.dtype)
    grid = nn.functional.affine_grid(theta, list(raw.shape), align_corners=False)
    raw = nn.functional.grid_sample(raw, grid, padding_mode="zeros", align_corners=False)
    native_h, native_w = spec.ink.native if spec.ink and spec.ink.native != (0, 0) else (h, w)
    raw = nn.functional.adaptive_avg_pool2d(raw, (native_h, native_w))
    raw = raw / raw.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    raw = nn.functional.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
    redrawn = (raw - mean) / std
    keep = (torch.rand(b, generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(keep, x, redrawn)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a whole split. inputs: (N, C, H, W) float32."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return correct / len(inputs), loss_sum / len(inputs)


def default_image_size(arch: str) -> int:
    try:
        return get_model(arch, num_classes=2).default_input[1]
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot(epochs, [h["test_loss"] for h in history], label="test")
    left.set_xlabel("epoch"), left.set_ylabel("cross-entropy"), left.legend()
    right.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    right.plot(epochs, [h["test_accuracy"] for h in history], label="test")
    right.set_xlabel("epoch"), right.set_ylabel("accuracy"), right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the run -----------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Train per `config`; rank 0 writes a checkpoint every epoch, metrics.jsonl and curves.png."""
    config.check()
    rank, world = _distributed()
    device = _pick_device(config.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # share the cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, available_cpus() // world))
    started = time.monotonic()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    image_size = config.image_size or default_image_size(config.arch)
    try:
        data = load_dataset(
            config.dataset,
            size=(image_size, image_size),
            seed=config.seed,
            test_fraction=config.test_fraction,
            typed_digits=config.typed_digits,
        )
    except DataError as exc:
        raise TrainError(str(exc)) from None
    # drawings (digits, MNIST: the spec has an ink step) are redrawn; photos are cropped and flipped
    augment = config.augment if config.augment is not None else not config.dataset.startswith("mnist")
    redraw = data.spec.ink is not None
    if rank == 0 and config.dataset == "digits" and config.typed_digits:
        print(
            f"training on {len(data.train_images)} digits: {data.typed} of them typed in DejaVu's faces"
            if data.typed
            else "no DejaVu faces on this machine (fonts-dejavu-extra): training on the handwritten digits only",
            flush=True,
        )

    train_x = torch.from_numpy(data.train_inputs())  # (N, C, H, W)
    train_y = torch.from_numpy(data.train_labels)
    test_x = torch.from_numpy(data.test_inputs())
    test_y = torch.from_numpy(data.test_labels)

    model = build_model(config, data.spec.channels, len(data.labels)).to(device)
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adamw"
        else torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    )
    dataset = TensorDataset(train_x, train_y)
    sampler = (
        DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        if world > 1
        else None
    )
    loader_generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=loader_generator,
        drop_last=False,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    os.makedirs(config.output, exist_ok=True)
    checkpoint_path = os.path.join(config.output, "checkpoint.pt")
    metrics_path = os.path.join(config.output, "metrics.jsonl")
    history: list[dict] = []
    start_epoch = 1
    if config.resume:
        if not os.path.exists(checkpoint_path):
            raise TrainError(f"--resume: no checkpoint at {checkpoint_path}")
        previous = Checkpoint.load(checkpoint_path, map_location=device)
        state = previous.training_state
        model.load_state_dict(previous.model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader_generator.set_state(state["loader_generator"])
        augment_state = state["augment_generator"]
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        history = previous.history
        start_epoch = previous.epoch + 1
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh metrics file

    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    augment_generator = torch.Generator().manual_seed(config.seed + 1000 * rank)
    if config.resume:
        augment_generator.set_state(augment_state)
    show_progress = config.progress and rank == 0
    for epoch in range(start_epoch, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        seen, correct, loss_sum, epoch_start = 0, 0, 0.0, time.monotonic()
        bar = _progress(loader, epoch, config.epochs, show_progress)
        for x, y in bar:
            if augment:
                x = augment_drawings(x, data.spec, augment_generator) if redraw else augment_batch(x, augment_generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)  # (B, K)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            if bar is not loader:
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{correct / seen:.3f}",
                    img_s=f"{seen / max(time.monotonic() - epoch_start, 1e-9):.0f}",
                )
        test_accuracy, test_loss = evaluate(model, test_x, test_y, device)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.monotonic() - epoch_start,
            "images_per_second": seen * world / max(time.monotonic() - epoch_start, 1e-9),
        }
        history.append(record)
        if rank == 0:
            print(
                f"epoch {epoch}/{config.epochs}  train loss {record['train_loss']:.4f}"
                f" acc {record['train_accuracy']:.4f}"
                f"  test loss {test_loss:.4f} acc {test_accuracy:.4f}  {record['images_per_second']:.0f} img/s",
                flush=True,
            )
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            Checkpoint(
                config=config,
                epoch=epoch,
                history=history,
                labels=data.labels,
                preprocess=data.spec,
                split={"train": len(train_x), "test": len(test_x)},
                model=model.state_dict(),
                # a few real inputs, so the export's parity check runs on real data
                samples=test_x[:8].clone(),
                training_state={
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "loader_generator": loader_generator.get_state(),
                    "augment_generator": augment_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
            ).save(checkpoint_path)
    result = TrainResult(
        config,
        history[-1]["test_accuracy"],
        history[-1]["test_loss"],
        len(history),
        time.monotonic() - started,
        checkpoint_path,
        data.labels,
        data.spec,
        history=history,
        rank=rank,
    )
    if rank == 0:
        plot_curves(history, os.path.join(config.output, "curves.png"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _progress(loader, epoch: int, epochs: int, show: bool):
    """A progress bar over one epoch, on a terminal only: piped or in a container's log, carriage-return
    frames would pile up (hundreds of KB), and the one line per epoch printed after it says enough."""
    if not show or not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)
