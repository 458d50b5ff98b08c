"""Named registries of constructors and functions.

A :class:`Registry` maps names to objects (model constructors, datasets, criteria, allocations,
...). The same registries drive the CLI choices, recipe validation and the test matrix, so a new
entry is picked up everywhere by registering it once.

An entry that lives in a module which itself builds on the registry's module (the second-order
criteria build on :mod:`prunescope.criteria`) is registered *lazily* by its import path
(:meth:`Registry.register_lazy`): it is listed at once and imported on first :meth:`get`, so
the registry's module never imports the entry's module and no import cycle arises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prunescope.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with a decorator to fill it and errors that list the choices.

    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... def square(x): return x * x
    >>> shapes.get("square")(3)
    9
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name`` (names are unique)."""

        def add(obj: T) -> T:
            self._claim(name)
            self._entries[name] = obj
            return obj

        return add

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as the object at ``target``, ``"package.module:attribute"``,
        imported on the first :meth:`get` of ``name`` (listed by :meth:`names` at once)."""
        self._claim(name)
        self._lazy[name] = target

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for code that registers an entry for a while, e.g. a test)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises an error listing choices."""
        if name in self._lazy:
            module, _, attribute = self._lazy[name].partition(":")
            self._entries[name] = getattr(importlib.import_module(module), attribute)
            del self._lazy[name]
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names (lazy ones included), sorted."""
        return sorted([*self._entries, *self._lazy])

    def _claim(self, name: str) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries) + len(self._lazy)
