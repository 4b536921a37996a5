"""argparse helpers shared by every sub-command and benchmark: ``type=`` functions that check numbers and output
paths where they are parsed, so bad values end as ``<prog>: error: argument --x: ...`` (exit 2) before any work
starts; and the help formatters of the sub-commands and the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RepVGGError
from ..files import check_output_path

if TYPE_CHECKING:
    from ..models.architectures import RepVGGConfig

__all__ = ["DefaultsFormatter", "HelpFormatter", "PRETRAINED_HELP", "positive_int", "nonneg_int", "positive_float",
           "nonneg_float", "prob_float", "architecture", "output_file", "figure_file", "add_checkpoint",
           "checkpoint_of"]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless there is none to show (None, a switch, an empty list)
    or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = isinstance(action, argparse._StoreConstAction)  # store_true/false: "(default: True)" misleads
        nothing = switch or action.default is None or action.default is False or action.default == []
        if nothing or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """A script's formatter: its docstring (the usage examples) kept as written, and the options' defaults."""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (worker processes, number of classes where 0 means none)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, time budgets)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (tolerances, weight decay, alphas where 0 means off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def prob_float(text: str) -> float:
    """A finite number in [0, 1] (probabilities, smoothing, decay factors)."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}")
    return value


def architecture(text: str) -> str | RepVGGConfig:
    """``--model``: a registered name (checked where it is built), or a ``.json`` file of a :class:`RepVGGConfig`."""
    if not text.endswith(".json"):
        return text
    from ..models.architectures import RepVGGConfig

    try:
        return RepVGGConfig.from_dict(json.loads(Path(text).read_text()))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {e.strerror or e}") from None
    except RepVGGError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    except ValueError as e:  # bad JSON, or bytes that are not text
        raise argparse.ArgumentTypeError(f"{text} is not a JSON architecture config: {e}") from None


def output_file(text: str) -> str:
    """A file path that can be written: not a folder, and no part of its folder path a regular file ('' passes,
    for options where it means "none")."""
    if text:
        try:
            check_output_path(text)
        except RepVGGError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp")
PRETRAINED_HELP = ("published weights by model name (repvgg_a0: timm's, from the Hugging Face Hub, cached), "
                   "a Hub id (timm/repvgg_a0.rvgg_in1k) or a file")


def figure_file(text: str) -> str:
    """An :func:`output_file` whose suffix names an image format matplotlib writes (.png, .pdf, .svg, ...)."""
    if text and not text.lower().endswith(FIGURE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text!r} is not an image file name: use one of "
                                         f"{', '.join(FIGURE_SUFFIXES)}")
    return output_file(text)


def add_checkpoint(p: argparse.ArgumentParser, help_text: str) -> None:
    """The model file a command reads, positionally as every command takes it (``repvgg eval CKPT``) or with
    ``--checkpoint``; :func:`checkpoint_of` reads it back."""
    p.add_argument("checkpoint_path", nargs="?", metavar="CHECKPOINT", help=help_text)
    p.add_argument("--checkpoint", metavar="FILE", help="the same file as an option (either form)")


def checkpoint_of(args: argparse.Namespace) -> str | None:
    """The file of :func:`add_checkpoint`, given either way; two different files are an error."""
    given, option = args.checkpoint_path, args.checkpoint
    if given and option and given != option:
        raise RepVGGError(f"two model files given, {given} and --checkpoint {option}: name one")
    return given or option
