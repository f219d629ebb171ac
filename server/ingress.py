"""The SuperLink ``fedlora-server`` starts, with a size limit on what clients push.

A reply reaches the server as objects that each SuperNode pushes to the SuperLink
(``POST /v1/fleet/push-object``), and the SuperLink keeps them in memory until the ServerApp pulls
them; a 500 MB reply would cost the server 500 MB or more before any check could run. Here an
ASGI middleware (:class:`RequestLimit`) refuses a push larger than the job allows with HTTP 413 from
its ``Content-Length`` (or, for a streamed body, as soon as the bytes read pass the limit), before
the body is read.

The limit is the ServerApp's (``fedlora.rounds.validate.request_limit``): three times the largest reply the
adapter plan allows (a float32 upload; Fed-SB's dense initialisation gradients when clients answer
its initialisation; SecAgg+'s masked int64 vectors are twice a float32 upload) plus 1 MiB of
framing. The ServerApp writes it to
``<out>/.max-request-bytes`` when it starts (:func:`write_limit`); until then the limit is
:data:`DEFAULT_LIMIT`. Run as ``python -m fedlora.server.ingress <flower-superlink flags>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import flwr.superlink.main as superlink_main
from flwr.superlink.cli import flower_superlink
from starlette.middleware import Middleware

LIMIT_FILE = ".max-request-bytes"
ENV = "FEDLORA_REQUEST_LIMIT_FILE"
DEFAULT_LIMIT = 256 * 2 ** 20
"""Bytes a push may carry before the ServerApp has written the job's limit."""
GUARDED = ("/v1/fleet/push-object", "/v1/fleet/push-messages")


def write_limit(out_dir: Path, limit: int) -> None:
    """Tell the SuperLink of this run the job's limit (atomically)."""
    tmp = out_dir / (LIMIT_FILE + ".tmp")
    tmp.write_text(json.dumps(limit))
    os.replace(tmp, out_dir / LIMIT_FILE)


class RequestLimit:
    """ASGI middleware: HTTP 413 for a guarded request whose body exceeds the current limit."""

    def __init__(self, app, limit_file: str | None = None) -> None:
        self.app, self.limit_file = app, limit_file
        self._cached: tuple[float, int] | None = None

    def limit(self) -> int:
        """The limit in the limit file (re-read when it changes), else :data:`DEFAULT_LIMIT`."""
        try:
            stamp = os.stat(self.limit_file).st_mtime if self.limit_file else None
        except OSError:
            stamp = None
        if stamp is None:
            return DEFAULT_LIMIT
        if self._cached is None or self._cached[0] != stamp:
            try:
                self._cached = (stamp, int(json.loads(Path(self.limit_file).read_text())))
            except (OSError, ValueError):
                return DEFAULT_LIMIT
        return self._cached[1]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in GUARDED:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        length = int(headers.get(b"content-length", b"0") or 0)
        if length > limit:
            await self._refuse(send, length, limit)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ValueError(f"request body above the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(send, length: int, limit: int) -> None:
        body = json.dumps({"detail": f"fedlora: a push of {length} bytes is above this job's limit of"
                                     f" {limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    """``flower-superlink`` with :class:`RequestLimit` outermost among its middleware."""
    flower_middleware = superlink_main._get_middleware
    limit_file = os.environ.get(ENV)
    superlink_main._get_middleware = lambda: [Middleware(RequestLimit, limit_file=limit_file),
                                              *flower_middleware()]
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
