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

from edge_bridge.envelope import CLAIM_CHECK_FIELD, ClaimCheck


def s3_client(connect_timeout: float = 2.0, read_timeout: float = 20.0):
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=connect_timeout, read_timeout=read_timeout)
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
        data = body.encode("utf-8")
        key = f"claim-check/{site_id}/{event_id}.json"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
        pointer = ClaimCheck(bucket=self.bucket, key=key, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        return json.dumps({CLAIM_CHECK_FIELD: pointer.model_dump(), "event_id": event_id, "site_id": site_id}, separators=(",", ":"))


def resolve(s3, pointer: ClaimCheck) -> str:
    """Fetch the envelope a pointer names and check it is the one that was stored."""
    data = s3.get_object(Bucket=pointer.bucket, Key=pointer.key)["Body"].read()
    if hashlib.sha256(data).hexdigest() != pointer.sha256:
        raise ValueError(f"claim check s3://{pointer.bucket}/{pointer.key} does not match its sha256")
    return data.decode("utf-8")
