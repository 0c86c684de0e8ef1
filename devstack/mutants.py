"""`make mutants`: put back, one at a time, the defects the promise rules out, and check the tests notice.

A test that cannot fail proves nothing. Each mutant below is a small, deliberate defect (acknowledging an
event before it is safe, deleting a window before its destinations have it, archiving duplicates ...)
applied to a copy of the repository, never to the working tree: the copy is made from a commit
(`git archive`, by default HEAD) or from the tracked files as they are on disk (`--working-tree`), in a
temporary directory that shares the project's `.venv` and the emulator's `node_modules` by path. Each
edit replaces an exact piece of source; if that piece is not found exactly once the script stops, so a
refactoring can never turn a mutant into a silent no-op. The tests that should notice run by node id,
first unmutated (they must pass, or catching means nothing), then against each mutant, which is
caught when at least one of them fails. Exit status 1 if any mutant survived or anything went wrong.

    python -m devstack.mutants [--only NAME ...] [--working-tree] [--rev REV] [--list] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = "tests/test_edge_faults.py::"
KILL_IN_FLIGHT = (
    FAULTS + "test_every_acknowledged_event_reaches_sqs_although_the_edge_service_is_killed_with_events_inside"
)
KILL_SPILLING = (
    FAULTS
    + "test_every_acknowledged_event_reaches_sqs_although_the_edge_service_is_killed_while_events_go_to_the_retry_log"
)
KILL_SENDER = FAULTS + "test_every_acknowledged_event_reaches_sqs_although_a_sender_process_is_killed_holding_a_chunk"
EDGE_DLQ = FAULTS + "test_event_failing_three_attempts_lands_in_the_dlq_and_a_replay_delivers_it"
DRAIN_FAILED_DESTINATION = (
    "tests/test_drain_routing.py::test_failed_destination_keeps_the_window_and_replay_reports_why_it_failed"
)
DRAIN_QUARANTINE_UNWRITABLE = (
    "tests/test_drain_isolation.py::test_when_a_quarantine_cannot_be_written_the_window_stays_in_sqs"
)


class MutationError(Exception):
    """A mutant that cannot be applied as written: the code it names has changed."""


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str

    def apply(self, root: Path) -> str:
        """Write the mutated file; returns the original text (to restore)."""
        file = root / self.path
        text = file.read_text()
        found = text.count(self.old)
        if found != 1:
            first = self.old.strip().splitlines()[0]
            raise MutationError(f"{self.path}: expected the source {first!r} exactly once, found it {found} times")
        file.write_text(text.replace(self.old, self.new))
        return text


@dataclass(frozen=True)
class Mutant:
    name: str
    defect: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # node ids of the tests that should notice


MUTANTS = [
    Mutant(
        "edge-acks-on-receipt",
        "the edge service acknowledges each MQTT message the moment it arrives, before SQS or the retry log has it",
        (
            Edit(
                "edge_bridge/service.py",
                "            self.inbox.put(Received(message.topic, message.payload, message.mid, self._session))\n",
                "            self.inbox.put(Received(message.topic, message.payload, 0, self._session))  # mid 0: never acked again\n"
                "            client.ack_many([message.mid])\n",
            ),
        ),
        (KILL_IN_FLIGHT,),
    ),
    Mutant(
        "edge-acks-before-the-retry-log-commit",
        "events SQS did not take are acknowledged when handed to the retry log writer, before its commit",
        (
            Edit(
                "edge_bridge/service.py",
                "            self._spill_q.put([(Ready(batch[token], event_id, priority(token, UNKNOWN_PRIORITY)), error, cause) for token, event_id, error in result.failed])\n",
                "            self._acknowledge([batch[token] for token, _, _ in result.failed])\n"
                "            self._spill_q.put([(Ready(batch[token], event_id, priority(token, UNKNOWN_PRIORITY)), error, cause) for token, event_id, error in result.failed])\n",
            ),
            Edit(
                "edge_bridge/service.py",
                "            self._acknowledge([r.received for r, _, _ in group])\n",
                "            pass  # acknowledged before the commit instead\n",
            ),
        ),
        (KILL_SPILLING, "tests/test_edge_spill.py::test_retry_log_write_failure_keeps_events_unacked_and_is_retried"),
    ),
    Mutant(
        "edge-forgets-a-dead-senders-chunk",
        "a chunk whose sender process died is dropped (left unacknowledged on a live connection) instead of sent again",
        (
            Edit(
                "edge_bridge/service.py",
                "                if not self._stop.is_set():\n                    self._dispatch(batch, holds_slot)\n                continue\n",
                "                continue\n",
            ),
        ),
        (KILL_SENDER,),
    ),
    Mutant(
        "edge-failed-retry-closes-its-job",
        "a retry SQS refused closes its retry-log job as if delivered",
        (
            Edit(
                "edge_bridge/service.py",
                "        moved = self.retry_log.record(outcome.done + [j.job_id for j, _, _ in outcome.quarantined], outcome.failed)\n",
                "        moved = self.retry_log.record(outcome.done + [j.job_id for j, _, _ in outcome.quarantined] + [job_id for job_id, _ in outcome.failed], [])\n",
            ),
        ),
        (EDGE_DLQ, KILL_SPILLING),
    ),
    Mutant(
        "edge-acks-qos-0",
        "the edge answers a QoS 0 message (id 0) with a PUBACK, which Mosquitto 2 takes as a protocol error",
        (
            Edit(
                "edge_bridge/mqtt_client.py",
                "        mids = [mid for mid in mids if mid]\n",
                "        mids = list(mids)\n",
            ),
        ),
        (
            "tests/test_mqtt_client.py::test_ack_many_sends_no_puback_for_a_qos_0_message_so_the_broker_keeps_the_connection",
            "tests/test_edge_poison.py::test_a_qos_0_publish_among_qos_1_ones_is_delivered_without_a_puback_or_a_disconnect",
        ),
    ),
    Mutant(
        "drain-deletes-on-receipt",
        "the drain deletes its window from SQS as soon as it has received it, before any destination has it",
        (
            Edit(
                "pipeline/jobs.py",
                '    context.log.info(f"received {len(window)} messages (window of at most {size})")\n    return window\n',
                '    context.log.info(f"received {len(window)} messages (window of at most {size})")\n'
                "    drain.delete_messages(sqs.get_client(), sqs.queue_url(), [m.receipt_handle for m in window.messages])\n"
                "    return window\n",
            ),
        ),
        (DRAIN_FAILED_DESTINATION, DRAIN_QUARANTINE_UNWRITABLE),
    ),
    Mutant(
        "drain-deletes-without-waiting-for-destinations",
        "the drain's delete op no longer depends on the destination ops, so it may run before they have the window",
        (
            Edit(
                "pipeline/jobs.py",
                "    delete_from_events_queue(\n"
                "        parsed,\n"
                "        landed=land_in_archive(parsed),\n"
                "        partners=route_to_partner_queues(window, parsed),\n"
                "        prioritized=route_to_priority_queues(window, parsed),\n"
                "        monitored=send_to_monitoring(window, parsed),\n"
                "    )\n",
                "    delete_from_events_queue(parsed)\n"
                "    land_in_archive(parsed)\n"
                "    route_to_partner_queues(window, parsed)\n"
                "    route_to_priority_queues(window, parsed)\n"
                "    send_to_monitoring(window, parsed)\n",
            ),
        ),
        (DRAIN_FAILED_DESTINATION, DRAIN_QUARANTINE_UNWRITABLE),
    ),
    Mutant(
        "archive-compaction-keeps-duplicates",
        "hourly compaction writes every landed row, skipping the dedupe by (site_id, event_id)",
        (
            Edit(
                "pipeline/archive.py",
                "    unique = dedupe_by_event_key(landed).sort_by(",
                "    unique = landed.sort_by(",
            ),
        ),
        (
            "tests/test_archive_exactly_once.py::test_events_delivered_twice_and_out_of_order_are_archived_once_and_pass_the_duplicate_check",
            "tests/test_drain_and_archive.py::test_archive_partition_holds_each_event_once_even_when_drained_twice",
        ),
    ),
    Mutant(
        "consumer-handles-a-redelivered-event-again",
        "the priority consumer's batch goes on with an event its insert found already handled",
        (
            Edit(
                "pipeline/consumers/store.py",
                "            for key, item in fresh.items():\n                if key not in inserted:\n                    continue\n",
                "            for key, item in fresh.items():\n                if False:\n                    continue\n",
            ),
        ),
        (
            "tests/test_priority_consumer.py::test_redelivered_event_is_handled_once_with_one_incident_and_one_signed_automation_call",
            "tests/test_priority_consumer.py::test_the_same_event_id_from_two_sites_is_two_events_and_the_same_site_and_id_twice_is_one",
        ),
    ),
]


# --- the copy ----------------------------------------------------------------------------------------
def make_copy(dest: Path, rev: str | None) -> str:
    """Fill `dest` with the repository at `rev`, or with its tracked files as on disk when `rev` is None.

    Only reads the repository. Returns a description of what was copied."""
    if rev is not None:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        archive = subprocess.Popen(["git", "archive", "--format=tar", rev], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {rev} failed")
        described = f"commit {commit}"
    else:
        listed = (
            subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True)
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, listed):
            source = ROOT / name
            if not source.is_file():
                continue  # deleted in the working tree
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        described = "the tracked files of the working tree, uncommitted changes included"
    # What the tests need but git does not hold: shared by path, never written through.
    for shared in (".venv", "devstack/fauxqs/node_modules"):
        if (ROOT / shared).exists() and not (dest / shared).exists():
            (dest / shared).symlink_to(ROOT / shared)
    manifest = ROOT / "dbt" / "target" / "manifest.json"
    if manifest.exists():
        (dest / "dbt" / "target").mkdir(parents=True, exist_ok=True)
        shutil.copy2(manifest, dest / "dbt" / "target" / "manifest.json")
    (dest / ".dagster_home").mkdir(exist_ok=True)
    return described


# --- running tests -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    results: dict[str, str]  # node id -> passed | failed | error | skipped | not run
    messages: dict[str, str]  # node id -> the first line of its failure
    returncode: int
    seconds: float
    output: str

    @property
    def failed(self) -> list[str]:
        return [node for node, result in self.results.items() if result in ("failed", "error")]

    @property
    def usable(self) -> bool:
        """pytest ran every test it was given (0: all passed, 1: some failed)."""
        return self.returncode in (0, 1) and "not run" not in self.results.values()


def run_tests(copy: Path, tests: list[str], python: str) -> Outcome:
    junit = copy / ".mutants-junit.xml"
    junit.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "DAGSTER_HOME": str(copy / ".dagster_home"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [python, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    results, messages = dict.fromkeys(tests, "not run"), {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            node = f"{case.get('file') or case.get('classname', '').replace('.', '/') + '.py'}::{case.get('name')}"
            node = next((t for t in tests if t.endswith("::" + case.get("name", ""))), node)
            kinds = {child.tag: child for child in case}
            results[node] = (
                "failed"
                if "failure" in kinds
                else "error"
                if "error" in kinds
                else "skipped"
                if "skipped" in kinds
                else "passed"
            )
            problem = kinds.get("failure", kinds.get("error"))
            if problem is not None:  # an element without children is false
                messages[node] = " ".join((problem.get("message") or "").split())[:160]
    return Outcome(results, messages, proc.returncode, seconds, proc.stdout[-4000:] + proc.stderr[-2000:])


def _short(node: str) -> str:
    return node.split("::", 1)[1] if "::" in node else node


def _clock(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.mutants", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--rev", default="HEAD", help="the commit to copy (default HEAD)")
    parser.add_argument(
        "--working-tree", action="store_true", help="copy the tracked files as they are on disk instead of a commit"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--list", action="store_true", help="list the mutants and the tests each should fail")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"no mutant {', '.join(sorted(unknown))}; --list names them")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.defect}")
            for node in m.tests:
                print(f"    {node}")
        return 0

    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mutants-"))
    copy = workdir / "repo"
    copy.mkdir()
    problems = 0
    try:
        described = make_copy(copy, None if args.working_tree else args.rev)
        print(
            f"mutants: {len(mutants)} defects, each applied alone to a copy of {described} (the working tree is not touched)",
            flush=True,
        )
        for m in mutants:  # every edit must still apply before anything runs
            for edit in m.edits:
                (copy / edit.path).write_text(edit.apply(copy))
        if not args.no_baseline:
            tests = list(dict.fromkeys(node for m in mutants for node in m.tests))
            baseline = run_tests(copy, tests, python)
            if not baseline.usable or baseline.failed:
                print(
                    f"baseline: the tests do not pass unmutated ({_clock(baseline.seconds)}), so no mutant can be judged:"
                )
                for node, result in baseline.results.items():
                    print(f"    {result:<8} {node}")
                print(baseline.output)
                return 1
            print(f"baseline: the {len(tests)} tests pass unmutated ({_clock(baseline.seconds)})", flush=True)
        survived = []
        for n, m in enumerate(mutants, start=1):
            originals = [(edit.path, edit.apply(copy)) for edit in m.edits]
            try:
                outcome = run_tests(copy, list(m.tests), python)
            finally:
                for path, text in reversed(originals):
                    (copy / path).write_text(text)
            files = ", ".join(sorted({e.path for e in m.edits}))
            if not outcome.usable:
                problems += 1
                verdict = f"ERROR (pytest exit {outcome.returncode}: the mutant could not be judged)"
            elif outcome.failed:
                verdict = "caught"
            else:
                survived.append(m.name)
                verdict = "SURVIVED"
            print(
                f"[{n}/{len(mutants)}] {m.name}: {verdict} in {_clock(outcome.seconds)}\n    defect: {m.defect} ({files})"
            )
            for node, result in outcome.results.items():
                print(f"    {'FAILED' if result in ('failed', 'error') else result:<8} {_short(node)}")
                if node in outcome.messages:
                    print(f"             {outcome.messages[node]}")
            if not outcome.usable:
                print("\n".join("    | " + line for line in outcome.output.splitlines()[-30:]))
            sys.stdout.flush()
        caught = len(mutants) - len(survived) - problems
        print(
            f"mutants: {caught} caught, {len(survived)} survived"
            + (f" ({', '.join(survived)})" if survived else "")
            + (f", {problems} not judged" if problems else "")
            + f"; {_clock(time.monotonic() - started)} in all"
        )
        return 1 if survived or problems else 0
    except MutationError as exc:
        print(f"mutants: {exc}: update the mutant to the code as it is now", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"the copy is kept in {copy}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
