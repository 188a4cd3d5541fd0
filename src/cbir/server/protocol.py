"""uvicorn's h11 protocol with the two deadlines uvicorn lacks: slow clients are dropped.

uvicorn (0.55) has a keep-alive timeout, a concurrency limit, a header size limit and a
graceful-shutdown timeout, but no timeout on *receiving* a request: a client that opens a socket
and sends its headers one byte at a time (slowloris), or its body one byte at a time, holds the
connection for as long as it likes. :class:`TimedH11Protocol` adds

- a **header timeout**: the request line and headers must arrive within ``header_timeout`` seconds
  of the connection opening (or of the first byte of a later request on a kept-alive connection);
- a **body timeout**: the whole body must arrive within ``body_timeout`` seconds of the headers.

A connection past its deadline gets ``408 Request Timeout`` (unless this request's response has
started) and is closed; the application sees its client as disconnected. The deadlines follow
h11's state of the client (``IDLE`` -> ``SEND_BODY`` -> ``DONE``), so they cost one timer per
connection and no task.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMEOUT_BODY = b"request timeout"


def timed_h11_protocol(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """:class:`TimedH11Protocol` with these deadlines (seconds), as the protocol class uvicorn's Config takes."""
    return type("TimedH11Protocol", (TimedH11Protocol,),
                {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout)})


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request's headers and one for its body
    (seconds; set by :func:`timed_h11_protocol`)."""

    header_timeout: float
    body_timeout: float
    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None  # "headers" or "body": what the armed deadline waits for

    # --- uvicorn's hooks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        if self._phase is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the deadlines --------------------------------------------------------------------------
    def _follow_state(self) -> None:
        """Move the deadline along with h11's view of the client: headers -> body -> done."""
        state = self.conn.their_state
        if self._phase == "headers" and state is not h11.IDLE:
            self._disarm()
        if state is h11.SEND_BODY and self._phase is None:
            self._arm("body")
        elif state is not h11.SEND_BODY and self._phase == "body":
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(self.header_timeout if phase == "headers" else self.body_timeout,
                                              self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self) -> None:
        """Past the deadline: 408 unless this request's response has started, then the connection is closed."""
        phase = self._phase
        self._deadline, self._phase = None, None
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle if phase == "body" else None  # in the headers phase, a cycle is the previous request's
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's later sends are dropped; receive() says disconnect
            cycle.message_event.set()
        seconds = self.header_timeout if phase == "headers" else self.body_timeout
        client = "%s:%s" % self.client if self.client else "a client"
        self.logger.warning("%s - connection closed: the request %s did not arrive within %g s", client, phase, seconds)
        if cycle is None or not cycle.response_started:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY))
        self.transport.close()
