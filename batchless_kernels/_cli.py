"""Argument types of the repository's command-line scripts (bench/, examples/): argparse reports a bad
value as a usage error that names the option (a shape or batch size of 0 raised ZeroDivisionError
deep in a run)."""

from __future__ import annotations

import argparse
import math


def shape(text: str) -> tuple[int, ...]:
    """'256x64x32x32' -> (256, 64, 32, 32): (N, C, *) with at least 2 dims, each a positive int."""
    try:
        dims = tuple(int(d) for d in text.split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 256x64x32x32 or 32x256 "
                                         "(N x C x ..., at least 2 positive sizes)")
    return dims


def number(kind: type, low: float = 0, high: float = math.inf, *, low_closed: bool = False,
           high_closed: bool = False):
    """An argparse type: a number of `kind` (int or float) between low and high, each bound excluded
    unless closed (NaN is refused)."""
    interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        above = value is not None and (low <= value if low_closed else low < value)
        below = value is not None and (value <= high if high_closed else value < high)
        if not (above and below):
            where = f"a positive {kind.__name__}" if interval == "(0, inf)" else f"in {interval}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {where}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"
    return parse


def positive(kind: type):
    """A finite number of `kind` above 0."""
    return number(kind)


def nonnegative(kind: type):
    """A finite number of `kind`, 0 or more."""
    return number(kind, 0, low_closed=True)


def fraction(high_closed: bool = False, low_closed: bool = True):
    """A float in [0, 1) (a dropout probability), or another of the four intervals of 0 and 1."""
    return number(float, 0, 1, low_closed=low_closed, high_closed=high_closed)
