"""Progress, one channel: every bar and line a job or the trainer shows while it works goes
through here, to stderr (stdout holds a command's result), and `--no-progress` (a request's
`progress=False`, passed here as `show`) silences all of it. Warnings stay with `logging`."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def bar(iterable: Iterable[Item] | None = None, *, show: bool, **options: Any) -> tqdm:
    """A progress bar on stderr, drawn only when `show` and stderr is a terminal.

    Args:
        iterable: what the bar counts (None: updated by hand).
        show: the request's `progress`.
        **options: tqdm's (desc, unit, total, initial, leave).

    Returns:
        The tqdm bar (iterate it, or `update` it).
    """
    return tqdm(iterable, file=sys.stderr, disable=None if show else True, **options)


def note(line: str, *, show: bool) -> None:
    """One line of progress on stderr (above any bar being drawn) when `show`."""
    if show:
        tqdm.write(line, file=sys.stderr)
