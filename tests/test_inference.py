"""Prediction through each engine with the checkpoint's class names and preprocessing, the default engine,
and bad input."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repvgg
from conftest import trained_looking
from repvgg import create_model, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.engines import ENGINES, available_engines, class_names_for, create_engine
from repvgg.deploy.predict import image_files, predict
from repvgg.deploy.probe import fastest_engine

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A training-time RepVGG-A0 for 32x32 crops with six named classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "a0.safetensors"
    save_checkpoint(trained_looking(create_model("repvgg_a0", num_classes=6)), path, class_names=CLASSES,
                    preprocess={"resize": 40, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Three small images of different sizes and modes (RGB, grayscale, RGBA)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (shape, mode) in enumerate([((48, 64, 3), "RGB"), ((40, 40), "L"), ((56, 44, 4), "RGBA")]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(str(path))
    return paths


def parse(out: str) -> dict[str, list[tuple[str, float]]]:
    """``repvgg predict`` output -> {image: [(class, probability), ...]}."""
    result: dict[str, list[tuple[str, float]]] = {}
    for line in out.splitlines()[1:]:
        if not line.startswith(" "):
            current = result.setdefault(line.rstrip(":"), [])
        else:
            prob, name = line.split(maxsplit=1)
            current.append((name, float(prob.rstrip("%")) / 100))
    return result


def test_predict_cli_on_every_installed_engine(ckpt, images, capsys) -> None:
    outputs = {}
    for engine in available_engines():
        assert main(["predict", str(ckpt), *images, "--engine", engine]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0] == f"engine: {engine}"
        outputs[engine] = parse(out)
    for result in outputs.values():
        assert list(result) == images
        for top in result.values():
            assert len(top) == 5 and {name for name, _ in top} <= set(CLASSES)
            probs = [p for _, p in top]
            assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    reference = outputs["torch"]
    for result in outputs.values():  # every engine agrees on the ranking's head
        assert all(result[i][0][0] == reference[i][0][0] for i in images)


def test_predict_matches_pytorch_on_preprocessed_input(ckpt, images) -> None:
    model, meta = repvgg.model_from_checkpoint(ckpt)
    top = predict(repvgg.reparameterize(model), images[:1], "torch", meta.metadata, topk=6)[0]
    x = repvgg.models.preprocess.eval_transform(meta.metadata["preprocess"])(Image.open(images[0]))[None]
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[0]
    assert [name for name, _ in top] == [CLASSES[i] for i in probs.argsort(descending=True).tolist()]
    assert top[0][1] == pytest.approx(probs.max().item(), rel=1e-4)


def test_predict_falls_back_to_class_indices_and_imagenet_preprocessing(tmp_path, images, capsys) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # official layout: no metadata at all
    assert main(["predict", str(tmp_path / "bare.pth"), images[0], "--engine", "torch", "--top", "2"]) == 0
    top = parse(capsys.readouterr().out)[images[0]]
    assert len(top) == 2 and all(name.startswith("class ") for name, _ in top)


def test_fastest_engine_is_an_installed_one() -> None:
    """Which one wins is measured (see test_probe.py); here the session's seeded probe ranks OpenVINO first."""
    assert fastest_engine(["torch"]) == "torch"
    assert fastest_engine() in available_engines() and repvgg.fastest_engine is fastest_engine


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree_with_pytorch_on_any_batch(engine: str) -> None:
    if engine not in available_engines():
        pytest.skip(f"{engine} not installed")
    model = trained_looking(create_model("repvgg_a0", num_classes=4, deploy=True))
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    run = create_engine(model, engine, (32, 32), batch_size=4)
    for batch in (x, x[:1]):
        np.testing.assert_allclose(run(batch), ref[: len(batch)], rtol=0, atol=1e-4 * np.abs(ref).max())


