"""Writes versions into the model repository (its layout: convserve.contract).

A version is written into a hidden temporary folder inside REPO and renamed into place, so a server
watching the folder never sees half a model; on any failure the temporary folder is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from convserve.contract import ContractError, check_name, versions


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
        raise ContractError(f"repository {repository!r} is a file, not a folder")
    model_dir = os.path.join(repository, name)
    os.makedirs(model_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=repository)
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
        for _attempt in range(100):
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
                os.rename(staging, target)  # atomic; fails if another writer took this version
            except OSError:
                if os.path.exists(target):
                    continue
                raise
            _fsync_dir(model_dir)
            return target, version
        raise ContractError(f"could not claim a version of {name!r} after 100 tries")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
