"""One registry helper for every pluggable choice: view generators, feature encoders, pretraining
strategies, architectures.

A ``Registry`` is a read-only mapping from name to entry, filled with ``@REGISTRY.register(name)``
(builders) or ``REGISTRY.add(name, value)`` (plain values); looking up an unknown name raises a
``KeyError`` that names the config key and the known names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class Registry(Mapping):
    def __init__(self, key: str):
        self.key = key  # the config key whose values this registry names, for error messages
        self._entries: dict[str, Any] = {}

    def add(self, name: str, entry: Any) -> Any:
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator form of ``add``."""
        return lambda entry: self.add(name, entry)

    @contextlib.contextmanager
    def temporarily(self, name: str, entry: Any) -> Iterator[Any]:
        """``name`` registered for the duration of a ``with`` block (tests plug in fakes this way)."""
        self.add(name, entry)
        try:
            yield entry
        finally:
            del self._entries[name]

    def __getitem__(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.key}: unknown name {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}, {sorted(self._entries)})"
