"""NLP features judged against E0 on one shared frame: increments, measures, paired deltas.

An increment is E0 + one NLP feature, trained like E0 (same configuration, seed and rows) on the
frame every analysis shares (cascade-frozen's training frame, a superset of E0's, in
impression_id order). Its validation ΔAUC over E0 is what selects a teacher or a checkpoint, so
the test split only judges. `FeatureJudge` holds E0's side of every comparison, computed once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import pandas as pd
import torch

from nlpctr.errors import UserError
from nlpctr.layout import RunLayout
from nlpctr.models import ceilings, distill, metrics, redundancy
from nlpctr.models.config import Mode, load_config
from nlpctr.models.data import FeatureColumns, Tensors
from nlpctr.models.device import CPU, Placement, device_of
from nlpctr.models.evaluation import EvaluationConfig, MetricReport, PairedDelta, metric_report, paired_delta
from nlpctr.models.nlp_features import FORMS, SCORE, VECTOR, NlpFeature
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import fit_recipe, plan
from nlpctr.models.runs import TrainedRun, build_model
from nlpctr.models.text_batches import FixedVectors
from nlpctr.models.training import FitInputs, fit_ctr


class RunReport(MetricReport):
    """A run's test metrics on the shared frame and its paired delta over E0 (None: E0 itself)."""

    delta_auc_vs_baseline: float | None
    delta_auc_ci: list[float] | None
    delta_rig_vs_baseline: float | None
    delta_rig_ci: list[float] | None
    delta_gauc: float | None
    delta_gauc_ci: list[float] | None
    significant: bool | None
    delta_auc_significant: NotRequired[bool]
    delta_rig_significant: NotRequired[bool]
    delta_gauc_significant: NotRequired[bool]
    share_of_text_gain: NotRequired[dict[str, metrics.Estimate]]


class ValidLoglossDelta(TypedDict):
    """A run against its control on validation log loss (and AUC), paired group bootstrap."""

    run: str
    control: str
    run_valid_logloss: float
    control_valid_logloss: float
    delta_valid_logloss: float
    delta_valid_logloss_ci: list[float]
    delta_valid_auc: float
    delta_valid_auc_ci: list[float]


class RedundancyMeasure(redundancy.FeatureRedundancyRecord):
    """One entry of results.json's `redundancy` (`<feature>/<form>`): the feature's redundancy
    with E0 and its gain over E0 in that form."""

    significant: bool
    share_of_text_gain: dict[str, metrics.Estimate]
    valid_delta_auc: float | None
    feature: str
    form: str
    dim: int  # the width E0 receives
    score_source: str | None  # score form: the LM's own head or a probe's


class Conversion(TypedDict):
    """A student feature's gain over E0 as a share of the teacher feature's (None: nothing to distil)."""

    conversion_auc: float | None
    conversion_auc_ci: list[float] | None
    conversion_rig: float | None
    conversion_rig_ci: list[float] | None
    conversion_note: NotRequired[str]


class FeatureGain(TypedDict):
    """A feature's gain over E0 in one form, as the distillation section shows it."""

    dim: int
    feature_delta_auc: float | None
    feature_delta_auc_ci: list[float] | None
    feature_delta_rig: float | None
    feature_delta_rig_ci: list[float] | None
    score_source: str | None


class StudentReport(TypedDict):
    """A student end to end on the test split, and its delta over E0."""

    method: str
    layers: int
    auc: float
    auc_ci: list[float]
    rig: float
    gauc: float
    logloss: float
    delta_auc: float | None
    delta_auc_ci: list[float] | None
    delta_rig: float | None
    delta_rig_ci: list[float] | None


