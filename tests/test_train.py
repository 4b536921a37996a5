"""Training: recipe rules, a short real run end to end, resume in every situation (mid-epoch exactness, the saved step
mode, after the last epoch, extension, mismatches), NaN safety, locking, fine-tuning, the speed probe and DDP (signals
sent from outside, SIGKILL included, are in test_resume.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from imagefolders import PYTHON, REPO, TINY_ARCH, TINY_MODEL, TINY_TRAIN, make_dataset, subprocess_env
from repvgg import create_model, hardware, model_from_checkpoint, save_checkpoint
from repvgg.cache import MATMUL_FILE
from repvgg.cli import main
from repvgg.commands.train import add_recipe_arguments, recipe_flags, recipe_overrides
from repvgg.errors import Interrupted, RepVGGError
from repvgg.files import TMP_SUFFIX
from repvgg.training import setup
from repvgg.training.data import BadImage
from repvgg.training.lookahead import Lookahead
from repvgg.training.loop import Stopper, recompute_bn_statistics
from repvgg.training.options import Callback, TrainOptions
from repvgg.training.recipes import (
    RECIPES,
    WarmupDecay,
    custom_l2_penalty,
    param_groups,
    recipe_differences,
    recipe_of,
    recipe_with,
    schedule_warnings,
)
from repvgg.training.rundir import RunDir
from repvgg.training.speed import StepMode, candidate_modes, probe_modes
from repvgg.training.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train=16, val=4)


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = recipe_with("cifar", epochs=2, batch_size=8, img_size=16, eval_resize=16, strides=(2, 2, 2, 2, 2),
                   warmup_epochs=0)
ONE_EPOCH, THREE_EPOCHS = dataclasses.replace(TINY, epochs=1), dataclasses.replace(TINY, epochs=3)


def _opts(out: Path, recipe=TINY, **kw) -> TrainOptions:
    kw = {"model": TINY_ARCH, "workers": 0, "amp": "none", "channels_last": False, "probe": False,
          "tensorboard": False, "log": lambda s: None, **kw}
    return TrainOptions(data=None, out_dir=str(out), recipe=recipe, **kw)


class Noisy(Dataset):
    """Fixed images plus fresh random noise per read (like augmentation); ``bad`` makes every image unreadable."""

    def __init__(self, n: int = 24, seed: int = 0, bad: bool = False) -> None:
        self.images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        self.bad = bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        if self.bad:
            return BadImage(f"{index}.png", "cannot identify image file")
        return self.images[index] + index % 3 + 0.3 * torch.randn(3, 16, 16), index % 3


VAL = [(torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)) + i % 3, i % 3) for i in range(6)]
CLASSES = ["a", "b", "c"]


class StopAt(Callback):
    """Sends this process SIGTERM after optimizer step ``step`` of ``epoch`` (0-based epoch, 1-based step); with
    ``group``, its loading workers first, as ``kill -TERM -PGID`` or a job scheduler would."""

    def __init__(self, epoch: int, step: int, group: bool = False) -> None:
        self.at, self.group = (epoch, step), group

    def on_step_end(self, epoch: int, step: int) -> None:
        if (epoch, step) == self.at:
            for worker in multiprocessing.active_children() if self.group else ():
                os.kill(worker.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)


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


def test_warmup_then_cosine_or_linear_decay() -> None:
    s = WarmupDecay(warmup_steps=4, total_steps=14)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and math.isclose(s(9), 0.5) and s(14) == 0.0 and math.isclose(s(6), 0.5 + 0.5 * 0.8090169944)
    linear = WarmupDecay(warmup_steps=4, total_steps=14, decay="linear")
    assert [linear(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert linear(4) == 1.0 and math.isclose(linear(6), 0.8) and math.isclose(linear(9), 0.5) and linear(14) == 0.0



def test_schedule_linear_decays_the_learning_rate_in_a_straight_line(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "3", "--schedule", "linear",
                 *TINY_TRAIN]) == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = RECIPES["cifar"].lr * 8 / 256  # TINY_TRAIN's batch of 8, no warm-up
    assert lrs == pytest.approx([peak * 2 / 3, peak / 3, 0.0])

def test_a_recipe_field_a_checkpoint_predates_counts_as_its_default() -> None:
    stored = {k: v for k, v in dataclasses.asdict(RECIPES["paper"]).items() if k != "schedule"}
    assert recipe_differences(stored, RECIPES["paper"]) == []
    assert recipe_differences(stored, recipe_with("paper", schedule="linear")) == ["schedule: 'cosine' -> 'linear'"]


def test_a_checkpoint_tells_its_recipe_values_else_its_registered_name() -> None:
    trained = recipe_with("cifar", lr=0.05, label_smoothing=0.15, schedule="cosine", strides=(2, 2, 2, 2, 2))
    stored = json.loads(json.dumps(dataclasses.asdict(trained)))  # as a .safetensors header keeps them: lists
    assert recipe_of({"recipe": "cifar", "recipe_values": stored}) == trained
    older = {k: v for k, v in stored.items() if k != "schedule"} | {"a_later_field": 1}
    assert recipe_of({"recipe_values": older}) == trained  # a field it predates: the default; a later one: ignored
    assert recipe_of({"recipe": "strong"}) == RECIPES["strong"] and recipe_of({}) == RECIPES["paper"]


def test_recipes_are_printed_presets(capsys: pytest.CaptureFixture) -> None:
    assert RECIPES["paper"].epochs == 120 and RECIPES["paper"].lr == 0.1 and RECIPES["paper"].weight_decay == 1e-4
    assert RECIPES["paper"].label_smoothing == 0 and RECIPES["paper"].warmup_epochs == 0
    strong = RECIPES["strong"]
    assert strong.warmup_epochs == 5 and strong.label_smoothing == 0.1 and strong.mixup and strong.cutmix
    assert recipe_with("cifar", epochs=3, strides=[1, 1, 2, 2, 2]).strides == (1, 1, 2, 2, 2)
    assert recipe_with("paper", lr=None).lr == 0.1 and RECIPES["paper"].scaled_lr(512) == 0.2
    with pytest.raises(RepVGGError, match="unknown recipe"):
        recipe_with("fast")
    assert main(["train", "--recipe", "cifar", "--lr", "0.3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"recipe\.lr +0\.3 \(for a global batch of 256; scaled linearly", printed)
    assert re.search(r"recipe\.strides +\(1, 1, 2, 2, 2\)", printed)
    assert re.search(r"recipe\.crop_pad +None \(an eighth of the side: 4 pixels\)", printed)
    assert main(["train", "--recipe", "cifar", "--crop-pad", "2", "--print-config"]) == 0
    assert re.search(r"recipe\.crop_pad +2\n", capsys.readouterr().out)
    assert main(["train", "--recipe", "paper", "--print-config"]) == 0
    assert re.search(r"recipe\.crop_pad +None\n", capsys.readouterr().out)  # the random-resized crop pads nothing


def test_recipe_flags_parse_back_into_the_recipe() -> None:
    """A run's recipe written as flags over its base (how a benchmark's report says to reproduce it) parses back
    into the same recipe: every kind of field, booleans turned off included."""
    base = RECIPES["cifar"]
    recipe = dataclasses.replace(base, epochs=7, lr=0.35, nesterov=False, custom_l2=True, crop="random_resized",
                                 schedule="linear", cutout=8, strides=(2, 1, 2, 2, 1), bn_bias_lr_scale=16.0,
                                 flip="random", bn_init="small", crop_pad=2)
    flags = recipe_flags(recipe, base)
    assert flags[:4] == ["--epochs", "7", "--lr", "0.35"] and "--no-nesterov" in flags
    assert recipe_flags(base, base) == []
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    assert recipe_with("cifar", **recipe_overrides(parser.parse_args(flags))) == recipe
    assert set(recipe_overrides(parser.parse_args(flags))) == {"epochs", "lr", "nesterov", "custom_l2", "crop",
                                                              "strides", "bn_bias_lr_scale", "flip", "bn_init",
                                                              "crop_pad"}
    assert recipe_overrides(parser.parse_args([])) == {}  # no flag: a resume takes every value from its checkpoint


def test_a_run_too_short_for_its_warm_up_or_its_ema_is_warned_of() -> None:
    """The cifar recipe's 30 epochs of 195 steps leave 0.29% of the initial weights in an EMA at 0.999; 19 steps an
    epoch (about 5,000 images) would leave 57% in the model the run saves, so the run says so and what to use."""
    ema = dataclasses.replace(RECIPES["cifar"], ema_decay=0.999)
    assert schedule_warnings(ema, 195) == [] and schedule_warnings(dataclasses.replace(ema, ema_decay=0), 1) == []
    [short] = schedule_warnings(ema, 19)
    assert short.startswith("the EMA of the weights (decay 0.999 a step) still holds 57% of the initial weights "
                            "after the run's 570 steps")
    assert short.endswith("lower --ema-decay (e.g. 0.9920, 1% left) or turn it off with 0")
    warm_up, _ = schedule_warnings(dataclasses.replace(ema, warmup_epochs=30), 19)
    assert warm_up.startswith("the 30-epoch warm-up spans the whole 30-epoch run")


def test_a_cutout_or_crop_padding_that_cannot_apply_is_refused(data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--cutout", "16", *TINY_TRAIN]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "cutout 16 must be at least 0 and smaller than the training crop side 16")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--crop", "pad", "--crop-pad", "16",
                 *TINY_TRAIN]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "crop padding 16 must be at least 0 and smaller than the training crop side 16")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--crop", "random_resized",
                 "--crop-pad", "2", *TINY_TRAIN]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "crop padding 2 applies to the pad crops (pad, pad_reflect), not random_resized")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run").exists()


def test_short_training_run_end_to_end(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--lr", "0.4",
                 "--ema-decay", "0.9", "--custom-l2", "--mixup", "0.2", "--cutmix", "1.0", "--cutout", "4",
                 "--crop", "pad", *TINY_TRAIN]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"recipe\.label_smoothing +{RECIPES['cifar'].label_smoothing}\n", printed)
    assert re.search(r"recipe\.custom_l2 +True", printed)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert {"val_top1", "ema_val_top1", "lr", "train_images_per_s", "train_of_matmul"} <= set(rows[-1])
    assert rows[1]["lr_steps"][0][0] == 6 and 0 < rows[-1]["train_of_matmul"] < 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_top1"] == summary["deploy_top1"] and summary["weights"] == "ema"
    for name, deploy in (("model.pth", False), ("model_deploy.pth", True)):
        model, ckpt = model_from_checkpoint(out / name)
        assert ckpt.deploy == deploy and model.strides == (2, 2, 2, 2, 2)
        assert ckpt.metadata["class_names"] == ["class0", "class1", "class2"]
        assert ckpt.metadata["preprocess"]["crop"] == 16
        assert recipe_of(ckpt.metadata) == recipe_with(  # TINY_TRAIN's values and this run's own
            "cifar", epochs=2, lr=0.4, ema_decay=0.9, custom_l2=True, mixup=0.2, cutmix=1.0, cutout=4, img_size=16,
            eval_resize=16, crop="pad", strides=(2, 2, 2, 2, 2), batch_size=8, warmup_epochs=0)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == 0 and state["ema"] is not None
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").stat().st_size > 1000


def test_bn_statistics_are_recomputed_with_the_weights_as_they_are() -> None:
    """The plain average of the batch statistics, for the BatchNorms the forward reaches and that are not kept;
    everything else stays in eval mode and keeps its statistics."""
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                        nn.Dropout(0.5))
    unreached = nn.BatchNorm2d(4)
    net.add_module("unreached", unreached)
    net.forward = lambda x: net[3](net[2](net[1](net[0](x))))  # type: ignore[method-assign]
    for bn in (net[0][1], net[2], unreached):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    batches = [torch.randn(6, 3, 4, 4) * 3 + 1, torch.randn(10, 3, 4, 4)]
    with torch.no_grad():
        inputs = [net[1](net[0].eval()(x)) for x in batches]
    assert recompute_bn_statistics(net, batches, keep=["0"]) == 16
    torch.testing.assert_close(net[2].running_mean, sum(h.mean((0, 2, 3)) for h in inputs) / 2)
    torch.testing.assert_close(net[2].running_var, sum(h.var((0, 2, 3)) for h in inputs) / 2)
    for bn in (net[0][1], unreached):
        assert bn.running_mean.eq(5.0).all() and bn.running_var.eq(9.0).all()
    assert net[2].momentum == 0.1 and not any(m.training for m in net.modules())
    assert recompute_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 1)), batches) == 0  # no BatchNorm to update


def test_a_short_run_saves_the_batchnorm_statistics_of_its_final_weights(tmp_path: Path) -> None:
    """Six steps, all warm-up: the running statistics still describe earlier weights (and their initial 0 and 1),
    and in eval mode the mismatch compounds to a validation loss in the hundreds at chance top-1, while the
    training loss is about 1. The final models get statistics recomputed with the final weights, and the run says
    so with both top-1s."""
    logs: list[str] = []
    recipe = dataclasses.replace(TINY, warmup_epochs=2)
    summary = train(_opts(tmp_path / "run", recipe, model="repvgg_a0", log=logs.append), Noisy(), VAL, CLASSES)
    assert "warning: the 2-epoch warm-up spans the whole 2-epoch run: the learning rate ends at its peak" in logs[0]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    running = create_model("repvgg_a0", num_classes=3, strides=TINY.strides)
    running.load_state_dict(state)
    final, _ = model_from_checkpoint(tmp_path / "run" / "model.pth")
    assert all(torch.equal(v, state[k]) for k, v in final.state_dict().items() if "running" not in k
               and "num_batches" not in k)
    x, y = torch.stack([image for image, _ in VAL]), torch.tensor([target for _, target in VAL])
    with torch.no_grad():
        loss = {name: nn.functional.cross_entropy(net.eval()(x), y).item()
                for name, net in (("running", running), ("final", final))}
    assert loss["final"] < 2 and loss["running"] > 100
    assert summary["bn_statistics_images"] == 24
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["running_statistics_top1"] == row["val_top1"]
    assert (f"BatchNorm statistics of the final weights recomputed over 24 training images: top-1 "
            f"{summary['train_top1']:.2f}% (with the running statistics of training: {row['val_top1']:.2f}%)") in logs


def test_resume_of_a_model_file_or_a_code_pickle_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_opts(run, ONE_EPOCH), Noisy(), VAL, CLASSES)
    with pytest.raises(RepVGGError, match=r"needs a training state .* model checkpoint"):
        train(_opts(tmp_path / "other", resume=str(run / "model.pth")), Noisy(), VAL, CLASSES)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(RepVGGError, match="never unpickled"):
        train(_opts(tmp_path / "other", resume=str(tmp_path / "evil.pt")), Noisy(), VAL, CLASSES)
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_and_says_what_was_kept(tmp_path: Path) -> None:
    class PoisonAfter(Noisy):
        def __init__(self, good_reads: int) -> None:
            super().__init__()
            self.reads, self.good = 0, good_reads

        def __getitem__(self, index: int):
            self.reads += 1
            image, target = super().__getitem__(index)
            return (image * float("nan") if self.reads > self.good else image), target

    with pytest.raises(RepVGGError, match=r"loss became nan at epoch 2 step 1 .* last good checkpoint .* untouched"):
        train(_opts(tmp_path / "a", THREE_EPOCHS), PoisonAfter(24), VAL, CLASSES)
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                   if v.is_floating_point())
    with pytest.raises(RepVGGError, match=r"epoch 1 step 1 .* no checkpoint had been written yet"):
        train(_opts(tmp_path / "b"), PoisonAfter(0), VAL, CLASSES)


def test_all_images_unreadable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepVGGError, match="no readable training image in epoch 1"):
        train(_opts(tmp_path / "a"), Noisy(bad=True), VAL, CLASSES)
    with pytest.raises(RepVGGError, match="no readable validation image"):
        train(_opts(tmp_path / "b"), Noisy(), [BadImage("v.png", "broken")] * 4, CLASSES)


def test_a_class_folder_with_no_readable_image_stops_train_before_it_starts(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """It used to train and score on the other classes only: val top-1 100% with two classes, exit 0."""
    data = make_dataset(tmp_path / "d", train=8, val=2)
    for split in ("train", "val"):
        for path in (data / split / "class2").iterdir():
            path.write_bytes(b"corrupt")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY_TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"class folder .*d/train/class2 has no readable image: none of its 8 image files decodes", err)
    assert not (tmp_path / "run").exists()


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True)["model"]


def test_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path: Path) -> None:
    """Workers draw augmentation noise and mixup/EMA are on: a run stopped in its second epoch (its first epoch's
    EMA and mixup draws behind it) must resume to the straight run's weights and metrics."""
    stop_at = (1, 1)
    recipe = dataclasses.replace(TINY, mixup=0.4, ema_decay=0.5)
    train(_opts(tmp_path / "straight", recipe, workers=1), Noisy(), VAL, CLASSES)
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(_opts(split, recipe, workers=1, callbacks=[StopAt(*stop_at)]), Noisy(), VAL, CLASSES)
    progress = torch.load(split / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step"]) == stop_at
    train(_opts(split, recipe, workers=1, resume="auto"), Noisy(), VAL, CLASSES)
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(split)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "split")}
    for a, b in zip(rows["straight"], rows["split"], strict=True):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-9) and b["train_images_per_s"] > 0
        assert a["val_top1"] == b["val_top1"]


