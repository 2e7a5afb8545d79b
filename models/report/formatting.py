"""What the report's sections and plots share: plot file names, labels, run order, and the
formatting of numbers with their CIs and of markdown tables."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from nlpctr.models.increments import RedundancyMeasure
from nlpctr.models.metrics import Estimate
from nlpctr.models.results import RunEntry

PLOTS = {
    "forest": "paired_differences.png",
    "metrics": "metric_bars.png",
    "calibration": "calibration.png",
    "e2_curve": "e2_curve.png",
    "redundancy": "explained_fraction.png",
    "conversion": "student_feature_gain.png",
    "simulator": "simulator.png",
    "simulator_shares": "simulator_shares.png",
    "joint_curves": "joint_curves.png",
}


Shared = RunEntry | RedundancyMeasure  # an entry with a `share_of_text_gain`


RUN_ORDER = ("baseline", "cascade_frozen", "cascade_finetuned", "joint_score", "joint_concat", "joint_gate")


SHARE_LABELS = {"rig": "RIG", "auc": "AUC", "gauc": "GAUC"}


SWEEP_MEASURES = {
    "explained_fraction": "explained fraction (E0 inputs)",
    "explained_fraction_representation": "explained fraction (E0 representation)",
    "delta_auc": "ΔAUC over E0",
    "delta_rig": "ΔRIG over E0",
}


SHARE_NOTE = (
    "Share = (model − E0) / (ceiling gap): on simulated data the gap is the Bayes oracle − the "
    "no-text oracle (the achievable text gain); on real data the split-half ceiling − E0. "
    "n/a: not meaningful here (see Ceilings). Paired group bootstrap, the draws of the Δ CIs."
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{float(value):{'+' if signed else ''}.{digits}f}"


def with_ci(value: Any, ci: Sequence[float] | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    if not ci:
        return num(value, digits, signed)
    return f"{num(value, digits, signed)} [{num(ci[0], digits, signed)}, {num(ci[1], digits, signed)}]"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def excludes_zero(ci: Sequence[float] | None) -> bool | None:
    """Whether a difference's CI excludes 0; None without a CI."""
    if not ci:
        return None
    return ci[0] > 0 or ci[1] < 0


def ordered_runs(runs: Collection[str]) -> list[str]:
    """Run names (a mapping's keys) in the protocol's order, then any others sorted."""
    return [r for r in RUN_ORDER if r in runs] + sorted(r for r in runs if r not in RUN_ORDER)


def interval_cell(interval: Estimate | None, digits: int = 4, signed: bool = False) -> str:
    """An {estimate, ci} entry as `value [low, high]`."""
    if not isinstance(interval, Mapping):
        return with_ci(None, None, digits, signed)
    return with_ci(interval.get("estimate"), interval.get("ci"), digits, signed)


def share_metrics(entries: Sequence[Shared]) -> list[str]:
    """The metrics the entries' `share_of_text_gain` is given on (simulated: rig, auc; real: gauc, auc)."""
    found: dict[str, None] = {}
    for entry in entries:
        found.update(dict.fromkeys((entry or {}).get("share_of_text_gain") or {}))
    return list(found)


def share_cell(entry: Shared, metric: str) -> str:
    """A run's or a feature's share of the text gain on `metric`; n/a where it is not meaningful."""
    share = (entry.get("share_of_text_gain") or {}).get(metric) or {}
    if share.get("estimate") is None:
        return "–" if not share.get("reason") else "n/a"
    return interval_cell(share, digits=2)
