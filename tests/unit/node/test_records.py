"""`record` behaves as `@dataclass(frozen=True, slots=True)` does, with its methods shared."""

from __future__ import annotations

import dataclasses
from dataclasses import FrozenInstanceError, dataclass, field

import pytest

from raftq.cluster.records import record


@record
class Point:
    x: int
    label: str = "p"
    cache: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class DataclassPoint:
    x: int
    label: str = "p"
    cache: tuple = field(default=(), repr=False, compare=False)


@record
class Empty:
    pass


@record
class Single:
    value: int


@record
class Shouting:
    word: str

    def __repr__(self) -> str:
        return self.word.upper()


def test_repr_is_the_dataclass_repr():
    assert repr(Point(1, "a", (9,))) == repr(DataclassPoint(1, "a", (9,))).replace("DataclassPoint", "Point")
    assert repr(Empty()) == "Empty()" and repr(Single(3)) == "Single(value=3)"


def test_equal_by_class_and_compared_fields_as_a_dataclass_is():
    assert Point(1) == Point(1) and Point(1) != Point(2) and Point(1, "a") != Point(1, "b")
    assert Point(1, "a", (1,)) == Point(1, "a", (2,))  # compare=False
    assert DataclassPoint(1, "a", (1,)) == DataclassPoint(1, "a", (2,))
    assert Point(1) != DataclassPoint(1) and Point(1) != (1, "p")
    assert Empty() == Empty() and Empty() != Single(0)
    assert Single(1) == Single(1) and Single(1) != Single(2)


def test_hash_follows_equality():
    assert hash(Point(1, "a", (1,))) == hash(Point(1, "a", (2,)))
    assert len({Point(1), Point(1), Point(2), Single(1), Single(1), Empty(), Empty()}) == 4


def test_frozen():
    point = Point(1)
    with pytest.raises(FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del point.x  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        point.other = 1  # type: ignore[attr-defined]
    assert point.x == 1


def test_still_a_dataclass_with_slots():
    assert dataclasses.replace(Point(1, "a"), x=5) == Point(5, "a")
    assert [f.name for f in dataclasses.fields(Point)] == ["x", "label", "cache"]
    assert dataclasses.asdict(Single(4)) == {"value": 4}
    assert not hasattr(Point(1), "__dict__")


def test_a_method_of_the_class_body_is_kept():
    assert repr(Shouting("hi")) == "HI"


def test_every_record_shares_the_same_methods_but_init():
    for name in ("__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__"):
        assert getattr(Point, name) is getattr(Single, name), name
    assert Point.__init__ is not Single.__init__
