"""The Ajax ingress: real DC-09 frames over real TCP; a hub is ACKed only for what the site broker acknowledged
(or the forwarder durably quarantined), NAKed for what it should send again, and one bad frame is its own fate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from Crypto.Cipher import AES

from devstack.processes import free_port, kill9
from edge_bridge.forwarder import Forwarder, Outcome
from edge_bridge.ingress.sia import (
    MAX_FRAME_BYTES,
    HubConnection,
    SiaAccountsError,
    SiaIngress,
    build_frame,
    parse_accounts,
    response_kind,
    sia_ingress_from_env,
)
from tests.conftest import PROJECT_ROOT, wait_until
from tests.helpers.forwarder import SiteSubscriber
from tests.helpers.sia import FORWARDER_PROCESS, KEY

SITE = "site-123"


# --- a forwarder stand-in, for the answers alone -----------------------------------------------------------


class FakeForwarder:
    """Records what the ingress hands on; `publish` answers `outcome`, after `gate` opens if one is set."""

    site_id = SITE

    def __init__(self) -> None:
        self.published, self.rejected = [], []
        self.outcome, self.reject_outcome = Outcome.FORWARDED, Outcome.QUARANTINED
        self.gate: threading.Event | None = None
        self.raises: Exception | None = None

    def publish(self, envelope, timeout: float = 10.0):
        self.published.append(envelope)
        if self.raises is not None:
            raise self.raises
        if self.gate is not None:
            self.gate.wait(timeout)
        return self.outcome

    def reject(self, source: str, raw: bytes, reason: str, detail: str = ""):
        self.rejected.append((source, raw, reason))
        return self.reject_outcome


@pytest.fixture
def fake():
    return FakeForwarder()


@pytest.fixture
def receiver(fake):
    ingress = SiaIngress(fake, "127.0.0.1", 0, {"A1B2C3": None, "BBB": KEY}).start()
    yield ingress
    ingress.stop()


def hub(ingress: SiaIngress) -> HubConnection:
    return HubConnection("127.0.0.1", ingress.port, timeout=5)


def test_a_frame_is_acked_only_once_the_forwarder_says_its_envelope_was_forwarded(receiver, fake):
    fake.gate = threading.Event()
    with hub(receiver) as conn:
        conn.sock.sendall(build_frame("A1B2C3", "RP", seq=1))
        wait_until(lambda: fake.published, 5, message="the frame's envelope handed to the forwarder")
        assert conn.read(timeout=0.5) is None, "answered before the forwarder said the broker had it"
        fake.gate.set()
        assert response_kind(conn.read()) == "ACK"
    assert fake.published[0].event_type == "device_heartbeat"


def test_a_frame_the_broker_did_not_acknowledge_gets_no_answer_and_its_resend_is_acked(receiver, fake):
    frame = build_frame("A1B2C3", "BA", zone=3, seq=2)
    fake.outcome = Outcome.FAILED
    with hub(receiver) as conn:
        assert conn.send(frame, timeout=1) is None
        fake.outcome = Outcome.FORWARDED
        assert response_kind(conn.send(frame)) == "ACK"
    first, resent = fake.published
    assert (first.event_id, first.idempotency_key) == (resent.event_id, resent.idempotency_key)


def stale(seconds: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "frame,answer,reason",
    [
        (lambda: build_frame("A1B2C3", "BA", seq=3).replace(b"BA", b"BB"), "NAK", "crc_mismatch"),
        (lambda: build_frame("FFF", "BA", seq=3), "NAK", "unknown_account"),
        (lambda: build_frame("FFF", "BA", seq=3, key=KEY), "NAK", "unknown_account"),
        (lambda: build_frame("A1B2C3", "BA", seq=3, key=KEY), "NAK", "undecryptable"),
        (lambda: build_frame("BBB", "BA", seq=3, key="the-wrong-key-16"), "NAK", "undecryptable"),
        (lambda: build_frame("BBB", "BA", seq=3), "NAK", "not_encrypted"),
        (lambda: build_frame("A1B2C3", "BA", seq=3, timestamp=stale(-120)), "NAK", "timestamp_out_of_window"),
        (lambda: build_frame("A1B2C3", "BA", seq=3, timestamp=stale(+60)), "NAK", "timestamp_out_of_window"),
        (lambda: b"\nnot a DC-09 frame at all\r", "NAK", "bad_frame"),
        (lambda: build_frame("A1B2C3", "ZX", seq=3), "DUH", "unknown_code"),
        (lambda: build_frame("A1B2C3", "GA", seq=3), "ACK", "unknown_event_type"),
    ],
    ids=[
        "crc",
        "unknown-account",
        "unknown-encrypted-account",
        "encrypted-for-a-plain-account",
        "wrong-key",
        "plaintext-for-a-keyed-account",
        "40s-old",
        "20s-ahead",
        "garbage",
        "unknown-code",
        "unmapped-code",
    ],
)
def test_a_refused_frame_is_quarantined_with_its_reason_and_answered_as_the_standard_says(
    receiver, fake, frame, answer, reason
):
    with hub(receiver) as conn:
        assert response_kind(conn.send(frame())) == answer
    assert [r for _, _, r in fake.rejected] == [reason] and fake.published == []


def test_an_encrypted_frame_with_the_right_key_is_acked_with_an_encrypted_ack(receiver, fake):
    with hub(receiver) as conn:
        answer = conn.send(build_frame("BBB", "1130", zone=4, seq=4, key=KEY))
    assert answer.startswith(b"\n") and b'"*ACK"0004L0#BBB[' in answer and response_kind(answer) == "ACK"
    assert decrypt(KEY, answer.split(b"[", 1)[1].rstrip(b"\r")).endswith(datetime.now(UTC).strftime(",%m-%d-%Y"))
    assert (fake.published[0].event_type, fake.published[0].device_id) == ("intrusion_alert", "ajax-BBB-zone-4")


def test_one_connection_carrying_good_and_bad_frames_back_to_back_has_each_answered_alone(receiver, fake):
    frames = [
        build_frame("A1B2C3", "BA", zone=1, seq=10),
        build_frame("A1B2C3", "BA", zone=2, seq=11).replace(b"BA", b"FA"),  # CRC no longer matches
        b"\n\x00\xff\xfe binary noise\r",
        b"\n" + b"9" * (MAX_FRAME_BYTES + 100) + b"\r",  # a run with no CR in sight
        build_frame("BBB", "TA", zone=5, seq=12, key=KEY),
        build_frame("A1B2C3", "RP", seq=13),
    ]
    with hub(receiver) as conn:
        conn.sock.sendall(b"".join(frames))
        answers = [response_kind(conn.read()) for _ in frames]
    assert answers == ["ACK", "NAK", "NAK", "NAK", "ACK", "ACK"]
    assert [e.payload["sequence"] for e in fake.published] == ["0010", "0012", "0013"]
    assert [r for _, _, r in fake.rejected] == ["crc_mismatch", "bad_frame", "frame_too_long"]


def test_a_run_of_bytes_without_a_cr_is_refused_once_and_the_frame_after_it_is_acked(receiver, fake):
    with hub(receiver) as conn:
        conn.sock.sendall(b"\n" + b"7" * (MAX_FRAME_BYTES + 1))
        assert response_kind(conn.read()) == "NAK"
        conn.sock.sendall(b"7" * MAX_FRAME_BYTES * 3 + b"\r")  # the rest of that run, dropped unread
        assert response_kind(conn.send(build_frame("A1B2C3", "RP", seq=14))) == "ACK"
    assert [r for _, _, r in fake.rejected] == ["frame_too_long"] and len(fake.published) == 1


def test_a_refusal_the_forwarder_could_not_quarantine_gets_no_answer(receiver, fake):
    fake.reject_outcome = Outcome.FAILED
    with hub(receiver) as conn:
        assert conn.send(build_frame("A1B2C3", "GA", seq=5), timeout=1) is None
        assert conn.send(build_frame("FFF", "BA", seq=5), timeout=1) is None


def test_a_forwarder_that_raises_leaves_the_frame_unanswered_and_the_connection_serving(receiver, fake):
    fake.raises = RuntimeError("boom")
    with hub(receiver) as conn:
        assert conn.send(build_frame("A1B2C3", "BA", seq=6), timeout=1) is None
        fake.raises = None
        assert response_kind(conn.send(build_frame("A1B2C3", "BA", seq=6))) == "ACK"


# --- frames built by hand from the standard, not by the library -------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16 as DC-09 specifies it (polynomial x^16 + x^15 + x^2 + 1, reflected, initial 0)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def decrypt(key: str, hex_text: bytes) -> str:
    return AES.new(key.encode(), AES.MODE_CBC, bytes(16)).decrypt(bytes.fromhex(hex_text.decode())).decode("ascii")


def hand_made_frame(account: str, content: str, seq: str, key: str | None = None) -> bytes:
    """LF, CRC, 0LLL, "id", seq, L0, #account, [data — AES-CBC with a zero IV over data padded at its front."""
    token = '"SIA-DCS"'
    if key:
        pad = 16 - len(content) % 16
        data = (
            AES.new(key.encode(), AES.MODE_CBC, bytes(16))
            .encrypt(("x" * (pad - 1) + "|" + content).encode())
            .hex()
            .upper()
        )
        token = '"*SIA-DCS"'
    else:
        data = f"#{account}|{content}"
    body = f"{token}{seq}L0#{account}[{data}".encode()
    return b"\n" + f"{crc16(body):04X}{len(body):04X}".encode() + body + b"\r"


