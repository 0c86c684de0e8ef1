"""Claim check: an event over the SQS size limit goes to S3, and SQS carries a pointer to it.

The object key is derived from the event id, so putting the same event twice (a retry after a crash)
overwrites the same object instead of leaving strays. The cloud resolves pointers in the drain
(`pipeline.drain.parse_window`), so no consumer ever sees one.
"""

from __future__ import annotations

import hashlib
import json
import os

import boto3
from botocore.config import Config

from edge_bridge.envelope import CLAIM_CHECK_FIELD, MAX_ENVELOPE_BYTES, ClaimCheck, EnvelopeRejected, parse_envelope

EDGE_PREFIX = "claim-check"  # what the edge service stores: claim-check/<site>/<event_id>.json
ROUTED_PREFIX = "claim-check-routed"  # what the drain stores for a downstream queue (its own bytes, its own key)


def claim_check_key(prefix: str, site_id: str, event_id: str) -> str:
    """The only key a pointer may name: derived from the event's own site and id, never taken from input."""
    return f"{prefix}/{site_id}/{event_id}.json"


def s3_client(connect_timeout: float = 2.0, read_timeout: float = 20.0):
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", region_name=region, config=config)


class ClaimChecker:
    def __init__(self, s3, bucket: str, max_message_bytes: int) -> None:
        self.s3 = s3
        self.bucket = bucket
        # SQS counts the body plus attributes; a small margin keeps the pointer decision on the safe side.
        self.max_body_bytes = max_message_bytes - 1024

    def needs_claim_check(self, body: str) -> bool:
        return len(body) > self.max_body_bytes // 4 and len(body.encode("utf-8")) > self.max_body_bytes

    def check_in(self, event_id: str, site_id: str, body: str) -> str:
        """Store the envelope in S3 and return the SQS body that points at it (raises if S3 fails)."""
        return check_in(self.s3, self.bucket, EDGE_PREFIX, site_id, event_id, body)


def check_in(s3, bucket: str, prefix: str, site_id: str, event_id: str, body: str) -> str:
    """Store `body` under the key derived from the event and return the SQS body that points at it."""
    data = body.encode("utf-8")
    key = claim_check_key(prefix, site_id, event_id)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json")
    pointer = ClaimCheck(bucket=bucket, key=key, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return json.dumps(
        {CLAIM_CHECK_FIELD: pointer.model_dump(), "event_id": event_id, "site_id": site_id}, separators=(",", ":")
    )


def check_in_downstream(s3, bucket: str, site_id: str, event_id: str, body: str) -> str:
    """For the drain: an event too big for a downstream queue travels there as a pointer too.

    Its key has a prefix of its own because its bytes (the re-serialised envelope) need not equal the
    edge's, whose pointer may still be redelivered and must keep matching its hash.
    """
    return check_in(s3, bucket, ROUTED_PREFIX, site_id, event_id, body)


def verify_and_fetch(s3, body: str, *, bucket: str, prefix: str = EDGE_PREFIX) -> str:
    """The envelope a pointer names, honoured only if the pipeline made the pointer.

    The bucket must be the claim-check bucket and the key exactly the one derived from the pointer
    message's own site and id (and the envelope inside must be that event), so a pointer cannot read
    anything else; the size is checked with HeadObject before the read, which is itself bounded; the
    bytes must match the hash. Each failure is bad input (`EnvelopeRejected`: quarantine it); any other
    exception means S3 could not be reached (leave the message for redelivery).
    """
    from botocore.exceptions import ClientError

    try:
        message = json.loads(body)
        pointer = ClaimCheck.model_validate(message[CLAIM_CHECK_FIELD])
        site_id, event_id = message["site_id"], message["event_id"]
        if not (isinstance(site_id, str) and isinstance(event_id, str)):
            raise TypeError("site_id and event_id must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvelopeRejected(
            "bad_claim_check", f"malformed pointer: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    where = f"s3://{pointer.bucket}/{pointer.key}"
    if pointer.bucket != bucket:
        raise EnvelopeRejected("bad_claim_check", f"{where}: not the claim-check bucket {bucket!r}")
    if pointer.key != claim_check_key(prefix, site_id, event_id):
        raise EnvelopeRejected("bad_claim_check", f"{where}: not the key of event {site_id}/{event_id}")
    if pointer.bytes > MAX_ENVELOPE_BYTES:
        raise EnvelopeRejected("bad_claim_check", f"{where}: {pointer.bytes} bytes, over the envelope limit")
    try:
        size = s3.head_object(Bucket=bucket, Key=pointer.key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise EnvelopeRejected("claim_check_mismatch", f"{where}: no such object") from None
        raise
    if size != pointer.bytes:
        raise EnvelopeRejected("claim_check_mismatch", f"{where}: {size} bytes stored, pointer says {pointer.bytes}")
    data = s3.get_object(Bucket=bucket, Key=pointer.key, Range=f"bytes=0-{pointer.bytes}")["Body"].read(
        pointer.bytes + 1
    )
    if len(data) != pointer.bytes or hashlib.sha256(data).hexdigest() != pointer.sha256:
        raise EnvelopeRejected("claim_check_mismatch", f"{where}: content does not match the pointer's size and sha256")
    envelope = parse_envelope(data)
    if envelope.key != (site_id, event_id):
        raise EnvelopeRejected(
            "claim_check_mismatch", f"{where}: holds event {envelope.dedupe_id}, not {site_id}/{event_id}"
        )
    return data.decode("utf-8")
