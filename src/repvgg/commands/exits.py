"""How every command ends, ``repvgg`` and the benchmark scripts alike: bad input and OS errors (full disk, read-only
folder) as one line on stderr and exit code 2, a stop by a signal as 128 + its number (as shells report it), a reader
that went away (``| head``) quietly."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from ..errors import Interrupted, RepVGGError
from ..files import os_error_message

__all__ = ["EXIT_BAD_INPUT", "run_command"]

EXIT_BAD_INPUT = 2


def run_command(program: str, call: Callable[[], int | None]) -> int:
    """Run ``call`` as the command ``program``; returns its exit code (``call``'s own when it returns one)."""
    try:
        code = call()
        sys.stdout.flush()
    except BrokenPipeError:
        # keep Python's exit-time flush from failing on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RepVGGError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"{program}: error: {os_error_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        print(f"{program}: interrupted", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    return code or 0
