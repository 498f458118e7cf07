"""The serving half's commands: serve, and the client commands that talk to a running server
(infer, models, describe), and the benchmark."""

from __future__ import annotations

import argparse
import json
import os

from .base import Command, UsageError, add_flags, add_server_flags, rpc_errors
from .remote import client_tls, connect, describe_model

# ---- serve -------------------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    from convserve.service.settings import Settings

    add_flags(p, Settings)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from convserve.service.settings import from_sources
    from convserve.service.supervisor import serve

    try:
        settings = from_sources(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if os.path.exists(settings.repository) and not os.path.isdir(settings.repository):
        raise UsageError(f"repository {settings.repository!r} is a file, not a folder")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(settings)
    except OSError as exc:
        raise UsageError(str(exc)) from None


# ---- models and describe (read a running server) -------------------------------------------------


def _models(args: argparse.Namespace) -> int:
    from convserve.proto import grpc_service_pb2 as pb

    with connect(args) as client, rpc_errors():
        index = client.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    for model in index.models:
        print(f"{model.name:<24} {model.version:>7}  {model.state:<12} {model.reason}")
    return 0


def _describe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="served model")
    p.add_argument("--version", default="", help="its version (default: the newest served)")
    add_server_flags(p)


def _describe(args: argparse.Namespace) -> int:
    with connect(args) as client:
        answer = describe_model(client, args.model, args.version)
    try:  # the table's layout is the arithmetic module's, in the training half
        from convserve.models.arithmetic import LayerRow, Table, format_table
    except ImportError:
        format_table = None
    precision = (answer.precision or "fp32").upper()
    title = f"{answer.name} version {answer.version} ({precision}) on {answer.execution_provider}"
    if format_table is not None:
        rows = [
            LayerRow(
                layer.name,
                layer.kind,
                layer.op,
                tuple(layer.input_shape),
                tuple(layer.output_shape),
                layer.params,
                0,
                layer.macs,
                layer.activations,
                tuple(layer.receptive_field) or None,
                tuple(layer.jump) or None,
                layer.detail,
            )
            for layer in answer.layers
        ]
        print(format_table(Table(rows[0].input_shape if rows else (), rows), title=title))
    else:
        print(title)
        for layer in answer.layers:
            print(
                f"  {layer.name:<12} {list(layer.output_shape)!s:<18} params {layer.params:>12,}  "
                f"MACs {layer.macs:>14,}"
            )
        print(f"  total params {answer.total_params:,}, MACs {answer.total_macs:,}")
    training = json.loads(answer.training_json or "{}")
    print(
        "training: "
        + ", ".join(
            f"{k}={training[k]}"
            for k in ("dataset", "arch", "epochs", "test_accuracy", "seed", "date")
            if k in training
        )
    )
    print(f"feature maps: {', '.join(answer.feature_maps)}")
    return 0


# ---- bench -------------------------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    from convserve.bench import CASES

    p.add_argument("--repository", required=True, help="model repository folder the benchmark's servers serve")
    p.add_argument("--model", required=True, help="model in it to measure (in-process and through the server)")
    p.add_argument("--clients", default="1,4,16,64", help="comma list of concurrent client counts")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--server-arg", action="append", default=[], help="an extra `convserve serve` flag (repeatable)")
    p.add_argument("--frontends", default="1", help="comma list of front-end counts: each case runs against each")
    p.add_argument(
        "--baseline-version",
        type=int,
        default=None,
        help="also measure this version in-process (an FP32 one beside an INT8 one) and give × its limit",
    )
    p.add_argument(
        "--driver",
        choices=("auto", "perf_analyzer", "python"),
        default="auto",
        help="who sends the load: perf_analyzer (tritonclient's wheel; needs Debian's libb64-0d and "
        "`pip install nvidia-cuda-runtime-cu12`) where it starts, else the Python client (auto)",
    )


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must be positive integers")
    return values


def _bench(args: argparse.Namespace) -> int:
    import sys

    from convserve.bench import CASES, format_report, run
    from convserve.contract import versions

    clients = _positive_ints(args.clients, "--clients")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        raise UsageError(f"--cases takes {', '.join(CASES)}")
    frontends = _positive_ints(args.frontends, "--frontends")
    served = versions(os.path.join(args.repository, args.model))
    if not served:
        raise UsageError(f"no model {args.model!r} in {args.repository!r}")
    if args.baseline_version is not None and args.baseline_version not in served:
        raise UsageError(f"model {args.model!r} has no version {args.baseline_version} in {args.repository!r}")
    report = run(
        args.repository,
        args.model,
        clients,
        args.seconds,
        cases,
        args.server_arg,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        frontends_list=frontends,
        driver=args.driver,
        baseline_version=args.baseline_version,
    )
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---- health (a container's healthcheck) ------------------------------------------------------------


def _health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", default="", help="a grpc.health.v1 service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_server_flags(p)


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING, 1 otherwise: the gRPC health protocol, as a
    container's healthcheck or a script asks it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from convserve.client import open_channel

    channel = open_channel(args.url, args.token, 1 << 20, client_tls(args))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"{args.url}: {exc.code().name}: no server answers there (is `convserve serve` running? --url)")
        else:
            print(f"{args.url}: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.url}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


COMMANDS = [
    Command("serve", "serve the model repository over gRPC (KServe V2), with Prometheus metrics", _serve_args, _serve),
    Command("models", "list a running server's model versions with their state", add_server_flags, _models),
    Command("describe", "a served model's arithmetic table and training provenance", _describe_args, _describe),
    Command("health", "exit 0 when a running server answers SERVING (the gRPC health protocol)", _health_args, _health),
    Command("bench", "server throughput and latency as ratios of in-process onnxruntime", _bench_args, _bench),
]
