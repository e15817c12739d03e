"""argparse types shared by the command-line tools, so that a flag means the same thing
and fails the same way everywhere: one usage line, exit 2, never a traceback later
(``vizloc-map --minutes inf`` once passed the check and crashed converting the budget to
a step count)."""
from __future__ import annotations

import argparse
import math


def positive(kind):
    """argparse type: a finite number of ``kind`` (``int`` or ``float``) above 0."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}")
        return value

    parse.__name__ = f"positive {noun}"
    return parse
