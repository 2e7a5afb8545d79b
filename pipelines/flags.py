"""The one way a job's flags become its typed request: each field of the request dataclass from
the flag of the same name (argparse's `dest`), the rest given by the job (a flag named or typed
otherwise, the Beam options)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

Request = TypeVar("Request")


def request_from_args(cls: type[Request], args: argparse.Namespace, **given: Any) -> Request:
    """Build the request dataclass `cls` from parsed flags.

    Args:
        cls: a dataclass whose fields are named as the flags' destinations.
        args: the parsed flags.
        **given: fields the flags do not spell as they are (`beam=...`, `progress=not
            args.no_progress`, a converted value); they win over a flag of the same name.

    Returns:
        The request; a field with neither a flag nor a given value keeps its default.

    Raises:
        TypeError: `cls` is not a dataclass, or a required field has no value (a bug of the job).
    """
    flags = vars(args)
    taken = {
        f.name: flags[f.name]
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.name in flags and f.name not in given
    }
    return cls(**taken, **given)
