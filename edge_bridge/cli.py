"""`python -m edge_bridge.cli status | dlq list | dlq replay | quarantine list | quarantine release | emit | retry-log check`: operate a running edge service.

Everything goes through the service's admin API (`EDGE_ADMIN_URL`, default http://127.0.0.1:9108),
because the service alone may write its DuckDB retry log; `retry-log check` alone reads the file, read-only. `dlq replay` and `emit` change the service's
state, so they send the service's token from `EDGE_ADMIN_TOKEN` (kept out of the command line, where
any local user could read it in the process list).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests


class AdminClient:
    """The admin API over HTTP; the POST endpoints send `EDGE_ADMIN_TOKEN` (read when the client is made) as a bearer token."""

    def __init__(self, base_url: str | None = None, timeout: float = 30.0, token: str | None = None) -> None:
        self.base_url = (base_url or os.environ.get("EDGE_ADMIN_URL") or "http://127.0.0.1:9108").rstrip("/")
        self.timeout = timeout
        self.token = token or os.environ.get("EDGE_ADMIN_TOKEN") or None

    def _get(self, path: str, **params) -> requests.Response:
        return requests.get(self.base_url + path, params=params, timeout=self.timeout)

    def _post(self, path: str, body: dict | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = requests.post(self.base_url + path, json=body, headers=headers, timeout=self.timeout)
        self._raise_for_status(response)
        return response

    def _raise_for_status(self, response: requests.Response) -> None:
        """Like raise_for_status, with the service's own reason, so an operator reads why it refused."""
        if response.ok:
            return
        try:
            reason = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            reason = response.text[:200] or response.reason
        if response.status_code in (401, 403) and not self.token:
            reason += " (EDGE_ADMIN_TOKEN is not set in this environment)"
        raise requests.HTTPError(f"{response.status_code} from {response.url}: {reason}", response=response)

    def status(self) -> dict:
        response = self._get("/status")
        self._raise_for_status(response)
        return response.json()

    def health(self) -> tuple[bool, dict]:
        response = self._get("/healthz")
        return response.status_code == 200, response.json()

    def dlq_list(self, limit: int = 100) -> list[dict]:
        response = self._get("/dlq", limit=limit)
        self._raise_for_status(response)
        return response.json()

    def dlq_replay(self) -> int:
        return int(self._post("/dlq/replay").json()["replayed"])

    def quarantine_list(self, limit: int = 50, reason: str | None = None) -> list[dict]:
        response = self._get("/quarantine", limit=limit, **({"reason": reason} if reason else {}))
        self._raise_for_status(response)
        return response.json()

    def quarantine_release(self, ref: str) -> dict:
        return self._post("/quarantine/release", {"ref": ref}).json()

    def emit(self, event_type: str, payload: dict, device_id: str = "edge-service") -> dict:
        return self._post("/events", {"event_type": event_type, "payload": payload, "device_id": device_id}).json()


