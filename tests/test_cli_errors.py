"""Every command's bad input, as one table: each row runs ``repvgg.cli.main(argv)`` in-process and expects an exit
code, a message fragment on stderr's last line, no traceback, and no file created or changed.

To add a case, append a ``Row(name, argv, code, message)`` to ``ROWS``; ``argv`` receives :class:`Files`, the
fixture's ready-made inputs, and ``setup`` (optional) gets pytest's ``monkeypatch`` before the command runs.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import trained_looking
from imagefolders import PYTHON, make_dataset, subprocess_env
from repvgg import create_model, reparameterize, save_checkpoint
from repvgg.cli import main

PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@dataclass(frozen=True)
class Files:
    """Inputs shared by all rows (paths as strings); ``out`` is an empty folder for outputs."""

    root: Path
    train: str  # training-time RepVGG-A0, 3 named classes, 16x16 preprocessing
    deploy: str  # its converted form
    link: str  # a symlink to ``train``
    nan: str  # ``train`` with a NaN weight
    huge: str  # finite weights whose outputs overflow to inf
    headless: str  # official layout without ``linear.*``
    fewer_classes: str  # training-time RepVGG-A0 with 2 classes
    image: str  # a 16x16 RGB PNG
    data: str  # val/class0..2 of readable PNGs
    bad_data: str  # val/class0..2 of unreadable files only
    afile: str  # a regular file, to put output paths under
    out: str

    def bad_preprocess(self, kind: str) -> str:
        """A checkpoint whose ``preprocess`` metadata is malformed: ``text``, ``crop`` or ``mean``."""
        return str(self.root / f"badpre_{kind}.pth")


class Row(NamedTuple):
    """One bad-input case: test id, argv built from the fixture's files, exit code, fragment of stderr's last line."""

    name: str
    argv: Callable[[Files], list[str]]
    code: int
    message: str
    setup: Callable[[pytest.MonkeyPatch], None] | None = None


def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA GPU, whether or not one is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def no_nncf(monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF not installed, whether or not it is."""
    monkeypatch.setitem(sys.modules, "nncf", None)


def small_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's decompression-bomb limit at 100 pixels: a 16x16 image is then over twice the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)


def evaluate(f: Files, checkpoint: str, *extra: str, data: str | None = None) -> list[str]:
    """``repvgg eval`` on the readable folder (or ``data``), in-process data loading."""
    return ["eval", "--data", data or f.data, "--checkpoint", checkpoint, "--workers", "0", *extra]


def predict(checkpoint: str, image: str, *extra: str) -> list[str]:
    """``repvgg predict`` with the torch engine, installed everywhere."""
    return ["predict", checkpoint, image, "--engine", "torch", *extra]


def train(f: Files, *extra: str) -> list[str]:
    """``repvgg train`` on the readable folder, tiny and without the speed probe, into ``out/run``."""
    return ["train", "--data", f.data, "--out", f"{f.out}/run", "--recipe", "cifar", "--img-size", "16",
            "--eval-resize", "16", "--batch-size", "2", "--workers", "0", "--no-probe", "--no-tensorboard", *extra]


def bench(*extra: str) -> list[str]:
    """``repvgg bench`` at its cheapest: torch only, no baselines, no memory probes, no chart."""
    return ["bench", "--engines", "torch", "--baselines", "--no-memory", "--plot", "", *extra]


def quantize(f: Files, *extra: str, calib: str | None = None, out: str = "q.onnx") -> list[str]:
    """``repvgg quantize`` of the training-time checkpoint, calibrated on the readable folder (or ``calib``)."""
    return ["quantize", f.train, "--calib", calib or f.data, "--out", f"{f.out}/{out}", *extra]


