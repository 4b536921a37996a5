"""The one exception type the library raises for bad user input; the CLI turns it into a one-line error."""


class RepVGGError(ValueError):
    """Bad input: unknown model, unreadable or mismatched checkpoint, invalid option."""
