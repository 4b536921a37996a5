"""The segmentation example (benchmarks/segmentation.py) on tiny generated image folders: canvases labelled tile by
tile, pixel confusion and mIoU, a segmenter scored alike before and after conversion, and the whole run (train,
convert, export, quantize, score, time) with its report, then its finished training reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import trained_looking
from imagefolders import REPO, make_split
from repvgg import reparameterize
from repvgg.deploy.engines import TorchEngine, available_engines
from repvgg.deploy.quantize import int8_engines_installed

spec = importlib.util.spec_from_file_location("segmentation_example", REPO / "benchmarks" / "segmentation.py")
seg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seg)

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ of three colour classes (red, green, blue), 16x16 images."""
    root = tmp_path_factory.mktemp("segmentation-data")
    make_split(root, "train", 6, size=16)
    make_split(root, "test", 3, size=16, seed=1)
    return root


def test_canvases_tile_images_and_label_every_pixel_with_its_tile(data: Path) -> None:
    canvases, classes = seg.build_canvases(data / "train", 4, 2, 8, seed=0)  # 16x16 images resized to 8x8 tiles
    assert classes == CLASSES
    assert canvases.images.shape == (4, 16, 16, 3) and canvases.tiles.shape == (4, 2, 2)
    labels = canvases.labels()
    for i in range(2):
        for j in range(2):
            region = (slice(None), slice(8 * i, 8 * i + 8), slice(8 * j, 8 * j + 8))
            assert (labels[region] == canvases.tiles[:, i, j, None, None]).all()
            # each class is one dominant colour (red, green, blue): the tile's pixels are its image's
            assert (canvases.images[region].mean((1, 2)).argmax(1) == canvases.tiles[:, i, j]).all()
    again, _ = seg.build_canvases(data / "train", 4, 2, 8, seed=0)
    other, _ = seg.build_canvases(data / "train", 4, 2, 8, seed=1)
    assert (again.images == canvases.images).all() and not (other.images == canvases.images).all()
    assert seg.build_canvases(data / "train", 6, 2, 8, seed=0)[0].count == 6  # 24 draws of 18 images
    x = canvases.inputs(slice(0, 2))
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32 and x.flags.c_contiguous


def test_confusion_and_miou_count_every_pixel_of_the_set() -> None:
    canvases = seg.Canvases(np.zeros((2, 4, 4, 3), np.uint8), np.array([[[0, 1], [2, 0]], [[1, 1], [1, 1]]]))

    def class0_everywhere(x: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(x), 3, *x.shape[2:]), np.float32)
        logits[:, 0] = 1
        return logits

    matrix = seg.confusion(class0_everywhere, canvases, 3, batch=1)
    assert matrix[:, 0].tolist() == [8, 20, 4] and matrix[:, 1:].sum() == 0
    scores = seg.iou_scores(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert scores["iou"] == {"a": 0.75, "b": pytest.approx(2 / 3), "c": None}  # c neither present nor predicted
    assert scores["miou"] == pytest.approx((0.75 + 2 / 3) / 2) and scores["pixel_accuracy"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("head", ["conv", "deeplab"])
def test_a_converted_segmenter_predicts_every_pixel_alike(data: Path, head: str) -> None:
    canvases, _ = seg.build_canvases(data / "test", 4, 2, 16, seed=1)
    model = trained_looking(seg.Segmenter(3, head))
    with torch.no_grad():  # logits centred class by class, so that every class gets predicted somewhere
        model.head[-1].bias -= model(torch.from_numpy(canvases.inputs())).mean((0, 2, 3))
    matrix = seg.confusion(TorchEngine(model), canvases, 3)
    assert (seg.confusion(TorchEngine(reparameterize(model)), canvases, 3) == matrix).all()
    assert (matrix.sum(0) > 0).all()  # every class predicted: the equality means something


def test_the_example_trains_converts_exports_quantizes_and_reports(data: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"),
            "--train-canvases", "8", "--test-canvases", "4", "--calib-canvases", "4", "--tile", "16", "--epochs", "1",
            "--batch-size", "4", "--rounds", "1", "--threads", "1"]
    seg.main(argv)
    result = json.loads((tmp_path / "results" / "segmentation.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    exported = [f"float32 {fmt} file" for fmt, (engine, _) in seg.EXPORTS.items() if engine in available_engines()]
    assert list(rows) == ["float32 training-time", "float32 deploy", *exported,
                          *(f"int8 {e} file" for e in int8_engines_installed())]
    for row in rows.values():
        assert 0 <= row["miou"] <= 1 and 0 <= row["pixel_accuracy"] <= 1 and list(row["iou"]) == CLASSES
        assert list(row["speed"]) == ["1", "8"] and all(s["images_per_s"] > 0 for s in row["speed"].values())
        assert row["file"] is None or Path(row["file"]).is_file()
    assert abs(rows["float32 deploy"]["miou"] - rows["float32 training-time"]["miou"]) <= 1e-6
    assert result["conversion"]["output_difference"] < 1e-5
    assert all(e["rel_diff"] < 1e-4 for e in result["exports"].values())
    assert sorted(result["int8"]) == sorted(int8_engines_installed())
    assert result["task"] | {"data": None} == dict(data=None, classes=CLASSES, grid=2, tile=16, canvas=32,
                                                   train_canvases=8, test_canvases=4, calib_canvases=4, seed=0)
    assert [e["epoch"] for e in result["training"]["per_epoch"]] == [1]
    assert result["machine"]["cpu"] and isinstance(result["machine"]["cpu_features"], list)
    assert 0 <= result["machine"]["others_busy_while_timed"] <= 1  # Linux: /proc/stat
    md = (tmp_path / "results" / "segmentation.md").read_text()
    assert "| float32 deploy | torch | - |" in md and result["command"] in md

    capsys.readouterr()
    args = seg.build_parser().parse_args(argv)
    train_set, _, classes = seg.load_data(args)
    model = seg.Segmenter(len(classes))
    assert seg.train(model, train_set, args, seg.settings_of(args, classes)) == result["training"]["per_epoch"]
    assert "reusing" in capsys.readouterr().out
    saved = torch.load(tmp_path / "out" / seg.STATE_FILE, weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert seg.load_state(tmp_path / "out" / seg.STATE_FILE, {**saved["settings"], "epochs": 2}) is None
