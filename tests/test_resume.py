"""Resume is exact with the default flags: a run stopped in the middle of an epoch by SIGTERM, SIGINT, SIGHUP (its
terminal closed) or SIGKILL sent to its whole process group (its loading workers included), then resumed (``train
--resume``, or ``qat`` run again) in another environment, continues in the step mode its speed probe chose before the
stop and ends with the weights of an uninterrupted run (for ``qat``, only if its fake quantizers' learnt ranges come
back too: they are no weights)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from imagefolders import PYTHON, REPO, TINY_ARCH, TINY_TRAIN, make_dataset, subprocess_env
from repvgg import create_model, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.engines import INT8_SUFFIXES
from repvgg.deploy.quantize import int8_engines_installed
from repvgg.training.speed import StepMode

pytestmark = pytest.mark.usefixtures("one_thread")

# each signal, and where it stops the run: (epoch, 0-based; optimizer step, 1-based). ``qat`` trains through the same
# loop, so it is stopped once, mid-epoch, with its fake quantizers' ranges in flight (its resume is "the same command
# again"). The last SIGKILL comes to a run that checkpoints after every step (``--save-every`` a tiny interval)
SAVE_EVERY_STEP = ["--save-every", "1e-9"]
STOPS = {"train": [("SIGTERM", (0, 2), []), ("SIGINT", (0, 4), []), ("SIGKILL", (1, 2), []), ("SIGHUP", (1, 4), []),
                   ("SIGKILL", (1, 5), SAVE_EVERY_STEP)],
         "qat": [("SIGTERM", (0, 2), [])]}
# the default flags (the speed probe chooses), and no stride-2 conv on a 1x1 input, where bf16 autocast gets wrong
# weight gradients on some CPUs (oneDNN)
STRIDES = (1, 2, 2, 2, 2)
PROBED = [*(flag for flag in TINY_TRAIN if flag != "--no-probe"), "--strides", *map(str, STRIDES)]
PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# ONNX Runtime where installed: the resume is the engine's business only at the final export, and it needs no NNCF
ENGINE = "onnxruntime" if "onnxruntime" in int8_engines_installed() else next(iter(int8_engines_installed()), None)
DATA_PATHS = ["loader", "memory", "loader", "memory", "loader"]  # the data path of ``train`` up to each stop
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image folders, and a checkpoint for ``qat`` to fine-tune."""
    root = tmp_path_factory.mktemp("inputs")
    make_dataset(root / "data", train=16, val=4)
    model = create_model(TINY_ARCH, num_classes=3, strides=STRIDES)
    save_checkpoint(model.eval(), root / "tiny.pth", class_names=["class0", "class1", "class2"],
                    preprocess=PREPROCESS, recipe="cifar")
    return root


def _command(kind: str, inputs: Path, out: Path) -> tuple[list[str], Path]:
    """The command line with default step-mode flags (six steps an epoch: two epochs for ``train``, whose stops span
    both, one for ``qat``), and the run folder it trains in."""
    if kind == "train":
        return ["train", "--data", str(inputs / "data"), "--out", str(out), *PROBED, "--epochs", "2"], out
    artifact = out / f"tiny_int8{INT8_SUFFIXES[ENGINE]}"
    argv = ["qat", str(inputs / "tiny.pth"), "--data", str(inputs / "data"), "--out", str(artifact), "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--calib-images", "8", "--engine", ENGINE]
    return argv, artifact.with_suffix(".qat")


def _take_terminal() -> None:
    """In the child, after ``setsid``: make its pseudo-terminal (stdin) the controlling terminal of its session, with
    SIGHUP at its default (a suite run under ``nohup`` would pass SIGHUP on ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read_until(master: int, done, deadline: float) -> str:
    """Output read from a pseudo-terminal's master side until ``done()`` (keeps the child from blocking on it)."""
    chunks = []
    while not done():
        assert time.monotonic() < deadline, "timed out: " + b"".join(chunks).decode(errors="replace")[-3000:]
        if select.select([master], [], [], 0.05)[0]:
            try:
                chunks.append(os.read(master, 65536))
            except OSError:  # the child closed the terminal
                break
    return b"".join(chunks).decode(errors="replace")