@dataclass
class FeatureJudge:
    """The shared frame's test split, E0's predictions and representation, and each feature's
    increment (test predictions of E0 + it) and validation gain, as they are fitted."""

    frame: pd.DataFrame
    manifest: dict[str, Any]
    runs_dir: Path
    train_config_file: Path  # the protocol's `train_config`: E0's configuration, as every run's
    seed: int
    redundancy_settings: redundancy.RedundancySettings  # the protocol's `redundancy:`
    e0: TrainedRun
    data: Tensors
    test_rows: torch.Tensor
    train_rows: torch.Tensor
    valid_rows: torch.Tensor
    test_labels: metrics.Labels
    valid_labels: metrics.Labels
    train_ctr: float
    evaluation: EvaluationConfig
    e0_p: np.ndarray  # E0's saved test predictions
    e0_valid_auc: float
    e0_inputs: redundancy.TrainTest[redundancy.Matrix]  # E0's design matrix
    e0_repr: redundancy.TrainTest[np.ndarray]  # E0's last hidden layer
    ceiling: ceilings.Ceiling | None = None  # `measure_ceiling`
    increments: dict[str, np.ndarray] = field(default_factory=dict)  # `<feature>/<form>` -> test p
    valid_gain: dict[str, float] = field(default_factory=dict)  # `<feature>/<form>` -> valid ΔAUC
    dims: dict[str, int] = field(default_factory=dict)  # `<feature>/<form>` -> the width E0 receives
    placement: Placement = CPU  # where E0 and the increments run

    @classmethod
    def load(
        cls,
        frame: pd.DataFrame,
        manifest: dict[str, Any],
        runs_dir: Path,
        baseline_run: str,
        train_config_file: Path,
        seed: int,
        redundancy_settings: redundancy.RedundancySettings,
        placement: Placement = CPU,
    ) -> FeatureJudge:
        """E0 (`runs_dir/baseline_run`) on `frame`, sorted by impression_id."""
        frame = frame.sort_values("impression_id", kind="stable").reset_index(drop=True)
        e0 = TrainedRun.load(runs_dir / baseline_run, placement)
        data = e0.pre.tensorize(frame)
        test_rows, train_rows = data.rows("test"), data.rows("train")
        test_labels = labels_of(data, test_rows)
        e0_p = saved_predictions(runs_dir / baseline_run, data, test_rows)
        valid_rows = data.rows("valid")
        valid_labels = labels_of(data, valid_rows)
        e0_valid_auc = metrics.auc(valid_labels, predict(e0.model, data, valid_rows, None))
        rows = (train_rows, test_rows)  # E0's side of every redundancy probe, once
        return cls(
            frame=frame,
            manifest=manifest,
            runs_dir=runs_dir,
            train_config_file=train_config_file,
            seed=seed,
            redundancy_settings=redundancy_settings,
            e0=e0,
            data=data,
            test_rows=test_rows,
            train_rows=train_rows,
            valid_rows=valid_rows,
            test_labels=test_labels,
            valid_labels=valid_labels,
            train_ctr=float(e0.spec["train_ctr"]),
            evaluation=e0.config.evaluation,
            e0_p=e0_p,
            e0_valid_auc=e0_valid_auc,
            e0_inputs=redundancy.TrainTest(*(redundancy.e0_design_matrix(data, r) for r in rows)),
            e0_repr=redundancy.TrainTest(*(redundancy.e0_representation(e0.model, data, r) for r in rows)),
            placement=placement,
        )

    def measure_ceiling(self) -> None:
        """The test split's ceilings (`models/ceilings.py`): the simulator's oracles when its truth
        file sits beside the source, else the split-half ceiling; shares pair with E0's CIs."""
        test = self.frame.iloc[self.test_rows.numpy()]
        self.ceiling = ceilings.for_split(
            self.manifest, test, self.test_labels, self.e0_p, self.train_ctr, self.evaluation, self.seed
        )

    def share(self, p: np.ndarray) -> dict[str, metrics.Estimate]:
        assert self.ceiling is not None, "measure_ceiling first"
        return self.ceiling.share(p)

    def saved_predictions(self, run: str) -> np.ndarray:
        """A run's saved test predictions, on the shared frame's test rows."""
        return saved_predictions(self.runs_dir / run, self.data, self.test_rows)

    def valid_logloss_delta(self, run: str, control: str) -> ValidLoglossDelta:
        """Validation log loss of run `run` minus its control's (negative: the run is better), with a
        paired group-bootstrap CI: what says whether a learned stage beats its simpler control,
        judged on the split that selects (the test split only judges the features)."""
        run_p, control_p = (
            saved_predictions(self.runs_dir / r, self.data, self.valid_rows) for r in (run, control)
        )
        delta = paired_delta(self.valid_labels, run_p, control_p, self.train_ctr, self.evaluation)
        scale = -metrics.entropy(self.train_ctr)  # log loss = (1 - RIG) * entropy of the train CTR
        low, high = sorted(scale * v for v in delta["delta_rig_ci"])
        return {
            "run": run,
            "control": control,
            "run_valid_logloss": metrics.logloss(self.valid_labels, run_p),
            "control_valid_logloss": metrics.logloss(self.valid_labels, control_p),
            "delta_valid_logloss": scale * delta["delta_rig"],
            "delta_valid_logloss_ci": [low, high],
            "delta_valid_auc": delta["delta_auc"],
            "delta_valid_auc_ci": delta["delta_auc_ci"],
        }

    def e0_report(self) -> RunReport:
        """E0's test metrics; its deltas over itself are None."""
        return RunReport(
            **metric_report(self.test_labels, self.e0_p, self.train_ctr, self.evaluation),
            delta_auc_vs_baseline=None,
            delta_auc_ci=None,
            delta_rig_vs_baseline=None,
            delta_rig_ci=None,
            delta_gauc=None,
            delta_gauc_ci=None,
            significant=None,
        )

    def report_of(self, p: np.ndarray) -> RunReport:
        """Test metrics of predictions `p` and their paired delta over E0's."""
        delta = paired_delta(self.test_labels, p, self.e0_p, self.train_ctr, self.evaluation)
        return RunReport(
            **metric_report(self.test_labels, p, self.train_ctr, self.evaluation),
            delta_auc_vs_baseline=delta["delta_auc"],
            delta_rig_vs_baseline=delta["delta_rig"],
            delta_auc_ci=delta["delta_auc_ci"],
            delta_auc_significant=delta["delta_auc_significant"],
            delta_rig_ci=delta["delta_rig_ci"],
            delta_rig_significant=delta["delta_rig_significant"],
            delta_gauc=delta["delta_gauc"],
            delta_gauc_ci=delta["delta_gauc_ci"],
            delta_gauc_significant=delta["delta_gauc_significant"],
            significant=delta["significant"],
            share_of_text_gain=self.share(p),
        )

    def judge(self, feature: NlpFeature) -> dict[str, RedundancyMeasure]:
        """The feature in both forms, each added to E0 and measured (`<name>/<form>` -> measures);
        a feature without a click head of its own gets a probe's score first."""
        if feature.score is None:
            feature.score, feature.score_source = self.probe_scores(feature), "probe"
        return {
            feature.key(form): self.measure(feature, form, self.fit_increment(feature, form))
            for form in FORMS
        }

    def probe_scores(self, feature: NlpFeature) -> np.ndarray:
        """A click score per row from the feature's vectors: the score fusion on E0's frozen tower,
        its head alone trained on the fixed vectors by the LM recipe's probe stage (the head the
        probe-only control trains), so the score is what the vectors add to E0."""
        config = load_config(Mode.JOINT, self.train_config_file, {"lm_loop": {"seed": self.seed}})
        recipe = replace(config.recipe, lm_stage=False)
        if not recipe.probe.epochs:
            raise UserError("scoring a feature needs a probe: give recipe.probe.epochs > 0")
        table = torch.zeros((len(self.data.texts), feature.vector.shape[1]))
        table[self.data.text_index] = torch.as_tensor(feature.vector, dtype=torch.float32)
        model = build_model(self.e0.pre, config, "score", table.shape[1])
        model.warm_start(self.e0.model)
        lm_loop = replace(config.lm_loop, early_stop="logloss")
        stages = plan(lm_loop, recipe, warm_started=True, has_tower=True, tower_lr=0.0)
        folder = self.runs_dir / "_probes" / feature.name
        shutil.rmtree(folder, ignore_errors=True)  # never resume another feature's probe
        fit_recipe(model, self.data, stages, folder, FixedVectors(table), progress=False)
        assert model.fusion is not None
        model.fusion.eval()
        with torch.inference_mode():
            scores = model.fusion.score(table.to(device_of(model))).squeeze(-1).cpu()
        return scores[self.data.text_index].numpy().astype(np.float32)

    def fit_increment(self, feature: NlpFeature, form: str) -> np.ndarray:
        """Test predictions of E0 + the feature in `form`, trained like E0 (same config, seed and rows)."""
        frame = self.frame.copy()
        cascade, scores = [], []
        if form == VECTOR:
            frame["nlp_feature__vector"] = list(feature.vector)
            cascade.append("nlp_feature__vector")
        else:
            frame["nlp_feature__score"] = feature.form(SCORE)
            scores.append("nlp_feature__score")
        columns = FeatureColumns.for_manifest(self.manifest, cascade=cascade, scores=scores)
        config = load_config(Mode.BASELINE, self.train_config_file, {"loop": {"seed": self.seed}})
        key = feature.key(form)
        checkpoints = self.runs_dir / "_increments" / key.replace("/", "__")
        shutil.rmtree(checkpoints, ignore_errors=True)  # never resume another feature's weights
        inputs = FitInputs(
            self.manifest, config, self.e0.pre.fill_ctr, progress=False, placement=self.placement
        )
        _, data, model, _, _ = fit_ctr(frame, columns, inputs, checkpoints)
        valid = data.rows("valid")
        assert torch.equal(valid, self.valid_rows)  # the same frame, so the same rows
        self.valid_gain[key] = (
            metrics.auc(self.valid_labels, predict(model, data, valid, None)) - self.e0_valid_auc
        )
        return predict(model, data, data.rows("test"), None)

    def measure(self, feature: NlpFeature, form: str, increment: np.ndarray) -> RedundancyMeasure:
        """Standalone AUC, incremental gain (E0 + feature vs E0), explained fraction and CKA of
        the feature in `form`; `dim` is the width E0 receives."""
        values = feature.form(form)
        delta = paired_delta(self.test_labels, increment, self.e0_p, self.train_ctr, self.evaluation)
        record = redundancy.measure_feature(
            feature.kind,
            redundancy.TrainTest(values[self.train_rows.numpy()], values[self.test_rows.numpy()]),
            redundancy.TrainTest(labels_of(self.data, self.train_rows), self.test_labels),
            self.e0_inputs,
            self.e0_repr,
            delta,
            max_rows=int(self.redundancy_settings.max_rows),
            max_components=int(self.redundancy_settings.max_components),
            seed=self.seed,
        )
        key = feature.key(form)
        measured = RedundancyMeasure(
            **record.to_dict(),
            significant=delta["significant"],
            share_of_text_gain=self.share(increment),
            valid_delta_auc=self.valid_gain.get(key),
            feature=feature.name,
            form=form,
            dim=int(values.shape[1]) if values.ndim == 2 else 1,
            score_source=feature.score_source if form == SCORE else None,
        )
        self.increments[key] = increment
        self.dims[key] = measured["dim"]
        return measured

    def paired(self, feature: str, other: str) -> PairedDelta:
        """Paired test delta between E0 + `feature` and E0 + `other` (group bootstrap)."""
        return paired_delta(
            self.test_labels,
            self.increments[feature],
            self.increments[other],
            self.train_ctr,
            self.evaluation,
        )

    def conversion(self, student: str, teacher: str) -> Conversion:
        """The student feature's gain over E0 as a share of the teacher feature's, paired CIs."""
        rounds, seed = self.evaluation.bootstrap_rounds, self.evaluation.bootstrap_seed
        rates = distill.conversion(
            self.test_labels,
            self.increments[student],
            self.increments[teacher],
            self.e0_p,
            self.train_ctr,
            rounds,
            seed,
        )
        return {
            "conversion_auc": rates["auc"]["estimate"],
            "conversion_auc_ci": rates["auc"]["ci"],
            "conversion_rig": rates["rig"]["estimate"],
            "conversion_rig_ci": rates["rig"]["ci"],
        }

    def student_entry(self, method: str, layers: int, p: np.ndarray) -> StudentReport:
        """A student end to end (`p`; for feature-KD that is E0 + its vector)."""
        entry = self.report_of(p)
        return {
            "method": method,
            "layers": layers,
            "auc": entry["auc"],
            "auc_ci": entry["auc_ci"],
            "rig": entry["rig"],
            "gauc": entry["gauc"],
            "logloss": entry["logloss"],
            "delta_auc": entry["delta_auc_vs_baseline"],
            "delta_auc_ci": entry["delta_auc_ci"],
            "delta_rig": entry["delta_rig_vs_baseline"],
            "delta_rig_ci": entry["delta_rig_ci"],
        }

    @staticmethod
    def feature_entry(measured: RedundancyMeasure) -> FeatureGain:
        """A feature's gain over E0 in one form, as the distillation section shows it."""
        return {
            "dim": measured["dim"],
            "feature_delta_auc": measured["delta_auc"],
            "feature_delta_auc_ci": measured["delta_auc_ci"],
            "feature_delta_rig": measured["delta_rig"],
            "feature_delta_rig_ci": measured["delta_rig_ci"],
            "score_source": measured.get("score_source"),
        }


def saved_predictions(run_dir: Path, data: Tensors, rows: torch.Tensor) -> np.ndarray:
    """A run's saved predictions (`predictions.parquet`: its test and validation rows) on `rows`
    of `data`, matched by impression_id."""
    saved = pd.read_parquet(RunLayout(run_dir).predictions).set_index("impression_id")
    p = saved["p"].reindex(data.impression_id[rows.numpy()]).to_numpy()
    if np.isnan(p).any():
        raise RuntimeError(f"run {run_dir.name} did not predict every row asked for")
    return p
