"""The DuckDB retry log on its own: attempts, backoff, the DLQ after three failures, replay, reopening,
priorities (high first, each site's order kept) and the migration of a file from before priorities."""

from __future__ import annotations

import json
import threading

import duckdb

from edge_bridge.retry_log import RetryLog


def jobs(n: int, prefix: str = "e") -> list[tuple[str, str, str]]:
    return [(f"{prefix}-{i}", f'{{"event_id": "{prefix}-{i}"}}', "ConnectionRefused") for i in range(n)]


def test_a_job_moves_to_the_dlq_after_its_third_failed_retry_with_its_last_error(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=1.0)
    log.add(jobs(1), now=100.0)
    for attempt, now in enumerate([100.0, 101.0, 103.0], start=1):
        [job] = log.due(10, now=now)
        assert job.attempts == attempt - 1
        log.record([], [(job.job_id, f"failure {attempt}")], now=now)
    assert (log.pending, log.dlq_size) == (0, 1)
    [letter] = log.dead_letters()
    assert (letter.event_id, letter.attempts, letter.last_error) == ("e-0", 3, "failure 3")


def test_backoff_doubles_so_a_failed_job_is_not_due_before_its_time(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=2.0)
    log.add(jobs(1), now=0.0)
    [job] = log.due(10, now=0.0)
    log.record([], [(job.job_id, "x")], now=10.0)  # next at 10 + 2
    assert log.due(10, now=11.9) == []
    [job] = log.due(10, now=12.0)
    log.record([], [(job.job_id, "x")], now=12.0)  # next at 12 + 4
    assert log.due(10, now=15.9) == [] and len(log.due(10, now=16.0)) == 1


def test_closing_a_job_removes_it_and_replay_puts_dead_letters_back_with_fresh_attempts(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=0.0, max_attempts=1)
    log.add(jobs(3), now=0.0)
    due = log.due(10, now=0.0)
    assert log.record([due[0].job_id], [(j.job_id, "refused") for j in due[1:]], now=0.0) == 2
    assert (log.pending, log.dlq_size) == (0, 2)
    assert log.replay_dlq(now=5.0) == 2
    assert sorted((j.event_id, j.attempts) for j in log.due(10, now=5.0)) == [("e-1", 0), ("e-2", 0)]
    assert (log.pending, log.dlq_size) == (2, 0)


def test_jobs_and_dead_letters_survive_closing_and_reopening_the_file(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=0.0, max_attempts=1)
    log.add(jobs(5), now=0.0)
    first = log.due(1, now=0.0)
    log.record([], [(first[0].job_id, "refused")], now=0.0)
    log.close()
    reopened = RetryLog(tmp_path / "r.duckdb")
    assert (reopened.pending, reopened.dlq_size) == (4, 1)
    reopened.add(jobs(1, prefix="new"), now=1.0)
    assert len({j.job_id for j in reopened.due(10, now=1.0)}) == 5


