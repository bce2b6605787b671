"""The command-line wrapper shared by the training entry modules: a user's error is one sentence and exit 2."""

from __future__ import annotations

import sys
from typing import Any, Callable


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None,
            errors: tuple[type[BaseException], ...], message: Callable[[BaseException], str] = str) -> int:
    """Runs ``main(argv)``: exit code 0, or 2 with ``error: <sentence>`` on stderr for one of ``errors``."""
    try:
        main(argv)
    except errors as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2
    return 0
