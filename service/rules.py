"""The rules a request meets wherever it is checked, front-end, engine or /metrics: model names,
versions, batch size, the bearer token."""

from __future__ import annotations

import hmac
from typing import Optional, Union

from convserve.contract import is_valid_name, parse_version

from .errors import InvalidInput


def check_model_name(name: str) -> str:
    """Refuse names that could reach outside the repository ('..', separators, absolute paths)."""
    if not is_valid_name(name):
        raise InvalidInput(f"invalid model name {name[:128]!r}")
    return name


def parse_requested_version(version: str) -> Optional[int]:
    """'' -> None (the served default); '3' -> 3; anything else is refused."""
    if not version:
        return None
    parsed = parse_version(version)
    if parsed is None:
        raise InvalidInput(f"invalid model version {version[:32]!r}: a positive integer, or empty for the default")
    return parsed


def check_batch_size(images: int, max_batch_size: int) -> None:
    """The one rule: a request may hold at most one batch of images."""
    if images > max_batch_size:
        raise InvalidInput(f"batch of {images} exceeds max_batch_size {max_batch_size}", limit="batch_size")


# The calls that need no token, by path, at either door: health (probes carry no credentials; gRPC's
# grpc.health.v1.Health, V2 HTTP's /v2/health/...), and the page and its own files (the page asks for
# the token itself, then sends it with every call).
TOKEN_FREE = ("/grpc.health.v1.Health/", "/v2/health/", "/static/")
TOKEN_FREE_PAGES = ("/",)


def needs_token(path: str) -> bool:
    """Whether a call (a gRPC method path or an HTTP path) needs the token, when one is set."""
    return not path.startswith(TOKEN_FREE) and path not in TOKEN_FREE_PAGES


class BearerToken:
    """The token rule of every door (gRPC, HTTP, /metrics): with a token set, a request presents
    `Authorization: Bearer <token>`, compared in constant time; with none, every request passes.
    `admits_call` adds which calls need none (`needs_token`)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode() if token else b""

    @property
    def required(self) -> bool:
        return bool(self._expected)

    def admits(self, presented: Union[str, bytes, None]) -> bool:
        """Whether an Authorization header (or gRPC metadata) value passes."""
        if not self._expected:
            return True
        given = presented.encode() if isinstance(presented, str) else (presented or b"")
        return hmac.compare_digest(given, self._expected)

    def admits_call(self, path: str, presented: Union[str, bytes, None]) -> bool:
        """Whether a call to `path` (gRPC method or HTTP path) with this Authorization value passes."""
        return not needs_token(path) or self.admits(presented)
