"""SIGINT and SIGTERM stop a run at its next tick with a checkpoint, so that ``--resume`` continues it.

The handler only records the signal; the loop looks at the record once per tick (a host-side read, no sync), writes a
checkpoint and raises :class:`Stopped`; ``engine.run`` exits with 128 + the signal number (130 for SIGINT, 143 for
SIGTERM), as a shell reports a process killed by that signal. A second signal stops at once (the last checkpoint
written stays). A signal the run was started with ignored (a script's background job: SIGINT) stays ignored.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    signum: int = 0  # 0: none received


class Stopped(Exception):
    """Raised by the loop once the checkpoint of a requested stop is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM fill the yielded request instead of killing the process."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield request
        return

    def handle(signum, frame):
        if request.signum:  # the second one: the previous handler (KeyboardInterrupt, or the default: terminate)
            signal.signal(signum, previous[signum] or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        request.signum = signum
        log.warning("%s: stopping after this tick with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    # A signal ignored on entry stays ignored: a shell starts a script's background jobs (`cmd &`) with SIGINT
    # ignored, so that a Ctrl-C meant for the foreground does not stop them.
    previous = {s: handler for s in SIGNALS if (handler := signal.getsignal(s)) is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
