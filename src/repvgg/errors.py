"""The library's exceptions: bad user input, which the CLI turns into a one-line error, and a run stopped by a
signal after saving its state."""


class RepVGGError(ValueError):
    """Bad input: unknown model, unreadable or mismatched checkpoint, invalid option."""


class Interrupted(KeyboardInterrupt):
    """A training run stopped by SIGINT, SIGTERM or SIGHUP after saving its state; the CLI exits with 128 + ``signum``,
    as a shell reports a process that the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
