"""Subcommands beyond `arithmetic`; each registers itself with `service.cli.command`.

The training-half commands import models.train / models.export (and so torch) only when they run.
"""

from __future__ import annotations

import argparse
import os

from .cli import UsageError, command

# ---- train -------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (built in), imagefolder:PATH, cifar10:PATH, mnist:PATH or fashion-mnist:PATH")
    p.add_argument("--arch", default="alexnet_small", help="zoo model (default alexnet_small)")
    p.add_argument("--width-mult", type=float, default=None, help="alexnet_small width multiplier (default 0.5)")
    p.add_argument("--image-size", type=int, default=None, help="square input side (default: the arch's own)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: off for digits and MNIST, on otherwise)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--output", default=None, help="run folder: checkpoint, metrics.jsonl, curves.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--repository", default=None, help="model repository (default model_repository)")
    p.add_argument("--name", default=None, help="model name in the repository (default: the dataset's kind)")
    p.add_argument("--no-export", action="store_true", help="train only; export later with `convserve export`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, only a line per epoch")


@command("train", "train a CNN and export it into the model repository", _train_args)
def _train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, TrainError, train
    from models.export import ExportError
    from models.repository import RepositoryError, check_name

    overrides = {key: value for key, value in {
        "dataset": args.dataset, "arch": args.arch, "width_mult": args.width_mult, "image_size": args.image_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
        "label_smoothing": args.label_smoothing, "augment": args.augment, "seed": args.seed,
        "device": args.device, "output": args.output, "repository": args.repository, "name": args.name,
    }.items() if value is not None}
    config = TrainConfig(**overrides, resume=args.resume, export=not args.no_export,
                         progress=not args.no_progress)
    if "output" not in overrides:
        config.output = os.path.join("runs", config.model_name())
    try:
        if config.export:
            check_name(config.model_name())
        train(config)
    except (TrainError, ExportError, RepositoryError) as exc:
        raise UsageError(str(exc)) from None
    return 0


# ---- export ------------------------------------------------------------------------------------

