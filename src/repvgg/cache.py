"""The user cache folder and what the project keeps in it: unpacked archives, decoded small image sets and measured
probes, each rebuilt on demand when missing. A use renews an entry's modification time, so clearing by age removes
only what no recent run has read; nothing else that lies in the folder is ever listed or removed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import temporary_path

__all__ = ["DATASETS", "DECODED", "ENGINE_PROBE_FILE", "MATMUL_FILE", "TRAIN_PROBE_FILE", "CacheEntry", "cache_dir",
           "mark_used", "cache_entries", "older_than", "remove_entries"]

DATASETS = "datasets"  # archives unpacked into <stem>-<content key>, with their locks and digest memos
DECODED = "decoded"  # small image sets decoded into uint8 tensors, <folder>-<key>.pt
ENGINE_PROBE_FILE = "engine_probe.json"  # deployment engines' speeds per CPU, threads and versions
MATMUL_FILE = "matmul.json"  # float32 and bf16 matmul rates per CPU and threads
TRAIN_PROBE_FILE = "train_probe.json"  # training step modes' speeds per model, CPU and threads

# The names the project writes in each part ("" is the top), temporaries of interrupted writes included.
_TMP = r"(\..+)?"
_OURS = {
    DATASETS: re.compile(rf"\.?.+-[0-9a-f]{{16}}{_TMP}"),
    DECODED: re.compile(rf"\.?.+-[0-9a-f]{{24}}\.pt{_TMP}"),
    "": re.compile(rf"\.?({'|'.join(map(re.escape, (ENGINE_PROBE_FILE, MATMUL_FILE, TRAIN_PROBE_FILE)))}){_TMP}"),
}


@dataclass(frozen=True)
class CacheEntry:
    """One item of the cache: a file at its top, or a file or folder inside one of its folders; ``size`` is the disk
    space it takes (an unpacked folder of small images takes several times its files' bytes)."""

    path: Path
    size: int
    used: float

    @property
    def bookkeeping(self) -> bool:
        """A lock, digest memo or temporary (a dot name): tiny, and never worth a line of its own."""
        return self.path.name.startswith(".")


def cache_dir(sub: str = "") -> Path:
    """The user cache folder: ``$REPVGG_CACHE_DIR``, else ``~/.cache/repvgg`` (``sub`` below it)."""
    root = Path(os.environ.get("REPVGG_CACHE_DIR") or Path.home() / ".cache" / "repvgg")
    return root / sub if sub else root


def mark_used(path: str | os.PathLike) -> None:
    """Record a use of a cache entry (its modification time); a cache that cannot be written is left as it is."""
    with contextlib.suppress(OSError):
        os.utime(path)


def cache_entries(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every entry the project made in the cache at ``root`` (default :func:`cache_dir`), least recently used first."""
    root = Path(root) if root is not None else cache_dir()
    entries = []
    for part, names in _OURS.items():
        for path in _children(root / part):
            if names.fullmatch(path.name) and (part or not path.is_dir()):
                with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                    entries.append(CacheEntry(path, _size(path), path.lstat().st_mtime))
    return sorted(entries, key=lambda e: (e.used, str(e.path)))


def remove_entries(entries: Iterable[CacheEntry]) -> int:
    """Delete the entries; returns the bytes freed. A folder is first renamed to a temporary name, so one that cannot
    be removed whole (an OSError, which names the entry) is never found again as if it were complete."""
    freed = 0
    for entry in entries:
        try:
            if entry.path.is_dir() and not entry.path.is_symlink():
                doomed = temporary_path(entry.path)
                os.rename(entry.path, doomed)
                shutil.rmtree(doomed)
            else:
                entry.path.unlink()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(entry.path)) from None
        freed += entry.size
    return freed


def older_than(entries: Iterable[CacheEntry], days: float, now: float | None = None) -> list[CacheEntry]:
    """The entries last used more than ``days`` days before ``now``."""
    cutoff = (time.time() if now is None else now) - days * 86400
    return [e for e in entries if e.used < cutoff]


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _size(path: Path) -> int:
    """The disk space of a file, or of a folder and everything below it (links not followed)."""
    total = _disk(path)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    total += _disk(Path(folder, name))
    return total


def _disk(path: Path) -> int:
    stat = path.lstat()
    return stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size