def test_frames_built_by_hand_from_the_standard_are_understood_and_equal_the_modules_own(receiver, fake):
    now = datetime.now(UTC).replace(microsecond=0)
    stamp = now.strftime("_%H:%M:%S,%m-%d-%Y")
    assert hand_made_frame("A1B2C3", f"Nri1/WA007]{stamp}", "0077") == build_frame(
        "A1B2C3", "WA", zone=7, seq=77, timestamp=now
    )
    with hub(receiver) as conn:
        assert response_kind(conn.send(hand_made_frame("A1B2C3", f"Nri1/WA007]{stamp}", "0077"))) == "ACK"
        assert response_kind(conn.send(hand_made_frame("BBB", f"Nri2/FA001]{stamp}", "0078", key=KEY))) == "ACK"
    assert [(e.event_type, e.device_id, e.timestamp) for e in fake.published] == [
        ("water_leak", "ajax-A1B2C3-zone-7", now),
        ("fire_alarm", "ajax-BBB-zone-1", now),
    ]


@pytest.mark.parametrize("code,answer", [("BA", "ACK"), ("ZX", "DUH")])
def test_an_answer_to_a_frame_with_extended_data_never_carries_the_accounts_key(receiver, fake, code, answer):
    stamp = datetime.now(UTC).strftime("_%H:%M:%S,%m-%d-%Y")
    with hub(receiver) as conn:
        response = conn.send(hand_made_frame("BBB", f"Nri1/{code}001][M0026B9E4268B]{stamp}", "0090", key=KEY))
    assert response_kind(response) == answer and KEY.encode() not in response
    if answer == "ACK":
        assert KEY not in decrypt(KEY, response.split(b"[", 1)[1].rstrip(b"\r"))
        assert fake.published[0].payload["extended_data"] == {"M": "0026B9E4268B"}


