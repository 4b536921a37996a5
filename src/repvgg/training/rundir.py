"""A run directory: one training process group at a time (a lock), and what tells that it holds a run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from ..errors import RepVGGError

__all__ = ["RunDir", "RUN_FILES"]

# Any of these in a folder means it holds a run: a new run must not go there.
RUN_FILES = ("last.pt", "best.pth", "model.pth", "model_deploy.pth", "summary.json", "metrics.jsonl")


class RunDir:
    """``out_dir`` and the files a run keeps there; :meth:`lock` makes a second run into it fail at once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: IO | None = None

    last = property(lambda self: self.path / "last.pt")
    best = property(lambda self: self.path / "best.pth")
    model = property(lambda self: self.path / "model.pth")
    deploy = property(lambda self: self.path / "model_deploy.pth")
    summary = property(lambda self: self.path / "summary.json")

    def create(self) -> None:
        """Make the folder, or say clearly why it cannot be one."""
        if self.path.exists() and not self.path.is_dir():
            raise RepVGGError(f"--out {self.path} is a file, not a run directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RepVGGError(f"cannot create run directory {self.path}: a parent is a file") from None

    def lock(self) -> None:
        """Hold an exclusive lock on the run directory until the process exits (or :meth:`unlock`)."""
        self._lock = open(self.path / ".lock", "a")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RepVGGError(f"another training run is using {self.path}; wait for it to finish or choose another "
                              f"--out") from None

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def holds_run(self) -> bool:
        """Whether the folder holds a run, finished or interrupted (its state, metrics or final files)."""
        return any((self.path / name).exists() for name in RUN_FILES)
