"""The user cache folder: its listing, clearing by age, and the uses that keep an entry from being cleared."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest
from torchvision import transforms

from imagefolders import make_split
from repvgg.cache import MATMUL_FILE, cache_dir, cache_entries, older_than, remove_entries
from repvgg.cli import main
from repvgg.files import TMP_SUFFIX
from repvgg.hardware import cached_speeds, keep_speeds
from repvgg.training.data import ImageFolder, unpack_archive
from repvgg.training.memory import decode_folder

DAY = 86400.0


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder of this test's own (the session's shared one stays untouched)."""
    monkeypatch.setenv("REPVGG_CACHE_DIR", str(tmp_path / "cache"))
    return cache_dir()


def _age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))


UNPACKED, DECODED, LOCK = "train-0123456789abcdef", "train-0123456789abcdef01234567.pt", ".train-89abcdef01234567.lock"
# a user's own files where the cache folder is (REPVGG_CACHE_DIR set to a folder in use): never listed nor removed
NOT_OURS = ("notes.json", "datasets/imagenet/a/1.png", "decoded/mine.pt", "datasets/train-0123.tar")


def _fill(cache: Path) -> None:
    """A probe file at the top, a decoded file, an unpacked folder of two files and a lock, of known ages; and files
    of the user's own beside them."""
    for name in (f"datasets/{UNPACKED}/a/1.png", f"datasets/{UNPACKED}/a/2.png", *NOT_OURS):
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(b"y" * 5000)
    (cache / MATMUL_FILE).write_text("{}")
    (cache / "decoded" / DECODED).write_bytes(b"x" * 10_000)
    (cache / "datasets" / LOCK).touch()
    for name in NOT_OURS:
        _age(cache / name, 100)
    _age(cache / MATMUL_FILE, 1)
    _age(cache / "decoded" / DECODED, 40)
    _age(cache / "datasets" / UNPACKED, 20)
    _age(cache / "datasets" / LOCK, 50)


def test_entries_are_the_top_files_and_the_items_of_its_folders_least_recently_used_first(cache: Path) -> None:
    _fill(cache)
    entries = cache_entries()
    names = [str(e.path.relative_to(cache)) for e in entries]
    assert names == [f"datasets/{LOCK}", f"decoded/{DECODED}", f"datasets/{UNPACKED}", MATMUL_FILE]
    assert [e.bookkeeping for e in entries] == [True, False, False, False]
    sizes = dict(zip(names, (e.size for e in entries), strict=True))
    assert sizes[f"decoded/{DECODED}"] >= 10_000 and sizes[f"datasets/{UNPACKED}"] >= 10_000  # disk space
    assert [e.path.name for e in older_than(entries, 30)] == [LOCK, DECODED]
    assert cache_entries(cache / "missing") == []


def test_clear_older_than_removes_only_what_no_run_used_lately(cache: Path, capsys: pytest.CaptureFixture) -> None:
    _fill(cache)
    assert main(["cache", "--older-than", "10"]) == 0  # a listing: nothing removed
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith(f"{cache}: 3 entries unused for 10 days, ")
    assert len(listed) == 5 and listed[1].split() == ["last", "used", "on", "disk", "entry"]
    assert [line.split()[-1] for line in listed[2:4]] == [f"decoded/{DECODED}", f"datasets/{UNPACKED}"]
    assert listed[4].startswith("  and 1 bookkeeping files (locks, digests, temporaries): ")
    assert (cache / "decoded" / DECODED).exists()

    assert main(["cache", "--clear", "--older-than", "30"]) == 0
    assert capsys.readouterr().out.startswith(f"removed 2 entries unused for 30 days from {cache} (")
    assert [e.path.name for e in cache_entries()] == [UNPACKED, MATMUL_FILE]
    assert main(["cache", "--clear"]) == 0
    assert "; 0 kept" in capsys.readouterr().out
    assert cache_entries() == []
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == sorted(NOT_OURS)


def test_reading_an_entry_renews_its_use(cache: Path, tmp_path: Path) -> None:
    """Clearing by age must keep what runs still read: each read of an entry (an unpacked archive, decoded images, a
    kept measurement) counts as a use."""
    split = make_split(tmp_path / "src", "train", 2)
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(split, arcname="train")
    unpacked = unpack_archive(archive)
    folder = ImageFolder(unpacked / "train", None)
    decode = transforms.PILToTensor()
    decode_folder(folder, decode, (3, 16, 16), {"split": "train"}, print)
    logged: list[str] = []
    decoded = next((cache / "decoded").iterdir())
    for entry in (unpacked, decoded):
        _age(entry, 100)
    assert len(older_than(cache_entries(), 50)) == 2
    assert unpack_archive(archive) == unpacked
    assert decode_folder(folder, decode, (3, 16, 16), {"split": "train"}, logged.append).images.shape == (6, 3, 16, 16)
    assert logged == []  # read from the cache
    assert older_than(cache_entries(), 50) == []
    keep_speeds(MATMUL_FILE, {"cpu": "x"}, {"gflops": 1.0})
    _age(cache / MATMUL_FILE, 100)
    assert cached_speeds(MATMUL_FILE, {"cpu": "x"}, lambda: {}).speeds == {"gflops": 1.0}  # a measurement read
    assert older_than(cache_entries(), 50) == []


def test_a_cache_entry_that_cannot_be_removed_is_one_line_and_exit_2(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    _fill(cache)

    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr("shutil.rmtree", refuse)
        assert main(["cache", "--clear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"repvgg: error: {cache / 'datasets' / UNPACKED}: Permission denied"]
    # the folder left behind is no longer an unpacked archive a run would take as whole; a later clear removes it
    assert not (cache / "datasets" / UNPACKED).exists()
    left = [e for e in cache_entries() if e.path.parent.name == "datasets" and e.path.is_dir()]
    assert [e.bookkeeping for e in left] == [True] and left[0].path.name.endswith(TMP_SUFFIX)
    assert remove_entries(left) == left[0].size
    assert [e.path.name for e in cache_entries()] == [MATMUL_FILE]  # the clear stopped at the failing entry
