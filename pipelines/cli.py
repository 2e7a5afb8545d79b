"""The `nlpctr` command: a thin dispatcher onto each job's own `run(argv)`.

Each job parses its own flags and hands the rest to Beam's PipelineOptions, so any Beam
option (`--runner`, `--direct_num_workers`, ...) passes straight through. A user's mistake
(`UserError`) prints one line and exits 2, with no traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from nlpctr.errors import UserError, interrupted, machine_fault

# command words -> (module, one-line help). Modules are imported on use: `nlpctr --help`
# should not pay for importing Beam or torch.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "prepare"): ("nlpctr.pipelines.ingest", "validate a source log into impressions (Beam)"),
    ("data", "simulate"): (
        "nlpctr.pipelines.simulate",
        "generate a sponsored-search log with known redundancy",
    ),
    ("ctr-stats",): ("nlpctr.pipelines.ctr_stats", "historical CTR features from training rows (Beam)"),
    ("embed",): ("nlpctr.pipelines.embed_text", "frozen-BERT embeddings of unique texts (Beam RunInference)"),
    ("features",): ("nlpctr.pipelines.feature_store_cli", "Feast: apply | materialize | get (online lookup)"),
    ("train",): ("nlpctr.pipelines.train", "train E0/E1/E2/E3 on Feast features; writes runs/NAME/"),
    ("evaluate",): ("nlpctr.pipelines.evaluate", "re-evaluate a run on test, paired delta vs a baseline"),
    ("experiment",): (
        "nlpctr.pipelines.experiment.command",
        "the whole protocol: prepare .. E0-E4 .. redundancy; results.json, report.md, plots",
    ),
    ("ceilings",): (
        "nlpctr.models.ceilings",
        "ceilings of a prepared split: the simulator's oracles, or the split-half ceiling",
    ),
    ("score-batch",): (
        "nlpctr.pipelines.score_batch",
        "enrich impressions from the online store (Beam Enrichment)",
    ),
    ("export",): (
        "nlpctr.pipelines.export",
        "a trained LM (E2, E3 or a student) as a transformers folder, click head, model card [, ONNX]",
    ),
}


class _DropStepErrors(logging.Filter):
    """A failing Beam step logs its exception, traceback and all, before Beam re-raises it: the
    command's one line says it once (and a bug's traceback is printed when it is re-raised)."""

    LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None and "Traceback (most recent call last)" not in record.getMessage()


class _QuietOptionalImports(logging.Filter):
    """Beam warns at import time about cloud clients (GCS, BigQuery) that offline jobs never use."""

    NOISE = ("Failed to import GCSFileSystem", "apitools not found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


def usage(group: str | None = None) -> str:
    """The commands, or only those of `group` (`nlpctr data --help`)."""
    lines = ["usage: nlpctr COMMAND [options]  (nlpctr COMMAND --help for its options)", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        if group is None or words[0] == group:
            lines.append(f"  {' '.join(words):<16} {text}")
    return "\n".join(lines)


def group_help(argv: list[str]) -> str | None:
    """The group's commands when `argv` names a group of several words (`data`) and asks for
    help or nothing more; None otherwise."""
    groups = {words[0] for words in COMMANDS if len(words) > 1}
    if argv[0] in groups and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        return usage(argv[0])
    return None


def resolve(argv: list[str]) -> tuple[Callable[[list[str]], Any], list[str]]:
    for words, (module, _) in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            return importlib.import_module(module).run, argv[len(words) :]
    raise UserError(f"unknown command {' '.join(argv[:2])!r}\n{usage()}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if (group := group_help(argv)) is not None:
        print(group)
        return 0 if len(argv) > 1 else 2
    # Weights come from the installed package; never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietOptionalImports())
    quiet = _DropStepErrors()
    for name in _DropStepErrors.LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        run, rest = resolve(argv)
        result = run(rest)
    except UserError as error:
        print(f"nlpctr: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlpctr: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if interrupted(error):  # Ctrl-C inside a Beam step, re-raised as a RuntimeError
            print("nlpctr: interrupted", file=sys.stderr)
            return 130
        fault = machine_fault(error)  # a full disk, a read-only folder, a name too long
        if fault is None:
            raise
        print(f"nlpctr: error: {fault}", file=sys.stderr)
        return 2
    finally:
        for name in _DropStepErrors.LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
    if isinstance(result, dict) and "summary" in result:
        print(result["summary"])
    elif result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
