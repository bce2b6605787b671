"""Console entry points: agmm-export, agmm-predict, agmm-bench (each: get_args_parser() and main(argv))."""

import argparse


def class_names(text: str) -> tuple[str, ...]:
    """argparse type for ``--classes sky,road,car``: the names in order, none empty."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class name; expected e.g. sky,road,car")
    return names


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; expected a whole number >= 1")
    return value
