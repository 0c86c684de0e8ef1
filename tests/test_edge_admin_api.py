"""The edge admin API against a real running service: POSTs need the token, browsers and bad input are refused.

Every refusal is asked of the same two running services (one with a token, one without), so the many
small cases cost one start-up; the CLI and the replay job are tested with the token from the environment.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import sys
import time
from urllib.parse import urlsplit

import boto3
import pytest
import requests

from devstack.processes import AwsEmulator, Mosquitto, aws_env, free_port
from edge_bridge.admin import MAX_DLQ_LIMIT, MAX_REQUEST_BYTES
from tests.conftest import PROJECT_ROOT, EdgeProcess

EVENT = {"event_type": "check_in", "payload": {"user": "u-17"}, "device_id": "kiosk-1"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A broker, the SQS endpoint and two edge services: `guarded` has a token, `unguarded` none."""
    workdir = tmp_path_factory.mktemp("admin-api")
    broker = Mosquitto(workdir / "mosquitto").start()
    emulator = AwsEmulator().start()
    started: list[EdgeProcess] = []
    try:
        aws = aws_env(emulator.endpoint_url)
        sqs = boto3.client(
            "sqs", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=aws["AWS_REGION"],
            aws_access_key_id=aws["AWS_ACCESS_KEY_ID"], aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        queue_url = sqs.create_queue(QueueName="events")["QueueUrl"]
        base = {k: v for k, v in os.environ.items() if k != "EDGE_ADMIN_TOKEN"}
        for name, token in [("guarded", secrets.token_urlsafe(24)), ("unguarded", None)]:
            env = {
                **base,
                **aws,
                "EDGE_MQTT_HOST": "127.0.0.1",
                "EDGE_MQTT_PORT": str(broker.port),
                "EDGE_CLIENT_ID": f"edge-admin-{name}",
                "EDGE_STATE_DIR": str(workdir / name / "state"),
                "EDGE_EVENTS_QUEUE_URL": queue_url,
                "EDGE_ADMIN_PORT": str(free_port()),
                "EDGE_SENDER_PROCESSES": "1",
                "PYTHONUNBUFFERED": "1",
                **({"EDGE_ADMIN_TOKEN": token} if token else {}),
            }
            started.append(EdgeProcess(workdir / name, env).start())
        for edge in started:
            edge.wait_subscribed()
        yield dict(zip(["guarded", "unguarded"], started))
    finally:
        for edge in started:
            edge.stop()
        emulator.stop()
        broker.stop()


@pytest.fixture
def edge(services) -> EdgeProcess:
    return services["guarded"]


def raw_post(
    edge: EdgeProcess, path: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b""
) -> tuple[int, dict]:
    """A POST with exactly these headers (none added), for what requests would not send."""
    url = urlsplit(edge.admin_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def events_emitted(edge: EdgeProcess) -> float:
    text = requests.get(edge.admin_url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("edge_internal_events_total"))


@pytest.mark.parametrize("path", ["/events", "/dlq/replay"])
def test_posts_are_refused_while_the_service_has_no_admin_token(services, path):
    response = services["unguarded"].post(path, EVENT, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "disabled until EDGE_ADMIN_TOKEN is set" in response.json()["error"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong-token", "Basic {token}", "Bearer {token}x", "Bearer {short}"],
    ids=["missing", "empty", "scheme-only", "blank-token", "wrong", "basic-scheme", "token-plus-one", "token-prefix"],
)
def test_a_post_with_a_missing_or_wrong_token_is_refused_with_401_and_emits_nothing(edge, authorization):
    before = events_emitted(edge)
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization.format(token=edge.admin_token, short=edge.admin_token[:-1])
    body = json.dumps(EVENT).encode()
    status, reply = raw_post(edge, "/events", {**headers, "Content-Length": str(len(body))}, body)
    assert (status, reply["error"]) == (
        401,
        "missing or wrong admin token: send Authorization: Bearer $EDGE_ADMIN_TOKEN",
    )
    assert edge.post("/dlq/replay", headers={"Authorization": headers.get("Authorization", "")}).status_code == 401
    assert events_emitted(edge) == before


def test_a_post_with_the_token_is_accepted(edge):
    response = edge.post("/events", EVENT)
    assert response.status_code == 202, response.text
    assert set(response.json()) == {"event_id", "idempotency_key"}
    assert edge.post("/dlq/replay").json() == {"replayed": 0}


@pytest.mark.parametrize(
    "method, path, browser_headers",
    [
        ("POST", "/events", {"Origin": "https://evil.example"}),
        ("POST", "/dlq/replay", {"Origin": "null"}),
        ("POST", "/dlq/replay", {"Sec-Fetch-Site": "cross-site"}),
        ("POST", "/events", {"Sec-Fetch-Site": "same-site"}),
        ("GET", "/dlq", {"Origin": "http://127.0.0.1:8080"}),
        ("GET", "/status", {"Sec-Fetch-Site": "cross-site"}),
    ],
)
def test_a_request_a_browser_sent_for_another_origin_is_refused_even_with_the_token(
    edge, method, path, browser_headers
):
    before = events_emitted(edge)
    if method == "POST":
        response = edge.post(path, EVENT, headers=browser_headers)
    else:
        response = requests.get(edge.admin_url + path, headers=browser_headers, timeout=10)
    assert response.status_code == 403
    assert "cross-origin requests are refused" in response.json()["error"]
    assert events_emitted(edge) == before


@pytest.mark.parametrize("fetch_site", ["same-origin", "none"])
def test_a_request_the_user_made_directly_in_a_browser_is_answered(edge, fetch_site):
    response = requests.get(edge.admin_url + "/status", headers={"Sec-Fetch-Site": fetch_site}, timeout=10)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_post_body_not_declared_as_json_is_refused_with_415(edge, content_type):
    body = json.dumps(EVENT).encode()
    headers = {"Authorization": f"Bearer {edge.admin_token}", "Content-Length": str(len(body))}
    if content_type:
        headers["Content-Type"] = content_type
    status, reply = raw_post(edge, "/events", headers, body)
    assert status == 415 and "Content-Type must be application/json" in reply["error"]


def test_json_with_a_charset_parameter_is_accepted(edge):
    response = edge.post("/events", EVENT, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 202, response.text


def test_an_oversized_body_is_refused_with_413_before_any_of_it_is_read(edge):
    """The service declares the body too big from its Content-Length: it never waits for the bytes, so it answers at once."""
    declared = MAX_REQUEST_BYTES + 1
    headers = {
        "Authorization": f"Bearer {edge.admin_token}",
        "Content-Type": "application/json",
        "Content-Length": str(declared),
    }
    started = time.monotonic()
    status, reply = raw_post(edge, "/events", headers, b'{"event_type": ')
    assert (status, reply["error"]) == (
        413,
        f"request body of {declared} bytes is over the limit of {MAX_REQUEST_BYTES} bytes",
    )
    assert time.monotonic() - started < 5


def test_a_post_with_a_body_but_no_content_length_is_refused_with_411(edge):
    response = requests.post(
        edge.admin_url + "/events",
        data=iter([json.dumps(EVENT).encode()]),  # a generator: requests sends it chunked, with no Content-Length
        headers={"Authorization": f"Bearer {edge.admin_token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 411 and "Content-Length" in response.json()["error"]


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "12, 12", ""])
def test_a_malformed_content_length_is_refused_with_400(edge, length):
    headers = {
        "Authorization": f"Bearer {edge.admin_token}",
        "Content-Type": "application/json",
        "Content-Length": length,
    }
    status, reply = raw_post(edge, "/events", headers, b"{}")
    assert status == 400 and "malformed Content-Length" in reply["error"]


def test_a_content_length_given_twice_is_refused_with_400(edge):
    headers = [
        ("Authorization", f"Bearer {edge.admin_token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", "2"),
        ("Content-Length", "40"),
    ]
    assert raw_post(edge, "/events", headers, b"{}") == (400, {"error": "Content-Length given more than once"})


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "a JSON body is required"),
        (b'{"event_type": "check_in"', "invalid JSON"),
        (b'{"event_type": "\xc3\x28"}', "invalid JSON"),
        (b'{"event_type": "check_in", "payload": {"t": NaN}}', "invalid JSON: NaN is not a JSON number"),
        (b"[" * 200_000 + b"]" * 200_000, "invalid JSON: nested too deeply"),
        (b'["check_in"]', "expected a JSON object with a string event_type"),
        (b'{"event_type": 7}', "expected a JSON object with a string event_type"),
        (b'{"event_type": "check_in", "payload": [1]}', "payload must be a JSON object"),
        (b'{"event_type": "check_in", "device_id": {"x": 1}}', "device_id must be a string"),
    ],
    ids=[
        "empty",
        "truncated",
        "not-utf8",
        "nan",
        "deep",
        "array",
        "event-type-number",
        "payload-list",
        "device-id-object",
    ],
)
def test_invalid_json_or_fields_are_refused_with_400_and_the_reason(edge, body, reason):
    before = events_emitted(edge)
    headers = {
        "Authorization": f"Bearer {edge.admin_token}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    status, reply = raw_post(edge, "/events", headers, body)
    assert status == 400 and reason in reply["error"], reply
    assert events_emitted(edge) == before


@pytest.mark.parametrize(
    "query",
    ["limit=abc", "limit=-1", "limit=0", f"limit={MAX_DLQ_LIMIT + 1}", "limit=99999999999999999999999", "limit=1.5",
     "limit=", "limit=%205", "limit=1&limit=2", "limt=5", "limit"],
)  # fmt: skip
def test_a_bad_dlq_query_gets_400_with_a_json_error(edge, query):
    response = requests.get(f"{edge.admin_url}/dlq?{query}", timeout=10)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert "limit" in response.json()["error"] or "query" in response.json()["error"]


@pytest.mark.parametrize("query", ["", "?limit=1", f"?limit={MAX_DLQ_LIMIT}"])
def test_good_dlq_queries_are_answered_without_a_token(edge, query):
    response = requests.get(f"{edge.admin_url}/dlq{query}", timeout=10)
    assert response.status_code == 200 and response.json() == []


def test_the_read_endpoints_stay_open_without_a_token(services):
    for edge in services.values():
        for path in ["/metrics", "/healthz", "/status", "/dlq"]:
            assert requests.get(edge.admin_url + path, timeout=10).status_code == 200, (edge.workdir.name, path)


def cli(edge: EdgeProcess, *args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_ADMIN_TOKEN"} | (
        {"EDGE_ADMIN_TOKEN": token} if token else {}
    )
    command = [sys.executable, "-m", "edge_bridge.cli", "--admin-url", edge.admin_url, *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_cli_emits_and_replays_with_the_token_from_its_environment(edge):
    emitted = cli(edge, "emit", "check_in", "--payload", '{"user": "u-17"}', token=edge.admin_token)
    assert emitted.returncode == 0, emitted.stderr
    assert json.loads(emitted.stdout)["event_id"]
    replayed = cli(edge, "dlq", "replay", token=edge.admin_token)
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed 0 events from the DLQ")


def test_the_cli_without_the_token_says_why_the_service_refused(edge):
    refused = cli(edge, "dlq", "replay", token=None)
    assert refused.returncode == 2
    assert "401" in refused.stderr and "EDGE_ADMIN_TOKEN is not set in this environment" in refused.stderr