def check_retry_log(path: str | None, client: AdminClient) -> int:
    """Print what an integrity read of the retry log finds; 0 ok, 1 corrupt, 2 not checked.

    The service holds the file's lock while it runs, and DuckDB lets no reader in beside a writer: then
    this says so and prints what the service found when it checked the file at its start.
    """
    from edge_bridge.config import EdgeConfig
    from edge_bridge.retry_log_salvage import CORRUPT, LOCKED, OK, check, moved_aside

    target = Path(path) if path else EdgeConfig.from_env().state_dir / "retry_log.duckdb"
    result = check(target)
    print(f"retry log {target}: {result.status}{': ' + result.reason if result.reason else ''}")
    print(f"  size: {result.size_bytes} bytes, write-ahead log {result.wal_bytes} bytes")
    if result.status in (OK, CORRUPT):
        for name, table in sorted(result.tables.items()):
            rows = "rows unknown" if table.rows is None else f"{table.rows} rows"
            print(f"  {name}: {rows}{', unreadable: ' + table.error if table.error else ''}")
        print(f"  pending jobs: {_count(result.pending_jobs)}, DLQ rows: {_count(result.dlq_rows)}")
    for aside in moved_aside(target):
        print(f"  moved aside earlier: {aside}")
    if result.status == OK:
        return 0
    if result.status == CORRUPT:
        return 1
    if result.status == LOCKED:
        print("  the file is held by a running edge service; stop it to read the file, or see its view:")
        try:
            status = client.status()
        except requests.RequestException as exc:
            print(f"  (its admin API is unreachable at {client.base_url}: {exc})")
        else:
            start = status.get("retry_log_check", {})
            print(
                f"  service: pending jobs {status['jobs_pending']}, DLQ rows {status['dlq_size']}, "
                f"{status['retry_log_bytes']} bytes; its start-up check: {json.dumps(start)}"
            )
    return 2


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_bridge.cli", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin-url", help="admin API of the edge service (default: $EDGE_ADMIN_URL or http://127.0.0.1:9108)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="counts: pending jobs, DLQ size, SQS reachability, retry log fill")
    dlq = commands.add_parser("dlq", help="the local DLQ").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="dead letters with their last error")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq.add_parser("replay", help="put every dead letter back in line for delivery")
    quarantine = commands.add_parser("quarantine", help="what the service refused, and why").add_subparsers(
        dest="quarantine_command", required=True
    )
    quarantine_list = quarantine.add_parser("list", help="newest first: ref, time, reason, topic, detail")
    quarantine_list.add_argument("--limit", type=int, default=50)
    quarantine_list.add_argument("--reason")
    quarantine_release = quarantine.add_parser(
        "release", help="send entries back through the intake once their cause is fixed"
    )
    quarantine_release.add_argument(
        "refs", nargs="+", help="as `quarantine list` prints them, e.g. quarantine.jsonl:12"
    )
    emit = commands.add_parser("emit", help="an internal event (check-in, job, robot action)")
    emit.add_argument("event_type")
    emit.add_argument("--payload", default="{}", help="JSON object")
    emit.add_argument("--device-id", default="edge-service")
    retry_log = commands.add_parser("retry-log", help="the DuckDB retry log file").add_subparsers(
        dest="retry_log_command", required=True
    )
    retry_log_check = retry_log.add_parser(
        "check", help="read every row, read-only: ok or corrupt (exit 1), rows per table, size"
    )
    retry_log_check.add_argument("--path", help="default: $EDGE_STATE_DIR/retry_log.duckdb")
    args = parser.parse_args(argv)
    if args.command == "retry-log":
        return check_retry_log(args.path, AdminClient(args.admin_url))

    client = AdminClient(args.admin_url)
    try:
        if args.command == "status":
            ok, status = client.health()
            print(json.dumps(status, indent=2))
            return 0 if ok else 1
        if args.command == "dlq" and args.dlq_command == "list":
            for letter in client.dlq_list(args.limit):
                print(
                    f"{letter['event_id']}  attempts={letter['attempts']}  bytes={letter['body_bytes']}  {letter['last_error']}"
                )
            return 0
        if args.command == "dlq" and args.dlq_command == "replay":
            print(f"replayed {client.dlq_replay()} events from the DLQ")
            return 0
        if args.command == "emit":
            print(json.dumps(client.emit(args.event_type, json.loads(args.payload), args.device_id)))
            return 0
        if args.command == "quarantine" and args.quarantine_command == "list":
            for entry in client.quarantine_list(args.limit, args.reason):
                state = "released" if entry.get("released") else "held"
                print(
                    f"{entry['ref']}\t{entry.get('quarantined_at', '-')}\t{entry.get('reason', '-')}\t{state}\t{entry.get('topic', '-')}\t{entry.get('detail', '')[:100]}"
                )
            return 0
        if args.command == "quarantine" and args.quarantine_command == "release":
            refused = 0
            for ref in args.refs:
                try:
                    done = client.quarantine_release(ref)
                    print(f"released {ref}: event {done['site_id']}/{done['event_id']} is in SQS or the retry log")
                except requests.HTTPError as exc:
                    refused += 1
                    print(f"not released {ref}: {exc}", file=sys.stderr)
            return 1 if refused else 0
    except requests.HTTPError as exc:
        print(f"edge service admin API refused: {exc}", file=sys.stderr)
        return 2
    except requests.RequestException as exc:
        print(f"edge service admin API unreachable at {client.base_url}: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
