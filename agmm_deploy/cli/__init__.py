"""Console entry points: agmm-export, agmm-predict, agmm-bench (each: get_args_parser() and main(argv))."""

import argparse


def class_names(text: str) -> tuple[str, ...]:
    """argparse type for ``--classes sky,road,car``: the names in order, none empty."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class name; expected e.g. sky,road,car")
    return names
