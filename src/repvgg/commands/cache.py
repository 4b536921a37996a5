"""``repvgg cache``: what the user cache folder holds (unpacked archives, decoded image sets, probes), and clearing
it, whole or what no run has used for some days."""

from __future__ import annotations

import argparse
import time

from ..files import Outputs
from .args import nonneg_float

WRITES = False


def inputs(args: argparse.Namespace) -> list[str]:
    return []


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clear", action="store_true",
                   help="remove the entries (every one, or those --older-than); each is rebuilt when next needed. "
                        "Clear while no run is starting: one unpacking or reading an archive needs its folder")
    p.add_argument("--older-than", type=nonneg_float, default=None, metavar="DAYS",
                   help="only the entries no run has used in the last DAYS days")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..cache import cache_dir, cache_entries, older_than, remove_entries

    root = cache_dir()
    entries = cache_entries(root)
    chosen = entries if args.older_than is None else older_than(entries, args.older_than)
    age = "" if args.older_than is None else f" unused for {args.older_than:g} days"
    if args.clear:
        freed = remove_entries(chosen)
        print(f"removed {_entries(len(chosen))}{age} from {root} ({_size(freed)}); {len(entries) - len(chosen)} kept")
        return
    print(f"{root}: {_entries(len(chosen))}{age}, {_size(sum(e.size for e in chosen))}")
    shown = [e for e in chosen if not e.bookkeeping]
    if shown:
        print(f"  {'last used':<17}{'on disk':>11}  entry")
    for e in shown:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        print(f"  {used:<17}{_size(e.size):>11}  {e.path.relative_to(root)}")
    hidden = [e for e in chosen if e.bookkeeping]
    if hidden:
        size = _size(sum(e.size for e in hidden))
        print(f"  and {len(hidden)} bookkeeping files (locks, digests, temporaries): {size}")
