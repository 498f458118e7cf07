"""Writes versions into the model repository: REPO/NAME/<integer version>/{model.onnx, model.json}.

A version is written into a hidden temporary folder inside REPO and renamed into place, so a server
watching the folder never sees half a model; on any failure the temporary folder is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    pass


def is_valid_name(name: str) -> bool:
    """A model name that stays inside the repository: letters, digits, '_', '-', '.'; no '..'."""
    return bool(name) and NAME_PATTERN.match(name) is not None and ".." not in name


def check_name(name: str) -> str:
    """`name` itself when is_valid_name, else RepositoryError."""
    if not is_valid_name(name):
        raise RepositoryError(f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting with '.'")
    return name


def versions(model_dir: str) -> list[int]:
    """The integer versions present under REPO/NAME, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(entry) for entry in os.listdir(model_dir)
                  if entry.isdigit() and not entry.startswith("0") and os.path.isdir(os.path.join(model_dir, entry)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(repository: str, name: str, files: dict[str, bytes]) -> tuple[str, int]:
    """Write `files` as the next version of `name`; returns (version folder, version number).

    `files` maps file names (model.onnx, model.json) to their bytes; a callable value is called with
    the version number to produce the bytes (model.json records its own version).
    """
    check_name(name)
    if os.path.exists(repository) and not os.path.isdir(repository):
        raise RepositoryError(f"repository {repository!r} is a file, not a folder")
    model_dir = os.path.join(repository, name)
    os.makedirs(model_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=repository)
    try:
        os.chmod(staging, 0o755)   # mkdtemp's 0700 would hide the version from a server run as another user
        for attempt in range(100):
            version = (versions(model_dir) or [0])[-1] + 1
            for filename, content in files.items():
                data = content(version) if callable(content) else content
                with open(os.path.join(staging, filename), "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            _fsync_dir(staging)
            target = os.path.join(model_dir, str(version))
            try:
                os.rename(staging, target)   # atomic; fails if another writer took this version
            except OSError:
                if os.path.exists(target):
                    continue
                raise
            _fsync_dir(model_dir)
            return target, version
        raise RepositoryError(f"could not claim a version of {name!r} after 100 tries")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
