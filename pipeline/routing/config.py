"""The routing configuration (`config/routing.yaml`): partners, priority rules, monitoring, automation.

Validated when loaded, so a typo fails the run that reads it with the key's path in the message
instead of silently routing nothing. Every event type it names must be in the event catalog
(`config/events.yaml`), and the catalog supplies each type's priority, whether it opens an incident and
whether it is operational; the file adds only what is routing's own (partners, queue names, webhooks)
and, rarely, an override. Secrets are never in the file: a partner names the environment variable that
holds its signing secret, read only when a delivery run needs it.

A partner's contract (its subscriptions, whitelist and transform: everything that decides the bodies it
gets) is versioned by content: `PartnerConfig.contract_version` is the first 12 hex digits of the
SHA-256 of the contract's canonical JSON, so any change to what a partner receives is a new version and
no one has to remember to bump one. `python -m pipeline.routing.config --check` validates a file and
prints each partner's version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edge_bridge.catalog import EventCatalog, EventCatalogError, key_path, load_event_catalog
from edge_bridge.envelope import ENVELOPE_FIELDS
from pipeline.stack import PROJECT_ROOT

DEFAULT_ROUTING_CONFIG = PROJECT_ROOT / "config" / "routing.yaml"
PRIORITIES = ("high", "medium", "low")
Priority = Literal["high", "medium", "low"]
_NAME = r"^[a-z0-9][a-z0-9\-]{0,60}$"
_ENV = r"^[A-Z_][A-Z0-9_]*$"


class RoutingConfigError(ValueError):
    """A routing config that cannot be used; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _catalog(info: ValidationInfo) -> EventCatalog:
    """The catalog `parse_routing_config` validates against; the shipped one when a model is built directly."""
    return (info.context or {}).get("catalog") or load_event_catalog()


def _known_event_type(name: str, info: ValidationInfo) -> str:
    catalog = _catalog(info)
    if name not in catalog:
        raise PydanticCustomError(
            "unknown_event_type",
            "unknown event type '{name}' (not in {source})",
            {"name": name, "source": catalog.source},
        )
    return name


EventTypeName = Annotated[str, AfterValidator(_known_event_type)]


def _field_path(path: str) -> str:
    """A whitelist path: an envelope field (`site_id`), one payload value (`payload.zone.name`, sent only
    when it is a scalar), or a payload subtree sent whole (`payload.zone.*`, `payload.*`)."""
    parts = path.split(".")
    top = parts[0]
    if len(parts) == 1:
        if top == "payload":
            raise ValueError(
                "'payload' is an object: name its values ('payload.zone.name') or send it whole with 'payload.*'"
            )
        if top not in ENVELOPE_FIELDS:
            raise ValueError(
                f"{path!r} is neither an envelope field ({', '.join(f for f in ENVELOPE_FIELDS if f != 'payload')}) nor 'payload.<key>[.<key>...][.*]'"
            )
        return path
    if top != "payload":
        raise ValueError(f"{path!r}: only payload paths have several parts ('payload.<key>[.<key>...][.*]')")
    keys, last = parts[1:-1], parts[-1]
    if any(not key or "*" in key for key in keys) or not last or ("*" in last and last != "*"):
        raise ValueError(f"{path!r}: keys must be non-empty, and '*' may only end a path ('payload.zone.*')")
    return path


class TransformConfig(_Strict):
    strip_fields: tuple[str, ...] = ()
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("rename")
    @classmethod
    def _targets(cls, rename: dict[str, str]) -> dict[str, str]:
        for source, target in rename.items():
            _field_path(source)
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_\-]*$", target):
                raise ValueError(f"rename target {target!r} (for {source!r}) must be a plain field name")
        if len(set(rename.values())) != len(rename):
            raise ValueError("two fields are renamed to the same name")
        return rename

    @model_validator(mode="after")
    def _not_renamed_to_stripped(self) -> TransformConfig:
        clash = sorted(set(self.rename.values()) & set(self.strip_fields))
        if clash:
            raise ValueError(f"rename targets {clash} are also strip_fields")
        return self


CONTRACT_RULES = 2  # the meaning PartnerTransform gives a contract; bump it when that meaning changes


