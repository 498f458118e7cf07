"""The training half's commands: arithmetic, train, export. Each imports convserve.models (and so,
for train and export, torch) only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator

from .base import Command, UsageError, add_flags, given


@contextlib.contextmanager
def _training_half() -> Iterator[None]:
    """Imports of the training half; where it is not installed (the serving image), a usage error."""
    try:
        yield
    except ImportError as exc:
        raise UsageError(f"this command needs the training half (pip install 'convserve[train]'): {exc}") from None


# ---- arithmetic --------------------------------------------------------------------------------


def _arithmetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="NAME_OR_ONNX_FILE", help="a zoo model name or a path to an .onnx file")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the model's own, e.g. 3x224x224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default: its own)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--all", action="store_true", help="show every layer, activations included")
    p.add_argument("--paper", action="store_true", help="googlenet only: Table 1 of the paper beside our numbers")
    p.add_argument(
        "--explain",
        action="store_true",
        help="work each layer out with the numbers in the formulas (output size, parameters, MACs, receptive field)",
    )


def _arithmetic(args: argparse.Namespace) -> int:
    with _training_half():
        from convserve.models import arithmetic as ar
    try:
        shape = ar.parse_input_shape(args.input) if args.input else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError("--num-classes must be at least 1")
    looks_like_file = os.path.sep in args.model or args.model.endswith(".onnx") or os.path.exists(args.model)
    if looks_like_file:
        if not os.path.isfile(args.model):
            raise UsageError(f"no such file: {args.model}")
        try:
            nodes, file_shape = ar.from_onnx(args.model)
        except ar.NotOnnxError as exc:
            raise UsageError(str(exc)) from None
        if shape is not None and tuple(shape) != tuple(file_shape):
            raise UsageError(f"{args.model} takes {'x'.join(map(str, file_shape))} inputs; --input cannot change that")
        table = ar.analyze(nodes, file_shape)
        shape = file_shape
        title = args.model
    else:
        model = _zoo_model(args.model, num_classes=args.num_classes, in_channels=shape[0] if shape else None)
        shape = shape or model.default_input
        try:
            from convserve.models.arithmetic_torch import trace

            nodes, _ = trace(model, shape)
            table = ar.analyze(nodes, shape)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(
                f"{args.model} cannot take a {'x'.join(map(str, shape))} input: {exc}".splitlines()[0]
            ) from None
        title = f"{args.model} on {'x'.join(map(str, shape))}"
    if args.explain:
        if args.json:
            raise UsageError("--explain prints the worked-out steps; it does not combine with --json")
        print(ar.format_explanation(ar.explain(nodes, shape), table, title=title))
        if not args.paper:
            return 0
        print()
    if args.paper:
        if args.model != "googlenet" or tuple(table.input_shape) != (3, 224, 224):
            raise UsageError("--paper compares with GoogLeNet's Table 1: use `arithmetic googlenet --paper`")
        from convserve.models.paper import compare, format_comparison

        rows = compare(table)
        if args.json:
            print(json.dumps({**table.to_dict(), "paper": [{**vars(r), "marked": r.marked} for r in rows]}))
        else:
            print(format_comparison(rows))
        return 0
    print(json.dumps(table.to_dict()) if args.json else ar.format_table(table, title=title, show_all=args.all))
    return 0


def _zoo_model(name: str, **kwargs):
    """A zoo model by name, with only the keyword arguments that were given."""
    with _training_half():
        from convserve.models.zoo import get_model
    try:
        return get_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# ---- train -------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    try:
        from convserve.models.config import TrainConfig
    except ImportError:  # the serving image: `train` runs, says what is missing, exits 2
        return
    add_flags(p, TrainConfig)
    export = p.add_argument_group("export (after training, into the model repository)")
    export.add_argument("--repository", default="model_repository", help="model repository folder")
    export.add_argument("--name", default=None, help="model name in the repository (default: the dataset's kind)")
    export.add_argument("--no-export", action="store_true", help="train only; export later with `convserve export`")


def _train(args: argparse.Namespace) -> int:
    with _training_half():
        from convserve.models.config import TrainConfig, TrainError
        from convserve.models.export import ExportError, export_checkpoint
        from convserve.models.train import train
    from convserve.contract import ContractError, check_name

    config = TrainConfig(**given(args, TrainConfig))
    name = args.name or config.dataset_kind()
    if args.output is None:
        config.output = os.path.join("runs", name)
    try:
        if not args.no_export:  # refuse a bad destination before spending minutes on training
            check_name(name)
            if os.path.exists(args.repository) and not os.path.isdir(args.repository):
                raise UsageError(f"repository {args.repository!r} is a file, not a folder")
        result = train(config)
        if not args.no_export and result.rank == 0:
            folder = export_checkpoint(result.checkpoint, repository=args.repository, name=name)
            print(f"exported {folder}", flush=True)
    except (TrainError, ExportError, ContractError) as exc:
        raise UsageError(str(exc)) from None
    return 0


# ---- export ------------------------------------------------------------------------------------


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a checkpoint.pt written by `convserve train`")
    p.add_argument("--arch", default=None, help="with --random-init: the zoo model to export untrained")
    p.add_argument("--random-init", action="store_true", help="export an untrained zoo model")
    p.add_argument("--num-classes", type=int, default=10, help="with --random-init: classes of the untrained model")
    p.add_argument("--input", default=None, help="with --random-init: CxHxW (default: the arch's own)")
    p.add_argument("--repository", default="model_repository", help="model repository folder, written into")
    p.add_argument("--name", default=None, help="model name (default: the checkpoint's dataset, or the arch)")
    lowered = p.add_argument_group("precision (a version in INT8 for CPUs, or FP16 for GPUs; FP32 by default)")
    lowered.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="the version's weights and activations"
    )
    lowered.add_argument(
        "--calibration", type=int, default=300, help="int8: training images that calibrate the activations' ranges"
    )
    lowered.add_argument(
        "--calibration-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="int8: onnxruntime's calibrator",
    )
    lowered.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="refuse a version whose held-out accuracy is more points below FP32's than this",
    )


def _export(args: argparse.Namespace) -> int:
    with _training_half():
        from convserve.models.arithmetic import parse_input_shape
        from convserve.models.export import ExportError, export_checkpoint, export_random_init
    from convserve.contract import ContractError, check_name

    try:
        if args.random_init:
            if not args.arch or args.checkpoint:
                raise UsageError("--random-init takes --arch NAME and no checkpoint")
            if args.num_classes < 1:
                raise UsageError("--num-classes must be at least 1")
            shape = parse_input_shape(args.input) if args.input else None
            name = check_name(args.name or args.arch)
            folder = export_random_init(
                args.arch,
                repository=args.repository,
                name=name,
                num_classes=args.num_classes,
                input_shape=shape,
                precision=args.precision,
                calibration=args.calibration,
                calibration_method=args.calibration_method,
            )
        else:
            if not args.checkpoint:
                raise UsageError("give a checkpoint, or --random-init --arch NAME")
            if args.name:
                check_name(args.name)
            folder = export_checkpoint(
                args.checkpoint,
                repository=args.repository,
                name=args.name,
                precision=args.precision,
                calibration=args.calibration,
                calibration_method=args.calibration_method,
                max_accuracy_drop=args.max_accuracy_drop,
            )
    except (ExportError, ContractError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"exported {folder}")
    _print_precision(folder)
    return 0


def _print_precision(folder: str) -> None:
    """What a lowered version cost: its accuracy beside FP32's, as the card records it."""
    import json
    import os

    from convserve.contract import CARD_FILE

    with open(os.path.join(folder, CARD_FILE)) as handle:
        export = json.load(handle).get("export", {})
    precision, accuracy = export.get("precision", "fp32"), export.get("accuracy")
    if precision == "fp32":
        return
    if accuracy:
        print(
            f"{precision}: held-out accuracy {accuracy[precision]:.2f}% (FP32 {accuracy['fp32']:.2f}%, "
            f"{accuracy['drop_points']:.2f} points lost, on {accuracy['held_out_images']} images)"
        )
    else:
        print(f"{precision}: {export.get('gate', 'no accuracy gate')}")