def test_bad_predict_input(ckpt, images, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "not_an_image.png").write_text("hello")
    assert main(["predict", str(ckpt), str(tmp_path / "not_an_image.png"), "--engine", "torch"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(tmp_path / "missing.png"), "--engine", "torch"]) == 2
    assert "image not found" in capsys.readouterr().err
    with pytest.raises(repvgg.RepVGGError, match="6 class names but the model has 4"):
        class_names_for({"class_names": CLASSES}, 4)
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "openvino"
                        else real(name, *a))
    assert main(["predict", str(ckpt), images[0], "--engine", "openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'repvgg[openvino]'" in err


def test_image_files_expands_folders_and_patterns(tmp_path, monkeypatch) -> None:
    for name in ("b/2.png", "b/deep/1.JPG", "a.png", "b/notes.txt", "c/3.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert image_files(["b"]) == ["b/2.png", "b/deep/1.JPG"]  # recursive, sorted, image kinds only
    assert image_files(["*.png", "c/*", "b/**/*.JPG"]) == ["a.png", "c/3.webp", "b/deep/1.JPG"]
    assert image_files(["*"]) == ["a.png", "b/2.png", "b/deep/1.JPG", "c/3.webp"]  # folders matched: searched
    assert image_files(["a.png", "b", "*.png"]) == ["a.png", "b/2.png", "b/deep/1.JPG"]  # each file once
    assert image_files(["missing.png"]) == ["missing.png"]  # reading it names the problem
    with pytest.raises(repvgg.RepVGGError, match=r"no image file matches x/\*\.jpg"):
        image_files(["x/*.jpg"])
    with pytest.raises(repvgg.RepVGGError, match="no image files in the folder empty"):
        image_files(["empty"])


def test_predict_reads_folders_and_patterns_and_saves_json_and_csv(ckpt, images, tmp_path, capsys) -> None:
    folder = Path(images[0]).parent
    (folder / "notes.txt").write_text("not an image")
    out_json, out_csv = tmp_path / "top.json", tmp_path / "top.csv"
    argv = ["predict", str(ckpt), str(folder), str(folder / "img1.*"), "--engine", "torch", "--top", "2"]
    assert main([*argv, "--json", str(out_json), "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"results -> {out_json}", f"results -> {out_csv}"]
    printed = parse("\n".join(out[:-2]))
    assert list(printed) == images  # the folder's images (the .txt left out); img1 through the pattern only once
    saved = json.loads(out_json.read_text())
    assert saved["model"] == str(ckpt) and saved["engine"] == "torch"
    assert [row["path"] for row in saved["images"]] == images
    for row in saved["images"]:
        assert [t["class"] for t in row["top"]] == [name for name, _ in printed[row["path"]]]
        assert [t["probability"] for t in row["top"]] == pytest.approx([p for _, p in printed[row["path"]]], abs=1e-4)
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    direct = predict(repvgg.reparameterize(repvgg.model_from_checkpoint(ckpt)[0]), images, "torch",
                     repvgg.read_checkpoint(ckpt).metadata, topk=2, batch_size=2)  # in two batches
    for row, top, kept in zip(rows[1:], direct, saved["images"], strict=True):
        assert row[1::2] == [name for name, _ in top]
        assert [float(p) for p in row[2::2]] == pytest.approx([t["probability"] for t in kept["top"]], abs=5.1e-7)
        # float32 convolutions may differ in the last bits with the batch's size (oneDNN picks kernels by shape)
        assert [t["probability"] for t in kept["top"]] == pytest.approx([p for _, p in top], abs=1e-5)
    assert main([*argv, "--json", str(out_json)]) == 2  # an existing result file is kept without --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--csv", images[1]]) == 2  # nor is an input image ever written over
    assert f"is the same file as the input {images[1]}" in capsys.readouterr().err


def test_with_pretrained_every_positional_is_an_image(ckpt, images, capsys) -> None:
    assert main(["predict", "--pretrained", str(ckpt), *images[:2], "--engine", "torch"]) == 0
    assert list(parse(capsys.readouterr().out)) == images[:2]
    assert main(["predict", images[0]]) == 2
    assert "is an image, not a model: name a checkpoint or exported file first, or use --pretrained" in \
        capsys.readouterr().err
    assert main(["predict"]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["predict", str(ckpt)]) == 2
    assert "no images given" in capsys.readouterr().err
