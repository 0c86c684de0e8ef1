"""The payload transformer at the partner boundary: only whitelisted values leave, in the partner's schema.

The whitelist (`allowed_fields`, mandatory) names exactly what a partner may receive:
- an envelope field (`site_id`): its value;
- a payload path at any depth (`payload.zone.name`): its value **only when it is a scalar** (string,
  number, boolean, null). An object or array at that path is not sent: naming `payload.zone` never
  lets the keys nested inside `zone` leave by accident;
- a payload subtree (`payload.zone.*`, or `payload.*` for the whole payload): the value at that path
  whole, whatever it holds. This is the only way an object or array leaves.
A path leads through objects only (an array on the way ends it), and payload keys that contain a dot
cannot be named. Then `strip_fields` removes a name wherever it appears, at any depth (even inside a
`.*` subtree, and a path through a stripped name sends nothing), and `rename` moves a whitelisted path
to a top-level field of that name. An unrenamed path keeps its place: `payload.zone.name` arrives as
`{"payload": {"zone": {"name": ...}}}`.

Everything is iterative: no payload, however deep, can overflow the interpreter's stack here.
"""

from __future__ import annotations

from typing import Any

from pipeline.routing.config import PartnerConfig, PartnerContract

_MISSING = object()


def _strip(value: Any, names: frozenset[str]) -> Any:
    """A copy of a JSON value without the keys in `names`, at any depth (explicit stack, no recursion)."""
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


def _lookup(event: dict[str, Any], parts: tuple[str, ...]) -> Any:
    """The value at `parts`, through objects only; `_MISSING` when any step is absent or not an object."""
    value: Any = event
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _place(body: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Put `value` at `parts` in `body`, creating the objects on the way; what is there already stays
    (paths are placed widest first, so a narrower path finds its value already in place)."""
    node = body
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return
        node = child
    node.setdefault(parts[-1], value)


class PartnerTransform:
    """One partner's view of an event under one contract: `subscribes(event_type)` and `apply(wire_dict) -> body`."""

    def __init__(self, contract: PartnerContract | PartnerConfig) -> None:
        if isinstance(contract, PartnerConfig):
            contract = contract.contract
        if not contract.allowed_fields:
            raise ValueError("a partner transform needs a whitelist (allowed_fields)")
        self.version = contract.version
        self.subscriptions = frozenset(contract.subscriptions)
        self.strip = frozenset(contract.transform.strip_fields)
        self.rename = dict(contract.transform.rename)
        paths = []
        for path in dict.fromkeys(contract.allowed_fields):
            whole = path.endswith(".*")
            parts = tuple(path[:-2].split(".") if whole else path.split("."))
            paths.append((len(parts), not whole, path, parts, whole))
        # Widest first: a subtree before the paths inside it, so `_place` never overwrites a wider value.
        self.paths = [(path, parts, whole) for _, _, path, parts, whole in sorted(paths)]

    def subscribes(self, event_type: str) -> bool:
        return event_type in self.subscriptions

    def apply(self, event: dict[str, Any]) -> dict[str, Any]:
        """The body for this partner, from the envelope's wire dict (`Envelope.to_wire()`)."""
        body: dict[str, Any] = {}
        for path, parts, whole in self.paths:
            if any(part in self.strip for part in parts):
                continue
            value = _lookup(event, parts)
            if value is _MISSING:
                continue
            if whole:
                value = _strip(value, self.strip)
            elif isinstance(value, (dict, list)):
                continue  # an object or array leaves only when its path ends in `.*`
            if path in self.rename:
                body[self.rename[path]] = value
            else:
                _place(body, parts, value)
        return body
