"""Console entry points, the four commands of pyproject.toml's [project.scripts], one module each with
get_args_parser() and main(argv):

    agmm-export   checkpoint -> artifacts of the precision table, with parity checks  (export.py)
    agmm-predict  label maps and overlays for images or folders                       (predict.py)
    agmm-bench    latency and throughput of artifacts                                 (bench.py)
    agmm-labels   annotation files -> a sparse-label data set, and predictions back  (labels.py)
"""

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
