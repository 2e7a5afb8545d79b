"""The one exception type for a user's mistake (the CLI prints it on one line, no traceback), and
the failures of the machine the CLI reports the same way: a full disk, a read-only folder, a name
too long, and an interrupt, however an engine (Beam) wrapped them."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator


class UserError(Exception):
    """Bad input, a wrong spec or a missing prerequisite; the message names the fix."""


# errno -> what the user does about it.
_MACHINE_FAULTS = {
    errno.ENOSPC: "free space on that disk (or write elsewhere)",
    errno.EDQUOT: "free space within your disk quota (or write elsewhere)",
    errno.EROFS: "it is on a read-only filesystem: make it writable, or write elsewhere",
    errno.EACCES: "you lack permission for it: fix its permissions, or use another location",
    errno.EPERM: "you lack permission for it: fix its permissions, or use another location",
    errno.ENAMETOOLONG: "a name in the path is longer than the filesystem takes: choose a shorter one",
}
# How Beam reports a worker's exception it could not re-create: "OSError: [Errno 28] text: 'path'".
_WRAPPED_OS_ERROR = re.compile(r"\[Errno (\d+)\] (.+?)(?:: '([^']*)')?(?= \[while running|$)", re.MULTILINE)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def machine_fault(exc: BaseException) -> UserError | None:
    """The one-line error for a failure of the machine rather than of nlpctr (a full disk, a
    read-only folder, a name too long, no permission), found in `exc` or what it wraps; None for
    anything else.

    Args:
        exc: what a command raised.

    Returns:
        A UserError naming the file, the reason and the fix, or None.
    """
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in _MACHINE_FAULTS:
            return _fault(link.errno, link.strerror or str(link), link.filename)
        found = _WRAPPED_OS_ERROR.search(str(link)) if isinstance(link, RuntimeError) else None
        if found and int(found[1]) in _MACHINE_FAULTS:
            return _fault(int(found[1]), found[2], found[3])
    return None


def _fault(code: int, reason: str, path: object | None) -> UserError:
    where = f" ({path})" if path else ""
    return UserError(f"{reason.strip()}{where}; {_MACHINE_FAULTS[code]}, then rerun the same command")


def interrupted(exc: BaseException) -> bool:
    """Whether `exc` is a Ctrl-C that an engine wrapped (Beam re-raises a KeyboardInterrupt from
    a step as `RuntimeError("KeyboardInterrupt [while running ...]")`)."""
    return any(
        isinstance(link, KeyboardInterrupt)
        or (isinstance(link, RuntimeError) and str(link).startswith("KeyboardInterrupt"))
        for link in _chain(exc)
    )
