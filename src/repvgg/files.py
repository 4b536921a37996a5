"""Files that are never half-written: every output goes to a temporary file beside its target, then is renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import RepVGGError

__all__ = ["atomic_write", "check_output_path"]


def check_output_path(path: str | os.PathLike) -> None:
    """Raise :class:`RepVGGError` when ``path`` cannot become a file: it is a folder, or a part of its folder path
    is a regular file."""
    path = Path(path)
    if path.is_dir():
        raise RepVGGError(f"cannot write {path}: it is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RepVGGError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
