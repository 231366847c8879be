"""Argument types of the benchmark scripts' command lines: argparse reports a bad value as a usage
error that names the option (a shape of 0 raised ZeroDivisionError deep in the run)."""

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


def positive(kind: type):
    """An argparse type: a finite number of `kind` (int or float) above 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (0 < value < math.inf):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse
