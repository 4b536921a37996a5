"""The one rule for every file the project writes: outputs are checked before any work (never one of the command's
inputs, counting companion files; an existing output only when the caller allows it), written to a temporary file
beside the target and renamed into place, and the temporaries of killed writes are removed by the next write.

Temporaries are named ``.<target>.<pid>-<random>.repvgg-tmp``: a pattern no user would choose, carrying the writing
process's id, so that only debris whose writer is gone is ever removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import RepVGGError

__all__ = ["TMP_SUFFIX", "companions", "check_output_path", "Outputs", "atomic_write", "atomic_folder",
           "temporary_path", "appending", "replace_together", "remove_debris", "file_sha256", "os_error_message",
           "write_failure"]

TMP_SUFFIX = ".repvgg-tmp"
_DEBRIS = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[^.]+" + re.escape(TMP_SUFFIX) + "$")
# Files that travel with another and are written, read and replaced with it.
_COMPANIONS = {".xml": (".bin",)}


def companions(path: str | os.PathLike) -> list[Path]:
    """``path`` and the files that belong to it (an OpenVINO ``.xml`` and its ``.bin``)."""
    path = Path(path)
    return [path, *(path.with_suffix(s) for s in _COMPANIONS.get(path.suffix.lower(), ()))]


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


def _same(a: Path, b: Path) -> bool:
    """Whether two spellings name one file (symlinks, ``..``, hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


@dataclass
class Outputs:
    """A command's inputs and the outputs it will write, checked together before any work starts.

    ``overwrite`` allows replacing existing output files; an input is never written onto, whatever it is spelled.
    """

    inputs: Sequence[str | os.PathLike | None] = ()
    overwrite: bool = False

    def _input_files(self) -> list[Path]:
        return [f for p in self.inputs if p for f in companions(p)]

    def file(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Check one output file (with its companions); returns it as a Path."""
        path = Path(path)
        check_output_path(path)
        for out in companions(path):
            for src in self._input_files():
                if _same(out, src):
                    raise RepVGGError(f"{what} {out} is the same file as the input {src}; choose another name")
            if out.exists() and not self.overwrite:
                raise RepVGGError(f"{out} exists; pass --overwrite to replace it")
        return path

    def folder(self, path: str | os.PathLike, what: str = "run folder") -> Path:
        """Check a folder the command writes into: no input may live inside it."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RepVGGError(f"{what} {path} is a file, not a folder")
        for src in self._input_files():
            if _inside(src, path):
                raise RepVGGError(f"the input {src} lies inside the {what} {path}, whose files this command writes; "
                                  f"copy it elsewhere or choose another folder")
        return path


def _tmp_name(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


def temporary_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``target``, by the rule above: where a folder is renamed before it is deleted,
    so that one half deleted is never taken for whole and is cleared as debris once its process is gone."""
    target = Path(target)
    return target.with_name(f"{_tmp_name(target)}{secrets.token_hex(4)}{TMP_SUFFIX}")


def remove_debris(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete temporaries in ``folder`` (of ``target`` only, when given) whose writing process no longer runs."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            m = _DEBRIS.match(entry.name)
            if not m or (target is not None and m["target"] != target) or _alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare(path: Path) -> None:
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path.parent, path.name)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None] | bytes | str) -> None:
    """Write ``path`` whole or not at all: ``write`` (bytes, text, or a function given a temporary path) fills a
    temporary file beside it, which is then renamed into place."""
    path = Path(path)
    _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        if isinstance(write, bytes | str):
            data = write.encode() if isinstance(write, str) else write
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == tmp:  # name the file the user asked for, not the temporary
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """A temporary folder beside ``target`` (removed on exit), for writers that make several files at once."""
    target = Path(target)
    _prepare(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(target), suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def appending(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """``path`` opened for appending lines (a log that grows by whole rows); an OS error names the file."""
    try:
        with open(path, "a", newline=newline) as f:
            yield f
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def replace_together(pairs: Iterable[tuple[Path, Path]]) -> None:
    """Move (source, target) files into place as one artifact: the first target (the file that names the others,
    e.g. an ``.xml``) is removed first and moved last, so a kill in between leaves no mixed old/new artifact."""
    pairs = list(pairs)
    pairs[0][1].unlink(missing_ok=True)
    for src, dst in [*pairs[1:], pairs[0]]:
        os.replace(src, dst)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in blocks), to record exactly which file a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def os_error_message(error: OSError) -> str:
    """One line naming the path and the cause of an OS error (full disk, read-only folder, permission)."""
    cause = error.strerror or str(error)
    return f"{error.filename}: {cause}" if error.filename is not None else cause


def write_failure(path: str | os.PathLike, message: str) -> OSError:
    """An OSError for a write that a library reported only as a message (OpenVINO's writer): a full disk is
    named as such, anything else keeps the library's words."""
    folder = Path(path).parent
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder if folder.exists() else ".").free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, message.strip().splitlines()[-1][:200] if message.strip() else "write failed",
                   str(path))
