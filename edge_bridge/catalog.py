"""The event catalog (`config/events.yaml`): every event type, who produces it and how it is handled.

It is the one place an event type is named: adapters emit only its types (tested over their code
tables) and the routing config takes priorities, incidents and the monitoring list from it, so the edge
and the cloud cannot drift apart on a name. Both layers import this module. The file is read at run
time (`EVENT_CATALOG` overrides the path) and cached until it changes; a bad key fails with its path.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError

DEFAULT_EVENT_CATALOG = Path(__file__).resolve().parent.parent / "config" / "events.yaml"
FAMILIES = ("ajax", "zigbee", "nvr", "idp", "edge")
Family = Literal["ajax", "zigbee", "nvr", "idp", "edge"]
Priority = Literal["high", "medium", "low"]
EventTypeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class EventCatalogError(ValueError):
    """A catalog that cannot be used; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventType(_Strict):
    meaning: str = Field(min_length=1)
    families: tuple[Family, ...] = Field(min_length=1)
    priority: Priority
    incident: bool = False
    operational: bool = False


class EventCatalog(_Strict):
    version: int = Field(ge=1)
    event_types: dict[EventTypeName, EventType] = Field(min_length=1)
    _source: str = PrivateAttr("config/events.yaml")

    @property
    def source(self) -> str:
        """How messages name the file: `config/events.yaml`, or the path it was read from."""
        return self._source

    def __contains__(self, name: object) -> bool:
        return name in self.event_types

    def __getitem__(self, name: str) -> EventType:
        return self.event_types[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.event_types)

    @property
    def priorities(self) -> dict[str, Priority]:
        return {name: t.priority for name, t in self.event_types.items()}

    @property
    def incident_types(self) -> tuple[str, ...]:
        return tuple(name for name, t in self.event_types.items() if t.incident)

    @property
    def operational_types(self) -> tuple[str, ...]:
        return tuple(name for name, t in self.event_types.items() if t.operational)

    def produced_by(self, family: str) -> set[str]:
        return {name for name, t in self.event_types.items() if family in t.families}


def key_path(loc: tuple) -> str:
    """A pydantic error location as the key path a person reads in the YAML: `partners[0].subscriptions[1]`."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the dict key itself", already named by the part before
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_event_catalog(data: object, source: str = "config/events.yaml") -> EventCatalog:
    try:
        catalog = EventCatalog.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{key_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise EventCatalogError(f"{source}: {problems}") from None
    catalog._source = source
    return catalog


def event_catalog_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("EVENT_CATALOG") or DEFAULT_EVENT_CATALOG)


def _display_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(DEFAULT_EVENT_CATALOG.parent.parent))
    except ValueError:
        return str(path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a key given twice: YAML would keep the last, so a type added twice would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int, size: int) -> EventCatalog:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise EventCatalogError(f"{path}: {exc}") from None
    return parse_event_catalog(data, _display_name(path))


def load_event_catalog(path: str | Path | None = None) -> EventCatalog:
    """The catalog at `path` (default: `EVENT_CATALOG`, else config/events.yaml); re-read only when the file changed."""
    path = event_catalog_path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise EventCatalogError(f"{path}: {exc}") from None
    return _load(path, stat.st_mtime_ns, stat.st_size)
