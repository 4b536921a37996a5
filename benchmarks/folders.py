"""What every benchmark script shares: where it reads CIFAR-10, where its runs and report go, and the options that
change both. A user's run writes into ``runs/``, so it never replaces the committed results."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from repvgg.errors import RepVGGError

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"  # training runs and the user's own reports
COMMITTED_RESULTS, OWN_RESULTS = ROOT / "benchmarks" / "results", RUNS / "results"
CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"  # beside the checkout


def add_data_argument(p: argparse.ArgumentParser) -> None:
    """``--data``: the CIFAR-10 copy to read."""
    p.add_argument("--data", default=str(CIFAR10),
                   help="CIFAR-10: a folder with train/ and test/ (folders or .tar.gz archives)")


def cifar10_data(args: argparse.Namespace) -> str:
    """``--data`` when it exists, else a one-line error naming the option (a checkout elsewhere lacks the default)."""
    if not Path(args.data).exists():
        raise RepVGGError(f"CIFAR-10 not found at {args.data}; pass --data DIR")
    return args.data


def add_results_arguments(p: argparse.ArgumentParser) -> None:
    """The report folder: the user's own unless ``--update-results`` asks for the committed one, or ``--results``
    names another."""
    p.add_argument("--results", help=f"folder for the report files (default: {OWN_RESULTS}, or {COMMITTED_RESULTS} "
                   "with --update-results)")
    p.add_argument("--update-results", action="store_true",
                   help=f"write the report into the committed results, {COMMITTED_RESULTS}")


def results_folder(args: argparse.Namespace) -> Path:
    """The folder :func:`add_results_arguments` chose."""
    return Path(args.results) if args.results else COMMITTED_RESULTS if args.update_results else OWN_RESULTS


LOCATION_FLAGS = {"--data": 1, "--results": 1, "--update-results": 0}  # each flag's count of values


def rerun_command(script: str, argv: Sequence[str]) -> str:
    """The command a report names to measure again on another machine: ``argv`` without the flags that only say where
    the data and the report are (the data's path is the measuring machine's own)."""
    kept, skip = [], 0
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip -= 1
        elif name in LOCATION_FLAGS:
            skip = 0 if "=" in arg else LOCATION_FLAGS[name]
        else:
            kept.append(arg)
    return " ".join(["python", f"benchmarks/{script}", *kept])


def shown_path(path: str | Path) -> str:
    """``path`` as a report names it: relative to the checkout when inside it, so that no machine's own folders enter
    a committed result."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
