"""What every subcommand shares: the error it raises, its record, flags derived from a dataclass.

A leaf: it imports neither half. Each command module builds `Command`s; `convserve.cli.main` lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    run: Handler  # runs it; returns the exit code


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field, defaulting to None (so unset means "the default").

    Help and choices come from the field's metadata; booleans get --x / --no-x.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or ""
        if f.default not in (None, "", dataclasses.MISSING) and "default" not in help_text:
            shown = ("on" if f.default else "off") if kind is bool else f.default
            help_text += f" (default: {shown})"
        extra: dict[str, Any] = {"help": help_text}
        if "choices" in f.metadata:
            extra["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, **extra)
        else:
            parser.add_argument(flag, type=kind, default=None, **extra)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, where it has one worth saying (not None, empty or off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "", False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def add_server_flags(parser: argparse.ArgumentParser, url: bool = True) -> None:
    """--url and --token, for the commands that talk to a running server."""
    if url:
        parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("CONVSERVE_TLS_CA", ""),
        help="PEM CA of a TLS server (default: $CONVSERVE_TLS_CA; empty and no --tls: plain)",
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("CONVSERVE_TLS_CERT", ""),
        help="PEM client certificate, for a server that requires one (mutual TLS)",
    )
    parser.add_argument("--tls-key", default=os.environ.get("CONVSERVE_TLS_KEY", ""), help="PEM key of --tls-cert")
    parser.add_argument(
        "--token",
        default=os.environ.get("CONVSERVE_AUTH_TOKEN", ""),
        help="bearer token, for a server run with an auth token (default: $CONVSERVE_AUTH_TOKEN)",
    )


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """A failed RPC becomes a usage error: 'convserve: error: NOT_FOUND: unknown model ...'."""
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        raise UsageError(f"{exc.code().name}: {exc.details()}") from None
