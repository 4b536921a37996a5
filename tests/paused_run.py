"""Run by tests: the ``repvgg`` command line, pausing after optimizer step STEP (1-based) of EPOCH (0-based) until a
stop signal has arrived, with READY_FILE written when the pause starts, so that a test can signal the process from
outside at a known point in the middle of an epoch.

    python tests/paused_run.py EPOCH STEP READY_FILE ARGS...   # ARGS: as for ``repvgg``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from repvgg.cli import main
from repvgg.training import train as train_module
from repvgg.training.loop import Run
from repvgg.training.options import Callback
from repvgg.training.setup import setup_run

PAUSE_LIMIT_S = 120.0


class PauseAt(Callback):
    """At (epoch, step): write the ready file, then wait until the run's stopper has caught a signal."""

    def __init__(self, run: Run, epoch: int, step: int, ready: Path) -> None:
        self.run, self.at, self.ready = run, (epoch, step), ready

    def on_step_end(self, epoch: int, step: int) -> None:
        if (epoch, step) != self.at:
            return
        self.ready.write_text(f"{epoch} {step}\n")
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while self.run.stopper.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)


def paused(epoch: int, step: int, ready: Path) -> Any:
    """``setup_run`` that adds a :class:`PauseAt` to the run it builds."""

    def setup(*args: Any, **kwargs: Any) -> Run:
        run = setup_run(*args, **kwargs)
        run.opts.callbacks = [*run.opts.callbacks, PauseAt(run, epoch, step, ready)]
        return run

    return setup


if __name__ == "__main__":
    epoch, step, ready = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    train_module.setup_run = paused(epoch, step, ready)
    sys.exit(main(sys.argv[4:]))
