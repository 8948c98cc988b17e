"""Logging: a rich handler on a terminal, plain timestamped lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        # On stderr, as the plain lines are (stdout keeps the summary line); the live display shares this console,
        # so that log lines print above it instead of through it.
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
