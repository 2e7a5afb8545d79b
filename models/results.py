"""One dataset's results.json and its sections that `pipelines/experiment/` assembles (DESIGN.md,
"Modules in detail", `pipelines/experiment/`); the sweep's document is `models/sweep.py`'s.

They are built from the records `models/` makes (`increments`, `redundancy`, `ceilings`,
`claims`), and read by the report and the sweep, also back from a finished run's file: so they
are TypedDicts, and the objects stay the dicts that are written.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from nlpctr.models.ceilings import CeilingSummary
from nlpctr.models.claims import ClaimRecord, Verdict
from nlpctr.models.increments import (
    Conversion,
    FeatureGain,
    RedundancyMeasure,
    RunReport,
    StudentReport,
    ValidLoglossDelta,
)
from nlpctr.models.redundancy import E2Curve


class DistillDocument(TypedDict):
    """experiment.yaml's `distill:` as run (`pipelines/experiment/config.py` DistillSettings)."""

    teacher_fusion: str
    students: list[int]
    weight: float
    loop: dict[str, int | float | str]  # LoopConfig fields over its defaults
    feature_kd: dict[str, int | float | str]
    throughput_texts: int


class SimulatorDocument(TypedDict):
    """experiment.yaml's `simulator:` as run (SimulatorSettings)."""

    rho: list[float]
    rows: int
    fusions: list[str] | None
    text_strength: float
    impressions_per_row: int | None
    distill: bool
    seeds: list[int] | None
    seed_rho: list[float] | None
    train_config: dict[str, Any] | None  # a training config (models/config.py's keys)


class ProtocolDocument(TypedDict):
    """results.json's `protocol` (`Protocol.to_dict`): a finished rho's identity in the sweep."""

    encoder: str
    device: str | None
    precision: str | None
    embed_layers: int
    lm_layers: int
    fusions: list[str]
    joint_init_from_baseline: bool
    train_config: dict[str, Any]  # a training config (models/config.py's keys)
    distill: DistillDocument
    redundancy: dict[str, int]
    simulator: SimulatorDocument


class ValidPoint(TypedDict):
    """One validation of a joint run's recipe (`valid_curve`)."""

    stage: str
    step: int
    valid_logloss: float
    valid_auc: float


class RunEntry(RunReport):
    """One run of `runs`: its test report on the shared frame and how it was fitted. `budget`,
    `encoder` and `stages` are the run's own record (`nlpctr train`'s results.json), copied."""

    mode: str
    fusion: str | None
    layers: int | None
    epochs: int
    best_epoch: int
    wall_seconds: float
    train_rows_per_s: float
    best_valid_logloss: float | None
    budget: dict[str, Any] | None
    encoder: dict[str, Any] | None
    stages: NotRequired[list[dict[str, Any]]]  # the joint recipe, per stage
    valid_curve: NotRequired[list[ValidPoint]]


class ProbeControl(ValidLoglossDelta):
    """`controls`' first entry: the joint run's LM stage against its probe-only control."""

    id: str
    statement: str
    verdict: Verdict


Control = ProbeControl | ClaimRecord  # `controls`: the probe control, then the feature controls


class StudentForm(FeatureGain, Conversion):
    """A student's feature in one form: its gain over E0 and its conversion rate."""


class StudentEntry(StudentReport):
    """One student of `distillation` (`<method>_L<layers>`): end to end, and per form as a feature."""

    score: StudentForm
    vector: StudentForm
    rows_per_s: float  # inference, encoder only
    teacher_rows_per_s: float  # the teacher on the same texts


class TeacherEntry(TypedDict):
    """`teacher`: E4's teacher, how it was chosen, end to end and as a feature per form."""

    run: str
    fusion: str
    selected_by: str
    valid_delta_auc: dict[str, float]
    layers: int
    auc: float
    rig: float
    gauc: float
    score: FeatureGain
    vector: FeatureGain
    nothing_to_distil: dict[str, bool]


class Provenance(TypedDict):
    """Where a result came from: the data, the encoders, the code and the placement."""

    dataset: str
    spec_hash: str | None
    split_mode: str
    split_seed: int
    frozen_encoder: str | None
    lm_encoder: str
    code_version: str
    torch: str
    placement: dict[str, str | None]
    data_dir: str  # relative to the results folder
    runs_dir: str
    e2_feast_vs_in_memory_max_abs_diff: float | None


class ExperimentResults(TypedDict):
    """One dataset's results.json (`protocol.run_protocol`); `summary` only in what it returns."""

    dataset: str
    source: str
    seed: int
    split: str
    quick: bool
    wall_seconds: float
    timings: dict[str, float]
    runs: dict[str, RunEntry]
    ceilings: CeilingSummary
    redundancy: dict[str, RedundancyMeasure]
    e2_curve: E2Curve
    distillation: NotRequired[dict[str, StudentEntry]]  # with students
    teacher: NotRequired[TeacherEntry]
    claims: list[ClaimRecord]
    controls: list[Control]
    protocol: ProtocolDocument
    provenance: Provenance
    summary: NotRequired[str]
