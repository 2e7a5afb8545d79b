"""One dataset through the experiment protocol (DESIGN.md, "Experiment protocol").

prepare (Beam) -> CTR history (Beam) -> frozen embeddings (Beam RunInference) -> Feast apply and
materialize -> E0 baseline, E1 cascade-frozen, E2 cascade-finetuned, E3 joint per fusion (each a
`nlpctr train` run, through Feast) -> redundancy of every NLP feature -> E4 distillation
(`students.py`) -> the paper's claims. Each Beam job is called through its typed
entry (`ingest.prepare`, `ctr_stats.ctr_stats`, `embed_text.embed`), each training run as a
`train.TrainRequest`; the analysis is `models.increments.FeatureJudge`'s.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from nlpctr.atomic import write_atomic, write_json
from nlpctr.features import store as feature_store
from nlpctr.features.names import CASCADE_FROZEN, lm_feature_slug
from nlpctr.layout import EXPERIMENT_RESULTS, lm_features_dir, read_manifest
from nlpctr.models import claims, redundancy, report
from nlpctr.models.claims import ClaimRecord
from nlpctr.models.config import Mode
from nlpctr.models.ctr_net import Fusion
from nlpctr.models.device import Placement
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.increments import FeatureJudge, RedundancyMeasure
from nlpctr.models.nlp_features import FORMS, NlpFeature, feature_key, frozen_vectors, lm_feature
from nlpctr.models.redundancy import E2Curve, E2Point, E2PointForm
from nlpctr.models.results import (
    Control,
    ExperimentResults,
    ProbeControl,
    Provenance,
    RunEntry,
    StudentEntry,
    TeacherEntry,
    ValidPoint,
)
from nlpctr.models.sweep import SweepResults
from nlpctr.models.training import LmStep
from nlpctr.pipelines import ctr_stats, embed_text, ingest, train, train_modes
from nlpctr.pipelines.experiment import students
from nlpctr.pipelines.experiment.config import Protocol
from nlpctr.pipelines.job_options import JobOptions
from nlpctr.pipelines.ownership import claim_output_dir

JOB = "experiment"
BASELINE_RUN = Mode.BASELINE.run_name
E1_RUN, E2_RUN = Mode.CASCADE_FROZEN.run_name, Mode.CASCADE_FINETUNED.run_name
JOINT_PROBE = "joint_probe"


@dataclass(frozen=True)
class ExperimentRequest:
    """One `nlpctr experiment` run, as its flags say it (None: the protocol's value).

    `rho`, `rows` and `impressions_per_row` go with the simulated sweep only; `options` is the
    user's infrastructure (Beam options, stores) for every job the protocol runs.
    """

    dataset: str  # a bundled dataset, a spec's path, or `simulated`
    out: Path
    quick: bool = False
    seed: int = 0
    config: Path | None = None  # YAML merged over the protocol
    encoder: str | None = None
    rho: tuple[float, ...] | None = None
    rows: int | None = None
    impressions_per_row: int | None = None  # 0: one binary impression per row
    device: str | None = None
    precision: str | None = None
    progress: bool = True
    options: JobOptions = field(default_factory=JobOptions)


class PlacementFlags(typing.Protocol):
    """`--device` and `--precision` as given (None: not given)."""

    device: str | None
    precision: str | None


def experiment_placement(flags: PlacementFlags, protocol: Protocol) -> Placement:
    """Where every job and run of the experiment goes: `--device`/`--precision`, else the protocol's."""
    device = flags.device if flags.device is not None else protocol.device
    precision = flags.precision if flags.precision is not None else protocol.precision
    return Placement.resolve(device, precision)


class Experiment:
    """One dataset through the protocol; each step records its wall time in `timings`."""

    def __init__(self, request: ExperimentRequest, protocol: Protocol, out: Path) -> None:
        self.request, self.protocol, self.out = request, protocol, out
        self.options = request.options  # the user's Beam options and stores, for every job
        self.placement = experiment_placement(request, protocol)
        self.data_dir = out / "data"
        self.runs_dir = out / "runs"
        self.seed = int(request.seed)
        self.progress = request.progress
        self.timings: dict[str, float] = {}
        self.runs: dict[str, RunEntry] = {}
        self.trained: dict[str, train.TrainResult] = {}
        self.train_config_file = out / "train_config.yaml"
        self.feast_agreement: float | None = None  # E2's chosen checkpoint: Feast vs in-memory
        self.code_version = train.code_version()  # at the start: the tree may change during a long run

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[experiment] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 2)
        print(f"[experiment] {name}: {self.timings[name]:.1f} s", flush=True)

    # -------------------------------------------------------------------- data and features

    def prepare(self, dataset: str) -> None:
        data, beam = self.data_dir, self.options.beam
        with self.stage("prepare"):
            ingest.prepare(ingest.PrepareRequest(dataset, data, seed=self.seed, beam=beam))
        with self.stage("ctr_stats"):
            ctr_stats.ctr_stats(ctr_stats.CtrStatsRequest(data, beam=beam))
        with self.stage("embed"):
            encoder = EncoderConfig(name=self.protocol.encoder, layers=int(self.protocol.embed_layers))
            device = str(self.placement.device)
            embed_text.embed(embed_text.EmbedRequest(data, encoder, device=device, beam=beam))
        with self.stage("feast_apply_materialize"):
            feature_store.apply(self.data_dir, self.options.store)
            feature_store.materialize(self.data_dir)
        self.manifest = read_manifest(self.data_dir)

    # -------------------------------------------------------------------- E0-E3

    def train(
        self, run: str, mode: Mode, fusion: Fusion | None = None, probe_only: bool = False
    ) -> train.TrainResult:
        layers = self.protocol.lm_layers if mode.trains_lm else None  # E2 and E3: one LM
        warm_start = mode == Mode.JOINT and (self.protocol.joint_init_from_baseline or probe_only)
        request = train.TrainRequest(
            mode=mode,
            data_dir=self.data_dir,
            run=run,
            runs_dir=self.runs_dir,
            fusion=fusion,
            layers=int(layers) if layers else None,
            seed=self.seed,
            config_file=self.train_config_file,
            init_from=BASELINE_RUN if warm_start else None,
            progress=self.progress,
            probe_only=probe_only,
            device=str(self.placement.device),
            precision=self.placement.precision,
        )
        with self.stage(f"train_{run}"):
            trained = train.train(request)
        print(trained.summary, flush=True)
        return trained

    def train_runs(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.train_config_file, yaml.safe_dump(self.protocol.train_config, sort_keys=True))
        self.trained[BASELINE_RUN] = self.train(BASELINE_RUN, Mode.BASELINE)
        self.trained[E1_RUN] = self.train(E1_RUN, Mode.CASCADE_FROZEN)
        self.trained[E2_RUN] = self.train(E2_RUN, Mode.CASCADE_FINETUNED)
        for fusion in self.protocol.fusions:
            self.trained[f"joint_{fusion}"] = self.train(f"joint_{fusion}", Mode.JOINT, Fusion(fusion))
        # the probe-only control: the score fusion's head on the frozen LM, E0 frozen
        self.trained[JOINT_PROBE] = self.train(JOINT_PROBE, Mode.JOINT, Fusion.SCORE, probe_only=True)
        self.load_test_set()
        for name, trained in self.trained.items():
            self.runs[name] = self.run_entry(name, trained)

    def load_test_set(self) -> None:
        """The frame every analysis shares: cascade-frozen's training frame (a superset of E0's)."""
        with self.stage("training_frame"):
            frame = feature_store.training_frame(self.data_dir, CASCADE_FROZEN)
        self.judge = FeatureJudge.load(
            frame,
            self.manifest,
            self.runs_dir,
            BASELINE_RUN,
            self.train_config_file,
            self.seed,
            self.protocol.redundancy,
            self.placement,
        )
        with self.stage("ceilings"):
            self.judge.measure_ceiling()

    def run_entry(self, name: str, trained: train.TrainResult) -> RunEntry:
        """A run's test metrics on the shared frame (and its paired delta over E0), with its fit."""
        judge, results = self.judge, trained.results
        tested = judge.e0_report() if name == BASELINE_RUN else judge.report_of(judge.saved_predictions(name))
        entry = RunEntry(
            **tested,
            mode=results["mode"],
            fusion=results["fusion"],
            layers=results["layers"],
            epochs=results["epochs"],
            best_epoch=results["best_epoch"],
            wall_seconds=results["wall_seconds"],
            train_rows_per_s=results["train_rows_per_s"],
            best_valid_logloss=results.get("best_valid_logloss"),
            budget=results.get("budget"),
            encoder=results.get("encoder"),
        )
        if results.get("stages"):  # the joint recipe: per stage, and its validation curve
            entry["stages"] = results["stages"]
            entry["valid_curve"] = [
                ValidPoint(
                    stage=h["stage"],
                    step=h["step"],
                    valid_logloss=h["valid_logloss"],
                    valid_auc=h["valid_auc"],
                )
                for h in results["history"]
            ]
        return entry

    # -------------------------------------------------------------------- redundancy

    def feature_of_lm(self, run: str, checkpoint: str, kind: str, name: str) -> NlpFeature:
        folder = lm_features_dir(self.data_dir, lm_feature_slug(run)) / checkpoint
        return lm_feature(folder, self.judge.frame, kind, name)

    def redundancy(self) -> tuple[dict[str, RedundancyMeasure], E2Curve]:
        """Every NLP feature's measures in both forms (`<feature>/<form>`), and E2's
        standalone-vs-gain curve over its checkpoints."""
        judge = self.judge
        measures: dict[str, RedundancyMeasure] = {}
        with self.stage("redundancy_frozen"):
            measures.update(judge.judge(NlpFeature("frozen", "frozen", frozen_vectors(judge.frame))))
        e2 = self.trained[E2_RUN].lm_step
        assert e2 is not None
        with self.stage("redundancy_cascade_finetuned"):
            for folder in e2.checkpoints:
                name = f"cascade_finetuned@{folder}"
                feature = self.feature_of_lm(E2_RUN, folder, E2_RUN, name)
                measures.update(judge.judge(feature))
                if folder == e2.chosen:
                    self.feast_agreement = self.served_agreement(name, judge.increments)
        for run in [*(f"joint_{f}" for f in self.protocol.fusions), JOINT_PROBE]:
            with self.stage(f"redundancy_{run}"):
                folder = f"step-{self.trained[run].fit.best_step}"
                kind = "probe" if run == JOINT_PROBE else "joint"
                measures.update(judge.judge(self.feature_of_lm(run, folder, kind, run)))
        return measures, redundancy.e2_curve(e2_points(e2, measures))

    def served_agreement(self, served: str, increments: dict[str, np.ndarray]) -> float:
        """E2's CTR run (its feature through Feast, in the form `cascade_form` names) against E0 +
        the same feature in memory: the max absolute difference of their test predictions."""
        increment = increments[feature_key(served, self.trained[E2_RUN].results["config"]["cascade_form"])]
        return float(np.max(np.abs(increment - self.judge.saved_predictions(E2_RUN))))

    # -------------------------------------------------------------------- the paper's claims

    def claims(self, teacher: str) -> list[ClaimRecord]:
        """The paper's claims (`models/claims.py`), each judged in both forms of NLP features."""
        e2 = self.trained[E2_RUN].lm_step
        assert e2 is not None
        depths = (int(k) for k in self.protocol.distill.students)
        return [c.to_dict() for c in claims.protocol_claims(self.judge, e2.chosen, teacher, depths)]

    def controls(self) -> list[Control]:
        """Each learned part beside its simpler control: the joint run against its probe-only
        control on validation log loss, and their LM features added to E0, per form."""
        judge, run = self.judge, "joint_score"
        if run not in self.trained:
            return []
        valid = judge.valid_logloss_delta(run, JOINT_PROBE)
        statement = "the joint run's LM stage lowers validation log loss below its probe-only control's"
        verdict = claims.verdict(valid["delta_valid_logloss_ci"], side=-1)
        out: list[Control] = [
            ProbeControl(**valid, id=claims.LM_STAGE_BEATS_PROBE, statement=statement, verdict=verdict)
        ]
        for form in FORMS:
            delta = judge.paired(feature_key(run, form), feature_key(JOINT_PROBE, form))
            claim = claims.from_delta(
                claims.JOINT_FEATURE_BEATS_PROBE_FEATURE,
                "the joint LM's feature adds more to E0 than the probe-only control's (the frozen LM)",
                delta,
                detail={"joint_feature": run, "probe_feature": JOINT_PROBE},
                form=form,
            )
            out.append(claim.to_dict())
        return out

    def results(self, dataset: str, started: float, analysis: Analysis) -> ExperimentResults:
        """results.json's document: the runs, `analysis`, the protocol and the provenance."""
        assert self.judge.ceiling is not None
        distilled = {}
        if analysis.students is not None:
            distilled = {"distillation": analysis.students[0], "teacher": analysis.students[1]}
        return ExperimentResults(
            dataset=self.manifest["dataset"],
            source=dataset,
            seed=self.seed,
            split=self.manifest["split"]["mode"],
            quick=bool(self.request.quick),
            wall_seconds=round(time.perf_counter() - started, 1),
            timings=self.timings,
            runs=self.runs,
            ceilings=self.judge.ceiling.summary(),
            redundancy=analysis.redundancy,
            e2_curve=analysis.e2_curve,
            **distilled,
            claims=analysis.claims,
            controls=analysis.controls,
            protocol=self.protocol.to_dict(),
            provenance=self.provenance(),
        )

    def provenance(self) -> Provenance:
        """Where the results came from: the data, both encoders, the code and the placement."""
        lm_run = self.trained[f"joint_{self.protocol.fusions[0]}"]
        return {
            "dataset": self.manifest["dataset"],
            "spec_hash": self.manifest.get("spec_hash"),
            "split_mode": self.manifest["split"]["mode"],
            "split_seed": self.manifest["split"]["seed"],
            "frozen_encoder": train_modes.frozen_encoder_version(self.data_dir, self.judge.frame.columns),
            "lm_encoder": lm_run.results["provenance"]["encoder_version"],
            "code_version": self.code_version,
            "torch": torch.__version__,
            "placement": self.placement.to_dict(),
            # Relative to the results folder: a result never names a path outside its tree.
            "data_dir": self.data_dir.relative_to(self.out).as_posix(),
            "runs_dir": self.runs_dir.relative_to(self.out).as_posix(),
            "e2_feast_vs_in_memory_max_abs_diff": self.feast_agreement,
        }