def test_has_room_turns_false_at_the_configured_bound(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", max_events=10)
    log.add(jobs(9))
    assert log.has_room()
    log.add(jobs(1, prefix="last"))
    assert not log.has_room()


def test_size_is_readable_while_checkpoints_delete_the_wal(tmp_path):
    # The status page reads the size from another thread while commits create the WAL and
    # checkpoints delete it: a file gone between two looks must not fail the status page.
    log = RetryLog(tmp_path / "retry_log.duckdb")
    errors: list[BaseException] = []
    done = threading.Event()

    def read_sizes() -> None:
        while not done.is_set():
            try:
                assert log.size_bytes() > 0
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
                return

    reader = threading.Thread(target=read_sizes)
    reader.start()
    try:
        for i in range(300):
            log.add([(f"e-{i}", "{}", "SQS unreachable")])
            with log._lock:
                log._con.execute("CHECKPOINT")  # what DuckDB does by itself as the WAL grows
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
    log.close()


# --- priorities: high first after an outage, each site's order kept within a priority ----------------


def envelope_body(event_id: str, site: str, event_type: str) -> str:
    return json.dumps({"event_id": event_id, "site_id": site, "event_type": event_type})


def test_due_hands_out_high_jobs_first_and_keeps_each_sites_order_within_a_priority(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb")
    kinds = [("door_access", "medium"), ("panic_button", "high"), ("climate", "low"), ("fire_alarm", "high")]
    committed = []
    for group in range(3):  # three commits, as an outage's groups arrive
        rows = []
        for i, (kind, priority) in enumerate(kinds * 2):
            site = ("site-a", "site-b")[i % 2]
            event_id = f"{site}-{group}-{i}"
            rows.append((event_id, envelope_body(event_id, site, kind), "SQS unreachable", priority))
            committed.append((event_id, site, priority))
        log.add(rows, now=100.0 + group)
    due = log.due(100, now=200.0)
    assert [j.priority for j in due] == sorted((p for _, _, p in committed), key=["high", "medium", "low"].index)
    for priority in ("high", "medium", "low"):
        for site in ("site-a", "site-b"):
            expected = [e for e, s, p in committed if (s, p) == (site, priority)]
            assert [
                j.event_id for j in due if j.priority == priority and json.loads(j.body)["site_id"] == site
            ] == expected
    assert [j.event_id for j in log.due(2, now=200.0)] == [e for e, _, p in committed if p == "high"][:2]


def test_a_high_job_that_failed_once_still_goes_out_before_newer_high_jobs_and_any_medium(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=1.0)
    log.add([("old-alarm", "{}", "x", "high"), ("old-door", "{}", "x", "medium")], now=0.0)
    [alarm, _] = log.due(2, now=0.0)
    log.record([], [(alarm.job_id, "refused")], now=0.0)  # due again at 1.0
    log.add([("new-alarm", "{}", "x", "high")], now=0.5)
    assert [j.event_id for j in log.due(10, now=1.0)] == ["old-alarm", "new-alarm", "old-door"]


def test_dead_lettered_jobs_keep_their_priority_through_a_replay(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", backoff_s=0.0, max_attempts=1)
    log.add([("door", "{}", "x", "medium"), ("alarm", "{}", "x", "high")], now=0.0)
    log.record([], [(j.job_id, "refused") for j in log.due(10, now=0.0)], now=0.0)
    assert log.replay_dlq(now=1.0) == 2
    assert [(j.event_id, j.priority) for j in log.due(10, now=1.0)] == [("alarm", "high"), ("door", "medium")]


def test_fifo_order_hands_out_jobs_by_age_alone(tmp_path):
    log = RetryLog(tmp_path / "r.duckdb", order="fifo")
    log.add([("door", "{}", "x", "medium"), ("alarm", "{}", "x", "high")], now=0.0)
    assert [j.event_id for j in log.due(10, now=0.0)] == ["door", "alarm"]


def test_a_retry_log_file_from_before_priorities_is_migrated_at_open_with_each_jobs_priority_from_its_body(tmp_path):
    path = tmp_path / "retry_log.duckdb"
    with duckdb.connect(str(path)) as con:  # the file as the service wrote it before jobs had a priority
        con.execute(
            """CREATE TABLE jobs (job_id BIGINT, event_id VARCHAR, body VARCHAR, attempts INTEGER,
                   next_attempt_at DOUBLE, last_error VARCHAR, created_at DOUBLE);
               CREATE TABLE dlq (event_id VARCHAR, body VARCHAR, attempts INTEGER, last_error VARCHAR,
                   created_at DOUBLE, failed_at DOUBLE);
               CREATE TABLE probe (written_at DOUBLE);"""
        )
        rows = [
            (1, "door", envelope_body("door", "s", "door_access")),
            (2, "garbled", "not json {"),
            (3, "alarm", envelope_body("alarm", "s", "panic_button")),
            (4, "mystery", envelope_body("mystery", "s", "no_such_type")),
        ]
        con.executemany("INSERT INTO jobs VALUES (?, ?, ?, 0, 0.0, 'SQS unreachable', 0.0)", rows)
        con.execute(
            "INSERT INTO dlq VALUES ('dead-fire', ?, 3, 'refused', -1.0, 1.0)",
            [envelope_body("dead-fire", "s", "fire_alarm")],
        )
    log = RetryLog(path, priorities={"door_access": "medium", "panic_button": "high", "fire_alarm": "high"})
    assert (log.pending, log.dlq_size) == (4, 1)
    assert [(j.event_id, j.priority) for j in log.due(10, now=1.0)] == [
        ("alarm", "high"),
        ("door", "medium"),
        ("garbled", "low"),
        ("mystery", "low"),
    ]
    log.add([("new-door", "{}", "x", "medium")], now=1.0)
    log.replay_dlq(now=2.0)
    assert [j.event_id for j in log.due(10, now=2.0)][:2] == ["dead-fire", "alarm"]
    log.close()
    assert [j.event_id for j in RetryLog(path).due(1, now=2.0)] == ["dead-fire"]
