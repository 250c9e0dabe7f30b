"""A registry of named entries (objectives, decoders): what the rest of the code looks up instead
of comparing names."""

from __future__ import annotations

from typing import Generic, TypeVar

from trainer.errors import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key  # what an entry is, and the config key that names one
        self.entries: dict[str, Entry] = {}  # by name, in registration order

    def register(self, entry: Entry) -> Entry:
        if entry.name in self.entries:
            raise ValueError(f"{self.kind} {entry.name} is registered twice")
        self.entries[entry.name] = entry
        return entry

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise ConfigError(f"{self.key} {name!r} is not a registered {self.kind} "
                              f"(registered: {', '.join(self.entries)})")
        return self.entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)
