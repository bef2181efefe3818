"""The value cache seam of the async manager.

``get_or_load(name, key, load)`` returns the cached entry for *key* or awaits *load* to fill it;
``invalidate(name)`` drops every entry of a secret after it changed. ``NO_CACHE`` always loads,
which is what one-shot use wants; the filesystem daemon plugs in a TTL- and size-bounded cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class ValueCache(Protocol):
    async def get_or_load(self, name: str, key: str, load: Callable[[], Awaitable[T]]) -> T: ...

    def invalidate(self, name: str) -> None: ...


class NoCache:
    """Caching off: every read goes to the backend."""

    async def get_or_load(self, name: str, key: str, load: Callable[[], Awaitable[T]]) -> T:
        return await load()

    def invalidate(self, name: str) -> None:
        return None


NO_CACHE = NoCache()