# --- settings ------------------------------------------------------------------------------------------------


def test_accounts_and_optional_keys_come_from_one_environment_string():
    assert parse_accounts(" aaa=0123456789abcdef , BBB,") == {"AAA": "0123456789abcdef", "BBB": None}


@pytest.mark.parametrize(
    "spec,named", [("AAA=short", "account AAA has 5 characters"), ("XYZ", "'XYZ'"), ("AAA,aaa", "given twice")]
)
def test_a_bad_account_setting_is_named_without_its_key(spec, named):
    with pytest.raises(SiaAccountsError, match=named) as refused:
        parse_accounts(spec)
    assert "short" not in str(refused.value)


def test_no_configured_account_means_no_sia_receiver(fake):
    assert sia_ingress_from_env(fake, {}) is None
    ingress = sia_ingress_from_env(
        fake, {"FORWARDER_SIA_ACCOUNTS": "AAA", "FORWARDER_SIA_PORT": "7001", "FORWARDER_SIA_HOST": "127.0.0.1"}
    )
    assert (ingress.host, ingress.port, list(ingress.accounts)) == ("127.0.0.1", 7001, ["AAA"])


# --- against the real forwarder and a real Mosquitto ----------------------------------------------------------


@pytest.fixture
def site(mosquitto, tmp_path):
    forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path)
    subscriber = SiteSubscriber(mosquitto.port, client_id="sia-test-subscriber")
    ingress = SiaIngress(forwarder, "127.0.0.1", 0, {"A1B2C3": None, "BBB": KEY}, publish_timeout=2).start()
    yield ingress, forwarder, subscriber
    ingress.stop()
    subscriber.close()
    forwarder.close()


