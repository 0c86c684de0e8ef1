"""Ajax hubs' own protocol: a SIA DC-09 receiver (SIA-DCS and ADM-CID over TCP) in front of the forwarder.

A hub repeats each frame until its monitoring station answers ACK, so the ACK is this ingress's promise:
it goes out only once the frame's envelope was acknowledged by the site broker (FORWARDED), or the
frame was durably quarantined because no catalog type fits it (QUARANTINED: ACKed, or the hub would
resend it for ever). What the hub should send again gets a NAK and a quarantine entry: a CRC mismatch,
an unknown account, a frame that does not decrypt with its account's key, a plaintext frame for an
account that has a key, a timestamp outside DC-09's window (-40 s/+20 s, the anti-replay check). A code
the standard does not know is quarantined and answered DUH. When the broker does not acknowledge in
time (FAILED) the hub gets no answer at all and resends. Every frame is handled alone: whatever one
frame does, the connection and the frames after it go on.

pysiaalarm parses the frames, checks CRC and timestamp, decrypts (AES-CBC) and writes the ACK/DUH/NAK.
Its own servers answer before the callback has run, so the socket loop here is this module's.

Settings (environment only, keys never in files): `FORWARDER_SIA_ACCOUNTS="AAA=<key>,BBB"` (account
numbers, 3-16 hex digits, each with an optional AES key of 16, 24 or 32 characters),
`FORWARDER_SIA_HOST` (default 0.0.0.0), `FORWARDER_SIA_PORT` (default 7777).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime

from pysiaalarm import SIAAccount, SIAEvent
from pysiaalarm.errors import EventFormatError, NoAccountError
from pysiaalarm.event import NAKEvent, OHEvent
from pysiaalarm.utils import ResponseType

from edge_bridge.adapters.ajax import adapt_sia
from edge_bridge.adapters.base import AdapterRejected
from edge_bridge.envelope import utc_now
from edge_bridge.forwarder import Outcome
from edge_bridge.quarantine import PROCESSING_ERROR, error_detail

log = logging.getLogger(__name__)

ACCOUNTS_ENV = "FORWARDER_SIA_ACCOUNTS"
HOST_ENV = "FORWARDER_SIA_HOST"
PORT_ENV = "FORWARDER_SIA_PORT"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 7777
KEY_LENGTHS = (16, 24, 32)  # AES-128/192/256, the key's characters taken as its bytes
MAX_FRAME_BYTES = 4096  # far above any DC-09 frame; a longer run without CR is refused, not buffered
IDLE_TIMEOUT_S = 300.0  # a hub that keeps its connection open sends a periodic test well within this
# DC-09's timestamp window: a frame may be 40 s behind the receiver's clock, 20 s ahead.
TIMESTAMP_WINDOW_S = (40, 20)


class SiaAccountsError(ValueError):
    """A bad FORWARDER_SIA_ACCOUNTS entry; the message names the account, never a key."""


def parse_accounts(spec: str) -> dict[str, str | None]:
    """`"AAA=key1,BBB"` -> `{"AAA": "key1", "BBB": None}`: account numbers with their optional AES keys."""
    accounts: dict[str, str | None] = {}
    for i, entry in enumerate(part.strip() for part in spec.split(",")):
        if not entry:
            continue
        account, sep, key = (s.strip() for s in entry.partition("="))
        account = account.upper()
        if not (3 <= len(account) <= 16) or any(c not in "0123456789ABCDEF" for c in account):
            raise SiaAccountsError(f"{ACCOUNTS_ENV}[{i}]: account {account!r} is not 3-16 hex digits")
        if account in accounts:
            raise SiaAccountsError(f"{ACCOUNTS_ENV}[{i}]: account {account} is given twice")
        if sep and len(key) not in KEY_LENGTHS:
            raise SiaAccountsError(
                f"{ACCOUNTS_ENV}[{i}]: the key of account {account} has {len(key)} characters (16, 24 or 32)"
            )
        if sep and not all(" " < c <= "~" for c in key):
            raise SiaAccountsError(
                f"{ACCOUNTS_ENV}[{i}]: the key of account {account} holds characters other than printable ASCII"
            )
        accounts[account] = key if sep else None
    return accounts


def sia_ingress_from_env(forwarder, environ: Mapping[str, str] | None = None) -> SiaIngress | None:
    """The Ajax ingress as the environment configures it, or None when no SIA account is configured."""
    environ = os.environ if environ is None else environ
    accounts = parse_accounts(environ.get(ACCOUNTS_ENV, ""))
    if not accounts:
        return None
    return SiaIngress(
        forwarder, environ.get(HOST_ENV) or DEFAULT_HOST, int(environ.get(PORT_ENV) or DEFAULT_PORT), accounts
    )


class _Refused(Exception):
    """A frame turned down: its quarantine reason and the answer the hub gets (None: no answer)."""

    def __init__(self, reason: str, detail: str, response: bytes | None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.response = reason, detail, response


def _nak() -> bytes:
    """The library's framed NAK; it carries the receiver's time, by which a hub corrects its clock."""
    return NAKEvent().create_response()


class SiaIngress:
    """Receives DC-09 frames from Ajax hubs and answers each one only for what the forwarder did with it."""

    def __init__(
        self,
        forwarder,
        host: str,
        port: int,
        accounts: Mapping[str, str | None],
        publish_timeout: float = 10.0,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.forwarder = forwarder
        self.host = host
        self.requested_port = port
        self.publish_timeout = publish_timeout
        self.idle_timeout = idle_timeout
        self.accounts = {
            account.upper(): SIAAccount(
                account.upper(), key or None, allowed_timeband=TIMESTAMP_WINDOW_S, device_timezone=UTC
            )
            for account, key in accounts.items()
        }
        self.counts: Counter[str] = Counter()  # answers sent (ack/nak/duh/none) and refusals by reason
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one the system chose for port 0)."""
        return self._server.server_address[1] if self._server else self.requested_port

    def start(self) -> SiaIngress:
        ingress = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                ingress._serve_connection(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            block_on_close = False

        self._server = Server((self.host, self.requested_port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="sia-ingress", daemon=True
        )
        self._thread.start()
        log.info("SIA DC-09 receiver on %s:%d for %d account(s)", self.host, self.port, len(self.accounts))
        return self

    def stop(self) -> None:
        """Stop listening and close every hub connection; a frame being handled finishes unanswered or answered, never half."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def _serve_connection(self, conn: socket.socket, peer) -> None:
        """Frames end with CR (and start with LF); each is answered before the next is read."""
        conn.settimeout(self.idle_timeout)
        with self._lock:
            self._connections.add(conn)
        buffer, skipping = b"", False
        try:
            while True:
                try:
                    chunk = conn.recv(4096)
                except (TimeoutError, OSError):
                    return
                if not chunk:
                    return
                buffer += chunk
                while True:
                    end = buffer.find(b"\r")
                    if end < 0:
                        if len(buffer) > MAX_FRAME_BYTES:
                            if not skipping:
                                self._answer(
                                    conn,
                                    self._refuse(
                                        buffer[:MAX_FRAME_BYTES],
                                        _Refused("frame_too_long", f"no CR within {MAX_FRAME_BYTES} bytes", _nak()),
                                    ),
                                )
                            buffer, skipping = b"", True
                        break
                    frame, buffer = buffer[:end], buffer[end + 1 :]
                    if skipping:  # the tail of a frame already refused as too long
                        skipping = False
                        continue
                    frame = frame.strip(b"\n\r\x00 ")
                    if len(frame) > MAX_FRAME_BYTES:
                        response = self._refuse(
                            frame[:MAX_FRAME_BYTES],
                            _Refused("frame_too_long", f"{len(frame)} bytes (limit {MAX_FRAME_BYTES})", _nak()),
                        )
                    elif frame:
                        try:
                            response = self.handle_frame(frame)
                        except Exception:  # noqa: BLE001 - even a refusal that failed leaves the connection serving
                            log.exception("a SIA frame could not be handled; it goes unanswered")
                            response = None
                    else:
                        continue
                    if not self._answer(conn, response):
                        return
        finally:
            with self._lock:
                self._connections.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, conn: socket.socket, response: bytes | None) -> bool:
        if response is None:
            return True
        try:
            conn.sendall(response)
            return True
        except OSError:  # the hub hung up; it resends what it got no answer for
            return False

    def handle_frame(self, frame: bytes, received_at: datetime | None = None) -> bytes | None:
        """One frame (without its LF/CR) in, the bytes to answer out (None: no answer, the hub resends)."""
        received_at = received_at or utc_now()
        try:
            event = self._parse(frame)
            return self._forward(frame, event, received_at)
        except _Refused as refused:
            return self._refuse(frame, refused)
        except Exception as exc:  # noqa: BLE001 - one frame's unforeseen failure is its own, never the connection's
            log.exception("SIA frame failed unexpectedly")
            return self._refuse(frame, _Refused(PROCESSING_ERROR, error_detail("sia ingress", exc), _nak()))

    def _parse(self, frame: bytes) -> SIAEvent:
        line = frame.decode("ascii", errors="replace")
        encrypted = line[8:10] == '"*'
        try:
            event = SIAEvent.from_line(line, self.accounts)
        except NoAccountError:  # an encrypted frame for an account we do not know, or know without a key
            account = _account_of(line)
            if account not in self.accounts:
                raise _Refused("unknown_account", f"encrypted frame for account {account!r}", _nak()) from None
            raise _Refused(
                "undecryptable", f"encrypted frame for account {account}, which has no key here", _nak()
            ) from None
        except (EventFormatError, ValueError, UnicodeError) as exc:
            if encrypted and _account_of(line) in self.accounts:
                raise _Refused(
                    "undecryptable", f"account {_account_of(line)}: the content does not decrypt with its key", _nak()
                ) from None
            raise _Refused("bad_frame", f"not a SIA DC-09 frame: {type(exc).__name__}", _nak()) from None
        if isinstance(event, OHEvent):
            raise _Refused("bad_frame", "an Osborne-Hoffman line, not a DC-09 frame", _nak())
        if not event.valid_message:
            raise _Refused("crc_mismatch", f"CRC {event.msg_crc} sent, {event.calc_crc} computed", _nak())
        account = self.accounts.get(str(event.account or "").upper())
        if event.sia_account is None or account is None:
            raise _Refused("unknown_account", f"account {event.account!r}", _nak())
        if account.encrypted and not event.encrypted:
            raise _Refused("not_encrypted", f"plaintext frame for account {event.account}, which has a key", _nak())
        if event.encrypted and not isinstance(event.timestamp, datetime):
            raise _Refused("missing_timestamp", "an encrypted frame must carry its timestamp (DC-09)", _nak())
        if not event.valid_timestamp:
            raise _Refused(
                "timestamp_out_of_window",
                f"{event.timestamp} is outside -{TIMESTAMP_WINDOW_S[0]}/+{TIMESTAMP_WINDOW_S[1]} s",
                _nak(),
            )
        event.receiver = event.receiver or ""  # the library would echo a missing receiver as "None"
        if event.response == ResponseType.DUH:
            raise _Refused("unknown_code", f"code {event.code!r} is not a SIA event code", _answer_to(event))
        return event

    def _forward(self, frame: bytes, event: SIAEvent, received_at: datetime) -> bytes | None:
        try:
            envelope = adapt_sia(self.forwarder.site_id, event, received_at)
        except (
            AdapterRejected
        ) as exc:  # a valid frame no catalog type fits: kept, and ACKed so it is not resent for ever
            return self._refuse(frame, _Refused(exc.reason, exc.detail, _answer_to(event)), account=event.account)
        try:
            outcome = self.forwarder.publish(envelope, timeout=self.publish_timeout)
        except Exception:  # noqa: BLE001 - whatever the publish raised, the broker did not acknowledge it
            log.exception("publishing a SIA frame's envelope failed")
            outcome = Outcome.FAILED
        if outcome in (Outcome.FORWARDED, Outcome.QUARANTINED):
            return self._count("ack", _answer_to(event))
        log.warning(
            "broker did not acknowledge account %s frame %s in %.0f s: no answer, the hub resends",
            event.account,
            event.sequence,
            self.publish_timeout,
        )
        return self._count("none", None)

    def _refuse(self, frame: bytes, refused: _Refused, account: str | None = None) -> bytes | None:
        """Quarantine the frame; answer as refused only once the entry is durable, else say nothing."""
        account = account or _account_of(frame.decode("ascii", "replace")) or "unknown"
        with self._lock:
            self.counts[f"refused:{refused.reason}"] += 1
        log.warning("SIA frame from account %s refused: %s: %s", account, refused.reason, refused.detail[:200])
        try:
            outcome = self.forwarder.reject(f"sia/{account}", frame, refused.reason, refused.detail)
        except Exception:  # noqa: BLE001 - a quarantine that cannot write leaves the hub to resend
            log.exception("quarantining a SIA frame failed")
            outcome = Outcome.FAILED
        if outcome != Outcome.QUARANTINED:
            return self._count("none", None)
        return self._count(
            (response_kind(refused.response) or "none").lower() if refused.response else "none", refused.response
        )

    def _count(self, kind: str, response: bytes | None) -> bytes | None:
        with self._lock:
            self.counts[kind] += 1
        return response


def _answer_to(event: SIAEvent) -> bytes:
    """The library's ACK/DUH for a frame, made as if it carried no extended data: given any, the library
    would echo the account's key in a `[K…]` field, in plaintext on a DUH."""
    extended, event.extended_data = event.extended_data, None
    try:
        return event.create_response()
    finally:
        event.extended_data = extended


def _account_of(line: str) -> str | None:
    """The account a frame names (`#AAA[`), read without trusting anything else in it."""
    start = line.find("#")
    end = line.find("[", start + 1)
    if start < 0 or end < 0 or end - start > 17:
        return None
    account = line[start + 1 : end].upper()
    return account if account and all(c in "0123456789ABCDEF" for c in account) else None


# --- the hub's side, for the simulator and tests: frames as an Ajax hub sends them ---------------------


# The hub events the simulator plays (the relayed-JSON `eventCode`s of `adapters.ajax.EVENT_TYPES`) as the
# SIA code a hub reports each one with, and whether the frame's number is the zone (else 0: the hub, or a user).
HUB_EVENT_SIA_CODES = {
    "ARM": ("CL", False),
    "DISARM": ("OP", False),
    "NIGHT_MODE_ON": ("NL", False),
    "INTRUSION": ("BA", True),
    "PANIC": ("PA", True),
    "FIRE": ("FA", True),
    "SMOKE": ("FA", True),
    "LEAK": ("WA", True),
    "TAMPER": ("TA", True),
    "TAMPER_OPEN": ("TA", True),
    "BATTERY_LOW": ("XT", True),
    "CONNECTION_LOST": ("YC", False),
    "CONNECTION_RESTORED": ("YK", False),
    "PERIODIC_TEST": ("RP", False),
}


def build_frame(
    account: str,
    code: str,
    zone: int = 0,
    seq: int = 1,
    key: str | None = None,
    timestamp: datetime | None = None,
    area: int = 1,
) -> bytes:
    """One DC-09 frame, LF to CR, as a hub sends it.

    `code` is a SIA event code (`"BA"`: a SIA-DCS frame, `Nri<area>/<code><zone>`) or a four-digit
    Contact ID event with its qualifier (`"1130"`, `"3130"`: an ADM-CID frame, `<q><eee> <area> <zone>`).
    With `key` the content is AES-CBC encrypted (`*SIA-DCS`); the timestamp is now (UTC) unless given.
    """
    stamp = (timestamp or datetime.now(UTC)).astimezone(UTC).strftime("_%H:%M:%S,%m-%d-%Y")
    if len(code) == 4 and code.isdigit():
        token, content = "ADM-CID", f"#{account}|{code} {area:02d} {zone:03d}]{stamp}"
    else:
        token, content = "SIA-DCS", f"#{account}|Nri{area}/{code}{zone:03d}]{stamp}"
    if key:
        token, content = (
            "*" + token,
            SIAEvent(sia_account=SIAAccount(account, key)).encrypt_content(content[len(f"#{account}") :]),
        )
    body = f'"{token}"{seq % 10000:04d}L0#{account}[{content}'
    return f"\n{SIAEvent._crc_calc(body)}{len(body):04X}{body}\r".encode("ascii")


def response_kind(response: bytes) -> str | None:
    """`ACK`, `NAK`, `DUH` or `RSP` for a receiver's answer (encrypted ones too), None if it is none of them."""
    text = response.decode("ascii", "replace")
    start = text.find('"')
    end = text.find('"', start + 1)
    token = text[start + 1 : end].lstrip("*") if start >= 0 and end > start else ""
    return token if token in ("ACK", "NAK", "DUH", "RSP") else None


class HubConnection:
    """A hub's TCP connection to its receiver: send a frame, wait for the answer (None: none came in time)."""

    def __init__(self, host: str, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buffer = b""

    def send(self, frame: bytes, timeout: float | None = None) -> bytes | None:
        self.sock.sendall(frame)
        return self.read(timeout)

    def read(self, timeout: float | None = None) -> bytes | None:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\r" not in self._buffer:
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("the receiver closed the connection")
            self._buffer += chunk
        answer, self._buffer = self._buffer.split(b"\r", 1)
        return answer + b"\r"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HubConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
