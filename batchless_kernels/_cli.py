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


def number(kind: type, low: float = 0, high: float = math.inf):
    """An argparse type: a number of `kind` (int or float) strictly between low and high."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (low < value < high):
            where = f"positive {kind.__name__}" if (low, high) == (0, math.inf) else f"in ({low:g}, {high:g})"
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a ' if where[0] == 'p' else ''}{where}")
        return value

    parse.__name__ = f"{kind.__name__} in ({low:g}, {high:g})"
    return parse


def positive(kind: type):
    """A finite number of `kind` above 0."""
    return number(kind)
