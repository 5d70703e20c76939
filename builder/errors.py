"""Errors the CLI reports as one clear message (no traceback)."""


class SohoError(Exception):
    """A user-facing error: the message names the file, the key and what was expected."""


class ConfigError(SohoError):
    pass


class Aborted(SohoError):
    """A wait given up because something else failed first (that failure is the one to report)."""
