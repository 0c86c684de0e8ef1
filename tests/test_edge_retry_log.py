"""The DuckDB retry log on its own: attempts, backoff, the DLQ after three failures, replay, reopening."""

from __future__ import annotations

import threading

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