class PartnerContract(_Strict):
    """Everything that decides the bodies a partner gets, and nothing else: its version is its content's hash.

    The canonical JSON is what the drain keeps in the contract history (s3://<archive bucket>/
    partner_contracts/<partner>/<version>.json), so an audit can re-create a body under an older contract.
    """

    subscriptions: tuple[str, ...] = Field(min_length=1)
    allowed_fields: tuple[str, ...] = Field(min_length=1)
    transform: TransformConfig = TransformConfig()
    rules: int = CONTRACT_RULES

    @field_validator("allowed_fields")
    @classmethod
    def _paths(cls, fields: tuple[str, ...]) -> tuple[str, ...]:
        for path in fields:
            _field_path(path)
        return fields

    def canonical_json(self) -> str:
        """Order-free and spelling-free: the same contract always gives the same text, hence version."""
        return json.dumps(
            {
                "rules": self.rules,
                "subscriptions": sorted(set(self.subscriptions)),
                "allowed_fields": sorted(set(self.allowed_fields)),
                "transform": {
                    "strip_fields": sorted(set(self.transform.strip_fields)),
                    "rename": dict(sorted(self.transform.rename.items())),
                },
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )

    @property
    def version(self) -> str:
        return contract_version(self.canonical_json())


def contract_version(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode("utf-8")).hexdigest()[:12]


class PartnerConfig(_Strict):
    name: str = Field(pattern=_NAME)
    webhook: str = Field(pattern=r"^https?://")
    webhook_env: str | None = Field(None, pattern=_ENV)  # when set in the environment, overrides `webhook`
    secret_env: str = Field(pattern=_ENV)
    subscriptions: tuple[EventTypeName, ...] = Field(min_length=1)
    # Mandatory: a partner receives exactly these paths and nothing else (see pipeline.routing.transform).
    allowed_fields: tuple[str, ...] | None = Field(None, validate_default=True)
    transform: TransformConfig = TransformConfig()
    timeout_s: float = Field(10.0, gt=0, le=60)

    @field_validator("allowed_fields")
    @classmethod
    def _paths(cls, fields: tuple[str, ...] | None) -> tuple[str, ...]:
        if fields is None:
            raise ValueError(
                "required: list the fields this partner may receive (envelope fields, 'payload.<key>...', or 'payload.<key>.*' for a whole object)"
            )
        if not fields:
            raise ValueError("an empty whitelist sends nothing; drop the partner or list fields")
        for path in fields:
            _field_path(path)
        return fields

    @model_validator(mode="after")
    def _rename_sources_and_collisions(self) -> PartnerConfig:
        unknown = sorted(set(self.transform.rename) - set(self.allowed_fields or ()))
        if unknown:
            raise ValueError(
                f"transform.rename sources {unknown} are not in allowed_fields (rename names whitelisted paths exactly)"
            )
        kept = {path.partition(".")[0] for path in self.allowed_fields or () if path not in self.transform.rename}
        clash = sorted(kept & set(self.transform.rename.values()))
        if clash:
            raise ValueError(f"transform.rename targets {clash} collide with fields the partner already receives")
        return self

    @property
    def contract(self) -> PartnerContract:
        return PartnerContract(
            subscriptions=self.subscriptions, allowed_fields=self.allowed_fields, transform=self.transform
        )

    @property
    def contract_version(self) -> str:
        return self.contract.version

    @property
    def queue_name(self) -> str:
        return f"partner-{self.name}"

    @property
    def dlq_name(self) -> str:
        return f"partner-{self.name}-dlq"

    def url(self) -> str:
        return (os.environ.get(self.webhook_env) if self.webhook_env else None) or self.webhook

    def secret(self) -> str:
        value = os.environ.get(self.secret_env)
        if not value:
            raise RoutingConfigError(
                f"partner {self.name!r}: environment variable {self.secret_env} (its webhook secret) is not set"
            )
        return value


class PriorityQueues(_Strict):
    high: str = "events-high"
    medium: str = "events-medium"
    low: str = "events-low"


class PriorityConfig(_Strict):
    queues: PriorityQueues = PriorityQueues()
    default: Priority = "low"  # for an event type the catalog does not know (accepted on the wire, never dropped)
    rules: dict[EventTypeName, Priority] = Field(
        default_factory=dict
    )  # the catalog's priorities, then the file's overrides

    @model_validator(mode="before")
    @classmethod
    def _from_catalog(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rules", {}), dict):
            data = {**data, "rules": {**_catalog(info).priorities, **data.get("rules", {})}}
        return data

    def for_event_type(self, event_type: str) -> Priority:
        return self.rules.get(event_type, self.default)

    def queue_for(self, priority: str) -> str:
        return getattr(self.queues, priority)


class MonitoringConfig(_Strict):
    event_types: tuple[EventTypeName, ...] = ()  # the file's additions, then the catalog's operational types
    loki_url_env: str = Field("PIPELINE_LOKI_URL", pattern=_ENV)

    @model_validator(mode="before")
    @classmethod
    def _from_catalog(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(data.get("event_types", ()), (list, tuple)):
            listed = list(data.get("event_types", ()))
            data = {**data, "event_types": listed + [t for t in _catalog(info).operational_types if t not in listed]}
        return data

    def loki_url(self) -> str | None:
        return os.environ.get(self.loki_url_env) or None


class AutomationRule(_Strict):
    event_type: EventTypeName
    incident: bool = True
    webhook_env: str | None = Field(None, pattern=_ENV)
    secret_env: str | None = Field(None, pattern=_ENV)


class AutomationConfig(_Strict):
    rules: tuple[
        AutomationRule, ...
    ] = ()  # the file's rules (a webhook, or `incident: false`), then one per catalog incident type

    @model_validator(mode="before")
    @classmethod
    def _from_catalog(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rules", ()), (list, tuple)):
            listed = list(data.get("rules", ()))
            named = {r.get("event_type") if isinstance(r, dict) else getattr(r, "event_type", None) for r in listed}
            data = {
                **data,
                "rules": listed
                + [{"event_type": t, "incident": True} for t in _catalog(info).incident_types if t not in named],
            }
        return data

    @field_validator("rules")
    @classmethod
    def _one_rule_per_event_type(cls, rules: tuple[AutomationRule, ...]) -> tuple[AutomationRule, ...]:
        names = [r.event_type for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"one rule per event type: {dupes} have several")
        return rules

    def rule_for(self, event_type: str) -> AutomationRule | None:
        return next((r for r in self.rules if r.event_type == event_type), None)


class RoutingConfig(_Strict):
    retry_delays_s: tuple[int, ...] = Field((1, 5, 15, 60, 300), min_length=1)
    partners: tuple[PartnerConfig, ...] = ()
    # Validated even when absent from the file, so the catalog's part is always there.
    priority: PriorityConfig = Field(default_factory=dict, validate_default=True)
    monitoring: MonitoringConfig = Field(default_factory=dict, validate_default=True)
    automation: AutomationConfig = Field(default_factory=dict, validate_default=True)

    @field_validator("retry_delays_s")
    @classmethod
    def _sqs_visibility_range(cls, delays: tuple[int, ...]) -> tuple[int, ...]:
        bad = [d for d in delays if not 0 <= d <= 43200]
        if bad:
            raise ValueError(f"delays {bad} are outside SQS's visibility range 0..43200 s")
        return delays

    @field_validator("partners")
    @classmethod
    def _unique_names(cls, partners: tuple[PartnerConfig, ...]) -> tuple[PartnerConfig, ...]:
        names = [p.name for p in partners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"partner names must be unique: {dupes}")
        return partners

    def partner(self, name: str) -> PartnerConfig:
        for partner in self.partners:
            if partner.name == name:
                return partner
        raise RoutingConfigError(f"no partner named {name!r} (known: {[p.name for p in self.partners]})")

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.retry_delays_s)


def parse_routing_config(
    data: object, source: str = "routing config", catalog: EventCatalog | None = None
) -> RoutingConfig:
    """Validate `data` against the schema and the event catalog (default: `load_event_catalog()`)."""
    try:
        return RoutingConfig.model_validate(data or {}, context={"catalog": catalog or load_event_catalog()})
    except ValidationError as exc:
        problems = "; ".join(f"{key_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RoutingConfigError(f"{source}: {problems}") from None
    except EventCatalogError as exc:
        raise RoutingConfigError(f"{source}: the event catalog it is checked against is unusable: {exc}") from None


def routing_config_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("PIPELINE_ROUTING_CONFIG") or DEFAULT_ROUTING_CONFIG)


def load_routing_config(path: str | Path | None = None) -> RoutingConfig:
    path = routing_config_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RoutingConfigError(f"{path}: {exc}") from None
    return parse_routing_config(data, str(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.routing.config --check [PATH]`: validate, and print each partner's contract version."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.routing.config",
        description="Validate a routing config and print each partner's contract version.",
    )
    parser.add_argument("--check", action="store_true", help="validate (the only action; accepted for readability)")
    parser.add_argument(
        "path", nargs="?", help="the routing config (default: $PIPELINE_ROUTING_CONFIG or config/routing.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        routing = load_routing_config(args.path)
    except RoutingConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"{routing_config_path(args.path)}: valid, {len(routing.partners)} partners")
    for partner in routing.partners:
        contract = partner.contract
        print(
            f"  {partner.name}: contract {contract.version} (subscriptions {', '.join(contract.subscriptions)}; allowed_fields {', '.join(contract.allowed_fields)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
