"""The command's own errors: each is reported on one line, with its exit status."""

from __future__ import annotations


class CommandError(Exception):
    """A user error: reported on one line, with exit status 2."""

    exit_status = 2


class Interrupted(CommandError):
    """Ctrl-C: reported on one line (what was saved), exit status 130."""

    exit_status = 130
