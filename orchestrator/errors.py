"""User-facing errors: one line on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import functools
import sys

import click

EXIT_USAGE = 2


class HaqtuneError(Exception):
    """Bad input from the user (config, flags, files): printed as one line, exit code 2."""


# ValueErrors raised by our own packages while validating input are user errors too
# (unknown names, bits out of range, infeasible budgets, malformed tables).
USER_ERRORS = (HaqtuneError, ValueError, FileNotFoundError)


def fail(message: str) -> None:
    """Print ``haqtune: error: <message>`` (one line) and exit 2."""
    one_line = " ".join(str(message).split())
    click.echo(f"haqtune: error: {one_line}", err=True)
    sys.exit(EXIT_USAGE)


def user_errors(fn):
    """Decorator for click commands: turn user errors into one line + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            fail(str(exc))

    return wrapper
