"""User-facing errors: one line that names the problem and the fix, no traceback.

Exit codes: 2 for bad input (:class:`UserError`), 3 for a run that finished but diverged (:class:`RunDiverged`:
most student or latent steps were not finite; its outputs and summary.json are written).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (flags, files, data). The message says what is wrong and how to fix it."""

    exit_code = 2


class RunDiverged(UserError):
    """The run completed, but most of its steps were skipped as non-finite: the student is meaningless."""

    exit_code = 3


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so a :class:`UserError` prints ``error: <message>`` on stderr and exits with its code.

    Under torchrun or ``accelerate launch`` every process checks the same input and fails alike; only rank 0
    prints, so the message appears once, not once per process."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {err}", file=sys.stderr)
            return err.exit_code

    return wrapper
