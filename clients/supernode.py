"""``python -m fedlora.clients.supernode ARGS``: Flower's ``flower-supernode``, polling faster.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink finds
no message (and 0.5 s between checks for a reply), which alone adds ~1.5 s on
average and up to 3 s to every message; and when a message's objects are not all
at the SuperLink yet, it retries after 1 s, then 2 s. This wrapper runs the
unmodified ``flower-supernode`` entry point with those sleeps capped at
``FEDLORA_SUPERNODE_POLL`` seconds (default 0.2) and object retries starting at
20 ms. Its heartbeat interval is ``FEDLORA_HEARTBEAT`` seconds (default 10, the least the
SuperLink accepts; Flower's default is 30): the SuperLink declares a node dead once two intervals
pass without a heartbeat and answers its pending messages with an error, so a round that lost a
SIGKILLed client closes within about 20 s instead of 60. Everything else, flags included, is
Flower's.
"""

from __future__ import annotations

import os
import sys
import time
import traceback


class _CappedClock:
    """The ``time`` module, except that ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def main() -> None:
    from functools import partial

    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    interval = float(os.environ.get("FEDLORA_HEARTBEAT", "10"))
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = connection.HEARTBEAT_DEFAULT_INTERVAL = interval
    cap = float(os.environ.get("FEDLORA_SUPERNODE_POLL", "0.2"))
    internal.time = _CappedClock(cap)
    internal.pull_objects = partial(internal.pull_objects, initial_backoff=0.02, backoff_cap=cap)
    sys.argv[0] = "flower-supernode"
    try:
        flower_supernode()
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:  # e.g. the SuperLink is gone: Flower's HTTP server thread would
        traceback.print_exc()  # keep the process alive with no node loop; exit instead
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
