"""What `nlpctr experiment` passes through to every job it runs: Beam pipeline options (to
`data prepare`, `ctr-stats` and `embed`, after their own flags, as each Beam job takes them) and
the feature store's stores (to `features apply`; every later step reads the store it rendered,
so training frames, materialisation and the trainers' own re-applies use the same stores)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr.errors import UserError
from nlpctr.features.store_config import StoreChoice


def beam_flags(flags: Sequence[str], command: str) -> tuple[str, ...]:
    """`flags` when every one is a Beam pipeline option with a valid value; else one line.

    Beam drops a flag it does not know with a warning; here that would be a typo of one of the
    command's own flags, silently ignored, so it is refused instead."""
    flags = list(flags)

    def refuse(parser: argparse.ArgumentParser) -> None:
        """Beam's parser of every pipeline option, before it reads `flags` (and warns)."""

        def error(message: str) -> None:
            raise UserError(f"{command}: Beam pipeline option: {message}; see {command} --help")

        parser.error = error  # type: ignore[method-assign]
        _, unknown = parser.parse_known_args(flags)
        if unknown:
            raise UserError(
                f"{command}: {unknown[0]!r} is neither one of its flags nor a Beam pipeline option; "
                f"see {command} --help"
            )

    PipelineOptions(flags).get_all_options(add_extra_args_fn=refuse)
    return tuple(flags)


@dataclass(frozen=True)
class JobOptions:
    """The user's infrastructure, for every job of a protocol run.

    Attributes:
        beam: Beam pipeline options (`--runner`, `--direct_num_workers`, ...), checked by
            `beam_flags`; given to each Beam job after its own flags.
        store: the online and offline stores `features apply` renders the repository for.
    """

    beam: tuple[str, ...] = ()
    store: StoreChoice = field(default_factory=StoreChoice)
