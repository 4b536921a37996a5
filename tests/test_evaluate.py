"""``repvgg eval``: the same figures for training-time, deploy, official-layout and timm checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import trained_looking
from imagefolders import make_dataset
from repvgg import create_model, reparameterize, save_checkpoint
from repvgg.cli import main
from repvgg.models.preprocess import eval_transform
from repvgg.training.data import ImageFolder

CLASSES = ["class0", "class1", "class2"]
PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train=1, val=6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    paths = {"train": root / "train.pth", "deploy": root / "deploy.safetensors", "official": root / "official.pth"}
    save_checkpoint(model, paths["train"], class_names=CLASSES, preprocess=PREPROCESS)
    save_checkpoint(reparameterize(model), paths["deploy"], class_names=CLASSES, preprocess=PREPROCESS)
    torch.save(model.state_dict(), paths["official"])
    return paths


def _eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"result{len(list(tmp_path.glob('result*.json')))}.json"
    assert main(["eval", "--workers", "0", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_training_time_and_deploy_agree(data: Path, checkpoints: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    train = _eval(tmp_path, "--data", str(data), "--checkpoint", str(checkpoints["train"]), "--per-class",
                  "--confusion", str(tmp_path / "confusion.png"))
    deploy = _eval(tmp_path, "--data", str(data), "--checkpoint", str(checkpoints["deploy"]))
    assert train["form"] == "training-time" and deploy["form"] == "deploy" and train["images"] == 18
    assert train["top1"] == deploy["top1"] and abs(train["loss"] - deploy["loss"]) < 1e-4
    assert train["top5"] == 100.0 and train["images_per_s"] > 0
    assert set(train["per_class_top1"]) == set(CLASSES)
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "top-1" in printed and "class2" in printed and "images/s" in printed


def test_official_layout_without_metadata(data: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ours = _eval(tmp_path, "--data", str(data), "--checkpoint", str(checkpoints["train"]))
    official = _eval(tmp_path, "--data", str(data / "val"), "--checkpoint", str(checkpoints["official"]),
                     "--model", "RepVGG-A0", "--img-size", "16", "--resize", "16")
    assert official["format"] == "official" and official["top1"] == ours["top1"]


def test_timm_checkpoint_matches_timm(data: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = trained_looking(timm.create_model("repvgg_a0", pretrained=False, num_classes=3))
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    dataset = ImageFolder(data / "val", eval_transform(PREPROCESS))
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        hits = (model(images).argmax(1) == torch.tensor(dataset.targets)).float().mean().item()
    result = _eval(tmp_path, "--data", str(data), "--checkpoint", str(tmp_path / "timm.pth"),
                   "--img-size", "16", "--resize", "16")
    assert result["format"] == "timm" and result["top1"] == pytest.approx(100 * hits)


def test_bad_input(data: Path, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (data / "odd" / "dogs").mkdir(parents=True)
    (data / "odd" / "dogs" / "0.png").hardlink_to(data / "val" / "class0" / "000.png")
    assert main(["eval", "--data", str(data), "--split", "odd", "--checkpoint", str(checkpoints["train"])]) == 2
    assert main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "not among the model's 3 class names: dogs" in errors[0] and "not found" in errors[1]


def test_folders_that_cannot_match_the_outputs_are_refused(data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A model without class names (an unnamed 10-class file, or 1000 published classes read as a bare file) on 3
    class folders: refused, never a meaningless 0%; with as many folders as outputs, folders map by position."""
    from repvgg.training.evaluate import align_classes

    for classes in (10, 1000):
        torch.save(create_model("repvgg_a0", num_classes=classes).state_dict(), tmp_path / f"bare{classes}.pth")
        assert main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / f"bare{classes}.pth"),
                     "--img-size", "16", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"has {classes} outputs and no class names, but the folder has 3 classes" in err[0]
    assert align_classes(["b", "a"], None, 2) == [0, 1]
    assert align_classes(["b", "a"], ["a", "b", "c"], 3) == [1, 0]


@pytest.mark.parametrize("tta", ["flip", "flip-translate"])
def test_tta_scores_the_mean_logits_of_its_views_beside_the_plain_figures(data: Path, checkpoints: dict[str, Path],
                                                                         tmp_path: Path, tta: str) -> None:
    from torch.utils.data import DataLoader

    from repvgg import model_from_checkpoint
    from repvgg.training.data import collate
    from repvgg.training.evaluate import evaluate, tta_views

    model, ckpt = model_from_checkpoint(checkpoints["deploy"])
    dataset = ImageFolder(Path(data) / "val", eval_transform(ckpt.metadata["preprocess"]))
    loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=collate)
    images = next(iter(loader)).images
    views = tta_views(images, tta)
    assert len(views) == {"flip": 2, "flip-translate": 6}[tta] and torch.equal(views[1], images.flip(3))
    if tta == "flip-translate":  # 16-pixel crops: shifted by one pixel down-right and up-left, edges reflected
        assert torch.equal(views[2][..., 1:, 1:], images[..., :-1, :-1])
        assert torch.equal(views[3][..., :-1, :-1], images[..., 1:, 1:])
        assert torch.equal(views[2][..., 0, 1:], images[..., 1, :-1])
    with torch.no_grad():
        plain = model(images)
        averaged = torch.stack([model(v) for v in views]).mean(0)
    result = evaluate(model, loader, torch.device("cpu"), 3, tta=tta)
    targets = torch.tensor([t for _, t in dataset.samples])
    assert result.correct1 == int((plain.argmax(1) == targets).sum())
    assert result.tta.correct1 == int((averaged.argmax(1) == targets).sum()) and result.tta.n == len(targets)
    expected_loss = torch.nn.functional.cross_entropy(averaged, targets, reduction="sum").item()
    assert abs(result.tta.loss_sum - expected_loss) < 1e-3 and abs(result.loss_sum - expected_loss) > 1e-3
    report = _eval(tmp_path, "--data", str(data), "--checkpoint", str(checkpoints["deploy"]),
                   *(["--tta"] if tta == "flip-translate" else ["--flip-tta"]))
    assert report["settings"]["tta"] == tta and abs(report["tta"]["loss"] - expected_loss / len(targets)) < 1e-4
    assert abs(report["loss"] - result.loss) < 1e-4
