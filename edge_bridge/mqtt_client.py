"""paho's MQTT client with buffered reads and batched acknowledgements, for the edge service's intake.

paho reads each packet off the socket in three or four `recv` calls (the fixed header a byte at a
time, then the body), and sends each PUBACK as its own write after a wake-up write to its loop: at
tens of thousands of QoS 1 messages a second those system calls were most of the MQTT thread's time
and half the retry log writer's. This subclass changes only the I/O:

- `_ReadBuffer` serves paho's small reads from one 64 KiB `recv`, and reports what it holds through
  `pending()`, the hook paho already has for TLS sockets, so paho never waits in `select` on bytes
  it has in hand;
- `loop_read` goes on reading packets while some are buffered, instead of one per `select`;
- `ack_many` queues the PUBACKs of a whole group as one packet: one wake-up, one write (none for QoS 0).

The MQTT protocol, sessions, reconnects and callbacks are paho's own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_BUFFER_BYTES = 65536
_PUBACK = struct.Struct("!BBH")  # fixed header (PUBACK, remaining length 2), packet id


class _ReadBuffer:
    """A socket whose reads come out of a buffer refilled `READ_BUFFER_BYTES` at a time."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(max(bufsize, READ_BUFFER_BYTES))  # BlockingIOError, b"" at EOF: as a socket
            if len(data) <= bufsize:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos : self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0  # a TLS socket's own buffer
        return len(self._data) - self._pos + inner

    def __getattr__(self, name: str) -> Any:  # send, fileno, setblocking, close...: the socket's own
        return getattr(self._sock, name)


class Client(mqtt.Client):
    def _create_socket(self):
        sock = super()._create_socket()
        return sock if self._transport == "websockets" else _ReadBuffer(sock)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(self._sock, _ReadBuffer) and self._sock.pending():
            rc = super().loop_read(max_packets)
        return rc

    def ack_many(self, mids: Sequence[int]) -> MQTTErrorCode:
        """PUBACK each QoS 1 message id (`manual_ack=True`), all in one write.

        A QoS 0 message (id 0) has nothing to acknowledge: Mosquitto 2 takes a PUBACK for id 0 as a
        protocol error and drops the connection, and every message in flight is redelivered.
        """
        mids = [mid for mid in mids if mid]
        if not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        packet = b"".join(_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids)
        return self._packet_queue(mqtt.PUBACK, packet, mids[0], 1)
