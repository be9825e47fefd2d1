"""Errors that are the user's to fix: the CLI prints them without a traceback and exits with 2."""


class UserError(Exception):
    """Bad input (a file, shard, key or flag). The message says what was wrong, where, and what to do."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""
