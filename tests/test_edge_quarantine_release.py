"""An operator lists what the edge quarantined and releases an entry once its cause is fixed.

The release goes back through the service's own intake, so it is validated, sent (or spilled to the
retry log) and acked like any message; one that would only be refused again is not released, and says why.
"""

from __future__ import annotations

import json
import secrets

import pytest
import requests

import edge_bridge.envelope as envelope_module
from devstack.processes import free_port
from edge_bridge.cli import AdminClient
from edge_bridge.cli import main as cli_main
from tests.conftest import receive_all, sample_envelope, wait_until
from tests.test_edge_poison import edge_service, publish_mixed, quarantine_entries, run  # noqa: F401 - the fixture


def test_a_quarantined_message_is_released_once_its_cause_is_fixed_and_not_before(
    edge_service, mosquitto, aws, monkeypatch, capsys
):  # noqa: F811
    token = secrets.token_urlsafe(16)
    service = run(edge_service(admin_port=free_port(), admin_token=token))
    client = AdminClient(f"http://127.0.0.1:{service.config.admin_port}", token=token)
    newer = json.loads(sample_envelope(site_id="site-a", device_id="new-firmware").to_json())
    newer["schema_version"] = "2.0"
    stray = sample_envelope(site_id="site-b", device_id="wrong-topic")
    publish_mixed(
        mosquitto.port,
        [
            ("sites/site-a/events/ajax/door_access", json.dumps(newer), 1),
            ("sites/site-a/events/ajax/door_access", stray.to_json(), 1),
        ],
    )
    wait_until(lambda: len(quarantine_entries(service.quarantine.path)) == 2, 30, message="both in quarantine")

    listed = client.quarantine_list()
    assert [(e["reason"], e["released"]) for e in listed] == [("site_mismatch", False), ("unsupported_major", False)]
    assert [e["reason"] for e in client.quarantine_list(reason="unsupported_major")] == ["unsupported_major"]
    newer_ref = listed[1]["ref"]

    # Before the fix: refused, with the reason, and nothing recorded.
    with pytest.raises(requests.HTTPError, match="409.*unsupported_major"):
        client.quarantine_release(newer_ref)

    # The fix ships (this code learns major 2): released through the intake, into SQS, once.
    monkeypatch.setattr(envelope_module, "SUPPORTED_MAJORS", frozenset({1, 2}))
    done = client.quarantine_release(newer_ref)
    assert (done["site_id"], done["event_id"]) == ("site-a", newer["event_id"])
    assert [m["event_id"] for m in receive_all(aws.provisioned.queues["events"], timeout=2)] == [newer["event_id"]]
    assert [(e["reason"], e["released"]) for e in client.quarantine_list()] == [
        ("site_mismatch", False),
        ("unsupported_major", True),
    ]
    with pytest.raises(requests.HTTPError, match="409.*released already"):
        client.quarantine_release(newer_ref)

    # The CLI says the same to an operator; a site mismatch stays refused.
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", token)
    assert cli_main(["--admin-url", client.base_url, "quarantine", "release", listed[0]["ref"]]) == 1
    assert "site_mismatch" in capsys.readouterr().err
    assert cli_main(["--admin-url", client.base_url, "quarantine", "list"]) == 0
    assert [line.split("\t")[3] for line in capsys.readouterr().out.splitlines()] == ["held", "released"]


def test_bad_quarantine_requests_get_a_400_or_404_that_says_why(edge_service, mosquitto, aws):  # noqa: F811
    token = secrets.token_urlsafe(16)
    service = run(edge_service(admin_port=free_port(), admin_token=token))
    base = f"http://127.0.0.1:{service.config.admin_port}"
    for query in ("limit=0", "limit=abc", "reason=DROP%20TABLE", "limit=1&limit=2", "color=red"):
        assert requests.get(f"{base}/quarantine?{query}", timeout=5).status_code == 400, query
    headers = {"Authorization": f"Bearer {token}"}
    for ref in ("quarantine.jsonl:1", "../../etc/passwd:1", "retry_log.duckdb:1", "quarantine.jsonl:x"):
        response = requests.post(f"{base}/quarantine/release", json={"ref": ref}, headers=headers, timeout=5)
        assert response.status_code == 404 and response.json()["error"], ref
    assert requests.post(f"{base}/quarantine/release", json={"ref": "quarantine.jsonl:1"}, timeout=5).status_code == 401
