"""The one rule for every file a command writes, as a table over every command: an output that is one of the
command's inputs (any spelling, a symlink, a companion file such as an OpenVINO .bin, a file inside the run folder
it writes), an output that exists (refused without --overwrite), a fresh run into a folder that holds a run, a qat
re-run from another checkpoint. Every row ends with a one-line error (or the documented behaviour) and every input
keeps its bytes. Then the debris rule, and a full disk for every command that writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from conftest import trained_looking
from imagefolders import PYTHON, TINY_ARCH, TINY_TRAIN, make_dataset, subprocess_env
from repvgg import create_model, save_checkpoint
from repvgg.cli import main
from repvgg.files import TMP_SUFFIX, atomic_write, remove_debris

pytestmark = pytest.mark.usefixtures("one_thread")
PREPROCESS = {"resize": 16, "crop": 16}


class Env(NamedTuple):
    root: Path
    data: Path
    ckpt: Path  # a training-time checkpoint, 3 named classes, 16x16
    run: Path  # a finished tiny training run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("outputs")
    data = make_dataset(root / "data", train=8, val=2)
    ckpt = root / "a.pth"
    save_checkpoint(trained_looking(create_model(TINY_ARCH, num_classes=3)), ckpt,
                    class_names=["class0", "class1", "class2"], preprocess=PREPROCESS)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY_TRAIN, "--epochs", "1"]) == 0
    return Env(root, data, ckpt, run)


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".lock" not in p.name}


class Case(NamedTuple):
    name: str
    argv: Callable[[Env, Path], list[str]]  # (env, a fresh scratch folder) -> argv
    message: str  # fragment of the one error line ("" = the command succeeds)
    setup: Callable[[Env, Path], None] | None = None


def _link(env: Env, tmp: Path) -> None:
    (tmp / "link.pth").symlink_to(env.ckpt)


def _copy_to(name: str) -> Callable[[Env, Path], None]:
    return lambda env, tmp: shutil.copy(env.ckpt, tmp / name)


def _touch(*names: str) -> Callable[[Env, Path], None]:
    return lambda env, tmp: [(tmp / n).write_text("user's file\n") for n in names]


def _respelled(env: Env) -> str:
    return str(env.ckpt.parent / ".." / env.ckpt.parent.name / env.ckpt.name)


CASES = [
    Case("convert onto its source", lambda e, t: ["convert", str(e.ckpt), str(e.ckpt)], "same file as the input"),
    Case("convert onto its source respelled", lambda e, t: ["convert", str(e.ckpt), _respelled(e)],
         "same file as the input"),
    Case("convert onto a symlink of its source", lambda e, t: ["convert", str(t / "link.pth"), str(e.ckpt)],
         "same file as the input", _link),
    Case("convert onto a symlink of its source, with --overwrite",
         lambda e, t: ["convert", str(e.ckpt), str(t / "link.pth"), "--overwrite"], "same file as the input", _link),
    Case("convert onto an existing file", lambda e, t: ["convert", str(e.ckpt), str(t / "d.pth")],
         "exists; pass --overwrite", _touch("d.pth")),
    Case("convert onto an existing file with --overwrite",
         lambda e, t: ["convert", str(e.ckpt), str(t / "d.pth"), "--overwrite"], "", _touch("d.pth")),
    Case("export torchscript onto its checkpoint",
         lambda e, t: ["export", str(e.ckpt), "--format", "torchscript", "--out", str(e.ckpt)], "same file"),
    Case("export openvino whose .bin is the checkpoint",
         lambda e, t: ["export", str(t / "m.bin"), "--format", "openvino", "--out", str(t / "m.xml")],
         "m.bin is the same file as the input", _copy_to("m.bin")),
    Case("export over an existing .bin companion",
         lambda e, t: ["export", str(e.ckpt), "--format", "openvino", "--out", str(t / "m.xml")],
         "m.bin exists; pass --overwrite", _touch("m.bin")),
    Case("quantize whose .bin is the checkpoint",
         lambda e, t: ["quantize", str(t / "pytorch_model.bin"), "--calib", str(e.data), "--out",
                       str(t / "pytorch_model.xml")], "pytorch_model.bin is the same file as the input",
         _copy_to("pytorch_model.bin")),
    Case("quantize onto an existing file",
         lambda e, t: ["quantize", str(e.ckpt), "--calib", str(e.data), "--out", str(t / "q.onnx")],
         "exists; pass --overwrite", _touch("q.onnx")),
    Case("eval --json onto its checkpoint",
         lambda e, t: ["eval", "--data", str(e.data), "--checkpoint", str(e.ckpt), "--json", str(e.ckpt)],
         "same file as the input"),
    Case("eval --json onto an existing file",
         lambda e, t: ["eval", "--data", str(e.data), "--checkpoint", str(e.ckpt), "--json", str(t / "r.json")],
         "exists; pass --overwrite", _touch("r.json")),
    Case("eval --confusion with a checkpoint's suffix",
         lambda e, t: ["eval", "--data", str(e.data), "--checkpoint", str(e.ckpt), "--confusion", str(e.ckpt)],
         "is not an image file name"),
    Case("plot onto the run's model", lambda e, t: ["plot", str(e.run), "--out", str(e.run / "model.pth")],
         "is not an image file name"),
    Case("plot onto the run's metrics", lambda e, t: ["plot", str(e.run), "--out", str(e.run / "metrics.csv")],
         "is not an image file name"),
    Case("plot over existing curves", lambda e, t: ["plot", str(e.run), "--out", str(t / "c.png")],
         "exists; pass --overwrite", _touch("c.png")),
    Case("train a fresh run into a finished run",
         lambda e, t: ["train", "--data", str(e.data), "--out", str(e.run), *TINY_TRAIN, "--epochs", "1"],
         "holds a training run already; continue it with --resume"),
    Case("train a fresh run into a folder holding a user's model.pth",
         lambda e, t: ["train", "--data", str(e.data), "--out", str(t), *TINY_TRAIN, "--epochs", "1"],
         "holds a training run already", _touch("model.pth")),
    Case("train --pretrained from inside its own run folder",
         lambda e, t: ["train", "--data", str(e.data), "--out", str(t), "--pretrained", str(t / "a.pth"),
                       *TINY_TRAIN, "--epochs", "1"], "lies inside the run folder", _copy_to("a.pth")),
    Case("qat from the model of the run folder it writes",
         lambda e, t: ["qat", str(e.run / "model.pth"), "--data", str(e.data), "--out", str(t / "q.onnx"),
                       "--run-dir", str(e.run)], "lies inside the fine-tuning run folder"),
    Case("qat onto its checkpoint's companion",
         lambda e, t: ["qat", str(t / "q.bin"), "--data", str(e.data), "--out", str(t / "q.xml")],
         "q.bin is the same file as the input", _copy_to("q.bin")),
    Case("bench --json over an existing file",
         lambda e, t: ["bench", "--json", str(t / "b.json"), "--engines", "torch"], "exists; pass --overwrite",
         _touch("b.json")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_rule(case: Case, env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if case.setup:
        case.setup(env, tmp_path)
    before = _digest(env.root), _digest(tmp_path)
    try:
        code = main(case.argv(env, tmp_path))
    except SystemExit as e:  # refused where argparse checks the value: its usage line, then the one error line
        code = e.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("repvgg")]
    if case.message:
        assert code == 2 and len(err) == 1 and case.message in err[0], err
        assert (_digest(env.root), _digest(tmp_path)) == before
    else:
        assert code == 0, err
        assert _digest(env.root) == before[0]


def test_qat_rerun_from_another_checkpoint_is_refused(env: Env, tmp_path: Path, capsys) -> None:
    """q.onnx made from A; the same command from B (even with --overwrite) must not reuse A's fine-tune."""
    for name, seed in (("a.pth", 0), ("b.pth", 1)):
        torch.manual_seed(seed)
        save_checkpoint(create_model(TINY_ARCH, num_classes=3, strides=(2, 2, 2, 2, 2)).eval(), tmp_path / name,
                        class_names=["class0", "class1", "class2"], preprocess=PREPROCESS, recipe="cifar")
    b = tmp_path / "b.pth"
    common = ["--data", str(env.data), "--out", str(tmp_path / "q.onnx"), "--workers", "0", "--threads", "1",
              "--batch-size", "8", "--calib-images", "8"]
    assert main(["qat", str(tmp_path / "a.pth"), *common]) == 0
    capsys.readouterr()
    artifact = (tmp_path / "q.onnx").read_bytes()
    assert main(["qat", str(b), *common, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "origin" in err[0] and "source_sha256" in err[0], err
    assert (tmp_path / "q.onnx").read_bytes() == artifact


def test_only_provable_debris_is_removed(tmp_path: Path) -> None:
    """A dead writer's temporaries go at the next write of the same target; a user's .tmp files and a live
    writer's temporaries stay."""
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".a.pth.{pid}-x1y2{TMP_SUFFIX}"
    stale_dir = tmp_path / f".m.xml.{pid}-abcd{TMP_SUFFIX}"
    live = tmp_path / f".a.pth.{os.getpid()}-zz{TMP_SUFFIX}"
    users = [tmp_path / ".notes.tmp", tmp_path / ".a.pth.123.tmp", tmp_path / f"a.pth.{pid}-x{TMP_SUFFIX}.bak"]
    for f in [stale, live, *users]:
        f.write_text("x")
    stale_dir.mkdir()
    atomic_write(tmp_path / "a.pth", b"new")
    assert not stale.exists() and live.exists() and stale_dir.exists() and all(f.exists() for f in users)
    assert remove_debris(tmp_path) == [stale_dir]
    assert (tmp_path / "a.pth").read_bytes() == b"new" and all(f.exists() for f in users)


def test_resume_keeps_a_users_tmp_file(env: Env, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(env.data), "--out", str(run), *TINY_TRAIN, "--epochs", "1"]
    assert main(args) == 0
    (run / ".notes.tmp").write_text("mine")
    assert main([*args, "--resume"]) == 0
    assert (run / ".notes.tmp").read_text() == "mine"


# --- a full disk: one line naming the path and the cause, exit 2, nothing half-written left behind -------------

UNSHARE = shutil.which("unshare")


# Runs every case in one process inside a private mount namespace (the tmpfs is gone afterwards): before each
# command the disk is filled to the last byte; after it, what the command left is listed, then removed.
DRIVER = """
import contextlib, io, json, os, shutil, sys, traceback
from pathlib import Path
from repvgg.cli import main
disk, cases, results = Path(sys.argv[1]), json.loads(sys.argv[2]), {}
for name, argv in cases:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, bytes(4096))
    os.close(fd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, err = "escaped", io.StringIO(traceback.format_exc())
    left = [str(p) for p in disk.rglob("*") if p.name != "filler"]
    results[name] = {"code": code, "stderr": err.getvalue(), "left": left}
    for p in disk.iterdir():
        if p.name != "filler":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
print(json.dumps(results))
"""


def _on_full_disk(disk: Path, cases: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Each case's exit code, stderr and the files it left, run with ``disk`` a full tmpfs."""
    script = f'mount -t tmpfs -o size=256k tmpfs "{disk}" || exit 99; exec "{PYTHON}" -c "$0" "$@"'
    done = subprocess.run([UNSHARE, "--mount", "--map-root-user", "sh", "-c", script, DRIVER, str(disk),
                           json.dumps(cases)], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _can_mount() -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL = [
    ("convert", lambda e, d: ["convert", str(e.ckpt), str(d / "d.pth")]),
    ("export onnx", lambda e, d: ["export", str(e.ckpt), "--format", "onnx", "--out", str(d / "m.onnx")]),
    ("export torchscript", lambda e, d: ["export", str(e.ckpt), "--format", "torchscript", "--out",
                                         str(d / "m.pt")]),
    ("export openvino", lambda e, d: ["export", str(e.ckpt), "--format", "openvino", "--out", str(d / "m.xml")]),
    ("quantize", lambda e, d: ["quantize", str(e.ckpt), "--calib", str(e.data), "--out", str(d / "q.onnx"),
                               "--calib-images", "8"]),
    ("eval --json", lambda e, d: ["eval", "--data", str(e.data), "--checkpoint", str(e.ckpt), "--workers", "0",
                                  "--json", str(d / "r.json")]),
    ("plot", lambda e, d: ["plot", str(e.run), "--out", str(d / "c.png")]),
    ("train", lambda e, d: ["train", "--data", str(e.data), "--out", str(d / "run"), *TINY_TRAIN, "--epochs", "1"]),
    ("qat", lambda e, d: ["qat", str(e.ckpt), "--data", str(e.data), "--out", str(d / "q.onnx"), "--workers", "0",
                          "--threads", "1", "--batch-size", "8", "--calib-images", "8"]),
    ("bench --json", lambda e, d: ["bench", "--engines", "torch", "--baselines", "--no-train", "--no-memory",
                                   "--rounds", "1", "--img-size", "16", "16", "--batch-sizes", "1", "--json",
                                   str(d / "b.json")]),
]


@pytest.fixture(scope="module")
def full_disk(env: Env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    disk = tmp_path_factory.mktemp("full") / "disk"
    disk.mkdir()
    return disk, _on_full_disk(disk, [(name, argv(env, disk)) for name, argv in FULL])


@pytest.mark.skipif(not _can_mount(), reason="needs unshare and tmpfs mounts in a user namespace")
@pytest.mark.parametrize("name", [n for n, _ in FULL])
def test_full_disk(name: str, full_disk: tuple[Path, dict[str, dict]]) -> None:
    disk, results = full_disk
    done = results[name]
    err = done["stderr"].strip().splitlines()
    assert done["code"] == 2 and err, done
    assert "No space left on device" in err[-1] and str(disk) in err[-1] and "Traceback" not in done["stderr"], err
    assert not [f for f in done["left"] if TMP_SUFFIX in f], f"temporary files left behind: {done['left']}"
    finished = (".pth", ".safetensors", ".onnx", ".pt", ".xml", ".bin", ".json", ".png")
    assert not [f for f in done["left"] if f.endswith(finished)], f"half-written outputs left: {done['left']}"
