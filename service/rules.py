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


class BearerToken:
    """The token rule of every door (gRPC, HTTP, /metrics): with a token set, a request presents
    `Authorization: Bearer <token>`, compared in constant time; with none, every request passes.
    Which calls need no token (health) is each door's own routing."""

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