def test_frames_reach_the_site_broker_and_an_ack_never_precedes_the_broker_ack_even_across_an_outage(site, mosquitto):
    ingress, _, subscriber = site
    with hub(ingress) as conn:
        assert response_kind(conn.send(build_frame("A1B2C3", "RP", seq=1))) == "ACK"
        wait_until(lambda: subscriber.messages, 10, message="the periodic test at the broker")
        assert subscriber.topics == [f"sites/{SITE}/events/ajax/device_heartbeat"]

        mosquitto.stop()
        alarm = build_frame("A1B2C3", "BA", zone=3, seq=2)
        assert conn.send(alarm, timeout=4) is None, "ACKed while the broker was down"
        mosquitto.start()
        answer = wait_until(
            lambda: conn.send(alarm, timeout=3), 30, message="the hub's resend ACKed once the broker is back"
        )
        assert response_kind(answer) == "ACK"
    wait_until(
        lambda: any(m["event_type"] == "intrusion_alert" for m in subscriber.messages),
        15,
        message="the alarm at the broker",
    )
    alarms = [m for m in subscriber.messages if m["event_type"] == "intrusion_alert"]
    assert {(m["device_id"], m["event_id"]) for m in alarms} == {
        ("ajax-A1B2C3-zone-3", alarms[0]["event_id"])
    }  # resends are one event


def test_a_crc_broken_frame_is_naked_quarantined_and_never_published(site, tmp_path):
    ingress, forwarder, subscriber = site
    broken = build_frame("A1B2C3", "FA", zone=1, seq=3).replace(b"FA", b"BA")
    with hub(ingress) as conn:
        assert response_kind(conn.send(broken)) == "NAK"
        assert response_kind(conn.send(build_frame("A1B2C3", "RP", seq=4))) == "ACK"
    wait_until(lambda: subscriber.messages, 10, message="the frame after the broken one at the broker")
    assert [m["event_type"] for m in subscriber.messages] == ["device_heartbeat"]
    entries = [
        json.loads(line) for path in tmp_path.glob("*quarantine*.jsonl") for line in path.read_text().splitlines()
    ]
    assert [e["reason"] for e in entries] == ["crc_mismatch"]


