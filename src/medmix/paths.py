"""Checks that an output path can be written *before* any work is done, so a bad ``--out`` costs nothing.

A path is probed by creating (and removing) a temporary directory in its nearest existing ancestor: that answers
for read-only file systems, ``/proc``, a file in the way and missing permissions alike, where ``os.access`` (root
passes it almost everywhere) does not.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def _check_dir(d: Path, what: str, target: Path) -> None:
    """Probe the nearest existing ancestor of ``d`` (``target``: the path named in the error)."""
    base = d.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{what} {target}: {base} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medmix-probe-", dir=base))
    except OSError as e:
        raise ConfigError(f"{what} {target}: cannot write in {base} ({e.strerror or type(e).__name__})") from None


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` is, or can be created as, a directory we can write in; returns it as a Path."""
    p = Path(path).expanduser()
    _check_dir(p, what, p)
    return p


def check_writable_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` is a file we can create or replace (its folder exists or can be created); returns it as a Path."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {p}: exists and is not writable")
    _check_dir(p.absolute().parent, what, p)
    return p


def ensure_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create the output directory ``path`` (and its parents) or raise one ``ConfigError`` line."""
    p = check_writable_dir(path, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot create the directory ({e.strerror or e})") from None
    return p
