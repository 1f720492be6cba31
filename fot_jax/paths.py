"""Workdirs on local disks or object stores (gs://, s3://): a pod's hosts share no disk, so its
workdir is a bucket. Local paths are made absolute; URLs pass through `etils.epath` (what Orbax
uses), so checkpoints, metrics and plots go to the same place either way."""
from __future__ import annotations

import os

from fot_jax.errors import UsageError


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """Absolute local path, or the URL with parts appended."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.abspath(os.path.join(base, *parts))


def isdir(path: str) -> bool:
    if is_url(path):
        from etils import epath
        return epath.Path(path).is_dir()
    return os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_url(path):
        from etils import epath
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r"):
    if is_url(path):
        from etils import epath
        return epath.Path(path).open(mode)
    return open(path, mode)


def rename(src: str, dst: str) -> None:
    """Atomic on a local disk (os.replace); object stores have no directory rename, so a URL's
    files are copied and the source removed."""
    if is_url(src):
        from etils import epath
        s, d = epath.Path(src), epath.Path(dst)
        d.mkdir(parents=True, exist_ok=True)
        for f in s.iterdir():
            f.copy(d / f.name, overwrite=True)
        s.rmtree()
    else:
        os.replace(src, dst)


def writable_dir(path: str, flag: str = "--workdir") -> None:
    """Checks, before any work, that `path` is a directory this run may create or write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)"
        )
    if is_url(path):        # a bucket: checked when it is written
        return
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UsageError(
            f"{flag} {path} cannot be written ({parent} is not writable); choose another directory"
        )


def existing_workdir(path: str, flag: str) -> None:
    """Checks that a workdir given as input (a model to compare with) holds a checkpoint."""
    if is_url(path):        # a bucket: checked when it is read
        return
    if not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path} is not a directory; give a training workdir (fot-jax train --workdir ...)"
        )
    ckpt = os.path.join(path, "checkpoints")
    if not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
        raise UsageError(
            f"{flag} {path} holds no checkpoint; train it first (fot-jax train --workdir {path} ...)"
        )
