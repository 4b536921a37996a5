"""The core commands as a user runs them: list, info, convert (bad input: see test_cli_errors.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import trained_looking
from imagefolders import make_dataset
from repvgg import create_model, list_models, model_from_checkpoint, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.export import default_export_path
from repvgg.models import ConvertResult, convert_checkpoint, describe_checkpoint, relative_difference


def test_list_prints_every_model_with_paper_counts(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())
    rows = {line.split()[0]: line.split()[2:] for line in out.splitlines()[1:] if line.startswith("repvgg")}
    assert rows["repvgg_a0"] == ["9.11M", "8.31M", "1.36", "72.41", "hub"]
    assert rows["repvgg_d2se"] == ["133.33M", "120.39M", "32.83", "83.55*", "hub"]
    assert rows["repvgg_b2g2"][3:] == ["-", "release", "file"]
    assert rows["repvggplus_l2pse"][3:] == ["84.06*", "release", "file"]


def test_list_builds_no_model_and_imports_no_torchvision() -> None:
    """Counts come from the configs, so the command costs little more than importing torch."""
    code = ("import sys; from repvgg.cli import main; from repvgg.models.architectures import RepVGG; "
            "RepVGG.__init__ = lambda *a, **k: sys.exit('a model was built'); main(['list']); "
            "assert 'torchvision' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_convert_then_info(tmp_path, capsys) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=4, strides=(1, 2, 2, 2, 2)))
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "official.pth")
    dst = tmp_path / "deploy.safetensors"
    assert main(["convert", str(tmp_path / "official.pth"), str(dst), "--model", "RepVGG-A0"]) == 0
    assert "max relative difference" in capsys.readouterr().out
    deploy, ckpt = model_from_checkpoint(dst)
    assert ckpt.deploy and ckpt.metadata["source_format"] == "official"
    x = torch.randn(1, 3, 64, 64)
    # the official file carries no strides: the converted model uses the defaults, as the file describes
    reference = create_model("repvgg_a0", num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    assert relative_difference(reference(x), deploy(x)) < 1e-5
    assert main(["info", str(dst)]) == 0
    info = capsys.readouterr().out
    assert "repvgg_a0" in info and "deploy (re-parameterized)" in info and "classes: 4" in info


def test_convert_keeps_metadata_of_own_checkpoints(tmp_path) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=2, strides=(1, 1, 2, 2, 2)))
    save_checkpoint(model, tmp_path / "train.pth", class_names=["cat", "dog"])
    assert main(["convert", str(tmp_path / "train.pth"), str(tmp_path / "deploy.pth")]) == 0
    deploy, ckpt = model_from_checkpoint(tmp_path / "deploy.pth")
    assert ckpt.metadata["class_names"] == ["cat", "dog"] and deploy.strides == (1, 1, 2, 2, 2)
    x = torch.randn(2, 3, 32, 32)
    assert relative_difference(model(x), deploy(x)) < 1e-5


def test_headless_checkpoint_converts_only_when_asked(tmp_path, capsys) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=0))
    torch.save(model.state_dict(), tmp_path / "backbone.pth")  # official layout, no linear.*: a headless model
    assert main(["convert", str(tmp_path / "backbone.pth"), str(tmp_path / "d.pth")]) == 2
    assert "pass --headless" in capsys.readouterr().err and not (tmp_path / "d.pth").exists()
    assert main(["convert", str(tmp_path / "backbone.pth"), str(tmp_path / "d.pth"), "--headless"]) == 0
    assert "headless: no classifier" in capsys.readouterr().out
    deploy, ckpt = model_from_checkpoint(tmp_path / "d.pth", headless=True)  # a backbone, asked for as such
    x = torch.randn(1, 3, 32, 32)
    assert ckpt.deploy and deploy.num_classes == 0 and relative_difference(model(x), deploy(x)) < 1e-5


def test_convert_and_describe_as_library_calls(tmp_path) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    save_checkpoint(model, tmp_path / "train.safetensors", class_names=["a", "b", "c"])
    result = convert_checkpoint(tmp_path / "train.safetensors", tmp_path / "deploy.pth", img_size=16)
    assert isinstance(result, ConvertResult) and result.num_classes == 3 and result.rel_diff < 1e-5
    assert (result.source_format, result.architecture) == ("repvgg", "RepVGG-A0")
    info = describe_checkpoint(tmp_path / "deploy.pth")
    assert info["form"] == "deploy (re-parameterized)" and info["classes"] == 3
    assert info["class_names"] == ["a", "b", "c"] and info["source_format"] == "repvgg"


def test_every_option_of_every_command_has_help_and_shows_its_default(capsys) -> None:
    from repvgg.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        assert all(action.help for action in parser._actions), name
    for argv, shown in ((["train", "--help"], "(default: repvgg)"), (["eval", "--help"], "(default: 64)"),
                        (["bench", "--help"], "(default: 5)")):
        with pytest.raises(SystemExit):
            main(argv)
        assert shown in capsys.readouterr().out, argv


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["list", "--help"], ["convert", "--help"]])
def test_version_and_help_do_not_import_torch(argv: list[str]) -> None:
    """--version and --help answer at once: neither needs torch (it takes seconds to import)."""
    from imagefolders import PYTHON, subprocess_env

    code = ("import sys\nfrom repvgg.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([PYTHON, "-c", code, *argv], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr


def test_eval_loads_data_with_the_cores_it_has() -> None:
    from repvgg.cli import build_parser
    from repvgg.training.options import default_workers

    args = build_parser("eval").parse_args(["eval", "--data", "d", "--checkpoint", "c"])
    assert args.workers == default_workers() <= max(1, (os.cpu_count() or 1) - 1)


def test_quantize_output_without_suffix_gets_the_engines(tmp_path: Path) -> None:
    from repvgg.deploy.quantize import QuantizeOptions, engine_and_out

    pytest.importorskip("onnxruntime.quantization")
    opts = QuantizeOptions(checkpoint="a.pth", calib=str(tmp_path), out=str(tmp_path / "q_noext"),
                           engine="onnxruntime")
    assert engine_and_out(opts)[2] == tmp_path / "q_noext.onnx"


def test_switches_show_no_misleading_default(capsys) -> None:
    """`--no-probe ... (default: True)` reads as if the probe were off: switches show no default."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-probe skip the speed probe" in text and "(default: True)" not in text
    assert "(default: False)" not in text and "(default: repvgg)" in text


