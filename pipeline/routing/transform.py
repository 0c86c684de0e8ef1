"""The payload transformer at the partner boundary: only agreed fields leave, in the partner's schema.

Order matters and is fixed: select the whitelist (`allowed_fields`; without one, the envelope's own
contract fields), then strip (a stripped name is removed wherever it appears, at any depth, even
inside a whitelisted object), then rename. A field is addressed as an envelope field (`site_id`) or
one payload key (`payload.zone`); an unrenamed payload key stays nested under `payload`.
"""

from __future__ import annotations

from typing import Any

from edge_bridge.envelope import ENVELOPE_FIELDS
from pipeline.routing.config import PartnerConfig


def _strip(value: Any, names: frozenset[str]) -> Any:
    """A copy of a JSON value without the keys in `names`, at any depth.

    Iterative, with an explicit stack: no payload, however deep, can overflow the interpreter's stack
    here (the envelope bounds depth, but this must not depend on it).
    """
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        source, copy = stack.pop()
        items = ((k, v) for k, v in source.items() if k not in names) if isinstance(source, dict) else enumerate(source)
        for key, child in items:
            if isinstance(child, dict):
                child_copy: Any = {}
                stack.append((child, child_copy))
            elif isinstance(child, list):
                child_copy = []
                stack.append((child, child_copy))
            else:
                child_copy = child
            if isinstance(copy, dict):
                copy[key] = child_copy
            else:
                copy.append(child_copy)
    return root


class PartnerTransform:
    """One partner's view of an event: `subscribes(event_type)` and `apply(wire_dict) -> body`."""

    def __init__(self, partner: PartnerConfig) -> None:
        self.subscriptions = frozenset(partner.subscriptions)
        self.allowed = tuple(partner.allowed_fields) if partner.allowed_fields is not None else ENVELOPE_FIELDS
        self.strip = frozenset(partner.transform.strip_fields)
        self.rename = dict(partner.transform.rename)

    def subscribes(self, event_type: str) -> bool:
        return event_type in self.subscriptions

    def _select(self, event: dict[str, Any]) -> dict[str, Any]:
        payload = event.get("payload") or {}
        selected: dict[str, Any] = {}
        for path in self.allowed:
            top, _, key = path.partition(".")
            if key:
                if key in payload:
                    selected[path] = payload[key]
            elif top in event:
                selected[path] = event[top]
        return selected

    def _stripped(self, path: str) -> bool:
        return any(part in self.strip for part in path.split("."))

    def apply(self, event: dict[str, Any]) -> dict[str, Any]:
        """The body for this partner, from the envelope's wire dict (`Envelope.to_wire()`)."""
        body: dict[str, Any] = {}
        for path, value in self._select(event).items():
            if self._stripped(path):
                continue
            value = _strip(value, self.strip)
            if path in self.rename:
                body[self.rename[path]] = value
            elif "." in path:
                top, _, key = path.partition(".")
                nested = body.setdefault(top, {})
                if isinstance(nested, dict):
                    nested[key] = value
            elif isinstance(value, dict) and isinstance(body.get(path), dict):
                body[path] = {**value, **body[path]}
            else:
                body[path] = value
        return body
