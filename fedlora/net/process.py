"""Child processes that do not outlive the fedlora process that started them."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """``preexec_fn``: on Linux, the child gets SIGTERM when its parent dies (even by SIGKILL).

    Without it a killed ``fedlora-server`` would leave its SuperLink holding the port,
    and a killed ``fedlora-client`` its SuperNode taking tasks nobody runs.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