ROWS = [
    # files that cannot be read
    Row("convert missing", lambda f: ["convert", f"{f.root}/missing.pth", f"{f.out}/d.pth"], 2,
        "checkpoint not found"),
    Row("convert not a checkpoint", lambda f: ["convert", f.afile, f"{f.out}/d.pth"], 2, "is not a checkpoint"),
    Row("info not a checkpoint", lambda f: ["info", f.afile], 2, "is not a checkpoint"),
    Row("info directory", lambda f: ["info", f.out], 2, "is a folder, not a checkpoint file"),
    Row("convert unknown model", lambda f: ["convert", f.headless, f"{f.out}/d.pth", "--model", "repvgg_q1"], 2,
        "unknown model 'repvgg_q1'"),
    Row("convert other architecture", lambda f: ["convert", f.train, f"{f.out}/d.pth", "--model", "repvgg_a1"], 2,
        "checkpoint holds repvgg_a0, not repvgg_a1"),
    # convert: its own source, already converted, no classifier
    Row("convert onto itself", lambda f: ["convert", f.train, f.train], 2, "same file as"),
    Row("convert onto itself via symlink", lambda f: ["convert", f.train, f.link], 2, "same file as"),
    Row("convert onto itself, other spelling", lambda f: ["convert", f.train, f"{f.out}/../train.pth"], 2,
        "same file as"),
    Row("convert a deploy file", lambda f: ["convert", f.deploy, f"{f.out}/d.pth"], 2, "already in deploy form"),
    Row("convert headless unasked", lambda f: ["convert", f.headless, f"{f.out}/d.pth"], 2,
        "no classifier (no linear.* weights); pass --headless"),
    Row("predict headless", lambda f: predict(f.headless, f.image), 2, "no classifier"),
    Row("eval headless", lambda f: evaluate(f, f.headless), 2, "has no classifier to evaluate"),
    # non-finite weights or outputs
    Row("convert NaN weights", lambda f: ["convert", f.nan, f"{f.out}/d.pth"], 2, "weights are not finite"),
    Row("eval NaN weights", lambda f: evaluate(f, f.nan), 2, "weights are not finite"),
    Row("predict NaN weights", lambda f: predict(f.nan, f.image), 2, "weights are not finite"),
    Row("export NaN weights", lambda f: ["export", f.nan, "--format", "torchscript", "--out", f"{f.out}/m.pt"], 2,
        "weights are not finite"),
    Row("convert overflowing outputs", lambda f: ["convert", f.huge, f"{f.out}/d.pth"], 2, "outputs are not finite"),
    Row("eval overflowing outputs", lambda f: evaluate(f, f.huge), 2, "outputs are not finite"),
    Row("predict overflowing outputs", lambda f: predict(f.huge, f.image), 2, "outputs are not finite"),
    # eval: nothing readable, devices
    Row("eval only unreadable images", lambda f: evaluate(f, f.train, "--json", f"{f.out}/r.json", data=f.bad_data),
        2, "class0 has no readable image"),
    Row("eval --device cuda without GPU", lambda f: evaluate(f, f.train, "--device", "cuda"), 2,
        "no CUDA GPU is available", no_cuda),
    Row("eval --device banana", lambda f: evaluate(f, f.train, "--device", "banana"), 2, "unknown device 'banana'"),
    # images and preprocessing
    Row("predict decompression bomb", lambda f: predict(f.train, f.image), 2, "exceeds limit", small_bomb_limit),
    Row("predict preprocess not a mapping", lambda f: predict(f.bad_preprocess("text"), f.image), 2,
        "preprocess metadata must be a mapping"),
    Row("predict preprocess bad crop", lambda f: predict(f.bad_preprocess("crop"), f.image), 2,
        "preprocess 'crop' must be a positive integer or [height, width]"),
    Row("eval preprocess bad mean", lambda f: evaluate(f, f.bad_preprocess("mean")), 2,
        "preprocess 'mean' must be 1 or 3 finite numbers"),
    Row("export preprocess bad crop",
        lambda f: ["export", f.bad_preprocess("crop"), "--format", "torchscript", "--out", f"{f.out}/m.pt"], 2,
        "preprocess 'crop' must be"),
    # output paths that cannot be written
    Row("convert dst under a file", lambda f: ["convert", f.train, f"{f.afile}/d.pth"], 2, "is a file, not a folder"),
    Row("convert dst is a folder", lambda f: ["convert", f.train, f.out], 2, "it is a folder"),
    Row("export --out under a file",
        lambda f: ["export", f.train, "--format", "torchscript", "--out", f"{f.afile}/x/m.pt"], 2,
        "is a file, not a folder"),
    Row("eval --json under a file", lambda f: evaluate(f, f.train, "--json", f"{f.afile}/r.json"), 2,
        "is a file, not a folder"),
    Row("bench --json under a file", lambda f: bench("--json", f"{f.afile}/b.json"), 2, "is a file, not a folder"),
    # numeric options
    Row("list --num-classes -5", lambda f: ["list", "--num-classes", "-5"], 2, "must be an integer >= 0, got '-5'"),
    Row("list --num-classes x", lambda f: ["list", "--num-classes", "x"], 2, "expected an integer, got 'x'"),
    Row("cache --older-than -1", lambda f: ["cache", "--older-than", "-1"], 2, "must be a number >= 0, got '-1'"),
    Row("cache --older-than x", lambda f: ["cache", "--clear", "--older-than", "x"], 2, "expected a number, got 'x'"),
    Row("convert --img-size 0", lambda f: ["convert", f.train, f"{f.out}/d.pth", "--img-size", "0"], 2,
        "must be a positive integer"),
    Row("convert --tolerance nan", lambda f: ["convert", f.train, f"{f.out}/d.pth", "--tolerance", "nan"], 2,
        "must be a finite number"),
    Row("convert --tolerance -1", lambda f: ["convert", f.train, f"{f.out}/d.pth", "--tolerance", "-1"], 2,
        "must be a number >= 0"),
    Row("eval --batch-size 0", lambda f: evaluate(f, f.train, "--batch-size", "0"), 2, "must be a positive integer"),
    Row("eval --workers -1", lambda f: evaluate(f, f.train, "--workers", "-1"), 2, "must be an integer >= 0"),
    Row("eval --img-size 0", lambda f: evaluate(f, f.train, "--img-size", "0"), 2, "must be a positive integer"),
    Row("eval --resize -3", lambda f: evaluate(f, f.train, "--img-size", "16", "--resize", "-3"), 2,
        "must be a positive integer"),
    Row("export --img-size 0 0",
        lambda f: ["export", f.train, "--format", "onnx", "--out", f"{f.out}/m.onnx", "--img-size", "0", "0"], 2,
        "must be a positive integer"),
    Row("export --tolerance nan",
        lambda f: ["export", f.train, "--format", "onnx", "--out", f"{f.out}/m.onnx", "--tolerance", "nan"], 2,
        "must be a finite number"),
    Row("predict --top 0", lambda f: predict(f.train, f.image, "--top", "0"), 2, "must be a positive integer"),
    Row("bench --img-size 0 0", lambda f: bench("--img-size", "0", "0"), 2, "must be a positive integer"),
    Row("bench --batch-sizes 1 0", lambda f: bench("--batch-sizes", "1", "0"), 2, "must be a positive integer"),
    Row("bench --rounds 0", lambda f: bench("--rounds", "0"), 2, "must be a positive integer"),
    Row("bench --images-per-round -1", lambda f: bench("--images-per-round", "-1"), 2, "must be a positive integer"),
    # train: numeric options, then what can only be checked once the data is found
    *(Row(f"train {' '.join(args)}", lambda f, a=args: train(f, *a), 2, message) for args, message in (
        (("--epochs", "0"), "must be a positive integer"),
        (("--epochs", "-3"), "must be a positive integer"),
        (("--batch-size", "0"), "must be a positive integer"),
        (("--workers", "-1"), "must be an integer >= 0"),
        (("--lr", "-1"), "must be a number > 0"),
        (("--lr", "nan"), "must be a finite number"),
        (("--momentum", "-1"), "between 0 and 1"),
        (("--ema-decay", "2"), "between 0 and 1"),
        (("--label-smoothing", "2"), "between 0 and 1"),
        (("--mixup", "-1"), "must be a number >= 0"),
        (("--img-size", "0"), "must be a positive integer"),
        (("--wd", "-1"), "must be a number >= 0"),
        (("--time-budget-min", "0"), "must be a number > 0"),
        (("--strides", "1", "1", "2", "2", "0"), "must be a positive"),
        (("--freeze-stages", "9"), "--freeze-stages must be between 0 and 5"),
    )),
    Row("train --model missing .json", lambda f: train(f, "--model", f"{f.root}/none.json"), 2,
        "argument --model: cannot read"),
    Row("train --model .json of no JSON", lambda f: train(f, "--model", f"{f.root}/notjson.json"), 2,
        "notjson.json is not a JSON architecture config"),
    Row("train --model .json of a bad config", lambda f: train(f, "--model", f"{f.root}/narrow.json"), 2,
        "narrow.json: narrow: widths (0.01, 1, 1, 1) leave a stage with no channel"),
    Row("train data missing", lambda f: ["train", "--data", f"{f.root}/nothing", "--out", f"{f.out}/run"], 2,
        "data not found"),
    Row("train --amp fp16 on the CPU", lambda f: train(f, "--amp", "fp16", "--device", "cpu"), 2, "needs a CUDA"),
    Row("train --device cuda without GPU", lambda f: train(f, "--device", "cuda"), 2, "no CUDA GPU", no_cuda),
    Row("train --device banana", lambda f: train(f, "--device", "banana"), 2, "unknown device 'banana'"),
    Row("train --out a file", lambda f: [*train(f), "--out", f.afile], 2, "is a file, not a folder"),
    Row("train --out under a file", lambda f: [*train(f), "--out", f"{f.afile}/run"], 2, "a parent is a file"),
    Row("train --resume missing", lambda f: train(f, "--resume", f"{f.root}/none.pt"), 2, "not found"),
    Row("train --resume random bytes", lambda f: train(f, "--resume", f.afile), 2, "not a readable training state"),
    Row("train --resume a model file", lambda f: train(f, "--resume", f.train), 2, "needs a training state"),
    Row("train --pretrained missing", lambda f: train(f, "--pretrained", f"{f.root}/none.pth"), 2, "none.pth"),
    # quantize: calibration data, engines, methods, extras
    Row("quantize calibration folder missing", lambda f: quantize(f, calib=f"{f.root}/nothing"), 2,
        "calibration data not found"),
    Row("quantize calibration folder empty", lambda f: quantize(f, calib=f.out), 2, "not an image folder"),
    Row("quantize only unreadable images", lambda f: quantize(f, calib=f.bad_data), 2,
        "class0 has no readable image"),
    Row("quantize --engine tensorrt", lambda f: quantize(f, "--engine", "tensorrt"), 2,
        "invalid choice: 'tensorrt'"),
    Row("quantize --method mse", lambda f: quantize(f, "--method", "mse"), 2,
        "unknown onnxruntime calibration method 'mse'"),
    Row("quantize openvino method on onnxruntime", lambda f: quantize(f, "--method", "mixed"), 2,
        "choose one of: minmax, percentile, entropy"),
    Row("quantize --out suffix of the other engine", lambda f: quantize(f, "--engine", "openvino"), 2,
        "openvino int8 output must end in .xml"),
    Row("quantize without nncf", lambda f: quantize(f, out="q.xml"), 2,
        "nncf is not installed; install it with: pip install 'repvgg[quantize]'", no_nncf),
    Row("quantize --val missing", lambda f: quantize(f, "--val", f"{f.root}/nothing"), 2, "data not found"),
    Row("quantize --calib-images 0", lambda f: quantize(f, "--calib-images", "0"), 2, "must be a positive integer"),
    Row("quantize --out under a file", lambda f: [*quantize(f), "--out", f"{f.afile}/q.onnx"], 2,
        "is a file, not a folder"),
    # qat: what it fine-tunes, its data, engines
    Row("qat of a deploy checkpoint", lambda f: qat(f, f.deploy), 2, "is a deploy checkpoint"),
    Row("qat checkpoint missing", lambda f: qat(f, f"{f.root}/nothing.pth"), 2, "checkpoint not found"),
    Row("qat data missing", lambda f: qat(f, f.train, data=f"{f.root}/nothing"), 2, "data not found"),
    Row("qat data of other classes", lambda f: qat(f, f.fewer_classes), 2, "classes differ"),
    Row("qat --engine tensorrt", lambda f: qat(f, f.train, "--engine", "tensorrt"), 2, "invalid choice"),
    Row("qat --epochs 0", lambda f: qat(f, f.train, "--epochs", "0"), 2, "must be a positive integer"),
    Row("qat --lr -1", lambda f: qat(f, f.train, "--lr", "-1"), 2, "must be a number > 0"),
    Row("qat without nncf", lambda f: [*qat(f, f.train), "--out", f"{f.out}/q.xml"], 2,
        "nncf is not installed; install it with: pip install 'repvgg[quantize]'", no_nncf),
]


