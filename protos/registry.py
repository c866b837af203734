"""Named registries whose members register where they are defined.

A strategy (strategies/) or an update encoding (protos/encodings/) is one
module that decorates its class with the registry's ``register``; nothing else
lists it. The registry imports every module of its package the first time it
is asked for a name, so a new module in the package is found without editing
any other file. Modules whose name starts with ``_`` are not imported; every
other module of the package must be harmless to import.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Registry(Generic[T]):
    """Members by name, found by importing every module of ``package``.

    ``order``: sort key ``(name, member) -> comparable`` for ``names()`` and
    ``items()`` (default: registration order). ``name_attr``: the attribute
    the decorator sets on each member to its registered name, so the name is
    written once; a member that defines that attribute itself must agree.
    """

    def __init__(self, what: str, package: str, *, order: Callable[[str, T], Any] | None = None,
                 name_attr: str | None = None) -> None:
        self.what = what            # "strategy", "encoding": used in error messages
        self.package = package      # dotted name of the package whose modules register
        self.order = order
        self.name_attr = name_attr
        self._members: dict[str, T] = {}
        self._scanned_path: tuple[str, ...] | None = None
        # a module imported by the scan may itself ask the registry: that thread then
        # sees the members registered so far instead of recursing. No lock: imports
        # are serialised by Python's own module locks, and holding one of ours
        # across an import could deadlock against a thread importing a member.
        self._scan = threading.local()
        # build function -> (the members it was built from, what it built); replaced whole,
        # so a reader on another thread sees either the old pair or the new one
        self._derived: dict[Callable[..., Any], tuple[tuple[tuple[str, T], ...], Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@STRATEGIES.register("fedavg")``."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a {self.what} name must be a non-empty string without surrounding spaces, "
                             f"got {name!r}")
        key = name.lower()

        def add(member: T) -> T:
            if inspect.isabstract(member):
                raise TypeError(f"{self.what} {key!r}: {_qualname(member)} is abstract and cannot be registered")
            known = self._members.get(key)
            if known is not None and known is not member and _qualname(known) != _qualname(member):
                raise ValueError(f"{self.what} {key!r} is registered twice: {_qualname(known)} and {_qualname(member)}")
            if self.name_attr is not None:
                own = vars(member).get(self.name_attr) if isinstance(member, type) else None
                if own is not None and own != key:
                    raise ValueError(f"{_qualname(member)} sets {self.name_attr}={own!r} "
                                     f"but is registered as {key!r}")
                setattr(member, self.name_attr, key)
            self._members[key] = member
            return member

        return add

    def unregister(self, name: str) -> T:
        """Remove a member and return it (a plugin unloaded, a test cleaning up).

        Its module stays imported: drop it from ``sys.modules`` too if it is
        to be found again by a later scan."""
        try:
            return self._members.pop(str(name).lower())
        except KeyError:
            raise ValueError(f"{self.what} {name!r} is not registered") from None

    def _discover(self) -> None:
        if getattr(self._scan, "active", False):
            return
        package = importlib.import_module(self.package)
        path = tuple(getattr(package, "__path__", ()))
        if path == self._scanned_path:  # scanned already (a path extended later is scanned again)
            return
        self._scan.active = True
        try:
            for module in pkgutil.iter_modules(path):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{module.name}")
        finally:
            self._scan.active = False
        # set only once every module imported: a failed import is raised again next time
        self._scanned_path = path

    def _sorted(self) -> list[tuple[str, T]]:
        items = list(self._members.items())
        if self.order is not None:
            order = self.order
            items.sort(key=lambda item: order(item[0], item[1]))
        return items

    def get(self, name: str) -> T:
        """The member called ``name``; ValueError listing the valid names otherwise."""
        self._discover()
        try:
            return self._members[str(name).lower()]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; valid: {self.names()}") from None

    def names(self) -> list[str]:
        self._discover()
        return [name for name, _ in self._sorted()]

    def items(self) -> Iterator[tuple[str, T]]:
        self._discover()
        return iter(self._sorted())

    def __contains__(self, name: object) -> bool:
        self._discover()
        return isinstance(name, str) and name.lower() in self._members

    def derived(self, build: Callable[[tuple[tuple[str, T], ...]], R]) -> R:
        """``build(members)`` — a lookup table, a check over all members — rebuilt only
        when the members change (a module registered later, or removed by a test)."""
        members = tuple(self.items())
        cached = self._derived.get(build)
        if cached is not None and cached[0] == members:
            return cached[1]
        value = build(members)
        self._derived[build] = (members, value)
        return value


def where(member: object) -> str:
    """module.qualname of a member, for error messages."""
    return _qualname(member)


def _qualname(member: object) -> str:
    return f"{getattr(member, '__module__', '?')}.{getattr(member, '__qualname__', repr(member))}"
