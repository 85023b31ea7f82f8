"""The errors msgcap's commands share: each one is a one-line reason and an exit status."""

from __future__ import annotations


class MsgcapError(Exception):
    """Base of msgcap's own errors."""

    exit_status = 1


class UsageError(MsgcapError):
    """Bad paths or options: exit status 2."""

    exit_status = 2


class ConfigError(UsageError, ValueError):
    """A bad config file or flag: exit status 2 with this one-line reason."""