def test_lookahead_moves_slow_weights_on_its_schedule_and_restarts_the_model_from_them() -> None:
    model = nn.BatchNorm1d(2)
    look = Lookahead(model, every=5, rate=0.9)
    start = [t.clone() for t in look.slow]
    with torch.no_grad():
        model.weight.add_(1.0)
        model.running_mean.add_(2.0)
    look.after_step(model, 3, 10)  # not a sync
    assert torch.equal(look.slow[0], start[0]) and torch.equal(model.weight, start[0] + 1)
    look.after_step(model, 5, 10)  # keeps 0.9 ** 5 * (5 / 10) ** 3 of the slow weights
    kept = 0.9**5 * 0.125
    assert math.isclose(look.decay(5, 10), kept)
    assert torch.allclose(model.weight, start[0] + (1 - kept)) and torch.equal(model.weight, look.slow[0])
    assert torch.allclose(model.running_mean, start[2] + 2 * (1 - kept))  # BatchNorm statistics averaged too
    assert torch.equal(model.num_batches_tracked, torch.tensor(0))  # an integer buffer is no weight


def test_a_lookahead_run_resumes_bit_exact_and_ends_on_its_slow_weights(tmp_path: Path) -> None:
    """The slow weights are run state: a run stopped after a sync resumes to the straight run's weights (it would not
    if they started afresh), and the final model is made of them, not of the last step's weights."""
    recipe = dataclasses.replace(TINY, lookahead=4)  # 6 steps: one sync, after the 4th
    train(_opts(tmp_path / "straight", recipe), Noisy(), VAL, CLASSES)
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(_opts(split, recipe, callbacks=[StopAt(1, 2)]), Noisy(), VAL, CLASSES)  # after step 5
    train(_opts(split, recipe, resume="auto"), Noisy(), VAL, CLASSES)
    straight, resumed = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "straight", split))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert all(torch.equal(a, b) for a, b in zip(straight["lookahead"]["slow"], resumed["lookahead"]["slow"],
                                                 strict=True))
    final, _ = model_from_checkpoint(split / "model.pth")
    slow = resumed["lookahead"]["slow"]
    assert all(torch.equal(p, s) for p, s in zip(final.parameters(), slow, strict=False))
    last = create_model(TINY_ARCH, num_classes=3, strides=TINY.strides)
    last.load_state_dict(resumed["model"])
    assert not all(torch.equal(p, s) for p, s in zip(last.parameters(), slow, strict=False))  # steps 5-6 moved on
    assert json.loads((split / "summary.json").read_text())["weights"] == "lookahead"