def qat(f: Files, checkpoint: str, *extra: str, data: str | None = None) -> list[str]:
    """``repvgg qat`` of ``checkpoint`` on the readable folder (or ``data``), to an ONNX Runtime artifact."""
    return ["qat", checkpoint, "--data", data or f.data, "--out", f"{f.out}/q.onnx", "--workers", "0", *extra]


def _checkpoints(root: Path) -> None:
    """The checkpoints :class:`Files` names, all RepVGG-A0 with 3 classes (the smallest registered model)."""
    torch.manual_seed(0)
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    classes = ["class0", "class1", "class2"]
    save_checkpoint(model, root / "train.pth", class_names=classes, preprocess=PREPROCESS)
    save_checkpoint(reparameterize(model), root / "deploy.pth", class_names=classes, preprocess=PREPROCESS)
    save_checkpoint(create_model("repvgg_a0", num_classes=2), root / "fewer_classes.pth", preprocess=PREPROCESS)
    (root / "link.pth").symlink_to(root / "train.pth")
    for name, key, value in (("nan", "stage0.rbr_dense.conv.weight", float("nan")), ("huge", "linear.weight", 3e38)):
        broken = copy.deepcopy(model)
        broken.state_dict()[key].view(-1)[0] = value
        save_checkpoint(broken, root / f"{name}.pth", class_names=classes, preprocess=PREPROCESS)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("linear.")}, root / "headless.pth")
    train = torch.load(root / "train.pth", weights_only=True)  # save_checkpoint refuses to write such metadata
    for kind, preprocess in (("text", "16x16"), ("crop", {**PREPROCESS, "crop": "sixteen"}),
                             ("mean", {**PREPROCESS, "mean": [0.5, 0.5]})):
        torch.save({**train, "repvgg": {**train["repvgg"], "preprocess": preprocess}}, root / f"badpre_{kind}.pth")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Every input of the table, built once for the module."""
    root = tmp_path_factory.mktemp("cli")
    _checkpoints(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "image.png")
    make_dataset(root / "data", train=1, val=2)
    for c in range(3):
        folder = root / "bad_data" / "val" / f"class{c}"
        folder.mkdir(parents=True)
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (root / "afile").write_text("a regular file")
    (root / "notjson.json").write_text("depths: 1 1 1 1")
    (root / "narrow.json").write_text('{"official_name": "narrow", "depths": [1, 1, 1, 1], "widths": [0.01, 1, 1, 1]}')
    (root / "out").mkdir()
    names = ("train", "deploy", "link", "nan", "huge", "headless", "fewer_classes")
    return Files(root=root, **{n: str(root / f"{n}.pth") for n in names}, image=str(root / "image.png"),
                 data=str(root / "data"), bad_data=str(root / "bad_data"), afile=str(root / "afile"),
                 out=str(root / "out"))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of everything under ``root``: any write shows."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def run_cli(argv: list[str]) -> int:
    """``repvgg.cli.main`` as the console script runs it: argparse errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row: Row, files: Files, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    if row.setup:
        row.setup(monkeypatch)
    before = _snapshot(files.root)
    code = run_cli(row.argv(files))
    err = capsys.readouterr().err
    assert code == row.code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("repvgg") and row.message in last, err
    assert _snapshot(files.root) == before  # nothing written, nothing changed


def test_broken_pipe_ends_quietly() -> None:
    """``repvgg list | head``: the reader goes away; no traceback, no "Exception ignored" at exit."""
    proc = subprocess.Popen([PYTHON, "-m", "repvgg.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    proc.stdout.close()  # nobody reads: the first flush meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_real_process_prints_one_line(files: Files) -> None:
    """The console script itself: one line on stderr, exit code 2, its input untouched."""
    before = _snapshot(files.root)
    result = subprocess.run([PYTHON, "-m", "repvgg.cli", "convert", files.train, files.link], capture_output=True,
                            text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "same file as" in result.stderr
    assert _snapshot(files.root) == before