def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a checkpoint.pt written by `convserve train`")
    p.add_argument("--arch", default=None, help="with --random-init: the zoo model to export untrained")
    p.add_argument("--random-init", action="store_true", help="export an untrained zoo model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input", default=None, help="with --random-init: CxHxW (default: the arch's own)")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--name", default=None, help="model name (default: the checkpoint's dataset, or the arch)")


@command("export", "export a checkpoint (or an untrained zoo model) to ONNX in the repository", _export_args)
def _export(args: argparse.Namespace) -> int:
    from models.arithmetic import parse_input_shape
    from models.export import ExportError, export_checkpoint, export_random_init
    from models.repository import RepositoryError, check_name

    try:
        if args.random_init:
            if not args.arch or args.checkpoint:
                raise UsageError("--random-init takes --arch NAME and no checkpoint")
            if args.num_classes < 1:
                raise UsageError("--num-classes must be at least 1")
            shape = parse_input_shape(args.input) if args.input else None
            name = check_name(args.name or args.arch)
            folder = export_random_init(args.arch, repository=args.repository, name=name,
                                        num_classes=args.num_classes, input_shape=shape)
        else:
            if not args.checkpoint:
                raise UsageError("give a checkpoint, or --random-init --arch NAME")
            if args.name:
                check_name(args.name)
            folder = export_checkpoint(args.checkpoint, repository=args.repository, name=args.name)
    except (ExportError, RepositoryError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"exported {folder}")
    return 0


# ---- serve -------------------------------------------------------------------------------------

def _serve_args(p: argparse.ArgumentParser) -> None:
    from .settings import add_arguments
    add_arguments(p)


@command("serve", "serve the model repository over gRPC (KServe V2), with Prometheus metrics", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .server import serve
    from .settings import from_sources

    try:
        settings = from_sources(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if os.path.exists(settings.repository) and not os.path.isdir(settings.repository):
        raise UsageError(f"repository {settings.repository!r} is a file, not a folder")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        raise UsageError(str(exc)) from None
    return 0


# ---- infer -------------------------------------------------------------------------------------

def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="PNG/JPEG files")
    p.add_argument("--model", required=True)
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--top", type=int, default=3, help="classes to show per image")
    p.add_argument("--feature-map", action="append", default=[], help="also fetch this feature map (repeatable)")
    _token_arg(p)


@command("infer", "classify image files with a running server", _infer_args)
def _infer(args: argparse.Namespace) -> int:
    import grpc

    from .client import Client

    images = []
    for path in args.images:
        try:
            with open(path, "rb") as handle:
                images.append(handle.read())
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    outputs = ["probabilities", *args.feature_map]
    with Client(args.url, token=args.token) as client:
        try:
            response = client.infer(args.model, images=images, outputs=outputs, classification=args.top, timeout=30)
        except grpc.RpcError as exc:
            raise UsageError(f"{exc.code().name}: {exc.details()}") from None
        top = client.output(response, "probabilities")
        for path, row in zip(args.images, top):
            print(f"{path}: " + "  ".join(item.decode() for item in row))
        for name in args.feature_map:
            fmap = client.output(response, name)
            print(f"{name}: shape {list(fmap.shape)}, mean {float(fmap.mean()):.4f}, max {float(fmap.max()):.4f}")
        params = client.parameters(response)
        print("metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    return 0


# ---- bench -------------------------------------------------------------------------------------

def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", default="1,16", help="comma list of concurrent client counts")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--input-kind", choices=["input", "image"], default="input")
    p.add_argument("--feature-map", action="append", default=[], help="also request this feature map")
    p.add_argument("--fp16", action="store_true", help="feature maps as FP16")
    p.add_argument("--json", action="store_true")


@command("bench", "server throughput and latency as ratios of in-process onnxruntime", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    import json

    from .bench import format_rows, run

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UsageError("--clients must be a comma list of integers") from None
    if not clients or min(clients) < 1:
        raise UsageError("--clients must be positive integers")
    if not os.path.isdir(os.path.join(args.repository, args.model)):
        raise UsageError(f"no model {args.model!r} in {args.repository!r}")
    rows = run(args.repository, args.model, clients, args.seconds, args.input_kind, args.feature_map, args.fp16)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


# ---- models and describe (read a running server) -------------------------------------------------

def _token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=os.environ.get("CONVSERVE_AUTH_TOKEN", ""),
                   help="bearer token, for a server run with an auth token (default: $CONVSERVE_AUTH_TOKEN)")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001")
    _token_arg(p)


@command("models", "list a running server's model versions with their state", _models_args)
def _models(args: argparse.Namespace) -> int:
    import grpc

    from .client import Client
    from .proto import grpc_service_pb2 as pb

    with Client(args.url, token=args.token) as client:
        try:
            index = client.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise UsageError(f"{exc.code().name}: {exc.details()}") from None
    for model in index.models:
        print(f"{model.name:<24} {model.version:>7}  {model.state:<12} {model.reason}")
    return 0


def _describe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--version", default="")
    p.add_argument("--url", default="127.0.0.1:8001")
    _token_arg(p)


@command("describe", "a served model's arithmetic table and training provenance", _describe_args)
def _describe(args: argparse.Namespace) -> int:
    import json

    import grpc

    from models.arithmetic import LayerRow, Table, format_table

    from .proto import introspection_pb2 as ipb
    from .proto import introspection_pb2_grpc as ipb_grpc

    from .client import open_channel

    with open_channel(args.url, args.token) as channel:
        try:
            answer = ipb_grpc.IntrospectionStub(channel).DescribeModel(
                ipb.DescribeModelRequest(name=args.model, version=args.version), timeout=10)
        except grpc.RpcError as exc:
            raise UsageError(f"{exc.code().name}: {exc.details()}") from None
    rows = [LayerRow(layer.name, layer.kind, layer.op, tuple(layer.input_shape), tuple(layer.output_shape),
                     layer.params, 0, layer.macs, layer.activations, tuple(layer.receptive_field) or None,
                     tuple(layer.jump) or None, layer.detail) for layer in answer.layers]
    shape = rows[0].input_shape if rows else ()
    print(format_table(Table(shape, rows), title=f"{answer.name} version {answer.version} "
                                                  f"on {answer.execution_provider}"))
    training = json.loads(answer.training_json or "{}")
    print("training: " + ", ".join(f"{k}={training[k]}" for k in
                                   ("dataset", "arch", "epochs", "test_accuracy", "seed", "date") if k in training))
    print(f"feature maps: {', '.join(answer.feature_maps)}")
    return 0
