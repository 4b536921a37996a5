"""The ``repvgg`` command line: dispatches to one module of :mod:`repvgg.commands` per sub-command. Bad input and
OS errors (full disk, read-only folder) end with one line on stderr and exit code 2; a stop by a signal with
128 + its number."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._version import __version__
from .commands import COMMANDS
from .commands.args import DefaultsFormatter
from .commands.exits import run_command


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: its --help shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f".commands.{name}", __package__)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``repvgg`` parser; only the sub-command about to run (every one when ``command`` is None, none when it
    is "") imports its module to define its options, so ``repvgg --help`` and ``--version`` never import torch."""
    parser = argparse.ArgumentParser(prog="repvgg", description="RepVGG: train the multi-branch network, convert it "
                                     "exactly into a plain stack of 3x3 convs, deploy it fast.")
    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name, help_line in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if command is None or command == name:
            module = _module(name)
            module.add_arguments(p)
            if module.WRITES:
                p.add_argument("--overwrite", action="store_true",
                               help="replace output files that exist (never an input, never a run folder)")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parsed arguments; a sub-command's options may stand anywhere among its positionals (``predict m.onnx
    --engine onnxruntime a.jpg b.jpg``), as argparse's intermixed parsing allows."""
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command or "")
    if command is None:
        return parser.parse_args(argv)
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    args = sub.choices[command].parse_intermixed_args(argv[1:])
    args.command = command
    return args


def _run(args: argparse.Namespace) -> None:
    from .files import Outputs

    module = _module(args.command)
    module.run(args, Outputs(module.inputs(args), overwrite=getattr(args, "overwrite", False)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the exit code (see :mod:`repvgg.commands.exits`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    return run_command("repvgg", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
