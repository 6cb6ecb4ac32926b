"""uvicorn's HTTP/1.1 (h11) protocol, answering a request it cannot parse with the OpenAI error
envelope: 431 when the headers are larger than uvicorn accepts (h11's receive buffer limit,
16 KiB by default), 400 for anything else malformed. uvicorn's own answer is a plain-text 400
either way. The connection is closed after it (h11 cannot resynchronise); what the client is
still sending is read and dropped for a moment first, since closing a socket with unread data
makes the kernel send a reset, which can reach the client before the answer does.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


DRAIN_SECONDS = 1.0  # how long the rest of a refused request is read and dropped before closing


class EnvelopeH11Protocol(H11Protocol):
    _discarding = False

    def data_received(self, data: bytes) -> None:
        if not self._discarding:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size or h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        too_large = len(buffered) >= limit
        status = 431 if too_large else 400
        message = ("request header fields too large" if too_large else "malformed HTTP request")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": status}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self._discarding = True
        self.loop.call_later(DRAIN_SECONDS, self.transport.close)
