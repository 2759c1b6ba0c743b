"""The one parser of command-line option strings (corruption and intervention specs)."""

from __future__ import annotations

import pytest

from vlm_interp.options import SpecParser


class Bad(ValueError):
    pass


P = SpecParser("thing", "a:x=1 | b", Bad)


def test_split_and_options():
    assert P.split(" a : x=1 ", ("a", "b")) == ("a", " x=1")
    assert P.split("b", ("a", "b")) == ("b", "")
    assert P.options("a", " x = 1 ,y=two,", ("x", "y")) == {"x": "1", "y": "two"}
    assert P.options("a", "", ("x",)) == {}
    assert P.pairs("p=q+r=s", "pair", "P=Q", sep="+") == [("p", "q"), ("r", "s")]


def test_values():
    assert P.integer("a", "x", "7") == 7 and P.number("a", "x", "2.5") == 2.5
    assert P.integers("a", "x", "1-3") == [1, 2, 3]
    assert P.integers("a", "x", "0+2+5") == [0, 2, 5]


@pytest.mark.parametrize("call, message", [
    (lambda: P.split("", ("a",)), "empty thing spec; use one of: a:x=1 | b"),
    (lambda: P.split("c:x=1", ("a",)), "unknown thing spec 'c:x=1'; use one of"),
    (lambda: P.options("a", "x", ("x",)), "a option 'x' must look like key=value; spec forms: a:x=1 | b"),
    (lambda: P.options("a", "x=", ("x",)), "must look like key=value"),
    (lambda: P.options("a", "z=1", ("x",)), r"unknown a option 'z'; a takes \['x'\]"),
    (lambda: P.options("a", "x=1,x=2", ("x",)), "a option 'x' is given twice"),
    (lambda: P.integer("a", "x", "1.5"), "a option x='1.5' must be an integer"),
    (lambda: P.number("a", "x", "one"), "a option x='one' must be a number"),
    (lambda: P.integers("a", "x", "1-b"), "must be an integer"),
    (lambda: P.pairs("p", "pair", "P=Q"), "pair 'p' must look like P=Q"),
])
def test_errors_name_the_fix(call, message):
    with pytest.raises(Bad, match=message):
        call()
