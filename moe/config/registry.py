"""One registry shape for everything the package names: merge methods, delta compression steps,
split and init methods, study arms, experiments.

    METHODS: Registry[MethodSpec] = Registry("merge method", discover="moe.merge")

    @METHODS.register("ties")          # as a decorator, or METHODS.register("ties", item)
    def ties(...): ...

A registry given `discover` imports every public submodule of that package (`_private` ones are
skipped) the first time it is read, so a new member is one new file there that registers itself
on import. Every list a user sees (argparse choices and help, "choose one of ..." errors,
`moe run --list-arms`) is read from a registry, never written out by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, Literal, TypeVar, overload

from moe.config.check import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Generic[T]):
    """Named items of one kind.

    kind      what one item is called in messages ("merge method")
    discover  a package whose public submodules are imported on first read (they register)
    order     how `names()` lists them: "name" (sorted), "registered" (registration order) or
              "attribute" (by each item's `order` attribute, then by name)
    field     the option or recipe key an unknown name is reported against ("merge_method")
    noun      the word for one item in that message (default: `kind`)
    """

    def __init__(self, kind: str, discover: str | None = None, *,
                 order: Literal["name", "registered", "attribute"] = "name", field: str = "",
                 noun: str | None = None) -> None:  # fmt: skip
        self.kind, self.discover, self.order = kind, discover, order
        self.field, self.noun = field, noun or kind
        self._items: dict[str, T] = {}
        self._discovered = discover is None

    def _load(self) -> dict[str, T]:
        if not self._discovered:
            self._discovered = True  # first: a module that reads the registry must not recurse
            try:
                package = importlib.import_module(self.discover)  # type: ignore[arg-type]
                for mod in pkgutil.iter_modules(package.__path__):
                    if not mod.name.startswith("_"):
                        importlib.import_module(f"{self.discover}.{mod.name}")
            except BaseException:
                self._discovered = False  # the next read tries again (and fails again, loudly)
                raise
        return self._items

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, item: T) -> T: ...
    def register(self, name: str, item: Any = _MISSING) -> Any:
        """Add `item` under `name` (or, without `item`, a decorator that adds what it wraps).
        A name is registered once: a second registration is a programming error."""
        if item is _MISSING:
            return lambda it: self.register(name, it)
        if not name:
            raise ValueError(f"{self.kind}: a name must not be empty")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: it lists every one that is."""
        where = f"{self.field}: " if self.field else ""
        return f"{where}unknown {self.noun} {name!r}; choose one of {', '.join(self.names())}"

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The item named `name`; an unknown name is a ConfigError naming the choices (or, when
        `default` is given, returns it, as dict.get does)."""
        items = self._load()
        if name in items:
            return items[name]
        if default is not _MISSING:
            return default
        raise ConfigError(self.unknown(name))

    def names(self) -> list[str]:
        items = self._load()
        if self.order == "registered":
            return list(items)
        if self.order == "attribute":
            return sorted(items, key=lambda n: (items[n].order, n))  # type: ignore[attr-defined]
        return sorted(items)

    def items(self) -> list[tuple[str, T]]:
        items = self._load()
        return [(n, items[n]) for n in self.names()]

    def values(self) -> list[T]:
        return [item for _, item in self.items()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, item: T) -> None:  # as register (pytest's monkeypatch)
        self.register(name, item)

    def __delitem__(self, name: str) -> None:  # a test's temporary member, removed again
        del self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
