"""The rules a request meets wherever it is checked, front-end or engine: model names, versions, batch size."""

from __future__ import annotations

from typing import Optional

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