CHANNELS_LAST = StepMode("none", True, 1)


def test_the_speed_probe_is_announced_and_measured_once_per_machine_and_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_probe_cache: Path) -> None:
    """A second run of the same network on the same machine reads the first run's timing instead of measuring."""
    calls: list[list[StepMode]] = []
    monkeypatch.setattr(setup, "probe_modes", _probe_preferring(CHANNELS_LAST, calls))
    first, second = [], []
    train(_opts(tmp_path / "a", ONE_EPOCH, log=first.append, **PROBED), Noisy(), VAL, CLASSES)
    train(_opts(tmp_path / "b", ONE_EPOCH, log=second.append, **PROBED), Noisy(), VAL, CLASSES)
    assert len(calls) == 1 and (fresh_probe_cache / "train_probe.json").is_file()
    assert any(line.startswith("speed probe: timing") for line in first)
    assert not any(line.startswith("speed probe: timing") for line in second)
    assert any("measured earlier here" in line for line in second)
    assert all(any(f"step: {CHANNELS_LAST.label}" in line for line in logs) for logs in (first, second))
PROBED = {"amp": None, "channels_last": None, "threads": None, "probe": True}  # the default flags


@pytest.fixture
def fresh_probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _user_cache: Path) -> Path:
    """A user cache folder with no speed-probe timing measured by an earlier test (the session's matmul rates)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(_user_cache / MATMUL_FILE, cache)
    monkeypatch.setenv("REPVGG_CACHE_DIR", str(cache))
    return cache



def test_a_probe_measured_while_the_cores_were_busy_chooses_for_its_run_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_probe_cache: Path) -> None:
    """Other processes held the cores during the first probe: its choice trains that run, the log says it was not
    kept, and the next run measures again."""
    calls: list[list[StepMode]] = []
    monkeypatch.setattr(setup, "probe_modes", _probe_preferring(CHANNELS_LAST, calls))
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda run: (run(), 0.75))
    first: list[str] = []
    train(_opts(tmp_path / "a", ONE_EPOCH, log=first.append, **PROBED), Noisy(), VAL, CLASSES)
    assert any(f"kept 75% of the cores busy during the speed probe; this run keeps its choice ({CHANNELS_LAST.label})"
               f" to the end, resumes included" in line and "the timing is not kept" in line for line in first)
    assert any(f"step: {CHANNELS_LAST.label}" in line for line in first)
    assert not (fresh_probe_cache / "train_probe.json").exists()
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda run: (run(), 0.0))
    train(_opts(tmp_path / "b", ONE_EPOCH, **PROBED), Noisy(), VAL, CLASSES)
    assert len(calls) == 2 and (fresh_probe_cache / "train_probe.json").is_file()

def _probe_preferring(favourite: StepMode, calls: list[list[StepMode]]) -> Callable:
    """A stand-in for the speed probe that measures ``favourite`` fastest, recording the modes it was given."""

    def probe(model: torch.nn.Module, modes: list[StepMode], images: torch.Tensor, targets: torch.Tensor,
              rounds: int = 3) -> dict[StepMode, float]:
        calls.append(list(modes))
        return {m: 2.0 if m == favourite else 1.0 for m in modes}

    return probe


@pytest.mark.usefixtures("fresh_probe_cache")
def test_a_resume_continues_in_the_step_mode_its_probe_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe chose channels-last before the stop and would choose NCHW now: the resume keeps the saved mode,
    probes nothing, and ends bit-identical to an uninterrupted channels-last run."""
    calls: list[list[StepMode]] = []
    monkeypatch.setattr(setup, "probe_modes", _probe_preferring(CHANNELS_LAST, calls))
    split = tmp_path / "split"
    with pytest.raises(Interrupted):
        train(_opts(split, callbacks=[StopAt(0, 2)], **PROBED), Noisy(), VAL, CLASSES)
    saved = torch.load(split / "last.pt", weights_only=True)["repvgg"]["step_mode"]
    assert saved == dataclasses.asdict(CHANNELS_LAST)
    monkeypatch.setattr(setup, "probe_modes", _probe_preferring(StepMode(), calls))
    logs: list[str] = []
    train(_opts(split, resume="auto", log=logs.append, **PROBED), Noisy(), VAL, CLASSES)
    assert len(calls) == 1
    assert any(f"step: {CHANNELS_LAST.label} (the run's own, from its saved state)" in line for line in logs)
    train(_opts(tmp_path / "straight", channels_last=True, threads=1), Noisy(), VAL, CLASSES)
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(split)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.usefixtures("fresh_probe_cache")
def test_step_mode_flags_on_a_new_run_a_resume_and_an_older_state(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run's probe keeps the flags given (before the fix, a faster float32 NCHW replaced --channels-last); a
    resume keeps its saved mode over other flags, saying so; a state that records no mode resumes unprobed; a run
    whose flags choose everything is not probed."""
    calls: list[list[StepMode]] = []
    monkeypatch.setattr(setup, "probe_modes", _probe_preferring(StepMode(), calls))
    # bf16 a candidate on any CPU: --channels-last alone leaves a choice to probe wherever the suite runs
    monkeypatch.setattr(setup, "candidate_modes", lambda *a, **k: candidate_modes(*a, **{**k, "bf16": True}))
    out, logs = tmp_path / "run", []
    with pytest.raises(Interrupted):
        train(_opts(out, ONE_EPOCH, **{**PROBED, "channels_last": True}, log=logs.append, callbacks=[StopAt(0, 1)]),
              Noisy(), VAL, CLASSES)
    assert StepMode() in calls[0] and any(f"step: {CHANNELS_LAST.label}" in line for line in logs)
    logs.clear()
    train(_opts(out, ONE_EPOCH, resume="auto", threads=1, log=logs.append), Noisy(), VAL, CLASSES)  # NCHW flag
    assert any(f"trained in {CHANNELS_LAST.label}, and a resume continues in that step mode so that it stays exact: "
               f"--no-channels-last not applied" in line for line in logs)
    assert any(f"step: {CHANNELS_LAST.label} (the run's own" in line for line in logs)

    older = tmp_path / "older"
    with pytest.raises(Interrupted):
        train(_opts(older, ONE_EPOCH, channels_last=True, callbacks=[StopAt(0, 1)]), Noisy(), VAL, CLASSES)
    state = torch.load(older / "last.pt", weights_only=True)
    del state["repvgg"]["step_mode"]
    torch.save(state, older / "last.pt")
    logs.clear()
    train(_opts(older, ONE_EPOCH, resume="auto", log=logs.append, **PROBED), Noisy(), VAL, CLASSES)
    assert len(calls) == 1
    assert any("does not record the step mode it trained in (an older version wrote it); resuming in fp32 NCHW, "
               "1 thread, without a speed probe" in line for line in logs)
    every_flag = {**PROBED, "amp": "none", "channels_last": True, "threads": 1}
    train(_opts(tmp_path / "given", ONE_EPOCH, **every_flag), Noisy(), VAL, CLASSES)
    assert len(calls) == 1  # float32 and every flag given: nothing to choose or warn about, so no probe


def test_the_stopper_catches_a_hangup_unless_the_process_ignores_it() -> None:
    """SIGHUP (a closed terminal) stops a run like SIGTERM; under ``nohup`` (SIGHUP ignored) the run goes on."""
    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the suite itself may run under nohup
        with Stopper() as stopper:
            assert signal.getsignal(signal.SIGHUP) == stopper._handle
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with Stopper() as stopper:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stopper._handle
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_resume_after_the_last_epoch_finishes_and_a_complete_run_says_so(tmp_path: Path) -> None:
    logs: list[str] = []
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # stopped on the very last step: only the end of the run is left
        train(_opts(out, callbacks=[StopAt(1, 3)]), Noisy(), VAL, CLASSES)
    assert not (out / "model.pth").exists()
    summary = train(_opts(out, resume="auto"), Noisy(), VAL, CLASSES)
    assert summary["epochs"] == 2 and (out / "model_deploy.pth").is_file()
    for name in ("model.pth", "model_deploy.pth", "summary.json"):  # killed after last.pt, before the final files
        (out / name).unlink()
    assert train(_opts(out, resume="auto", log=logs.append), Noisy(), VAL, CLASSES)["epochs"] == 2
    assert (out / "summary.json").exists() and any("trained all 2 epochs; writing what its stop" in x for x in logs)
    logs.clear()
    again = train(_opts(out, resume="auto", log=logs.append), Noisy(), VAL, CLASSES)
    assert again == json.loads((out / "summary.json").read_text())
    assert any("already complete (2 epochs)" in line for line in logs)
    assert not any("resumed from" in line for line in logs)  # no "resumed at epoch 3" before "complete"
    logs.clear()
    assert train(_opts(out, THREE_EPOCHS, resume="auto", log=logs.append), Noisy(), VAL, CLASSES)["epochs"] == 3
    assert any("schedule is stretched to end at epoch 3" in line for line in logs)
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(epochs)) == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_the_gpu_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """A state saved on the GPU is read to the CPU and each part put back where it lives (generators, optimizer)."""
    gpu = {"device": "cuda", "recipe": dataclasses.replace(TINY, ema_decay=0.9)}
    straight = train(_opts(tmp_path / "straight", **gpu), Noisy(), VAL, CLASSES)
    with pytest.raises(KeyboardInterrupt):
        train(_opts(tmp_path / "stopped", callbacks=[StopAt(0, 2)], **gpu), Noisy(), VAL, CLASSES)
    resumed = train(_opts(tmp_path / "stopped", resume="auto", **gpu), Noisy(), VAL, CLASSES)
    assert resumed["epochs"] == straight["epochs"] == 2
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("straight", "stopped"))
    for name, value in a.items():
        assert torch.allclose(value.float(), b[name].float(), atol=1e-4), name


def test_resume_with_other_settings_names_the_differences(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_opts(out, callbacks=[StopAt(0, 1)]), Noisy(), VAL, CLASSES)
    changes = [(dataclasses.replace(TINY, lr=0.05), {}, f"lr: {TINY.lr} -> 0.05"),
               (dataclasses.replace(TINY, strides=(1, 2, 2, 2, 2)), {}, "strides"),
               (TINY, {"model": "repvgg_b0"}, "model_name: 'RepVGG-tiny' -> 'repvgg_b0'"),
               (TINY, {"model": dataclasses.replace(TINY_ARCH, widths=(0.5, 0.25, 0.25, 0.25))},
                "(config.widths: [0.25, 0.25, 0.25, 0.25] -> [0.5, 0.25, 0.25, 0.25]);"),
               (dataclasses.replace(TINY, name="paper"), {}, "name: 'cifar' -> 'paper'"),
               (TINY, {"seed": 1}, "seed: 0 -> 1")]
    for recipe, extra, message in changes:
        with pytest.raises(RepVGGError, match=re.escape(message)):
            train(_opts(out, recipe, resume="auto", **extra), Noisy(), VAL, CLASSES)


def test_a_resume_goes_on_with_its_checkpoints_recipe_where_no_flag_sets_a_value(tmp_path: Path) -> None:
    """A run begun under earlier defaults of its preset (cosine decay, no Cutout, 3 epochs) resumed by a caller that
    sets no recipe field ends at the straight run's weights, saying which values it took; a field set on purpose
    must still match, and ``recipe_given=None`` holds the whole recipe to the checkpoint's."""
    begun, logs = dataclasses.replace(TINY, schedule="cosine", cutout=0, epochs=3), []
    train(_opts(tmp_path / "straight", begun), Noisy(), VAL, CLASSES)
    out = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(_opts(out, begun, callbacks=[StopAt(1, 2)]), Noisy(), VAL, CLASSES)
    with pytest.raises(RepVGGError, match=re.escape("schedule: 'cosine' -> 'linear'; cutout: 0 -> 8")):
        train(_opts(out, TINY, resume="auto"), Noisy(), VAL, CLASSES)
    with pytest.raises(RepVGGError, match=re.escape("other settings than this run's (cutout: 0 -> 8)")):
        train(_opts(out, TINY, resume="auto", recipe_given=frozenset({"cutout"})), Noisy(), VAL, CLASSES)
    summary = train(_opts(out, TINY, resume="auto", recipe_given=frozenset(), log=logs.append), Noisy(), VAL, CLASSES)
    taken = next(line for line in logs if line.startswith("resuming with the recipe values"))
    assert taken.endswith("epochs 3 (the 'cifar' recipe now: 2), schedule 'cosine' (the 'cifar' recipe now: "
                          "'linear'), cutout 0 (the 'cifar' recipe now: 8)")
    assert summary["epochs"] == 3
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_train_resume_without_recipe_flags_continues_a_run_begun_under_other_defaults(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``repvgg train --resume`` extends a finished 1-epoch cosine run without Cutout to 2 epochs in its own recipe
    (only ``--epochs`` set; ``--print-config`` shows it first); a flag contradicting the run is refused, naming it."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), *TINY_TRAIN]
    assert main([*args, "--epochs", "1", "--schedule", "cosine", "--cutout", "0"]) == 0
    assert main([*args, "--epochs", "2", "--resume", "--schedule", "linear"]) == 2
    assert "schedule: 'cosine' -> 'linear'" in capsys.readouterr().err
    assert main([*args, "--resume", "--print-config"]) == 0  # what a resume would go on with
    assert re.search(r"recipe\.schedule +cosine\n", capsys.readouterr().out)
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "schedule 'cosine' (the 'cifar' recipe now: 'linear'), cutout 0 (the 'cifar' recipe now: 8)" in printed
    stored = torch.load(out / "last.pt", weights_only=True)["repvgg"]["recipe_values"]
    assert (stored["epochs"], stored["schedule"], stored["cutout"]) == (2, "cosine", 0)


def test_train_resume_without_recipe_goes_on_in_the_runs_own_preset(data: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """``--recipe`` left out of a resume continues the run in the preset it was begun with (not the default
    ``paper``), saying so; a ``--recipe`` naming another preset is refused, naming both."""
    out = tmp_path / "run"
    at = TINY_TRAIN.index("--recipe")
    bare = ["train", "--data", str(data), "--out", str(out), *TINY_TRAIN[:at], *TINY_TRAIN[at + 2:]]
    assert main([*bare, "--recipe", "cifar", "--epochs", "1", "--crop-pad", "1"]) == 0
    capsys.readouterr()
    assert main([*bare, "--epochs", "2", "--resume"]) == 0
    assert f"resuming in the recipe {out / 'last.pt'} was begun with, 'cifar' (no --recipe given)" in \
        capsys.readouterr().out
    stored = torch.load(out / "last.pt", weights_only=True)["repvgg"]
    assert (stored["recipe"], stored["recipe_values"]["epochs"], stored["recipe_values"]["crop_pad"]) == ("cifar", 2, 1)
    assert main([*bare, "--recipe", "paper", "--epochs", "3", "--resume"]) == 2
    assert "recipe: 'cifar' -> 'paper'" in capsys.readouterr().err


def test_a_second_run_into_the_same_directory_is_refused_and_debris_is_cleared(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.create()
    holder.lock()
    with pytest.raises(RepVGGError, match="another training run is using"):
        train(_opts(out), Noisy(), VAL, CLASSES)
    holder.unlock()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".last.pt.{int(gone.stdout)}-abc123{TMP_SUFFIX}"  # a killed writer's temporary
    stale.write_bytes(b"x" * 100)
    (out / ".notes.tmp").write_text("the user's")
    logs: list[str] = []
    train(_opts(out, log=logs.append), Noisy(), VAL, CLASSES)
    assert not stale.exists() and any("left by an interrupted write" in line for line in logs)
    assert (out / ".notes.tmp").read_text() == "the user's"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_fine_tuning_replaces_the_classifier_freezes_stages_and_scales_the_backbone_lr(tmp_path: Path) -> None:
    source = create_model(TINY_ARCH, num_classes=7, strides=(2, 2, 2, 2, 2))
    save_checkpoint(source, tmp_path / "pre.pth")
    logs: list[str] = []
    opts = _opts(tmp_path / "run", pretrained=str(tmp_path / "pre.pth"), freeze_stages=2, backbone_lr_scale=0.1,
                 log=logs.append)
    train(opts, Noisy(), VAL, CLASSES)
    assert any("replaced its 7-class classifier by a new 3-class one" in line for line in logs)
    tuned = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    before = source.state_dict()
    final = model_from_checkpoint(tmp_path / "run" / "model.pth")[0].state_dict()
    for key, value in tuned["model"].items():
        if key.startswith(("stage0.", "stage1.")):
            assert torch.equal(value, before[key]) and torch.equal(final[key], before[key]), key  # all kept
    assert not torch.equal(tuned["model"]["stage2.0.rbr_dense.conv.weight"], before["stage2.0.rbr_dense.conv.weight"])
    lrs = {round(g["initial_lr"], 6) for g in tuned["optimizer"]["param_groups"]}
    peak = TINY.lr * 8 / 256  # the head at the peak, the backbone at 0.1 of it, its BN biases at the recipe's 4x
    assert TINY.bn_bias_lr_scale == 4 and lrs == {round(peak, 6), round(0.1 * peak, 6), round(0.4 * peak, 6)}



def test_batchnorm_biases_train_at_their_own_learning_rate(tmp_path: Path) -> None:
    """``bn_bias_lr_scale`` 4: every BN bias, and nothing else, in groups at 4x the lr, without weight decay."""
    train(_opts(tmp_path / "run", dataclasses.replace(ONE_EPOCH, bn_bias_lr_scale=4.0)), Noisy(), VAL, CLASSES)
    groups = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    model = create_model(TINY_ARCH, num_classes=len(CLASSES), strides=TINY.strides)
    bn_biases = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    peak = TINY.scaled_lr(TINY.batch_size)
    fast = [g for g in groups if math.isclose(g["initial_lr"], 4 * peak)]
    assert sum(len(g["params"]) for g in fast) == bn_biases and all(g["weight_decay"] == 0 for g in fast)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {round(g["initial_lr"] / peak, 6) for g in groups} == {1.0, 4.0}


@pytest.mark.parametrize("bn_init", ["default", "small"])
def test_the_recipe_starts_the_blocks_batchnorms_as_it_says(tmp_path: Path, bn_init: str) -> None:
    """``bn_init`` reaches the model a run trains: after one short epoch the blocks' BN weights are still near where
    they started (1, or timm's N(0.1, 0.1)), and the checkpoint keeps the value for a resume."""
    train(_opts(tmp_path / "run", dataclasses.replace(ONE_EPOCH, bn_init=bn_init)), Noisy(), VAL, CLASSES)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    weights = torch.cat([v for k, v in state["model"].items() if k.endswith(("bn.weight", "rbr_identity.weight"))])
    assert abs(weights.mean().item() - (1.0 if bn_init == "default" else 0.1)) < 0.1
    assert recipe_of(state["repvgg"]).bn_init == bn_init


def test_paper_recipe_on_small_images_warns(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--recipe", "paper", "--epochs", "1",
            "--model", TINY_MODEL, "--batch-size", "8", "--workers", "0", "--no-tensorboard", "--no-probe",
            "--img-size", "64", "--eval-resize", "64"]
    assert main(argv) == 0
    assert "'paper' recipe crops 64x64 from 16-pixel images" in capsys.readouterr().out


def test_speed_probe_measures_every_open_mode() -> None:
    cpu = torch.device("cpu")
    modes = candidate_modes(cpu, None, None, 1, bf16=True)
    assert set(modes) == {StepMode(a, c, 1) for a in ("none", "bf16") for c in (False, True)}
    assert candidate_modes(cpu, None, None, 1, bf16=False) == [StepMode("none", c, 1) for c in (False, True)]
    asked = candidate_modes(cpu, "bf16", False, 1, bf16=False)
    assert asked == [StepMode("bf16", False, 1), StepMode("none", False, 1)]
    assert candidate_modes(cpu, "bf16", True, 1) == [StepMode("bf16", True, 1), StepMode("none", False, 1)]
    model = create_model("repvgg_a0", num_classes=3, strides=(2, 2, 2, 2, 2))
    speeds = probe_modes(model, modes[:2], torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,)), rounds=1)
    assert set(speeds) == set(modes[:2]) and all(v > 0 for v in speeds.values())
    assert StepMode("bf16", True, 2).label == "bf16 autocast channels_last, 2 threads"


def test_grad_checkpointing_updates_bn_statistics_once() -> None:
    plain = create_model("repvgg_a0", num_classes=3, strides=(2, 2, 2, 2, 2)).train()
    checkpointed = create_model("repvgg_a0", num_classes=3, strides=(2, 2, 2, 2, 2)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        for model in (plain, checkpointed):
            model(x).sum().backward()
    a, b = plain.state_dict(), checkpointed.state_dict()
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)
    assert int(b["stage2.0.rbr_dense.bn.num_batches_tracked"]) == 3


BROKEN = {"bad-rank-1": ["no readable training image in epoch 1"] * 2,
          "nan-rank-1": ["loss became nan at epoch 1 step 1", "loss became non-finite on another process at epoch 1"]}


def test_torchrun_two_processes_train_disjoint_shards_and_stop_together_when_one_breaks(tmp_path: Path) -> None:
    """One launch of two processes, four runs in turn: a healthy one (disjoint shards, reshuffled every epoch, the
    same weights, one checkpoint), the same checkpointed after every step, killed mid-epoch and resumed (the same
    weights and losses: rank 0 saves every process's partial sums, the others drop theirs on resume), then each broken
    mode, where both processes stop the run with one error line (before the fix, the healthy process waited for the
    broken one until timeout) and go on in step."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_train.py"), str(tmp_path / "run"), str(tmp_path), "ok", "ok-resumed", *BROKEN]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    err = done.stderr  # the two processes' lines may interleave
    assert done.stdout.count("final (last weights)") == 2 and "2 process(es)" in done.stdout, done.stdout[-3000:]
    ok, resumed = ([json.loads(line) for line in (tmp_path / "run" / m / "metrics.jsonl").read_text().splitlines()]
                   for m in ("ok", "ok-resumed"))
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in ok], rel=1e-12)
    a, b = (torch.load(tmp_path / "run" / m / "model.pth", weights_only=True)["state_dict"]
            for m in ("ok", "ok-resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards = [[set(map(int, line.split())) for line in (tmp_path / f"indices_rank{r}.txt").read_text().splitlines()]
              for r in range(2)]
    for epoch in range(2):
        a, b = shards[0][epoch], shards[1][epoch]
        assert len(a) == len(b) == 24 and not a & b and len(a | b) == 48
    assert shards[0][0] != shards[0][1]  # reshuffled every epoch
    assert len({(tmp_path / f"params_rank{r}.txt").read_text() for r in range(2)}) == 1  # identical weights
    summary = json.loads((tmp_path / "run" / "ok" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_top1"] == summary["deploy_top1"]
    assert len(list((tmp_path / "run" / "ok").glob("*.pth"))) == 3
    assert done.returncode != 0 and err.count("repvgg: error: ") == 2 * len(BROKEN), err[-3000:]
    for messages in BROKEN.values():
        assert all(err.count(m) == messages.count(m) for m in messages), err[-3000:]
    bad, nan = BROKEN.values()  # a process enters the next run only after its error line
    assert max(map(err.rfind, bad)) < min(map(err.find, nan)), err[-3000:]


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    import sys

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "lr": 0.1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install 'repvgg[plot]'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2