def test_an_encrypted_frame_with_the_right_key_arrives_and_one_with_a_wrong_key_is_refused(site):
    ingress, _, subscriber = site
    with hub(ingress) as conn:
        assert response_kind(conn.send(build_frame("BBB", "BA", zone=9, seq=5, key="0123456789abcdef"))) == "NAK"
        assert response_kind(conn.send(build_frame("BBB", "BA", zone=9, seq=6, key=KEY))) == "ACK"
    wait_until(lambda: subscriber.messages, 10, message="the encrypted alarm at the broker")
    assert [(m["device_id"], m["payload"]["sequence"], m["payload"]["encrypted"]) for m in subscriber.messages] == [
        ("ajax-BBB-zone-9", "0006", True)
    ]


class Hub(threading.Thread):
    """An Ajax hub: sends numbered frames one after another, resending a frame until it is ACKed."""

    def __init__(self, account: str, port: int, stop: threading.Event, key: str | None = None) -> None:
        super().__init__(daemon=True)
        self.account, self.port, self.stop_event, self.key = account, port, stop, key
        self.acked: list[int] = []
        self.attempts = 0

    def run(self) -> None:
        seq, conn, frame = 1, None, None
        while not self.stop_event.is_set():
            frame = frame or build_frame(self.account, "BA", zone=seq % 50 + 1, seq=seq, key=self.key)
            try:
                conn = conn or HubConnection("127.0.0.1", self.port, timeout=3)
                self.attempts += 1
                answer = conn.send(frame)
            except OSError:
                conn = None
                time.sleep(0.1)  # a hub's reconnect pause, not a synchronisation
                continue
            kind = response_kind(answer) if answer is not None else None
            if kind == "ACK":
                self.acked.append(seq)
                seq, frame = seq + 1, None
            elif kind is not None:  # NAK: the same event again, stamped anew
                frame = None


def test_every_frame_acked_before_a_kill_9_of_the_forwarder_is_at_the_broker(mosquitto, tmp_path):
    """Hubs send without pause; the broker goes down so frames are in flight, the forwarder is killed -9."""
    sia_port = free_port()
    accounts = {"A1A1": None, "B2B2": None, "C3C3": KEY}
    env = {
        **os.environ,
        "SITE": SITE,
        "MQTT_PORT": str(mosquitto.port),
        "STATE_DIR": str(tmp_path / "state"),
        "FORWARDER_SIA_PORT": str(sia_port),
        "FORWARDER_SIA_ACCOUNTS": "A1A1,B2B2,C3C3=" + KEY,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }

    def start_forwarder() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", FORWARDER_PROCESS],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        assert proc.stdout.readline().strip() == "READY"
        return proc

    subscriber = SiteSubscriber(mosquitto.port, client_id="sia-kill-subscriber")
    proc = start_forwarder()
    stop = threading.Event()
    hubs = [Hub(account, sia_port, stop, key) for account, key in accounts.items()]
    try:
        for h in hubs:
            h.start()
        wait_until(lambda: sum(len(h.acked) for h in hubs) >= 150, 60, message="150 frames ACKed")
        mosquitto.stop()  # what the forwarder publishes now waits in its memory, unacknowledged
        marks = [h.attempts for h in hubs]
        wait_until(
            lambda: all(h.attempts >= n + 2 for h, n in zip(hubs, marks)),
            30,
            message="every hub sending while the broker is down",
        )
        kill9(proc)
        acked_before_kill = {(h.account, seq) for h in hubs for seq in h.acked}
        mosquitto.start()
        proc = start_forwarder()  # the hubs' resends now go through
        counts = [len(h.acked) for h in hubs]
        wait_until(lambda: all(len(h.acked) > n for h, n in zip(hubs, counts)), 60, message="every hub ACKed again")
    finally:
        stop.set()
        for h in hubs:
            h.join(10)
        kill9(proc)

    def missing() -> set:
        return acked_before_kill - {
            (m["payload"]["account"], int(m["payload"]["sequence"])) for m in list(subscriber.messages)
        }

    try:
        wait_until(lambda: not missing(), 30, message="every frame ACKed before the kill at the broker")
    finally:
        subscriber.close()
    assert len(acked_before_kill) >= 150
