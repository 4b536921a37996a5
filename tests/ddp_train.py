"""Run by ``torchrun`` in tests: train on in-memory tensors, recording what each process saw through callbacks.

    torchrun --nproc_per_node 2 tests/ddp_train.py OUT_DIR RECORD_DIR [MODE ...]

Each MODE is one run into OUT_DIR/MODE, one after the other in the same process group: ``ok``; ``ok-resumed``, the
same run checkpointed after every step, killed (an exception on both processes) after step 3 and resumed;
``bad-rank-1`` and ``nan-rank-1``, where every process must leave the failed run at the same point, ready for the
next. Exits with the status of the last run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from imagefolders import TINY_ARCH
from repvgg.commands.exits import run_command
from repvgg.training.data import BadImage
from repvgg.training.options import Callback, TrainOptions
from repvgg.training.recipes import recipe_with
from repvgg.training.train import train


class Images(Dataset):
    """Separable noisy images; in the ``bad-rank-1``/``nan-rank-1`` modes process 1 gets only unreadable/NaN ones."""

    def __init__(self, n: int, mode: str, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.broken = mode if os.environ.get("RANK") == "1" else ""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        if self.broken == "bad-rank-1":
            return BadImage(f"image{index}.png", "cannot identify image file")
        image = self.images[index] + index % 3
        return (image * float("nan") if self.broken == "nan-rank-1" else image), index % 3


class Record(Callback):
    """Each process writes the samples it trained on per epoch, and a checksum of its final weights."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.rank = folder, int(os.environ.get("RANK", "0"))

    def on_epoch_start(self, epoch: int, indices: Sequence[int]) -> None:
        with open(self.folder / f"indices_rank{self.rank}.txt", "a") as f:
            f.write(" ".join(map(str, indices)) + "\n")

    def on_finish(self, model: nn.Module, summary: dict) -> None:
        checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
        (self.folder / f"params_rank{self.rank}.txt").write_text(f"{checksum!r}\n")


class Killed(Exception):
    """The run's end without a chance to save, as a SIGKILL or a power cut."""


class KillAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, epoch: int, step: int) -> None:
        if (epoch, step) == (0, self.step):
            raise Killed


def run(out: str, record: str, mode: str) -> None:
    torch.set_num_threads(1)
    recipe = recipe_with("cifar", epochs=2, batch_size=8, img_size=16, eval_resize=16, strides=(2, 2, 2, 2, 2),
                         warmup_epochs=0)
    opts = TrainOptions(data=None, out_dir=out, model=TINY_ARCH, recipe=recipe, workers=0, amp="none",
                        channels_last=False, probe=False, tensorboard=False, callbacks=[Record(Path(record))])
    if mode == "ok-resumed":
        opts.save_every_min, opts.callbacks = 1e-9, [KillAfter(3)]
        try:
            train(opts, Images(48, mode, 0), Images(12, "", 1), ["a", "b", "c"])
        except Killed:
            opts.resume, opts.callbacks = "auto", [Record(Path(record))]
    train(opts, Images(48, mode, 0), Images(12, "", 1), ["a", "b", "c"])


def main(out: str, record: str, *modes: str) -> int:
    """Each mode's run in turn, each ended as the command line ends (one error line, an exit status)."""
    return [run_command("repvgg", lambda m=m: run(str(Path(out) / m), record, m)) for m in modes][-1]


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
