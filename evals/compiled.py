"""One compiled function per key (model structure and settings), across checkpoints.

jit caches per function object, so a function rebuilt for every checkpoint would recompile every
time; the model config fixes the graphdef (itself unhashable), so keys hold the config's values."""

from __future__ import annotations

from collections.abc import Callable, Hashable

_FUNCTIONS: dict[Hashable, Callable] = {}


def once(key: Hashable, make: Callable[[], Callable]) -> Callable:
    """`make()` the first time `key` is seen, the same function afterwards."""
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = make()
    return _FUNCTIONS[key]
