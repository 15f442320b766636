"""The one exception type that means "the user can fix this" (exit code 2 at the CLI)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a config, dataset, checkpoint, storage URL or budget.

    The message is one line that names the field and says how to fix it; the CLI prints it
    without a traceback and exits with code 2.
    """