@dataclass(frozen=True)
class Analysis:
    """What the protocol measured after E0-E3, for `Experiment.results`."""

    redundancy: dict[str, RedundancyMeasure]  # every NLP feature, `<feature>/<form>`
    e2_curve: E2Curve
    claims: list[ClaimRecord]
    controls: list[Control]
    students: tuple[dict[str, StudentEntry], TeacherEntry] | None  # E4, when it ran


def e2_points(e2: LmStep, measures: Mapping[str, RedundancyMeasure]) -> list[E2Point]:
    """E2's curve: per checkpoint, its standalone validation AUC and each form's gain over E0."""
    points = []
    for folder, checkpoint in e2.checkpoints.items():
        name = f"cascade_finetuned@{folder}"
        score, vector = (point_form(measures[feature_key(name, form)]) for form in FORMS)
        point = E2Point(
            checkpoint=folder,
            step=checkpoint.step,
            chosen=folder == e2.chosen,
            valid_auc_standalone=checkpoint.valid_auc,
            score=score,
            vector=vector,
        )
        points.append(point)
    return points


def point_form(measured: RedundancyMeasure) -> E2PointForm:
    """One E2 checkpoint's feature in one form, as the curve plots it."""
    return E2PointForm(
        standalone_auc=measured["standalone_auc"],
        delta_auc=measured["delta_auc"],
        delta_rig=measured["delta_rig"],
        valid_delta_auc=measured["valid_delta_auc"],
    )


def run_protocol(
    request: ExperimentRequest, protocol: Protocol, dataset: str, out: Path
) -> ExperimentResults:
    """One dataset: prepare, E0-E3, redundancy, and E4 when the protocol asks for it; every job
    on `request.options`' infrastructure (Beam options, stores)."""
    started = time.perf_counter()
    out = claim_output_dir(out, JOB, create=True)
    exp = Experiment(request, protocol, out)
    exp.prepare(dataset)
    exp.train_runs()
    measures, curve = exp.redundancy()
    distilled = students.distil(exp, measures) if protocol.distill.students else None
    claimed = exp.claims(students.teacher_run(protocol, exp.judge.valid_gain))
    analysis = Analysis(measures, curve, claimed, exp.controls(), distilled)
    results = exp.results(dataset, started, analysis)
    write_results(results, out)
    return results


def write_results(results: ExperimentResults | SweepResults, out: Path) -> list[Path]:
    """results.json (written to a temporary name, then renamed), report.md and the plots."""
    write_json(out / EXPERIMENT_RESULTS, results, default=float)
    return report.write_report(results, out)
