"""``train()``: a whole run, from set-up through every epoch to the final models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from .loop import Run, end_of_epoch, finish, train_one_epoch
from .options import TrainOptions
from .setup import setup_run

__all__ = ["train"]


def train(opts: TrainOptions, train_set: Dataset | None = None, val_set: Dataset | None = None,
          class_names: Sequence[str] | None = None, preprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``opts.model`` with ``opts.recipe``; returns the final summary (also written to summary.json).

    Datasets default to the image folders under ``opts.data``; pass ``train_set``/``val_set`` (yielding
    ``(tensor, int)``) and ``class_names`` to train on anything else. A resumed run that had already finished
    is reported as complete; one killed after its last epoch finishes what was left.
    """
    run = setup_run(opts, train_set, val_set, class_names, preprocess)
    try:
        p = run.progress
        if p.epoch >= p.total_epochs and _complete(run):
            run.log(f"the run in {run.rundir.path} is already complete ({p.epoch} epochs); summary in "
                    f"{run.rundir.summary} (pass a larger --epochs to train further)")
            return json.loads(run.rundir.summary.read_text())
        if p.epoch >= p.total_epochs:
            run.log(f"the run in {run.rundir.path} trained all {p.epoch} epochs; writing what its stop left out "
                    f"(final models, their evaluation, the summary)")
        with run.stopper:
            while p.epoch < p.total_epochs:
                train_one_epoch(run)
                end_of_epoch(run)
        return finish(run)
    finally:
        if run.metrics:
            run.metrics.close()
        run.rundir.unlock()


def _complete(run: Run) -> bool:
    """True when an earlier process already finished this run (final models and summary written)."""
    files = (run.rundir.summary, run.rundir.model, run.rundir.deploy)
    return all(f.is_file() for f in files) and \
        json.loads(run.rundir.summary.read_text()).get("epochs") == run.progress.epoch