def test_options_may_stand_among_the_positionals(tmp_path, capsys) -> None:
    """`predict m.pth --engine torch a.png b.png`: options anywhere, as argparse users expect."""
    from PIL import Image

    save_checkpoint(trained_looking(create_model("repvgg_a0", num_classes=3)), tmp_path / "m.pth",
                    class_names=["a", "b", "c"], preprocess={"resize": 16, "crop": 16})
    for name in ("x.png", "y.png"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / name)
    assert main(["predict", str(tmp_path / "m.pth"), "--engine", "torch", str(tmp_path / "x.png"),
                 str(tmp_path / "y.png"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "engine: torch" and f"{tmp_path / 'y.png'}:" in out and out.count("%") == 2


def test_eval_takes_the_checkpoint_positionally_like_every_command(tmp_path, capsys) -> None:
    """`repvgg eval CKPT --data DIR`, as predict, export, info and bench take it; --checkpoint still works."""
    data = make_dataset(tmp_path / "data", train=1, val=2)
    ckpt = tmp_path / "m.pth"
    save_checkpoint(trained_looking(create_model("repvgg_a0", num_classes=3)), ckpt,
                    class_names=["class0", "class1", "class2"], preprocess={"resize": 16, "crop": 16})
    results = []
    for how in ([str(ckpt)], ["--checkpoint", str(ckpt)], [str(ckpt), "--checkpoint", str(ckpt)]):
        out = tmp_path / f"{len(results)}.json"
        assert main(["eval", *how, "--data", str(data), "--workers", "0", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["checkpoint"] == str(ckpt) and results[0]["images"] == 6
    assert results[0]["top1"] == results[1]["top1"] == results[2]["top1"]
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--checkpoint", str(tmp_path / "other.pth"), "--data", str(data)]) == 2
    assert f"two model files given, {ckpt} and --checkpoint {tmp_path / 'other.pth'}: name one" in \
        capsys.readouterr().err


def test_export_writes_beside_the_checkpoint_by_default(tmp_path, capsys) -> None:
    ckpt = tmp_path / "runs" / "model.pt"  # a checkpoint named like a TorchScript file
    ckpt.parent.mkdir()
    save_checkpoint(create_model("repvgg_a0", num_classes=3), ckpt, preprocess={"resize": 16, "crop": 16})
    assert main(["export", str(ckpt), "--format", "torchscript"]) == 0
    assert f"-> {tmp_path / 'runs' / 'model.torchscript.pt'} (torchscript" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--format", "torchscript"]) == 2  # the next run keeps it: --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_default_export_names() -> None:
    assert default_export_path("repvgg_a0", "onnx") == Path("repvgg_a0.onnx")  # published weights: current folder
    assert default_export_path("RepVGG-A0", "openvino") == Path("repvgg_a0.xml")
    assert default_export_path("timm/repvgg_b1.rvgg_in1k", "torchscript") == Path("repvgg_b1.rvgg_in1k.pt")


def test_default_export_name_is_never_the_source(tmp_path) -> None:
    for name in ("a0.pth", "pytorch_model.bin", "m.pt"):
        (tmp_path / name).write_bytes(b"")
    assert default_export_path(tmp_path / "a0.pth", "onnx") == tmp_path / "a0.onnx"
    assert default_export_path(tmp_path / "a0.pth", "openvino") == tmp_path / "a0.xml"
    # the IR's .bin would replace timm's pytorch_model.bin; TorchScript's .pt the checkpoint itself
    assert default_export_path(tmp_path / "pytorch_model.bin", "openvino") == tmp_path / "pytorch_model.openvino.xml"
    assert default_export_path(tmp_path / "m.pt", "torchscript") == tmp_path / "m.torchscript.pt"
