"""`record`: a frozen dataclass with slots, whose methods but `__init__` are shared by every class.

A node defines some sixty such value classes: queue commands and their results, Raft messages,
the shell's Ready effects. For each, `@dataclass(frozen=True, slots=True)` compiles six functions
of its own (`__init__`, `__repr__`, `__eq__`, `__hash__`, `__setattr__`, `__delattr__`): about
14 KB a class in code objects, 0.8 MiB of every node. Only `__init__` gains from being compiled
for its fields, so `record` keeps the dataclass's `__init__` and gives every class the same five
others, which read a class's fields through one `operator.attrgetter` made for it.

The behaviour is the dataclass's: equal when of the same class with equal compared fields (else
NotImplemented), a hash of those fields, the repr `Name(field=value, ...)` of the fields shown in
it, `FrozenInstanceError` on assignment or deletion; `dataclasses.fields`, `replace` and `asdict`
work as on any dataclass, since it is one. A method the class body defines itself is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import FrozenInstanceError
from operator import attrgetter
from typing import Any, Callable, TypeVar, dataclass_transform

_T = TypeVar("_T", bound=type)

#: The methods `record` shares, and the class body may define instead.
_SHARED = ("__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__")


def _values_getter(names: tuple[str, ...]) -> staticmethod:
    """The named fields of an instance, as a tuple (attrgetter gives a bare value for one name);
    a staticmethod, so that an instance reads it from its class without binding itself to it."""
    getter: Callable[[Any], tuple]
    if len(names) > 1:
        getter = attrgetter(*names)
    elif names:
        single = attrgetter(names[0])
        getter = lambda instance: (single(instance),)  # noqa: E731
    else:
        getter = lambda instance: ()  # noqa: E731
    return staticmethod(getter)


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        values = self._record_compared
        return values(self) == values(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self._record_hashed(self))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={value!r}" for name, value in zip(self._record_shown, self._record_shown_values(self)))
    return f"{self.__class__.__qualname__}({shown})"


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(frozen_default=True)
def record(cls: _T) -> _T:
    """`@dataclass(frozen=True, slots=True)`, with the shared methods of the module docstring."""
    own = {name for name in _SHARED if name in cls.__dict__}
    made = dataclasses.dataclass(frozen=True, slots=True, repr=False, eq=False)(cls)
    fields = dataclasses.fields(made)
    shown = tuple(f.name for f in fields if f.repr)
    made._record_shown = shown
    made._record_shown_values = _values_getter(shown)
    made._record_compared = _values_getter(tuple(f.name for f in fields if f.compare))
    # The dataclass's rule for frozen classes: a field's `hash`, or else its `compare`.
    made._record_hashed = _values_getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))
    for name, method in zip(_SHARED, (_eq, _hash, _repr, _setattr, _delattr)):
        if name not in own:
            setattr(made, name, method)
    return made
