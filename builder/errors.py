"""Errors the CLI reports as one clear message (no traceback)."""


class SohoError(Exception):
    """A user-facing error: the message names the file, the key and what was expected."""


class ConfigError(SohoError):
    pass
