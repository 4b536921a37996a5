"""Training: recipe rules, a short real run end to end, crash safety (SIGKILL, SIGTERM, NaN) and 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from imagefolders import PYTHON, TINY_TRAIN, make_dataset, subprocess_env
from repvgg import create_model, model_from_checkpoint
from repvgg.cli import main
from repvgg.errors import RepVGGError
from repvgg.training.loop import (
    RECIPES,
    TrainOptions,
    WarmupCosine,
    custom_l2_penalty,
    param_groups,
    recipe_with,
    train,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train=16, val=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_weight_decay_rules() -> None:
    model = create_model("repvgg_a0", num_classes=10)
    decay, no_decay = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert "stage1.1.rbr_identity.weight" in decayed
    assert "stage1.0.rbr_dense.conv.weight" in decayed and "linear.weight" in decayed
    assert not any(n.endswith(("rbr_dense.bn.weight", "rbr_1x1.bn.weight", ".bias")) for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_custom_l2_replaces_decay_on_branch_kernels() -> None:
    model = create_model("repvgg_a0", num_classes=10)
    decay, _ = param_groups(model, 1e-4, custom_l2=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(names[id(p)].endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight")) for p in decay["params"])
    block = model.stage1[0]
    penalty = custom_l2_penalty(block)
    k3, k1 = block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight
    t3 = block.rbr_dense.bn.weight / (block.rbr_dense.bn.running_var + block.rbr_dense.bn.eps).sqrt()
    t1 = block.rbr_1x1.bn.weight / (block.rbr_1x1.bn.running_var + block.rbr_1x1.bn.eps).sqrt()
    ring = (k3 ** 2).sum() - (k3[:, :, 1, 1] ** 2).sum()
    eq = k3[:, :, 1, 1] * t3[:, None] + k1[:, :, 0, 0] * t1[:, None]
    expected = ring + (eq ** 2 / (t3 ** 2 + t1 ** 2)[:, None]).sum()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert k3.grad is not None and k1.grad is not None and block.rbr_dense.bn.weight.grad is None


def test_warmup_cosine() -> None:
    s = WarmupCosine(warmup_steps=4, total_steps=14)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and math.isclose(s(9), 0.5) and s(14) == 0.0


def test_recipes_are_printed_presets() -> None:
    assert RECIPES["paper"].epochs == 120 and RECIPES["paper"].lr == 0.1 and RECIPES["paper"].weight_decay == 1e-4
    assert RECIPES["paper"].label_smoothing == 0 and RECIPES["paper"].warmup_epochs == 0
    strong = RECIPES["strong"]
    assert strong.warmup_epochs == 5 and strong.label_smoothing == 0.1 and strong.mixup and strong.cutmix
    assert recipe_with("cifar", epochs=3, strides=[1, 1, 2, 2, 2]).strides == (1, 1, 2, 2, 2)
    assert recipe_with("paper", lr=None).lr == 0.1 and RECIPES["paper"].scaled_lr(512) == 0.2
    with pytest.raises(RepVGGError, match="unknown recipe"):
        recipe_with("fast")


def test_short_training_run_end_to_end(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--lr", "0.4",
                 "--ema-decay", "0.9", "--custom-l2", "--mixup", "0.2", "--cutmix", "1.0", *TINY_TRAIN]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"recipe\.label_smoothing +0\.1\n", printed) and re.search(r"recipe\.custom_l2 +True", printed)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert {"val_top1", "ema_val_top1", "lr", "train_images_per_s"} <= set(rows[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_top1"] == summary["deploy_top1"] and summary["weights"] == "ema"
    for name, deploy in (("model.pth", False), ("model_deploy.pth", True)):
        model, ckpt = model_from_checkpoint(out / name)
        assert ckpt.deploy == deploy and model.strides == (2, 2, 2, 2, 2)
        assert ckpt.metadata["class_names"] == ["class0", "class1", "class2"]
        assert ckpt.metadata["preprocess"]["crop"] == 16
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0 and state["ema"] is not None
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").stat().st_size > 1000


def test_bad_options_are_one_line_errors(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TINY_TRAIN]) == 2
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--amp", "fp16", "--device", "cpu",
                 *TINY_TRAIN]) == 2
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "x.pt"),
                 *TINY_TRAIN]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("repvgg: error: ") for e in errors)
    assert "data not found" in errors[0] and "fp16" in errors[1] and "not found" in errors[2]


class _PoisonAfterOneEpoch(Dataset):
    """Good images for the first pass over the data, NaN images afterwards."""

    def __init__(self, n: int = 16) -> None:
        self.calls, self.n = 0, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        image = torch.randn(3, 16, 16) + index % 3
        return (image * float("nan") if self.calls > self.n else image), index % 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    recipe = recipe_with("cifar", epochs=3, batch_size=8, img_size=16, eval_resize=16, strides=(2, 2, 2, 2, 2))
    opts = TrainOptions(data=None, out_dir=str(tmp_path), recipe=recipe, workers=0, tensorboard=False,
                        log=lambda s: None)
    val = [(torch.randn(3, 16, 16), i % 3) for i in range(6)]
    with pytest.raises(RepVGGError, match=r"loss became nan at epoch 2 step 1 .* last good checkpoint"):
        train(opts, _PoisonAfterOneEpoch(), val, ["a", "b", "c"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "repvgg.cli", "train", "--data", str(data), "--out", str(out), *TINY_TRAIN, *extra]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume_finishes(data: Path, tmp_path: Path) -> None:
    out, debug = tmp_path / "run", tmp_path / "debug"
    debug.mkdir()
    env = subprocess_env(REPVGG_DEBUG_INDICES_DIR=str(debug))
    started = debug / "indices_rank0.txt"
    cmd = _train_cmd(data, out, "--epochs", "3", "--batch-size", "4")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # epoch 2 has started once its shard is recorded; the checkpoint of epoch 1 is on disk by then
    _wait_for(lambda: started.exists() and len(started.read_text().splitlines()) >= 2, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not (out / "model.pth").exists()

    proc = subprocess.Popen([*cmd, "--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(started.read_text().splitlines()) >= 3, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted; saved epoch 2" in output
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] >= 1

    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'last.pt'} at epoch 2, step {state['step']}" in done.stdout
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["train_top1"] == summary["deploy_top1"]
    model, _ = model_from_checkpoint(out / "model_deploy.pth")
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


def test_torchrun_two_processes_disjoint_shards_one_checkpoint(data: Path, tmp_path: Path) -> None:
    out, debug = tmp_path / "run", tmp_path / "debug"
    debug.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "repvgg.cli", "train", "--data", str(data), "--out", str(out), *TINY_TRAIN, "--epochs", "2"]
    done = subprocess.run(cmd, env=subprocess_env(REPVGG_DEBUG_INDICES_DIR=str(debug)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("final (last weights)") == 1 and "2 process(es)" in done.stdout
    shards = [[set(map(int, line.split())) for line in (debug / f"indices_rank{r}.txt").read_text().splitlines()]
              for r in range(2)]
    for epoch in range(2):
        a, b = shards[0][epoch], shards[1][epoch]
        assert len(a) == len(b) == 24 and not a & b and len(a | b) == 48
    assert shards[0][0] != shards[0][1]  # reshuffled every epoch
    sums = {(debug / f"params_rank{r}.txt").read_text() for r in range(2)}
    assert len(sums) == 1  # both ranks ended with identical weights
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_top1"] == summary["deploy_top1"]
    model, ckpt = model_from_checkpoint(out / "model.pth")
    assert model.num_classes == 3 and ckpt.metadata["class_names"] == ["class0", "class1", "class2"]
    assert os.path.exists(out / "last.pt") and len(list(out.glob("*.pth"))) == 3


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "lr": 0.1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install 'repvgg[plot]'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2


class _Interrupting(Dataset):
    """Fixed tensors; the first read of the second pass sends this process SIGINT (when armed)."""

    def __init__(self, armed: bool, n: int = 24) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.calls, self.armed = 0, armed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        if self.armed and self.calls == len(self) + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return self.images[index] + index % 3, index % 3


def test_resume_mid_epoch_continues_exactly(tmp_path: Path) -> None:
    recipe = recipe_with("cifar", epochs=2, batch_size=8, img_size=16, eval_resize=16, strides=(2, 2, 2, 2, 2),
                         ema_decay=0.5)
    val = [(torch.randn(3, 16, 16), i % 3) for i in range(6)]

    def run(out: Path, armed: bool, resume: str | None = None) -> None:
        opts = TrainOptions(data=None, out_dir=str(out), recipe=recipe, workers=0, tensorboard=False,
                            log=lambda s: None, resume=resume)
        train(opts, _Interrupting(armed), val, ["a", "b", "c"])

    run(tmp_path / "straight", armed=False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", armed=True)
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)
    run(tmp_path / "split", armed=False, resume="auto")
    for name in ("model.pth", "model_deploy.pth"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "split" / name, weights_only=True)["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
