"""Children that end with the process that started them.

``taskloom up`` starts Redis, a supervisor and workers, each in a session of
its own (so that a Ctrl-C in the terminal reaches ``up`` alone, which stops
them in order). If ``up`` itself is killed, nothing would stop them: each
child therefore watches its parent. On Linux the kernel sends it SIGTERM when
its parent dies (``PR_SET_PDEATHSIG``, set by ``die_with_parent`` between
fork and exec); everywhere, a taskloom process started with
``TASKLOOM_PARENT_PID`` checks its parent each second (``watch_parent``) and
stops itself as on SIGTERM when that parent is gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PARENT_PID = "TASKLOOM_PARENT_PID"
"""Set by ``taskloom up`` in its children's environment: the pid to outlive not."""
PR_SET_PDEATHSIG = 1
CHECK_EVERY = 1.0

logger = logging.getLogger(__name__)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies (Linux;
    elsewhere nothing, and ``watch_parent`` does the work)."""

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig))

    return preexec


def watch_parent() -> None:
    """If ``TASKLOOM_PARENT_PID`` is set, SIGTERM this process once its parent
    is no longer that process. The variable is removed, so that what this
    process starts does not watch a parent that is not its own."""
    value = os.environ.pop(PARENT_PID, "")
    if not value.isdigit():
        return
    parent = int(value)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(CHECK_EVERY)
        logger.warning("the process that started this one (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="taskloom-parent-watch", daemon=True).start()
