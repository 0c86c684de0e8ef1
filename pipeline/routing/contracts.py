"""The partner contract history: every contract version a body was ever made under, kept in the archive bucket.

A contract's version is the hash of its canonical JSON (`PartnerContract.version`), so the history is
append-only and self-checking: `partner_contracts/<partner>/<version>.json` holds exactly the text whose
hash is its name, written the first time a drain run (or an archive-range replay) makes bodies under it.
An audit reads it back to re-create what a partner received under a contract that is no longer current.
"""

from __future__ import annotations

import json
import logging
import threading

from botocore.exceptions import ClientError

from pipeline.routing.config import PartnerContract, contract_version

log = logging.getLogger(__name__)

CONTRACTS_PREFIX = "partner_contracts"


class ContractHistoryError(LookupError):
    """A contract version the history does not hold, or holds under text that is not that version."""


def contract_key(partner: str, version: str) -> str:
    return f"{CONTRACTS_PREFIX}/{partner}/{version}.json"


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}


class ContractHistory:
    """Reads and records contract versions in `s3://<bucket>/partner_contracts/` (a boto3 S3 client)."""

    def __init__(self, s3, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def record(self, partner: str, contract: PartnerContract) -> bool:
        """Store `contract` unless the history has it already; True when this call wrote it.

        S3 refusing either call raises: bodies must not leave under a contract nobody could read back."""
        key = contract_key(partner, contract.version)
        with self._lock:
            if key in self._known:
                return False
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
            written = False
        except ClientError as exc:
            if not _missing(exc):
                raise
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=contract.canonical_json().encode("utf-8"),
                ContentType="application/json",
            )
            log.info("partner %s: contract %s recorded at s3://%s/%s", partner, contract.version, self.bucket, key)
            written = True
        with self._lock:
            self._known.add(key)
        return written

    def load(self, partner: str, version: str) -> PartnerContract:
        """The contract `version` of `partner`, checked against its own hash."""
        key = contract_key(partner, version)
        try:
            text = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode("utf-8")
        except ClientError as exc:
            if _missing(exc):
                raise ContractHistoryError(
                    f"partner {partner!r}: contract {version} is not in s3://{self.bucket}/{key}"
                ) from None
            raise
        if contract_version(text) != version:
            raise ContractHistoryError(f"s3://{self.bucket}/{key} does not hash to {version}: it was altered")
        contract = PartnerContract.model_validate(json.loads(text))
        if contract.canonical_json() != text:
            raise ContractHistoryError(f"s3://{self.bucket}/{key} is not a canonical contract")
        return contract
