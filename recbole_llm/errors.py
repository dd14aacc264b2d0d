"""User-facing errors: the CLI prints them as one line, without a traceback."""


class ConfigError(ValueError):
    """Bad user input: an option, a file, a field. The message names it."""


class WriteError(OSError):
    """A result could not be written (disk full, permissions): the message names the file and the reason."""
