"""uvicorn's httptools protocol with a deadline and a size cap on each request head.

uvicorn times out a connection only while it idles after a response (keep-alive): a socket
that never sends a request, or sends its head a byte at a time, is held forever, and the
head's bytes are buffered without a bound (200 MB of header lines took 200 MB). Here a
connection must deliver a whole request head within `head_timeout` seconds of opening or
of its last response (408 in JSON when part of one came, else a plain close, as an idle
keep-alive connection gets), and a head past `max_head_bytes` is answered 431. A request
the parser refuses is answered 400 in JSON (uvicorn's is plain text).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from angle_rt.serve.protocol import ApiError

log = logging.getLogger("angle_rt.serve")

#: bytes of one request head (request line and headers): Node's and h11's cap is 16 KB,
#: nginx's 32 KB; a request's content goes in its body
MAX_HEAD_BYTES = 65_536


def guarded(head_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """The protocol class for uvicorn's `http` setting, with these limits."""
    return type("GuardedHttpTools", (GuardedHttpTools,),
                {"head_timeout": head_timeout, "max_head_bytes": max_head_bytes})


class GuardedHttpTools(HttpToolsProtocol):
    head_timeout = 10.0
    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's end (or the connection's start) and a head
        self._head_bytes = 0
        self._began = False  # part of a head came (else an expiry closes, as keep-alive does)
        self._heads = 0  # heads completed on this connection
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # the chunk counts when a head was awaited at its start and still is at its end,
        # with no head completed inside it (a head that began in it counts from the next)
        counted, heads = self._in_head, self._heads
        super().data_received(data)
        if not (counted and self._in_head and heads == self._heads) \
                or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, f"The request head (line and headers) is over "
                              f"{self.max_head_bytes} bytes", "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began = True

    def on_headers_complete(self) -> None:
        self._in_head, self._began, self._head_bytes = False, False, 0
        self._heads += 1
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None
                                                or self.cycle.response_complete):
            self._arm()  # idle again: the next head has head_timeout to arrive

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._began or self._head_bytes:
            self._refuse(408, f"The request head did not arrive within {self.head_timeout:g} "
                              "s (--body-timeout)", "request_timeout")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused (uvicorn logs it): in JSON, like every API error."""
        self._answer(400, msg, "invalid_request")

    def _refuse(self, status: int, message: str, code: str) -> None:
        log.warning("request head refused", extra={"fields": {
            "status": status, "client": _addr(self.client), "head_bytes": self._head_bytes}})
        self._answer(status, message, code)

    def _answer(self, status: int, message: str, code: str) -> None:
        body = ApiError(status, message, code=code).body()
        reason = {400: b"Bad Request", 408: b"Request Timeout",
                  431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), body))
        self.transport.close()


def _addr(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
