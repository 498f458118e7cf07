"""Helpers of the commands that talk to a running server: TLS from the flags, and a connection
that has answered once (an unreachable server is one clear line, not a traceback)."""

from __future__ import annotations

import argparse

from .base import UsageError


def client_tls(args: argparse.Namespace):
    """The client's TLS from --tls/--tls-ca/--tls-cert/--tls-key; None for a plain connection."""
    from convserve.client import Tls

    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    return Tls(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)


def connect(args: argparse.Namespace):
    """A Client for --url that has answered once; a server that cannot be reached is one clear line."""
    import grpc

    from convserve.client import Client
    from convserve.proto import grpc_service_pb2 as pb

    client = Client(args.url, token=args.token, tls=client_tls(args))
    try:
        client.stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
    except grpc.RpcError as exc:
        client.close()
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise UsageError(f"the server at {args.url} needs a token: set CONVSERVE_AUTH_TOKEN (or --token)") from None
        raise UsageError(
            f"cannot reach a convserve server at {args.url} ({exc.code().name}): is `convserve serve` running there? "
            "(`make serve` starts one; --url sets the address)"
        ) from None
    return client


def describe_model(client, model: str, version: str = ""):
    """DescribeModel, with an unknown model turned into one line naming the models there are."""
    import grpc

    try:
        return client.describe(model, version)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise UsageError(f"{exc.code().name}: {exc.details()}") from None
        served = sorted({m.name for m in client.models() if m.state == "READY"})
        if model in served:  # the model is there, the version is not
            raise UsageError(exc.details()) from None
        raise UsageError(f"unknown model {model!r}; the server has: {', '.join(served) or 'no models'}") from None