# ---- import ------------------------------------------------------------------------------------


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an ONNX image classifier (NCHW float input)")
    p.add_argument("--repository", default="model_repository", help="model repository folder, written into")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--labels", default=None, metavar="FILE", help="one label per line (default: class indices)")
    p.add_argument(
        "--preprocess",
        default="imagenet",
        help="how images become its input: imagenet, none (tensors only), or mean=A/B/C,std=A/B/C,scale=S,color=RGB|L",
    )
    p.add_argument(
        "--feature-maps", default="auto", help="auto (each conv, after its activation), none, or Conv node names"
    )
    p.add_argument("--scores", default=None, help="the scores output (default: the graph's only 2-D output)")


def _import(args: argparse.Namespace) -> int:
    with _training_half():
        from convserve.models.export import ExportError
        from convserve.models.importer import import_onnx
    from convserve.contract import ContractError, check_name

    try:
        folder = import_onnx(
            args.model,
            repository=args.repository,
            name=check_name(args.name),
            labels_file=args.labels,
            preprocess=args.preprocess,
            feature_maps=args.feature_maps,
            scores=args.scores,
        )
    except (ExportError, ContractError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"imported {folder}")
    return 0


COMMANDS = [
    Command(
        "arithmetic", "per-layer output shapes, parameters, MACs and receptive fields", _arithmetic_args, _arithmetic
    ),
    Command("train", "train a CNN and export it into the model repository", _train_args, _train),
    Command(
        "export", "export a checkpoint (or an untrained zoo model) to ONNX in the repository", _export_args, _export
    ),
    Command(
        "import", "import your own ONNX image classifier into the repository, feature maps added", _import_args, _import
    ),
]