def _stopped_run(argv: list[str], folder: Path, sig: str, at: tuple[int, int], env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` (one loading worker) in a terminal of its own, paused after step ``at``; stop it there with
    ``sig`` sent to its process group (for SIGHUP, once the terminal is closed). Returns its exit status and the
    output read from the terminal."""
    ready = folder / "paused"
    cmd = [PYTHON, str(REPO / "tests" / "paused_run.py"), *map(str, at), str(ready), *argv, "--workers", "1"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=_take_terminal)
    os.close(slave)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        output = _read_until(master, lambda: ready.exists() or proc.poll() is not None, deadline)
        assert proc.poll() is None, output[-3000:]
        if sig == "SIGHUP":  # as when an SSH session ends: its terminal hangs up, and its shell passes SIGHUP on
            os.close(master)
            master = -1
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            os.killpg(proc.pid, getattr(signal, sig))
            output += _read_until(master, lambda: proc.poll() is not None, deadline)
        return proc.wait(timeout=TIMEOUT_S), output
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _uninterrupted(kind: str, inputs: Path, folder: Path,
                   mode: StepMode) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The final weights and metrics rows of the same command run in one go in ``mode``."""
    argv, run = _command(kind, inputs, folder)
    flags = ["--channels-last" if mode.channels_last else "--no-channels-last", "--threads", str(mode.threads)]
    if kind == "train":
        flags += ["--amp", mode.amp, "--no-probe"]
    else:
        assert mode.amp == "none"  # quantization-aware training runs in float32
    assert main([*argv, *flags]) == 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["repvgg"]["step_mode"] == dataclasses.asdict(mode)  # the flags, not a probe, chose the mode
    return state["model"], [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["train", pytest.param("qat", marks=pytest.mark.skipif(
    ENGINE is None, reason="no int8 engine installed"))])
def test_a_run_stopped_by_each_signal_resumes_in_its_own_step_mode_to_the_uninterrupted_weights(
        kind: str, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One run, stopped and resumed at each of its stops: after the first stop every resume runs where torch's
    default (and a probe's choice) would be two threads, and must keep the step mode that the first probe chose;
    ``train`` switches between the loader and the in-memory data path at every stop (``qat`` holds its images in
    memory), the uninterrupted run holds them in memory. The last resume, to the end, runs in the test's process."""
    argv, run = _command(kind, inputs, tmp_path / "split")
    resume = [*argv, "--resume"] if kind == "train" else argv  # qat: the same command again
    elsewhere = {**subprocess_env(), "OMP_NUM_THREADS": "2"}
    mode, saved_at = None, (0, 0)
    for n, (sig, at, flags) in enumerate(STOPS[kind]):
        (tmp_path / f"{n}").mkdir()
        path = ["--data-path", DATA_PATHS[n]] if kind == "train" else []
        status, output = _stopped_run([*(resume if n else argv), *path, *flags], tmp_path / f"{n}", sig, at,
                                      elsewhere if n else subprocess_env())
        signum = getattr(signal, sig)
        assert status == (-signum if sig == "SIGKILL" else 128 + signum), f"{sig}: {output[-3000:]}"
        state = torch.load(run / "last.pt", weights_only=True)
        if mode is None:
            assert "speed probe (training images/s" in output  # the default flags: the step mode was measured
            mode = StepMode(**state["repvgg"]["step_mode"])
        else:
            _assert_resumed(output, mode, saved_at)
        saved_at = (at[0], 0) if sig == "SIGKILL" and not flags else at  # SIGKILL: the last save before it
        assert (state["progress"]["epoch"], state["progress"]["step"]) == saved_at, sig
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the last resume runs in this process, where torch's default is two threads too
    try:
        assert main(resume) == 0
    finally:
        torch.set_num_threads(threads)
    _assert_resumed(capsys.readouterr().out, mode, saved_at)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == ([1, 2] if kind == "train" else [1])
    final = torch.load(run / "last.pt", weights_only=True)["model"]
    reference, reference_rows = _uninterrupted(kind, inputs, tmp_path / "straight", mode)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in reference_rows], rel=1e-12)


def _assert_resumed(output: str, mode: StepMode, at: tuple[int, int]) -> None:
    """The output of a resume: from the saved step, in the saved step mode, with no probe."""
    assert "speed probe" not in output
    assert f"step: {mode.label} (the run's own, from its saved state)" in output, output[-3000:]
    assert f"at epoch {at[0] + 1}, step {at[1]}" in output, output[-3000:]
