"""User-facing errors: the CLI prints them as one line, without a traceback."""


class ConfigError(ValueError):
    """Bad user input: an option, a file, a field. The message names it."""
