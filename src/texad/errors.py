"""One exception type for bad input, so entry points can print it without a traceback."""


class TexadError(ValueError):
    """Bad input or configuration: the message names the file or key and what was expected."""
